"""Detection and reputation at the papers' scale: up to 176 workers (8 stages x 22 replicas), 10/25/40% Byzantine.

    python experiments/scale/run.py           # full run (~8 min on 2 cores): results.csv, results.md, results.png
    python experiments/scale/run.py --quick   # two small sizes, for the test suite (about 100 s on a slow 2-core machine)

Runs the in-process swarm of experiments/sim/swarm_sim.py: the project's SentinelMonitor (one per peer), ReputationLedger
(one per peer), aggregate() and Router on real activations and gradients of the tiny model (8 blocks when 8 stages),
trained with AdamW on the shipped corpus. Byzantine peers are spread evenly over the stages, each with one attack of
peers/adversary.py ATTACKS (round robin, default magnitudes, from its first message, both directions). The swarm
joins a run that has already trained ``--pretrain`` micro-batches (the first few hundred steps drift so fast that
the monitors' baselines cannot follow when each receiver sees only 1/R of the traffic; one extra run at the largest
size starts from scratch to show it). Micro-batches per run: ``base + per_replica x R`` (each receiver sees about
1/R of the traffic and needs ~20 tensors per direction to warm up).

Measured per run: detection rate of tampered tensors and false-positive rate on honest tensors (verdicts of honest
receivers), attackers blacklisted and micro-batches / simulated seconds from each one's first tampered tensor to its
blacklisting, honest peers ever blacklisted, micro-batches completed / dropped / retried, and the wall time of one
reputation round (reading and validating every report + ``aggregate``) and of ``aggregate`` alone.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from typing import List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from experiments.sim.swarm_sim import SimConfig, SwarmSim, mixed_byzantine  # noqa: E402
from peers.adversary import ATTACKS  # noqa: E402

SIZES = [(2, 3), (4, 6), (8, 11), (8, 22)]
FRACTIONS = (0.10, 0.25, 0.40)


def one_run(
    stages: int,
    replicas: int,
    fraction: float,
    microbatches: int,
    pretrain: int,
    seed: int,
    slander: bool = False,
) -> dict:
    started = time.perf_counter()
    byz = mixed_byzantine(stages, replicas, fraction, list(ATTACKS), seed=seed, slander=slander)
    sim = SwarmSim(
        SimConfig(
            stages=stages,
            replicas=replicas,
            microbatches=microbatches,
            seed=seed,
            pretrain_microbatches=pretrain,
            byzantine=byz,
        )
    )
    r = sim.run()
    att = r["attackers"]
    mbs = [a["mb_to_blacklist"] for a in att.values() if a["mb_to_blacklist"] is not None]
    secs = [a["s_to_blacklist"] for a in att.values() if a["s_to_blacklist"] is not None]
    never = sorted(
        f"{name}:{sim.peers[name].spec.attack}" for name, a in att.items() if a["blacklisted_mb"] is None
    )
    row = dict(
        stages=stages,
        replicas=replicas,
        peers=stages * replicas,
        byzantine_fraction=fraction,
        byzantine=len(byz),
        slander=slander,
        pretrain=pretrain,
        microbatches=microbatches,
        completed=r["microbatches"]["completed"],
        dropped=r["microbatches"]["dropped"],
        retried=r["microbatches"]["retried"],
        tampered_checked=r["tensors"]["tampered"],
        tampered_caught=r["tensors"]["tampered_caught"],
        detection_rate=_r(r["detection_rate"]),
        honest_checked=r["tensors"]["honest"],
        honest_rejected=r["tensors"]["honest_rejected"],
        false_positive_rate=_r(r["false_positive_rate"]),
        attackers_blacklisted=r["attackers_blacklisted"],
        attackers=len(att),
        mb_to_blacklist_median=statistics.median(mbs) if mbs else None,
        mb_to_blacklist_max=max(mbs, default=None),
        s_to_blacklist_median=statistics.median(secs) if secs else None,
        never_blacklisted=";".join(never),
        honest_blacklisted=";".join(r["honest_blacklisted"]),
        slander_targets=";".join(sim.slander_targets) if slander else "",
        rounds=r["rounds"],
        round_ms=round(1e3 * r["round_s_mean"], 3),
        aggregate_ms=round(1e3 * r["aggregate_s_mean"], 3),
        aggregate_ms_max=round(1e3 * r["aggregate_s_max"], 3),
        loss_first=round(r["loss_first"], 3),
        loss_last=round(r["loss_last"], 3),
        clock_s=r["clock_s"],
        wall_s=round(time.perf_counter() - started, 1),
    )
    print(
        f"{stages}x{replicas} ({stages * replicas} peers) {int(fraction * 100)}% Byzantine{' +slander' if slander else ''}"
        f" pretrain {pretrain}: detection {row['detection_rate']} fp {row['false_positive_rate']} blacklisted "
        f"{row['attackers_blacklisted']}/{row['attackers']} (median {row['mb_to_blacklist_median']} mb) honest "
        f"blacklisted: {row['honest_blacklisted'] or 'none'}; completed {row['completed']}/{microbatches}; round "
        f"{row['round_ms']} ms [{row['wall_s']}s]",
        flush=True,
    )
    return row


def _r(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(x, 4)


def write_outputs(out_dir: str, rows: List[dict], meta: dict) -> None:
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"Generated by `python experiments/scale/run.py{' --quick' if meta['quick'] else ''}` ({meta['wall_s']:.0f} s "
        f"on a 2-core CPU machine). Micro-batches of {meta['microbatch_size']}x{meta['seq_len']} tokens, 1 simulated "
        "second per attempt; rates are over tensors checked by honest receivers after the sentinel's warm-up.",
        "",
        "| peers | stages x replicas | Byzantine | slander | pretrain | detection | false positives | attackers "
        "blacklisted | micro-batches to blacklist (median / max) | never blacklisted | honest blacklisted | "
        "completed / dropped / retried | round ms (aggregate ms) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        det = (
            "-"
            if r["detection_rate"] is None
            else f"{100 * r['detection_rate']:.1f}% ({r['tampered_caught']}/{r['tampered_checked']})"
        )
        fp = (
            "-"
            if r["false_positive_rate"] is None
            else f"{100 * r['false_positive_rate']:.2f}% ({r['honest_rejected']}/{r['honest_checked']})"
        )
        lines.append(
            f"| {r['peers']} | {r['stages']}x{r['replicas']} | {r['byzantine']} ({int(100 * r['byzantine_fraction'])}%) | "
            f"{'yes' if r['slander'] else 'no'} | {r['pretrain']} | {det} | {fp} | {r['attackers_blacklisted']}/{r['attackers']} | "
            f"{r['mb_to_blacklist_median']} / {r['mb_to_blacklist_max']} | {r['never_blacklisted'] or '-'} | "
            f"{r['honest_blacklisted'] or '**none**'} | {r['completed']} / {r['dropped']} / {r['retried']} | "
            f"{r['round_ms']} ({r['aggregate_ms']}) |"
        )
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(out_dir, rows)


def plot(out_dir: str, rows: List[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [r for r in rows if not r["slander"] and r["pretrain"] == max(x["pretrain"] for x in rows)]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    panels = [
        ("detection_rate", "detection rate (tampered tensors rejected)"),
        ("false_positive_rate", "false-positive rate (honest tensors rejected)"),
        ("mb_to_blacklist_median", "median micro-batches to blacklist an attacker"),
        ("round_ms", "wall ms per reputation round (validate reports + aggregate)"),
    ]
    for ax, (key, title) in zip(axes.flat, panels):
        for fraction, marker in zip(sorted({r["byzantine_fraction"] for r in main}), "os^"):
            pts = sorted(
                (r["peers"], r[key])
                for r in main
                if r["byzantine_fraction"] == fraction and r[key] is not None
            )
            if pts:
                ax.plot(*zip(*pts), marker=marker, label=f"{int(100 * fraction)}% Byzantine")
        if key == "round_ms":
            pts = sorted(
                (r["peers"], r["aggregate_ms"]) for r in main if r["byzantine_fraction"] == FRACTIONS[0]
            )
            if pts:
                ax.plot(*zip(*pts), ls="--", color="gray", label="aggregate() alone (10%)")
        ax.set_xlabel("peers (stages x replicas)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "results.png"), dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="two small sizes, one fraction, for the test suite"
    )
    parser.add_argument(
        "--pretrain", type=int, default=400, help="micro-batches trained before the swarm starts"
    )
    parser.add_argument("--base", type=int, default=150, help="micro-batches per run: base + per_replica x R")
    parser.add_argument("--per-replica", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=HERE)
    args = parser.parse_args()
    if args.pretrain < 0 or args.base < 1 or args.per_replica < 0:
        parser.error("--pretrain and --per-replica must be >= 0, --base >= 1")
    started = time.perf_counter()
    rows = []
    if args.quick:
        plan = [(2, 3, 0.25, False, args.pretrain), (4, 3, 0.25, False, args.pretrain)]
        base, per_replica = 200, 20
    else:
        # all three fractions at the small sizes and at 176 workers; 88 workers at 25% only (CPU time); then 176
        # workers with slander, and 176 workers from scratch (pretrain 0)
        plan = [
            (s, r, f, False, args.pretrain)
            for s, r in SIZES
            if (s, r) != (8, 11)
            for f in FRACTIONS
            if (s, r) != (8, 22)
        ]
        plan += [(8, 11, 0.25, False, args.pretrain)] + [(8, 22, f, False, args.pretrain) for f in FRACTIONS]
        plan += [(8, 22, 0.25, True, args.pretrain), (8, 22, 0.10, False, 0)]
        base, per_replica = args.base, args.per_replica
    os.makedirs(args.out_dir, exist_ok=True)
    meta = dict(
        quick=args.quick, wall_s=0.0, microbatch_size=SimConfig().microbatch_size, seq_len=SimConfig().seq_len
    )
    for stages, replicas, fraction, slander, pretrain in plan:
        rows.append(
            one_run(stages, replicas, fraction, base + per_replica * replicas, pretrain, args.seed, slander)
        )
        meta["wall_s"] = time.perf_counter() - started
        write_outputs(args.out_dir, rows, meta)  # after every run: a partial run still leaves its results
        with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
            json.dump(dict(meta=meta, runs=rows, plan=[list(p) for p in plan]), f, indent=1)
    print(f"wrote {args.out_dir}/results.csv, results.md, results.png, summary.json in {meta['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
