"""Integration: real peer processes (bootstrap, stage peers, trainer) on 127.0.0.1, always stopped afterwards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from peers.local import LocalSwarm
from swarm.network import create_dht, fetch_stage_peers

pytestmark = pytest.mark.slow

SHAPE = [
    "--stages",
    "2",
    "--seq-len",
    "64",
    "--microbatch-size",
    "8",
    "--target-batch-size",
    "32",
    "--lr",
    "3e-3",
]


@pytest.fixture
def local_swarm(tmp_path):
    swarm = LocalSwarm(str(tmp_path / "swarm"), run_id="itest")
    try:
        yield swarm
    finally:
        swarm.stop()
        for child in swarm.children:
            assert child.proc.poll() is not None, f"{child.name} still running"


def start(swarm: LocalSwarm, stages) -> list:
    swarm.start_dht(SHAPE)
    children = [swarm.start_stage(stage, wait=False) for stage in stages]
    for child in children:
        child.wait_event("serve", 120)
    return children


def train(swarm: LocalSwarm, tmp_path, steps: int, extra=()):
    metrics, summary = str(tmp_path / "metrics.jsonl"), str(tmp_path / "summary.json")
    trainer = swarm.start_trainer(
        ["--steps", str(steps), "--metrics-out", metrics, "--summary-json", summary, *extra]
    )
    return trainer, metrics, summary


def peer_infos(swarm: LocalSwarm, peers) -> dict:
    return swarm.peer_infos(peers)


def test_two_stages_two_replicas_loss_falls(local_swarm, tmp_path):
    stage_peers = start(local_swarm, [0, 0, 1, 1])
    # every stage peer runs its chain RPCs, DHT calls and averaging on uvloop's event loop, and trains on it below
    assert all(c.info["event_loop"] == "uvloop.Loop" for c in stage_peers), [c.info for c in stage_peers]
    # lean peers: the DHT node and both averagers are threads of the peer; its one child process is its p2p daemon
    for child in stage_peers:
        kids = subprocess.run(
            ["ps", "--ppid", str(child.proc.pid), "-o", "comm="], capture_output=True, text=True
        ).stdout.split()
        assert kids == ["p2pd"], kids
    trainer, metrics, summary_path = train(local_swarm, tmp_path, steps=10)
    assert trainer.proc.wait(timeout=400) == 0, open(trainer.log_path).read()[-3000:]
    summary = json.load(open(summary_path))
    rows = [json.loads(line) for line in open(metrics)]
    assert [r["step"] for r in rows] == list(range(10))
    assert all({"step", "loss", "tokens", "elapsed_s"} <= set(r) for r in rows)
    # every micro-batch completes; a rare transport hiccup may cost a retry, never a loss
    assert summary["microbatches"]["completed"] == 40 and summary["microbatches"]["dropped"] == 0
    assert summary["loss_last"] < summary["loss_first"] - 0.5, summary
    stage_entries = [p for p in summary["peers"] if p["role"] == "stage"]
    assert len(stage_entries) == 4 and all(p["succeeded"] > 0 for p in stage_entries), stage_entries

    # replicas of a stage end level: hivemind.Optimizer lets them be an epoch apart while they work, and one that
    # the router stopped picking (or that missed an averaging round) would stay behind until its next micro-batch;
    # StageServer's resync loop downloads the state within a round's time without work (seen in CI: epochs 8 and 6)
    ids = [c.info["peer_id"] for c in stage_peers]
    deadline = time.monotonic() + 60
    while True:
        infos = peer_infos(local_swarm, ids)
        pairs = [[infos[c.info["peer_id"]] for c in stage_peers if c.stage == stage] for stage in (0, 1)]
        if all(a["epoch"] == b["epoch"] for a, b in pairs) or time.monotonic() > deadline:
            break
        time.sleep(2)
    # activations and gradients travelled on the data plane (direct TLS between neighbours), not over P2P
    assert summary["dataplane"]["requests"] > 0 and summary["dataplane"]["fallbacks"] == 0, summary[
        "dataplane"
    ]
    assert all(a["dataplane"]["server"]["requests"] > 0 for a in pairs[0]), [a["dataplane"] for a in pairs[0]]
    assert sum(a["dataplane"]["client"]["requests"] for a in pairs[0]) > 0, [a["dataplane"] for a in pairs[0]]
    assert sum(b["dataplane"]["server"]["requests"] for b in pairs[1]) > 0, [b["dataplane"] for b in pairs[1]]
    for a, b in pairs:
        assert a["epoch"] == b["epoch"] >= 1, (a["epoch"], b["epoch"])
        # under load an all-reduce can time out for a part (hivemind then keeps the local values of that part:
        # measured 1.5e-4 apart once, with other jobs running)
        assert a["param_checksum"] == pytest.approx(b["param_checksum"], rel=1e-3)

    # a clean leave announces the peer offline
    leaving = stage_peers[0]
    leaving.proc.send_signal(signal.SIGTERM)
    assert leaving.proc.wait(timeout=60) == 0
    dht = create_dht(local_swarm.run_id, local_swarm.initial_peers, client_mode=True)
    try:
        records = {p.peer_id: p.record.state for p in fetch_stage_peers(dht, local_swarm.run_id, 2)[0]}
    finally:
        dht.shutdown()
    assert records[leaving.info["peer_id"]] == "offline"


@pytest.mark.long
def test_replica_killed_mid_run_training_completes(local_swarm, tmp_path):
    stage_peers = start(local_swarm, [0, 0, 1, 1])
    trainer, metrics, summary_path = train(local_swarm, tmp_path, steps=10, extra=["--max-inflight", "6"])
    deadline = time.monotonic() + 300
    while not (os.path.exists(metrics) and len(open(metrics).read().splitlines()) >= 2):
        assert time.monotonic() < deadline and trainer.proc.poll() is None, "trainer made no progress"
        time.sleep(0.2)
    victim = next(c for c in stage_peers if c.stage == 1)
    local_swarm.kill(victim, signal.SIGKILL)
    assert trainer.proc.wait(timeout=400) == 0, open(trainer.log_path).read()[-3000:]
    summary = json.load(open(summary_path))
    mb = summary["microbatches"]
    assert mb["completed"] + mb["dropped"] == 40  # every micro-batch ended exactly once
    assert mb["dropped"] == 0, summary["drop_reasons"]
    assert mb["retried"] >= 1, "the killed peer's in-flight micro-batches must have been retried"
    victim_view = next(p for p in summary["peers"] if p["peer_id"] == victim.info["peer_id"])
    assert victim_view["failed"] >= 1
    assert summary["loss_last"] < summary["loss_first"]


def test_late_joiner_loads_stage_state(local_swarm, tmp_path):
    stage_peers = start(local_swarm, [0, 1])
    trainer, _, _ = train(local_swarm, tmp_path, steps=4)
    assert trainer.proc.wait(timeout=300) == 0, open(trainer.log_path).read()[-3000:]
    late = local_swarm.start_stage(0, name="stage0.late")
    infos = peer_infos(local_swarm, [stage_peers[0].info["peer_id"], late.info["peer_id"]])
    old, new = infos[stage_peers[0].info["peer_id"]], infos[late.info["peer_id"]]
    assert old["epoch"] >= 3
    assert new["epoch"] == old["epoch"]
    assert new["param_checksum"] == pytest.approx(old["param_checksum"], rel=1e-6)


def _byzantine_run(tmp_path, name: str, attack_args) -> tuple:
    os.makedirs(tmp_path / name, exist_ok=True)
    swarm = LocalSwarm(str(tmp_path / name / "swarm"), run_id=f"itest-{name}")
    try:
        swarm.start_dht(SHAPE)
        sentinel = ["--sentinel-warmup", "8"]
        stages = [
            swarm.start_stage(0, wait=False, extra=sentinel),
            swarm.start_stage(1, wait=False, extra=sentinel),
            swarm.start_stage(1, wait=False, extra=sentinel),
            swarm.start_stage(0, wait=False, extra=sentinel + list(attack_args)),
        ]
        for child in stages:
            child.wait_event("serve", 120)
        trainer, _, summary_path = train(swarm, tmp_path / name, steps=16)
        assert trainer.proc.wait(timeout=400) == 0, open(trainer.log_path).read()[-3000:]
    finally:
        swarm.stop()
    return json.load(open(summary_path)), swarm.peers_summary()


@pytest.mark.long
def test_byzantine_peer_rejected_and_training_unharmed(tmp_path):
    """One of two stage-0 replicas scales its activations x10 from step 11 on (after the sentinel's 10 warm-up
    steps): every tampered tensor is rejected
    by the stage-1 receivers, its micro-batches are retried elsewhere, and the loss stays near a clean run's."""
    clean, _ = _byzantine_run(tmp_path, "clean", [])
    attacked, peers = _byzantine_run(
        tmp_path, "attacked", ["--attack", "scale", "--attack-magnitude", "10", "--attack-start-step", "11"]
    )
    byzantine = [p for p in peers if p.get("byzantine")]
    honest = [p for p in peers if p["role"] == "stage" and not p.get("byzantine")]
    assert len(byzantine) == 1 and byzantine[0]["stage"] == 0
    assert byzantine[0]["tampered"] > 0
    # no fewer rejections than tampered tensors (counts cannot tell which tensors were refused; the loss check below
    # shows none that got through did harm); a rejection or two more can be of its honest tensors before the attack (seen in CI: 13 for 12, the attacker's replica an epoch behind while
    # the residual stream of a model trained from scratch grows fast), as the honest peers may have
    assert 0 <= byzantine[0]["flagged"] - byzantine[0]["tampered"] <= 2, byzantine
    # honest peers' tensors: a few rejections of ~64 (training drift; CI once saw 3, a loaded local machine 3 runs of 3
    # passed with at most 2), never enough to matter
    assert sum(p["flagged"] for p in honest) <= 3, honest
    mb = attacked["microbatches"]
    assert (
        mb["completed"] + mb["dropped"] == 64
        and mb["dropped"] == 0
        and mb["retried"] >= byzantine[0]["tampered"]
    )
    assert abs(attacked["loss_last"] - clean["loss_last"]) < 0.1 * clean["loss_last"], (attacked, clean)


