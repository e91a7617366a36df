"""The simulated-swarm experiments (experiments/reputation, experiments/scale) run in --quick mode and their outputs
make sense: a strong attacker is blacklisted, no honest peer is, slander by fresh Sybils fails, every micro-batch
is accounted for."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_quick(name: str, out_dir: str, timeout: float = 1200) -> str:
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", name, "run.py"), "--quick", "--out-dir", out_dir],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for produced in ("results.csv", "results.md", "results.png", "summary.json"):
        assert os.path.getsize(os.path.join(out_dir, produced)) > 0, produced
    return result.stdout


@pytest.mark.timeout(1500)  # a simulated swarm of real model compute: minutes on a loaded 2-core machine
def test_reputation_quick(tmp_path):
    out = run_quick("reputation", str(tmp_path))
    summary = json.load(open(tmp_path / "summary.json"))
    attacks = summary["attacks"]
    assert attacks and all(not row["honest_blacklisted"] for row in attacks), attacks
    # the hard-check attack (all zeros) is caught every time it is checked and its sender is blacklisted
    zero = [row for row in attacks if row["attack"] == "zero"]
    assert zero and all(row["detection_rate"] == 1.0 for row in zero if row["tampered_checked"])
    assert any(row["blacklisted"] and row["mb_to_blacklist"] > 0 for row in zero), zero
    for row in attacks:
        assert row["completed"] + row["dropped"] == row["microbatches"]
    slander = {(row["variant"], row["sybils"]): row for row in summary["slander"]}
    for n in (0, 20, 100):  # fresh Sybils and aged ones without vouched work weigh nothing
        assert not slander[("fresh", n)]["blacklisted"] and slander[("fresh", n)]["final_score"] > 0.5
        assert not slander[("aged", n)]["blacklisted"]
    liar = slander[("trusted_liar", 0)]
    assert (
        not liar["blacklisted"] and liar["final_score"] < 1.0
    )  # one trusted accuser lowers a score, never bans
    assert not summary["check"]["blacklisted"]
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(attacks) + len(summary["slander"])
    assert "slander" in out


@pytest.mark.timeout(1500)  # a simulated swarm of real model compute: minutes on a loaded 2-core machine
def test_scale_quick(tmp_path):
    run_quick("scale", str(tmp_path))
    runs = json.load(open(tmp_path / "summary.json"))["runs"]
    assert len(runs) == 2
    for row in runs:
        assert row["completed"] + row["dropped"] == row["microbatches"]  # every micro-batch ends exactly once
        assert row["byzantine"] >= 2 and row["tampered_checked"] > 0 and row["honest_checked"] > 100
        assert row["round_ms"] > 0 and row["aggregate_ms"] > 0
    for row in runs:  # no honest peer blacklisted, few honest tensors rejected (measured: 0% at both sizes)
        assert row["false_positive_rate"] < 0.02 and not row["honest_blacklisted"], row


def test_audits_quick_row():
    """One row of experiments/audits: a middle-stage attacker flipping its gradients' sign in a 3 x 3 swarm with
    recomputation audits is proven wrong and blacklisted by proof, no honest peer is, every micro-batch is done."""
    sys.path.insert(0, ROOT)
    from experiments.audits.run import sweep_row

    row = sweep_row(
        dict(
            kind="sweep",
            attack="signflip",
            stage=1,
            direction="backward",
            position="middle",
            collude=False,
            microbatches=40,
            stages=3,
            replicas=3,
            pretrain=0,
        )
    )
    attacker = row["attackers"]["s1r1"]
    assert attacker["tampered"] > 0 and attacker["mb_to_blacklist"] is not None, row
    assert attacker["mb_to_blacklist"] <= 50 and attacker["reason"].startswith("proof"), row
    assert row["honest_blacklisted"] == [] and row["completed"] + row["dropped"] == 40, row
    assert row["evidence"]["proven"] >= 1 and row["evidence"].get("false_alarms", 0) >= 0, row
