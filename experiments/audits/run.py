"""Recomputation audits with signed tensors (``swarm.evidence``): every attack, at every stage position, alone and
with a colluding neighbour, slow ramps, insider slander at 176 workers, and the final loss of a 4-stage swarm with
25% Byzantine peers with defences off / statistics only / statistics + audits.

    python experiments/audits/run.py              # everything (about 30 minutes on 2 cores)
    python experiments/audits/run.py --only sweep # one part: sweep, ramps, scale, convergence
    python experiments/audits/run.py --quick      # a few short runs (the test suite's)

Appends every finished row to ``rows.jsonl`` here (and each run's wall and CPU time to ``runs.jsonl``);
``report.py`` turns them into ``results.md``. The simulator is ``experiments/sim/swarm_sim.py`` (its
README says what is real); with ``SimConfig.evidence`` set, every hop's tensor is signed by its sender
(``TensorClaim``), the receiver checks the claim, hops are audited by recomputation at ``rate`` (always when the
sender is a suspect or SENTINEL rejected the tensor), the auditor is drawn with ``draw_auditor``, a mismatch is an
``Accusation`` that the stage's other replicas re-check (``check_accusation`` + ``reverify``), and proofs go into
``aggregate(proven=...)``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import time
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from experiments.sim.swarm_sim import Byzantine, SimConfig, Sybils, run_sim  # noqa: E402
from peers.attack_names import CHAIN_ATTACKS  # noqa: E402
from swarm.evidence import StageAuditConfig  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# (stage, direction, position) for 4 stages: stage 0 sends no gradient, the last stage no activations
POSITIONS = [
    (0, "forward", "first"),
    (1, "forward", "middle"),
    (2, "backward", "middle"),
    (3, "backward", "last"),
]
RAMPS = [("noise", 1.0), ("scale", 3.0)]
PRETRAIN = 400


def _attackers(r: dict) -> dict:
    return {
        name: dict(
            tampered=a["tampered"],
            first_tampered_mb=a["first_tampered_mb"],
            blacklisted_mb=a["blacklisted_mb"],
            mb_to_blacklist=a["mb_to_blacklist"],
            reason=a["reason"],
        )
        for name, a in r["attackers"].items()
    }


def sweep_row(job: dict) -> dict:
    started = time.perf_counter()
    stage, direction = job["stage"], job["direction"]
    byz = [
        Byzantine(
            stage=stage,
            replica=1,
            attack=job["attack"],
            direction=direction,
            magnitude=job.get("magnitude", math.nan),
            ramp=job.get("ramp", 0),
            collude=job["collude"],
        )
    ]
    if job["collude"]:  # the receiving neighbour covers its friend, and attacks in its own right
        nb = stage + 1 if direction == "forward" else stage - 1
        nb_dir = "backward" if nb > 0 else "forward"
        byz.append(Byzantine(stage=nb, replica=2, attack=job["attack"], direction=nb_dir, collude=True))
    cfg = SimConfig(
        stages=job.get("stages", 4),
        replicas=job.get("replicas", 3),
        byzantine=byz,
        microbatches=job["microbatches"],
        pretrain_microbatches=job.get("pretrain", PRETRAIN),
        evidence=StageAuditConfig(),
        seed=job.get("seed", 0),
    )
    r = run_sim(cfg)
    return dict(
        job,
        attackers=_attackers(r),
        honest_blacklisted=r["honest_blacklisted"],
        completed=r["microbatches"]["completed"],
        dropped=r["microbatches"]["dropped"],
        retried=r["microbatches"]["retried"],
        evidence=r["evidence"],
        wall_s=round(time.perf_counter() - started, 1),
    )


def slander_row(job: dict) -> dict:
    """Insider slander: Byzantine insiders that serve honestly, vouch for each other and accuse an honest peer, in
    reports and as auditors / verifiers (false accusations), plus Sybils accusing it too."""
    started = time.perf_counter()
    stages, replicas = job["stages"], job["replicas"]
    target_stage = stages // 2
    byz = [
        Byzantine(stage=target_stage, replica=r, attack=None, slander=True, collude=True)
        for r in range(1, 1 + job["insiders"])
    ]
    byz += [
        Byzantine(stage=target_stage + 1, replica=r, attack=None, slander=True, collude=True)
        for r in range(job["insiders"])
    ]
    cfg = SimConfig(
        stages=stages,
        replicas=replicas,
        byzantine=byz,
        slander_targets=[f"s{target_stage}r0"],
        sybils=Sybils(count=8, target=f"s{target_stage}r0", vouch=True),
        microbatches=job["microbatches"],
        pretrain_microbatches=PRETRAIN if stages <= 4 else 0,
        evidence=StageAuditConfig(),
    )
    r = run_sim(cfg)
    return dict(
        job,
        honest_blacklisted=r["honest_blacklisted"],
        final_blacklist=r["final_blacklist"],
        completed=r["microbatches"]["completed"],
        dropped=r["microbatches"]["dropped"],
        evidence=r["evidence"],
        wall_s=round(time.perf_counter() - started, 1),
    )


def convergence_row(job: dict) -> dict:
    from experiments.convergence.run import ConvergenceSim

    started = time.perf_counter()
    attack, mode = job["attack"], job["mode"]
    byz = (
        [Byzantine(stage=s, replica=(s + 1) % 4, attack=attack) for s in range(4)] if attack != "none" else []
    )
    cfg = SimConfig(
        stages=4,
        replicas=4,
        byzantine=byz,
        microbatches=job["microbatches"],
        pretrain_microbatches=PRETRAIN,
        evidence=StageAuditConfig() if mode == "audits" else None,
    )
    sim = ConvergenceSim(cfg, defences=mode != "off", eval_batches=48)
    r = sim.run()
    return dict(
        job,
        eval_loss=sim.curve[-1][1],
        attackers=_attackers(r),
        honest_blacklisted=r["honest_blacklisted"],
        completed=r["microbatches"]["completed"],
        dropped=r["microbatches"]["dropped"],
        evidence=r.get("evidence", {}),
        wall_s=round(time.perf_counter() - started, 1),
    )


def run_job(job: dict) -> dict:
    kind = job["kind"]
    try:
        row = {"sweep": sweep_row, "slander": slander_row, "convergence": convergence_row}[kind](job)
    except Exception as e:  # a row that fails says so; the others still run
        row = dict(job, error=f"{type(e).__name__}: {e}")
    print(json.dumps({k: v for k, v in row.items() if k not in ("evidence",)})[:400], flush=True)
    return row


def jobs_for(part: str, quick: bool) -> List[dict]:
    mbs = 40 if quick else 120
    if part == "sweep":
        attacks = ["signflip", "noise"] if quick else list(CHAIN_ATTACKS)
        positions = POSITIONS[:2] if quick else POSITIONS
        return [
            dict(kind="sweep", attack=a, stage=s, direction=d, position=p, collude=c, microbatches=mbs)
            for a in attacks
            for (s, d, p) in positions
            for c in ((False,) if quick else (False, True))
        ]
    if part == "ramps":
        return [
            dict(
                kind="sweep",
                attack=a,
                magnitude=m,
                ramp=500,
                stage=s,
                direction=d,
                position=p,
                collude=False,
                microbatches=mbs,
            )
            for a, m in RAMPS
            for (s, d, p) in POSITIONS
        ]
    if part == "scale":
        rows = [
            dict(kind="slander", stages=4, replicas=3, insiders=1, microbatches=mbs),
            dict(kind="slander", stages=8, replicas=22, insiders=2, microbatches=mbs),
        ]
        rows += [
            dict(
                kind="sweep",
                attack=a,
                stage=s,
                direction=d,
                position=p,
                collude=False,
                microbatches=mbs,
                stages=8,
                replicas=22,
            )
            for a, (s, d, p) in [("signflip", (4, "backward", "middle")), ("noise", (0, "forward", "first"))]
        ]
        return rows[:1] if quick else rows
    if part == "convergence":
        attacks = ["none", "noise"] if quick else ["none", *CHAIN_ATTACKS]
        return [
            dict(kind="convergence", attack=a, mode=m, microbatches=mbs if quick else 480)
            for a in attacks
            for m in (("audits",) if a == "none" else ("off", "stats", "audits"))
        ]
    raise ValueError(part)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["sweep", "ramps", "scale", "convergence"], action="append")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--out-dir", default=HERE)
    args = p.parse_args(argv)
    parts = args.only or ["sweep", "ramps", "scale", "convergence"]
    jobs = [j for part in parts for j in jobs_for(part, args.quick)]
    started = time.perf_counter()
    cpu0 = os.times()
    rows_path = os.path.join(
        args.out_dir, "rows.jsonl"
    )  # every finished row at once: a killed run keeps them
    rows = []
    with open(rows_path, "a") as sink, multiprocessing.get_context("spawn").Pool(args.processes) as pool:
        for row in pool.imap_unordered(run_job, jobs, chunksize=1):
            rows.append(row)
            sink.write(json.dumps(row) + "\n")
            sink.flush()
    cpu1 = os.times()
    meta = dict(
        quick=args.quick,
        parts=parts,
        wall_s=round(time.perf_counter() - started, 1),
        children_cpu_s=round(
            (cpu1.children_user - cpu0.children_user) + (cpu1.children_system - cpu0.children_system), 1
        ),
        load_avg=os.getloadavg(),
    )
    with open(os.path.join(args.out_dir, "runs.jsonl"), "a") as f:
        f.write(json.dumps(meta) + "\n")
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