REPUTATION = ["--probation-s", "5", "--probation-work", "10", "--report-period", "2"]


def _blacklist_run(
    tmp_path,
    run_id: str,
    stages,
    attacker_stage: int,
    attack,
    steps: int,
    trainer_extra=(),
    shape=SHAPE,
    extra=(),
) -> tuple:
    """One live swarm with reputation on: honest peers of ``stages`` plus one attacker at ``attacker_stage`` with
    ``attack`` flags: (trainer summary, swarm local's peers summary, attacker id, micro-batches)."""
    os.makedirs(tmp_path, exist_ok=True)
    swarm = LocalSwarm(str(tmp_path / "swarm"), run_id=run_id)
    per_step = 4  # 32 / 8: micro-batches per optimizer step
    try:
        swarm.start_dht(list(shape) + REPUTATION)
        # 3 s to form an averaging group: with 1 s, on this 2-core machine running 8 processes, most peers missed
        # a round every other step (9-21 "could not find a group" per peer in 26 steps), and replicas that step
        # alone really diverge, which SENTINEL then sees
        sentinel = ["--sentinel-warmup", "8", "--matchmaking-time", "3", *extra]
        children = [swarm.start_stage(s, wait=False, extra=sentinel) for s in stages]
        children.append(
            swarm.start_stage(
                attacker_stage,
                name=f"stage{attacker_stage}.byzantine",
                wait=False,
                extra=sentinel + list(attack),
            )
        )
        for child in children:
            child.wait_event("serve", 180)
        trainer, _, summary_path = train(swarm, tmp_path, steps=steps, extra=trainer_extra)
        assert trainer.proc.wait(timeout=600) == 0, open(trainer.log_path).read()[-3000:]
    finally:
        swarm.stop()
    return (
        json.load(open(summary_path)),
        swarm.peers_summary(),
        children[-1].info["peer_id"],
        steps * per_step,
    )


