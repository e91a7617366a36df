"""Integration: averaging attacks in a live swarm (real processes on 127.0.0.1), 2 stages x 3 replicas.

Each run puts one Byzantine replica in each stage (one of three: within what CenteredClip tolerates) and starts a
late joiner while the attacks go on. The in-process tests (tests/test_averaging.py) cover each attack alone; here the
whole path runs: hivemind matchmaking, the signed all-reduce, re-checks, strikes in the stage servers' ledgers,
reports, the swarm-wide blacklist, and state downloads checked against the other replicas."""

from __future__ import annotations

import json
import os
import re
import time

import pytest
from test_local_swarm import SHAPE, peer_infos, train

from peers.local import LocalSwarm

pytestmark = [pytest.mark.slow, pytest.mark.long]  # minutes each: the second test stage

REPUTATION = ["--probation-s", "5", "--probation-work", "10", "--report-period", "2"]
STAGE = [
    "--sentinel-warmup",
    "8",
    "--matchmaking-time",
    "3",
]  # 3 s to form a group on a loaded 2-core machine


def _run(tmp_path, run_id: str, attacks, steps: int, joiner_stage: int, joiner_after_steps: int):
    """Honest peers 2 + 2, one attacker per stage (``attacks[stage]``), a trainer, and a late joiner of
    ``joiner_stage`` started once the trainer logged ``joiner_after_steps`` steps. Returns (summary, peers summary,
    attacker ids by stage, joiner child, infos of every stage peer read after training)."""
    swarm = LocalSwarm(str(tmp_path / "swarm"), run_id=run_id)
    try:
        swarm.start_dht(SHAPE + REPUTATION)
        children = [swarm.start_stage(s, wait=False, extra=STAGE) for s in (0, 0, 1, 1)]
        attackers = {}
        for stage, attack in attacks.items():
            child = swarm.start_stage(stage, name=f"stage{stage}.byzantine", wait=False, extra=STAGE + attack)
            children.append(child)
            attackers[stage] = child
        for child in children:
            child.wait_event("serve", 180)
        trainer, metrics, summary_path = train(swarm, tmp_path, steps=steps)
        deadline = time.monotonic() + 400
        while not (os.path.exists(metrics) and len(open(metrics).read().splitlines()) >= joiner_after_steps):
            assert time.monotonic() < deadline and trainer.proc.poll() is None, "trainer made no progress"
            time.sleep(0.5)
        joiner = swarm.start_stage(joiner_stage, name=f"stage{joiner_stage}.late", wait=False, extra=STAGE)
        joiner.wait_event("serve", 180)
        assert trainer.proc.wait(timeout=600) == 0, open(trainer.log_path).read()[-3000:]
        # the joiner catches up with its stage after the last step: a replica one step behind waits a whole averaging
        # round (matchmaking + averaging timeout, 18 s here) before it downloads (StageOptimizer.should_catch_up)
        ids = [c.info["peer_id"] for c in children + [joiner]]
        deadline = time.monotonic() + 90
        while True:
            infos = peer_infos(swarm, ids)
            if (
                _level(infos, joiner.info["peer_id"], joiner_stage, attackers_ids(attackers))
                or time.monotonic() > deadline
            ):
                break
            time.sleep(5)
    finally:
        swarm.stop()
    summary = json.load(open(summary_path))
    return summary, swarm.peers_summary(), {s: c.info["peer_id"] for s, c in attackers.items()}, joiner, infos


def _check_common(summary, attackers, steps: int):
    views = {p["peer_id"]: p for p in summary["peers"] if p.get("role") == "stage"}
    honest = [v for pid, v in views.items() if pid not in attackers.values()]
    assert not any(v["blacklisted"] for v in honest), honest  # no honest peer blacklisted
    mb = summary["microbatches"]
    assert mb["completed"] + mb["dropped"] == steps * 4, mb  # every micro-batch accounted for exactly once
    assert summary["loss_last"] < summary["loss_first"] - 1.0, summary  # training went on
    return views


def attackers_ids(attackers) -> set:
    return {c.info["peer_id"] for c in attackers.values()}


def _level(infos, joiner_id: str, stage: int, attacker_ids) -> bool:
    """Whether the joiner holds an honest replica's weights: within one optimizer step of one and its parameter
    checksum within 5% (replicas a step apart, or that missed an averaging round on a loaded machine, differ by
    less; the x5 poisoned state is 400% off). Exact equality held in single runs but not with two swarms sharing
    the 2 cores."""
    joiner = infos[joiner_id]
    honest = [
        i for pid, i in infos.items() if i["stage"] == stage and pid not in attacker_ids and pid != joiner_id
    ]
    return any(
        abs(i["epoch"] - joiner["epoch"]) <= 1
        and i["param_checksum"] == pytest.approx(joiner["param_checksum"], rel=0.05)
        for i in honest
    )


