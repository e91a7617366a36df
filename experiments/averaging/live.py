"""Averaging attacks in live swarms: each attack of ``peers.adversary.AVERAGING_ATTACKS`` against a clean run.

Real processes on 127.0.0.1, 2 stages x 3 replicas, the same seed and schedule in every run. In an attacked run the
third replica of stage 1 is Byzantine (``--attack avg-...``, from the first averaging round); in the clean run it is
honest. A late stage-1 joiner starts once the trainer has logged ``--joiner-after`` steps. Per run: the training loss
of the last quarter of the steps (mean), against the clean run's; whether the attacker was blacklisted swarm-wide and
for what; honest peers blacklisted; micro-batches completed and dropped; whether the joiner ended within one step
and 5% of an honest replica's parameter checksum.

    python experiments/averaging/live.py              # every attack, about 25 minutes on 2 cores
    python experiments/averaging/live.py --attacks avg-signflip --steps 20

Writes ``live_results.json`` beside this file (``--out``) and prints a table. Run nothing else meanwhile: two
swarms on 2 cores distort each other's timing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from peers.adversary import AVERAGING_ATTACKS  # noqa: E402
from peers.local import LocalSwarm  # noqa: E402

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
    "--seed",
    "0",
    "--probation-s",
    "5",
    "--probation-work",
    "10",
    "--report-period",
    "2",
]
STAGE = ["--sentinel-warmup", "8", "--matchmaking-time", "3"]
ATTACK_STAGE = 1


def _joiner_level(infos: dict, joiner: str, honest: list) -> bool:
    mine = infos.get(joiner) or {}
    for peer in honest:
        other = infos.get(peer) or {}
        if mine.get("param_checksum") is None or other.get("param_checksum") is None:
            continue
        close = abs(other["param_checksum"] - mine["param_checksum"]) <= 0.05 * abs(other["param_checksum"])
        if abs(other["epoch"] - mine["epoch"]) <= 1 and close:
            return True
    return False


def _count_in_logs(directory: str, text: str) -> int:
    count = 0
    for log in os.listdir(directory) if os.path.isdir(directory) else []:
        if log.startswith("stage") and log.endswith(".log"):
            with open(os.path.join(directory, log), errors="replace") as f:
                count += f.read().count(text)
    return count


def run_one(
    workdir: str, attack: str | None, steps: int, joiner_after: int, stage_extra: tuple = (), tag: str = ""
) -> dict:
    started = time.monotonic()
    name = (attack or "clean") + tag
    swarm = LocalSwarm(os.path.join(workdir, name), run_id=f"avglive-{name}")
    metrics, summary_path = (os.path.join(workdir, f"{name}.{x}") for x in ("metrics.jsonl", "summary.json"))
    joiner = third = None
    everyone: dict = {}
    try:
        swarm.start_dht(SHAPE)
        stage = STAGE + list(stage_extra)
        honest = [swarm.start_stage(s, wait=False, extra=stage) for s in (0, 0, 0, 1, 1)]
        third = swarm.start_stage(
            ATTACK_STAGE,
            name=f"stage{ATTACK_STAGE}.third",
            wait=False,
            extra=stage + (["--attack", attack] if attack else []),
        )
        for child in honest + [third]:
            child.wait_event("serve", 240)
        trainer = swarm.start_trainer(
            ["--steps", str(steps), "--metrics-out", metrics, "--summary-json", summary_path]
        )
        deadline = time.monotonic() + 600
        while not (os.path.exists(metrics) and len(open(metrics).read().splitlines()) >= joiner_after):
            if time.monotonic() > deadline or trainer.proc.poll() is not None:
                break
            time.sleep(0.5)
        joiner = swarm.start_stage(ATTACK_STAGE, name=f"stage{ATTACK_STAGE}.late", wait=False, extra=stage)
        joiner.wait_event("serve", 240)
        code = trainer.proc.wait(timeout=900)
        honest_same_stage = [c.info["peer_id"] for c in honest if c.stage == ATTACK_STAGE]
        if not attack:
            honest_same_stage.append(third.info["peer_id"])
        level, infos, deadline = False, {}, time.monotonic() + 90
        while not level and time.monotonic() < deadline:
            infos = swarm.peer_infos(honest_same_stage + [joiner.info["peer_id"]])
            level = _joiner_level(infos, joiner.info["peer_id"], honest_same_stage)
            if not level:
                time.sleep(5)
        everyone = swarm.peer_infos([c.info["peer_id"] for c in honest + [third, joiner]])
    finally:
        swarm.stop()
    summary = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
    losses = [json.loads(line)["loss"] for line in open(metrics)] if os.path.exists(metrics) else []
    tail = losses[-max(1, len(losses) // 4) :]
    views = {p["peer_id"]: p for p in summary.get("peers", []) if p.get("role") == "stage"}
    attacker_id = third.info.get("peer_id") if attack else None
    attacker = views.get(attacker_id, {}) if attacker_id else {}
    strikes = {p["peer_id"]: p["strikes"] for p in swarm.peers_summary() if p["role"] == "stage"}
    mb = summary.get("microbatches", {})
    return dict(
        attack=name,
        trainer_exit=code,
        steps=len(losses),
        loss_tail=statistics.mean(tail) if tail else None,
        completed=mb.get("completed"),
        dropped=mb.get("dropped"),
        attacker_blacklisted=attacker.get("blacklisted") if attack else None,
        attacker_reason=attacker.get("blacklist_reason") if attack else None,
        attacker_strikes=strikes.get(attacker_id) if attack else None,
        honest_blacklisted=sorted(
            pid[-8:] for pid, v in views.items() if v.get("blacklisted") and pid != attacker_id
        ),
        honest_with_strikes={pid[-8:]: n for pid, n in strikes.items() if n and pid != attacker_id},
        joiner_level=level,
        # all-reduces where this aggregator got only part of its slice's inputs (hivemind's own warning)
        partial_rounds=_count_in_logs(os.path.join(workdir, name), "Reducer: received"),
        # state downloads of replicas that had missed their stage's steps
        caught_up=sum((i.get("averaging") or {}).get("caught_up", 0) for i in everyone.values()),
        wall_s=round(time.monotonic() - started, 1),
    )


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")  # so that the running swarm's ``finally: swarm.stop()`` runs


def main() -> None:
    signal.signal(signal.SIGTERM, _interrupt)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--attacks", nargs="*", default=list(AVERAGING_ATTACKS))
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--joiner-after", type=int, default=6)
    parser.add_argument("--out", default=os.path.join(HERE, "live_results.json"))
    parser.add_argument(
        "--stage-args", default="", help="extra flags for every stage peer, e.g. '--tag-along-period 0'"
    )
    args = parser.parse_args()
    stage_extra = tuple(args.stage_args.split())
    workdir = tempfile.mkdtemp(prefix="averaging-live-")
    rows = []
    for attack in [None] + args.attacks:
        try:
            row = run_one(workdir, attack, args.steps, args.joiner_after, stage_extra)
        except Exception as e:  # one failed run is a row that says so, not a lost experiment
            row = dict(
                attack=attack or "clean",
                error=repr(e)[:300],
                loss_tail=None,
                completed=None,
                dropped=None,
                attacker_blacklisted=None,
                attacker_reason=None,
                attacker_strikes=None,
                honest_blacklisted=[],
                joiner_level=None,
            )
        rows.append(row)
        print(json.dumps(row), flush=True)
    clean = rows[0].get("loss_tail")
    for row in rows:
        row["loss_ratio"] = row["loss_tail"] / clean if clean and row["loss_tail"] else None
    with open(args.out, "w") as f:
        json.dump(
            dict(
                machine=f"{os.cpu_count()} cores, {platform.machine()}",
                load=list(os.getloadavg()),
                steps=args.steps,
                attack_stage=ATTACK_STAGE,
                workdir=workdir,
                rows=rows,
            ),
            f,
            indent=1,
        )
    print(
        f"{'attack':<15} {'loss':>7} {'x clean':>7} {'done/drop':>9} {'attacker blacklisted':<34} honest-bl joiner"
    )
    for r in rows:
        verdict = (
            "-"
            if r["attacker_blacklisted"] is None
            else (
                f"yes: {(r['attacker_reason'] or '')[:28]}"
                if r["attacker_blacklisted"]
                else f"no ({r['attacker_strikes']} strikes)"
            )
        )
        done = f"{r['completed']}/{r['dropped']}"
        print(
            f"{r['attack']:<15} {r['loss_tail'] or float('nan'):>7.3f} {r.get('loss_ratio') or float('nan'):>7.3f} "
            f"{done:>9} {verdict:<34} {','.join(r['honest_blacklisted']) or 'none':<9} {r['joiner_level']}"
            + (f"  ERROR {r['error']}" if r.get("error") else "")
        )


if __name__ == "__main__":
    main()