def _verdict_misses(
    summary, peers, attacker_id: str, microbatches: int, honest_count: int, attack_start_mb: int = 0
) -> list:
    """Assert the safety of one blacklisting run (no honest peer blacklisted, every micro-batch accounted for exactly
    once, a blacklisted attacker no longer picked) and return what was late or noisy in it (empty: nothing).
    ``attack_start_mb``: the micro-batch the attack starts at; the verdict's delay counts from there at the earliest
    (an honest false alarm on the attacker-to-be before its attack starts is not its first tampered tensor)."""
    views = {p["peer_id"]: p for p in summary["peers"] if p.get("role") == "stage"}
    attacker = views[attacker_id]
    honest = [v for pid, v in views.items() if pid != attacker_id]
    assert len(honest) == honest_count and not any(
        v["blacklisted"] or v["blacklist_reason"] for v in honest
    ), honest
    mb = summary["microbatches"]
    assert mb["completed"] + mb["dropped"] == microbatches, mb
    if attacker["blacklisted"]:  # the swarm-wide verdict read back from the DHT
        assert attacker["chosen_after_blacklisted"] <= 1, attacker  # at most a pick already under way
        assert attacker["reputation"] < 0.5, attacker
    # timing and noise. The 50 micro-batches count from the first of its tensors a receiver rejected (the attacker
    # sends its first tampered tensor when the router next picks it after the attack starts).
    # Honest rejections happen: replicas that miss an averaging round really differ, and after the attacker's
    # verdict the two honest peers of its stage drift alike (no evidence, but refused until the baseline follows)
    honest_peers = [p for p in peers if p["role"] == "stage" and not p.get("byzantine")]
    strikes, flagged = sum(p["strikes"] for p in honest_peers), sum(p["flagged"] for p in honest_peers)
    late = []
    if not attacker["blacklisted"]:
        late.append("attacker not blacklisted")
    elif (
        attacker["blacklisted_after_microbatches"]
        - max(attacker["first_rejected_after_microbatches"], attack_start_mb)
        > 50
    ):
        late.append(
            f"blacklisted at {attacker['blacklisted_after_microbatches']}, first rejected at "
            f"{attacker['first_rejected_after_microbatches']}, attack from {attack_start_mb}"
        )
    if mb["dropped"] > 2:
        late.append(f"{mb['dropped']} dropped")
    if strikes > 10 or flagged > 0.2 * microbatches:
        late.append(f"honest peers: {strikes} strikes, {flagged} rejections")
    return late