def _same_weights(infos, joiner_id: str, stage: int, attackers) -> None:
    """The late joiner ends with the honest replicas' weights (same epoch and parameter checksum as one of them)."""
    honest = {pid: (i["epoch"], i["param_checksum"]) for pid, i in infos.items() if i["stage"] == stage}
    assert _level(infos, joiner_id, stage, set(attackers.values())), (joiner_id, honest)


@pytest.mark.timeout(900)
def test_lying_aggregator_and_scaled_contribution_are_blacklisted(tmp_path):
    """Stage 0's attacker returns -5x the aggregate of its slice to everyone; stage 1's hands the all-reduce -20x its
    gradient. Re-checks prove the first wrong (its signed inputs do not reproduce what it returned): blacklisted
    swarm-wide for ``aggregate``. CenteredClip clips the second and its aggregators report it (``averaging``
    strikes; blacklisted in 2 of 3 runs). No honest peer is blacklisted, and a stage-1 joiner started during the
    attacks ends with the honest replicas' weights."""
    steps = 20
    summary, peers, attackers, joiner, infos = _run(
        tmp_path,
        "itest-avg1",
        {0: ["--attack", "avg-aggregate"], 1: ["--attack", "avg-scale"]},
        steps,
        joiner_stage=1,
        joiner_after_steps=6,
    )
    views = _check_common(summary, attackers, steps)
    liar = views[attackers[0]]  # a proven lie: blacklisted in every run seen (3 of 3)
    assert liar["blacklisted"] and re.search(r": aggregate \(", liar["blacklist_reason"] or ""), liar
    # the scaled contribution is reported by the replicas that aggregate it; its swarm-wide verdict needs 3 strikes
    # from each of 2 of them, which took the whole run on a machine running two swarms (2 of 3 runs blacklisted it)
    scaler = views[attackers[1]]
    strikes = {p["peer_id"]: p["strikes"] for p in peers if p["role"] == "stage"}
    assert (
        scaler["blacklisted"] and re.search(r": averaging \(", scaler["blacklist_reason"] or "")
    ) or strikes[attackers[1]] >= 3, (scaler, strikes)
    _same_weights(infos, joiner.info["peer_id"], 1, attackers)


@pytest.mark.timeout(900)
def test_poisoned_state_refused_and_fake_progress_ignored(tmp_path):
    """Stage 1's attacker serves joiners its parameters x5; stage 0's claims, in its progress records, to be 1000
    epochs ahead. The stage-1 joiner checks what it downloads against the other replicas (a sketch under its own
    seed): it never applies the poisoned state and ends with the honest replicas' weights; stage 0's honest replicas
    do not believe the lone claim (no reloads of their state), and training goes on."""
    steps = 16
    summary, peers, attackers, joiner, infos = _run(
        tmp_path,
        "itest-avg2",
        {0: ["--attack", "avg-progress"], 1: ["--attack", "avg-state"]},
        steps,
        joiner_stage=1,
        joiner_after_steps=5,
    )
    _check_common(summary, attackers, steps)
    _same_weights(infos, joiner.info["peer_id"], 1, attackers)
    log = open(joiner.log_path).read()
    refused = re.findall(r"refused the state served by (\w+):", log)
    assert set(refused) <= {attackers[1]}, refused  # only ever the attacker's state is refused
    stage0_logs = [open(p.log_path).read() for p in joiner_siblings(tmp_path, 0)]
    # believed, the lie made honest replicas think they were ~1,000 steps behind and reload (13 times in 24 steps);
    # an honest replica that missed a round is 1-2 steps behind and may reload for that (seen: 3 times in 16 steps
    # on a loaded machine), which is not the lie's doing
    behind = [
        int(n)
        for text in stage0_logs
        for n in re.findall(r"(\d+) optimizer step\(s\) behind the other replicas, loading their state", text)
    ]
    assert all(n <= 2 for n in behind), behind


def joiner_siblings(tmp_path, stage: int):
    """The honest stage peers' log files of ``stage`` in a finished run (LocalSwarm names them stage{S}.{i}.log)."""

    class _Log:
        def __init__(self, path):
            self.log_path = path

    folder = tmp_path / "swarm"
    return [
        _Log(folder / name)
        for name in sorted(os.listdir(folder))
        if re.fullmatch(rf"stage{stage}\.\d+\.log", name)
    ]
