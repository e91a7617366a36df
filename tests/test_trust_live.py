"""Integration: an outsider attacks a live swarm's trust boundary from its own process (experiments/trust/attacker.py):
forged config, a stage record naming an honest peer, fresh-identity blacklists, a forged and a rewritten header, a
replay, oversized and too many label deposits, a stream that never finishes, 2,000 junk requests. Every attack is
refused, the honest peers keep serving (a trainer completes every micro-batch afterwards), nobody honest is
blacklisted, and the peers' memory stays bounded."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_local_swarm import SHAPE, train

from peers.local import LocalSwarm

pytestmark = [pytest.mark.slow, pytest.mark.long]  # minutes each: the second test stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPUTATION = ["--probation-s", "5", "--probation-work", "10", "--report-period", "2"]
RSS_BOUND_MIB = 300  # growth of a stage peer's resident memory over the whole attack


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


@pytest.mark.timeout(900)
def test_an_outsider_cannot_cross_the_trust_boundary(tmp_path):
    swarm = LocalSwarm(str(tmp_path / "swarm"), run_id="trust")
    try:
        swarm.start_dht(SHAPE + REPUTATION)
        first, last = swarm.start_stage(0, wait=False), swarm.start_stage(1, wait=False)
        for child in (first, last):
            child.wait_event("serve", 180)
        honest, last_id = first.info["peer_id"], last.info["peer_id"]
        before = {c.name: rss_mib(c.proc.pid) for c in (first, last)}
        attacker = subprocess.run(
            [
                sys.executable,
                os.path.join(ROOT, "experiments", "trust", "attacker.py"),
                "--initial-peers",
                swarm.initial_peers[0],
                "--run-id",
                "trust",
                "--honest",
                honest,
                "--last",
                last_id,
            ],
            capture_output=True,
            text=True,
            timeout=600,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
        lines = [json.loads(line) for line in attacker.stdout.splitlines() if line.startswith("{")]
        results = {r["attack"]: r for r in lines}
        (tmp_path / "attacks.json").write_text(json.dumps(results, indent=1))  # for the record
        assert "done" in results, attacker.stderr[-3000:]
        after = {c.name: rss_mib(c.proc.pid) for c in (first, last)}
        for attack, result in results.items():
            if attack not in ("done", "blacklists"):
                assert result["refused"] is True, json.dumps(result)[:1500]
        assert results["stalled"]["served_meanwhile"] and results["stalled"]["info_s"] < 10, results[
            "stalled"
        ]
        # junk: none accepted; nearly all answered with a refusal (a few streams may fail on the wire, unanswered)
        assert results["junk"]["answered"] >= 0.95 * results["junk"]["sent"], results["junk"]
        for name in before:
            assert after[name] - before[name] < RSS_BOUND_MIB, (before, after)
        # the honest peers still serve: a trainer completes every micro-batch, and nobody honest is blacklisted (the
        # three fresh identities' blacklists weigh nothing)
        trainer, _, summary_path = train(swarm, tmp_path, steps=3)
        assert trainer.proc.wait(timeout=300) == 0, open(trainer.log_path).read()[-3000:]
        summary = json.load(open(summary_path))
        assert summary["microbatches"]["dropped"] == 0 and summary["microbatches"]["completed"] > 0, summary
        views = {p["peer_id"]: p for p in summary["peers"] if p.get("role") == "stage"}
        assert not any(v.get("blacklisted") for v in views.values()), views
    finally:
        swarm.stop()