@pytest.mark.long
@pytest.mark.timeout(1800)  # up to three runs of about four minutes each
def test_byzantine_peer_blacklisted_swarm_wide_2x3(tmp_path):
    """2 stages x 3 replicas, one stage-0 attacker (x10 activations from micro-batch 44): the stage-1 receivers reject
    its tensors and report it; it is blacklisted swarm-wide within 50 micro-batches of its first rejected tensor,
    the trainer's router stops picking it, and no honest peer is blacklisted.

    Safety is asserted on every run: no honest peer blacklisted, every micro-batch accounted for exactly once, the
    attacker never picked after its verdict. Timing and noise (the verdict within 50 micro-batches, at most 2
    micro-batches dropped, few honest strikes) get up to three runs: on the loaded 2-core build machine they depend
    on how the processes are scheduled (measured: 6 of 7 recorded runs met them at the first try; verdicts 17-47
    micro-batches after the first rejection, 4-8 honest strikes, 0-1 dropped; one CI run dropped 6, as the two
    honest stage-0 peers drifted alike after the verdict, and its second run was then cut by the suite's 600 s
    per-test timeout, hence this test's own)."""
    misses = []
    attack = ["--attack", "scale", "--attack-magnitude", "10", "--attack-start-step", "11"]
    for attempt in range(3):
        summary, peers, attacker_id, microbatches = _blacklist_run(
            tmp_path / f"run{attempt}", f"itest-bl{attempt}", (0, 0, 1, 1, 1), 0, attack, steps=26
        )
        late = _verdict_misses(summary, peers, attacker_id, microbatches, 5, attack_start_mb=44)
        if not late:
            return
        misses.append((attempt, late, peers))
    pytest.fail(f"the attacker's verdict was late or noisy in all three runs: {misses}")


@pytest.mark.long
@pytest.mark.timeout(1800)  # up to three runs of about four minutes each
def test_gradient_sign_flipper_caught_by_audits_and_blacklisted(tmp_path):
    """A last-stage replica that flips the sign of every gradient it sends back (from step 2): no statistic of one
    tensor sees it; audits (25% of micro-batches here, every one once it is a suspect) compare its gradient with two
    other last-stage replicas', and it is blacklisted swarm-wide for ``audit`` while no honest peer is. Safety on
    every run; timing and noise as in the 2 x 3 test, up to three runs. The rate is raised from the default 10% so
    that the first catch comes early in 80 micro-batches: at 10% it is a draw of about 1 in 30 per micro-batch (the
    attacker on the route and the micro-batch audited), and one CI run's first catch came at micro-batch 63."""
    attack = ["--attack", "signflip", "--attack-direction", "backward", "--attack-start-step", "2"]
    _caught_by_audits(
        tmp_path,
        "itest-au",
        (0, 0, 1, 1),
        1,
        attack,
        steps=20,
        judges=("stage0.0", "stage0.1"),  # the penultimate judges
        auditors=("stage1.0", "stage1.1"),  # ... what they recompute
        trainer_extra=["--audit-rate", "0.25"],
        summary_check=lambda summary: summary["audits"] > 0,
    )


@pytest.mark.long
@pytest.mark.timeout(1800)  # up to three runs of about five minutes each
def test_middle_stage_sign_flipper_caught_by_recomputation(tmp_path):
    """3 stages (replicas 2, 3, 1); one stage-1 replica flips the sign of every gradient it sends back from step 2.
    Stage 1 is a middle stage: its gradient depends on the rest of the chain, so the last-stage audits cannot see
    it. Its receivers (stage 0) check its signed report against the tensors, then have the gradient recomputed by
    two other stage-1 replicas from the signed activations and the output-gradient stage 2 signed
    (``swarm.evidence``); the odd one out is struck (``audit``), and the attacker is blacklisted swarm-wide while no
    honest peer is. Safety on every run; timing and noise as in the 2 x 3 test, up to three runs."""
    attack = ["--attack", "signflip", "--attack-direction", "backward", "--attack-start-step", "2"]
    _caught_by_audits(
        tmp_path,
        "itest-rc",
        (0, 0, 1, 1, 2),
        1,
        attack,
        steps=20,
        judges=("stage0.0", "stage0.1"),
        auditors=("stage1.0", "stage1.1"),
        shape=["--stages", "3", *SHAPE[2:]],
        extra=["--recompute-rate", "0.25"],
    )


@pytest.mark.long
@pytest.mark.timeout(1800)  # up to three runs of about four minutes each
def test_scaled_activations_caught_by_forward_audits(tmp_path):
    """One of three stage-0 replicas scales its activations x1.5 from step 11: what SENTINEL's statistics do not
    catch (``experiments/detection``). The stage-1 receivers get the trainer's tokens beside stage 0's activations
    and have a share of them (every one of a newcomer's first hops, every one of a suspect's) recomputed by two
    other stage-0 replicas with their weights of the sender's epoch; the scaled tensor is the odd one out (norms
    1.5x apart, where honest replicas at the same epoch were within 1.19x even when one missed an averaging round),
    refused and struck (``audit``), and the attacker is blacklisted swarm-wide while no honest peer is. Safety on
    every run; timing and noise as in the 2 x 3 test, up to three runs."""
    attack = ["--attack", "scale", "--attack-magnitude", "1.5", "--attack-direction", "forward"]
    attack += ["--attack-start-step", "11"]  # forward audits start with SENTINEL's verdicts, after step 10
    _caught_by_audits(
        tmp_path,
        "itest-fa",
        (0, 0, 1, 1),
        0,
        attack,
        steps=26,
        judges=("stage1.0", "stage1.1"),
        auditors=("stage0.0", "stage0.1"),
    )


@pytest.mark.long
@pytest.mark.timeout(1800)  # up to three runs of about six minutes each
def test_middle_stage_scaled_activations_caught_by_forward_audits(tmp_path):
    """3 stages (replicas 1, 3, 2); one stage-1 replica scales its activations x1.5 from step 11. Stage 1 is a middle
    stage: its input is not the trainer's tokens but stage 0's activations, which its receivers (stage 2) fetch from
    the route's stage-0 peer (it holds what it sent while the micro-batch is in flight), check against the claim
    that peer signed on them (the sender relays it, and its own signed claim must name the same input), and give to
    two other stage-1 replicas to recompute; the scaled tensor is the
    odd one out, refused and struck (``audit``), and the attacker is blacklisted swarm-wide while no honest peer is.
    Safety on every run; timing and noise as in the 2 x 3 test, up to three runs."""
    attack = ["--attack", "scale", "--attack-magnitude", "1.5", "--attack-direction", "forward"]
    attack += ["--attack-start-step", "11"]  # forward audits start with SENTINEL's verdicts, after step 10
    _caught_by_audits(
        tmp_path,
        "itest-mf",
        (0, 1, 1, 2, 2),
        1,
        attack,
        steps=26,
        judges=("stage2.0", "stage2.1"),
        auditors=("stage1.0", "stage1.1"),
        shape=["--stages", "3", *SHAPE[2:]],
    )


def _caught_by_audits(
    tmp_path,
    run_id: str,
    stages,
    attacker_stage: int,
    attack,
    steps: int,
    judges,
    auditors,
    summary_check=None,
    **kwargs,
) -> None:
    """Up to three live runs of :func:`_blacklist_run` with an attacker that audits (recomputations by other
    replicas of its stage) must catch: in every run ``judges`` ran audits, ``auditors`` served them, no honest peer
    is blacklisted and an attacker's verdict is for ``audit``; one run must also be on time and quiet."""
    misses = []
    for attempt in range(3):
        summary, peers, attacker_id, microbatches = _blacklist_run(
            tmp_path / f"run{attempt}", f"{run_id}{attempt}", stages, attacker_stage, attack, steps, **kwargs
        )
        assert summary_check is None or summary_check(summary), summary
        by_name = {p["name"]: p for p in peers if p["role"] == "stage"}
        assert sum(by_name[n]["audits"]["run"] for n in judges) > 0, by_name
        assert sum(by_name[n]["audits"]["served"] for n in auditors) > 0, by_name
        start_step = int(attack[attack.index("--attack-start-step") + 1])
        late = _verdict_misses(
            summary, peers, attacker_id, microbatches, len(stages), attack_start_mb=start_step * 4
        )
        attacker = next(p for p in summary["peers"] if p["peer_id"] == attacker_id)
        if attacker["blacklisted"]:
            assert "audit" in (attacker["blacklist_reason"] or ""), attacker
        if not late:
            return
        misses.append((attempt, late, peers))
    pytest.fail(f"the attacker's verdict was late or noisy in all three runs: {misses}")


def _process_groups(run_id: str) -> set:
    """The process groups of the roles of ``run_id`` (each role is a group leader: its p2p daemon, and any helper
    process torch or hivemind starts, are in its group)."""
    import subprocess

    rows = subprocess.run(
        ["ps", "-ww", "-eo", "pid=,pgid=,args="], capture_output=True, text=True
    ).stdout.splitlines()
    return {int(r.split()[1]) for r in rows if f"run-id {run_id}" in r and r.split()[0] == r.split()[1]}


def _alive_in(groups: set) -> list:
    import subprocess

    rows = subprocess.run(
        ["ps", "-ww", "-eo", "pid=,pgid=,stat=,args="], capture_output=True, text=True
    ).stdout.splitlines()
    return [r for r in rows if int(r.split()[1]) in groups and not r.split()[2].startswith("Z")]


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL", "two Ctrl-C"])
def test_swarm_local_children_die_with_it_however_it_dies(tmp_path, how):
    """`kill` (SIGTERM), `kill -9` (SIGKILL: the children notice their parent is gone and leave, then their whole
    process groups are killed) and two Ctrl-C one second apart (the second skips the clean leave's wait) of
    `swarm local` leave no process behind: not a role, nor its p2p daemon or any helper process."""
    import subprocess
    import sys

    run_id = f"itest-term-{os.getpid()}-{how.split()[0].lower()}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "peers.cli",
            "local",
            "--workdir",
            str(tmp_path / "w"),
            "--run-id",
            run_id,
            "--stages",
            "2",
            "--replicas",
            "1",
            "--steps",
            "500",
            "--seq-len",
            "32",
            "--microbatch-size",
            "2",
            "--target-batch-size",
            "4",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    groups: set = set()
    try:
        for line in proc.stdout:
            if "training" in line and "stage peers up" in line:
                break
        else:
            pytest.fail(f"swarm local exited early with {proc.wait()}")
        time.sleep(3)  # the trainer has started too
        groups = _process_groups(run_id)
        assert len(groups) >= 4, groups  # bootstrap, two stage peers, the trainer
        if how == "two Ctrl-C":
            proc.send_signal(signal.SIGINT)
            time.sleep(1.0)
            proc.send_signal(signal.SIGINT)
        else:
            proc.send_signal(getattr(signal, how))
        out = proc.communicate(timeout=90)[0]
        assert proc.returncode != 0
        assert "Traceback" not in out, out[-3000:]
        deadline = time.monotonic() + 60  # SIGKILL: noticed within a second, a clean leave, then 30 s at most
        while _alive_in(groups) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _alive_in(groups), _alive_in(groups)
    finally:
        if proc.poll() is None:
            proc.kill()
        for group in groups:
            try:
                os.killpg(group, signal.SIGKILL)
            except OSError:
                pass
