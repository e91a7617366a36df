"""Reputation: time to blacklist each attack of the adversary suite, and resistance to slander by Sybils.

    python experiments/reputation/run.py           # full run (~11 min on 2 cores): results.csv, results.md, results.png
    python experiments/reputation/run.py --quick   # one attack, three Sybil counts, for the test suite (about 90 s on a slow 2-core machine)

Runs the in-process swarm of experiments/sim/swarm_sim.py (the project's SentinelMonitor, ReputationLedger,
aggregate() and Router on real activations and gradients of the tiny model, trained with AdamW on the shipped
corpus), 2 stages x 3 replicas:

1. **Attacks**: one attacker, each attack of peers/adversary.py ATTACKS at its default magnitude, from its first
   message, in stage 0 (it can only send activations: its tampering is forward) and in stage 1 (it can only send
   gradients: backward). Measured: micro-batches and simulated seconds from its first tampered tensor until the
   aggregate blacklists it; honest peers ever blacklisted; detection and false-positive rates.
2. **Slander**: an honest swarm (no attacker) runs; every reputation round's published reports are kept and the
   aggregation is replayed, at every round, with N extra Sybil reports (N in 0, 5, 10, 20, 50, 100) that accuse
   one honest peer (50 strikes, 0 clean each):
   - ``fresh``: Sybils that appeared this round (inside their probation);
   - ``aged``: Sybils seen since the start (past probation) that nobody vouches for;
   - ``aged_clique``: aged Sybils that vouch for each other's work (the known limit stated in swarm/reputation.py);
   - ``trusted_liar``: instead of Sybils, one aged honest peer with verified work adds the accusation to its report
     (N does not apply).
   Replaying is the same ``aggregate(...)`` call on the same inputs the peers would have at that round; what it
   leaves out is the feedback of a wrong verdict on routing, which only matters after the verdict it reports.
   One run with 20 fresh Sybils inside the simulation checks that the replay agrees.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from typing import List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from experiments.sim.swarm_sim import Byzantine, SimConfig, SwarmSim, Sybils  # noqa: E402
from peers.adversary import ATTACKS  # noqa: E402
from swarm.records import ReputationReport  # noqa: E402
from swarm.reputation import aggregate  # noqa: E402

SYBIL_COUNTS = (0, 5, 10, 20, 50, 100)
VARIANTS = ("fresh", "aged", "aged_clique", "trusted_liar")
TARGET = "s1r0"  # the slandered honest peer
LIAR = "s0r0"  # the trusted reporter that lies in the trusted_liar variant


def attack_runs(plan: List[tuple], microbatches: int, seed: int, pretrain: int) -> List[dict]:
    rows = []
    for attack, stage in plan:
        started = time.perf_counter()
        cfg = SimConfig(
            stages=2,
            replicas=3,
            microbatches=microbatches,
            seed=seed,
            pretrain_microbatches=pretrain,
            byzantine=[Byzantine(stage=stage, replica=1, attack=attack)],
        )
        r = SwarmSim(cfg).run()
        a = r["attackers"]["s%dr1" % stage]
        row = dict(
            kind="attack",
            pretrain=pretrain,
            attack=attack,
            direction="forward" if stage == 0 else "backward",
            attacker_stage=stage,
            blacklisted=a["blacklisted_mb"] is not None,
            mb_to_blacklist=a["mb_to_blacklist"],
            s_to_blacklist=a["s_to_blacklist"],
            reason=a["reason"] or "",
            tampered=a["tampered"],
            detection_rate=_round(r["detection_rate"]),
            false_positive_rate=_round(r["false_positive_rate"]),
            tampered_checked=r["tensors"]["tampered"],
            honest_checked=r["tensors"]["honest"],
            honest_blacklisted=";".join(r["honest_blacklisted"]),
            completed=r["microbatches"]["completed"],
            dropped=r["microbatches"]["dropped"],
            retried=r["microbatches"]["retried"],
            microbatches=microbatches,
            loss_last=round(r["loss_last"], 3),
            aggregate_ms=round(1e3 * r["aggregate_s_mean"], 3),
            wall_s=round(time.perf_counter() - started, 1),
        )
        rows.append(row)
        print(
            f"[pretrain {pretrain}] attack {attack:9s} {row['direction']:8s}: blacklisted={row['blacklisted']} after "
            f"{row['mb_to_blacklist']} micro-batches / {row['s_to_blacklist']} s ({row['reason']}); detection "
            f"{row['detection_rate']} fp {row['false_positive_rate']}; honest blacklisted: "
            f"{row['honest_blacklisted'] or 'none'} [{row['wall_s']}s]",
            flush=True,
        )
    return rows


def _round(x):
    return None if x is None else round(x, 4)


def _accusation(strikes: int = 50) -> dict:
    return {"clean": 0, "strikes": strikes, "reasons": {"log_rms": strikes}}


def slander_replay(history: List[tuple], counts, cfg) -> List[dict]:
    """Re-aggregate every kept round with the Sybils' (or the liar's) reports added."""
    rows = []
    for variant in VARIANTS:
        for n in counts if variant != "trusted_liar" else (1,):
            ever, first_round_s, score, agg_ms = False, None, 1.0, []
            for now, values, first_seen in history:
                reports = {r: ReputationReport.from_value(v) for r, v in values.items()}
                seen = dict(first_seen)
                if variant == "trusted_liar":
                    reports[LIAR].entries[TARGET] = _accusation()
                else:
                    names = [f"sybil{i}" for i in range(n)]
                    for name in names:
                        entries = {TARGET: _accusation()}
                        if variant == "aged_clique":
                            entries.update(
                                {o: {"clean": 1000, "strikes": 0, "reasons": {}} for o in names if o != name}
                            )
                        reports[name] = ReputationReport(reporter=name, issued_at=now, entries=entries)
                        seen[name] = now if variant == "fresh" else 0.0
                started = time.perf_counter()
                # every peer at the stage in its name. The Sybils announce the stage next to the target's (stage 0),
                # except that half of a clique announces the target's own stage: only vouching between adjacent
                # stages counts, so that is the clique that can earn weight (the worst case)
                stages = {r: (int(r[1:].split("r")[0]),) for r in reports if not r.startswith("sybil")}
                stages.update(
                    {f"sybil{i}": (1,) if variant == "aged_clique" and i % 2 else (0,) for i in range(n)}
                )
                agg = aggregate(reports, seen, now, cfg, reachable=set(reports), stages=stages)
                agg_ms.append(1e3 * (time.perf_counter() - started))
                score = agg.score(TARGET)
                if TARGET in agg.blacklist and not ever:
                    ever, first_round_s = True, now
            rows.append(
                dict(
                    kind="slander",
                    variant=variant,
                    sybils=n if variant != "trusted_liar" else 0,
                    target=TARGET,
                    blacklisted=ever,
                    blacklisted_at_s=first_round_s,
                    final_score=round(score, 4),
                    rounds=len(history),
                    aggregate_ms=round(sum(agg_ms) / max(len(agg_ms), 1), 3),
                )
            )
            print(
                f"slander {variant:12s} N={n:3d}: target blacklisted={ever} final score {score:.3f}",
                flush=True,
            )
    return rows


def write_outputs(
    out_dir: str, attack_rows: List[dict], slander_rows: List[dict], check: dict, meta: dict
) -> None:
    fields_a = list(attack_rows[0].keys()) if attack_rows else []
    fields_s = list(slander_rows[0].keys()) if slander_rows else []
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["kind"] + sorted((set(fields_a) | set(fields_s)) - {"kind"}))
        writer.writeheader()
        for row in attack_rows + slander_rows:
            writer.writerow(row)
    honest = sorted({p for row in attack_rows for p in row["honest_blacklisted"].split(";") if p})
    lines = [
        f"Generated by `python experiments/reputation/run.py{' --quick' if meta['quick'] else ''}` "
        f"({meta['wall_s']:.0f} s on a 2-core CPU machine). 2 stages x 3 replicas, one attacker (replica 1 of its stage) from its first "
        f"message, {meta['microbatches']} micro-batches of {meta['microbatch_size']}x{meta['seq_len']} tokens, "
        f"1 simulated second per micro-batch attempt; reputation as `swarm local` (probation 5 s and 10 vouched "
        f"clean exchanges, reports every 2 s, 2 reporters with >= 3 strikes and a strike ratio >= 0.2 to "
        f"blacklist). `pretrain`: micro-batches the model trained before the swarm started (0: from scratch, "
        f"as `swarm local`; 400: the swarm joins a run past its fastest-drifting phase). Detection and false "
        f"positives count the verdicts of honest receivers after the sentinel's warm-up steps.",
        "",
        f"Honest peers ever blacklisted in the attack runs: {', '.join(honest) if honest else 'none'}.",
        "",
        "| pretrain | attack | direction | blacklisted | micro-batches to blacklist | seconds to blacklist | reason | "
        "detection (after warm-up) | false positives | honest blacklisted | completed / dropped / retried |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in attack_rows:
        det = (
            "n/a"
            if r["detection_rate"] is None
            else f"{100 * r['detection_rate']:.0f}% of {r['tampered_checked']}"
        )
        fp = (
            "n/a"
            if r["false_positive_rate"] is None
            else f"{100 * r['false_positive_rate']:.2f}% of {r['honest_checked']}"
        )
        lines.append(
            f"| {r['pretrain']} | {r['attack']} | {r['direction']} | {'yes' if r['blacklisted'] else '**no**'} | "
            f"{r['mb_to_blacklist'] if r['mb_to_blacklist'] is not None else '-'} | "
            f"{r['s_to_blacklist'] if r['s_to_blacklist'] is not None else '-'} | {r['reason'] or '-'} | {det} | "
            f"{fp} | {r['honest_blacklisted'] or 'none'} | {r['completed']} / {r['dropped']} / {r['retried']} |"
        )
    lines += [
        "",
        f"Slander of honest peer `{TARGET}` (replayed over {slander_rows[0]['rounds'] if slander_rows else 0} "
        "reputation rounds of an honest run):",
        "",
        "| variant | Sybils | target ever blacklisted | target's final score |",
        "| --- | --- | --- | --- |",
    ]
    for r in slander_rows:
        lines.append(
            f"| {r['variant']} | {r['sybils'] if r['variant'] != 'trusted_liar' else '1 liar'} | "
            f"{'**yes**' if r['blacklisted'] else 'no'} | {r['final_score']} |"
        )
    lines += [
        "",
        f"In-simulation check (20 Sybils publishing from t={check['join_s']:.0f} s: fresh, then past "
        f"probation with no vouched work): {check['blacklisted']}, final score {check['score']}.",
    ]
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(out_dir, attack_rows, slander_rows)


def plot(out_dir: str, attack_rows: List[dict], slander_rows: List[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(16, 5.5), gridspec_kw={"width_ratios": [1, 2]})
    for variant, marker in zip(VARIANTS[:3], "os^"):
        rows = [r for r in slander_rows if r["variant"] == variant]
        ax1.plot(
            [max(r["sybils"], 0.5) for r in rows],
            [r["final_score"] for r in rows],
            marker=marker,
            label=variant,
        )
    liar = [r for r in slander_rows if r["variant"] == "trusted_liar"]
    if liar:
        ax1.axhline(liar[0]["final_score"], color="gray", ls="--", label="one trusted liar")
    ax1.set_xscale("log")
    ax1.set_xlabel("Sybil identities accusing the peer (0 plotted at 0.5)")
    ax1.set_ylabel(f"score of slandered honest peer {TARGET}")
    ax1.set_ylim(-0.05, 1.05)
    ax1.set_title("Slander: score 0 = blacklisted (fresh and aged overlap at 1.0)", fontsize=10)
    ax1.legend(fontsize=8)
    labels = [f"{r['attack']} {r['direction'][:3]} (pretrain {r['pretrain']})" for r in attack_rows]
    values = [r["mb_to_blacklist"] if r["mb_to_blacklist"] is not None else 0 for r in attack_rows]
    colors = ["tab:blue" if r["blacklisted"] else "tab:red" for r in attack_rows]
    ax2.bar(range(len(values)), values, color=colors)
    for i, r in enumerate(attack_rows):
        if not r["blacklisted"]:
            ax2.text(i, 1, "never", rotation=90, ha="center", va="bottom", fontsize=8, color="tab:red")
    ax2.set_xticks(range(len(values)))
    ax2.set_xticklabels(labels, fontsize=7, rotation=90)
    ax2.set_ylabel("micro-batches from first tampered tensor to blacklist")
    ax2.set_title("Time to blacklist per attack (1 s per micro-batch; red: never)")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "results.png"), dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run for the test suite")
    parser.add_argument(
        "--microbatches", type=int, default=0, help="per attack run (default: 700, quick: 400)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--pretrain",
        type=int,
        nargs="+",
        default=None,
        help="micro-batches the model trains before the swarm starts, one regime each "
        "(default: 0 400; quick: 400)",
    )
    parser.add_argument("--out-dir", default=HERE)
    parser.add_argument(
        "--render", action="store_true", help="only rewrite results.md/csv/png from summary.json"
    )
    parser.add_argument(
        "--slander-only",
        action="store_true",
        help="re-run the slander part only; keep the attack runs of summary.json",
    )
    args = parser.parse_args()
    saved = None
    if args.render or args.slander_only:
        with open(os.path.join(args.out_dir, "summary.json")) as f:
            saved = json.load(f)
    if args.render:
        write_outputs(args.out_dir, saved["attacks"], saved["slander"], saved["check"], saved["meta"])
        return 0
    if args.microbatches < 0:
        parser.error("--microbatches must be >= 0")
    started = time.perf_counter()
    microbatches = args.microbatches or (400 if args.quick else 700)
    # an attacker in stage 0 can only send activations (forward), one in stage 1 only gradients (backward)
    plan = [("zero", 0)] if args.quick else [(attack, stage) for attack in ATTACKS for stage in (0, 1)]
    counts = (0, 20, 100) if args.quick else SYBIL_COUNTS
    regimes = args.pretrain or ([400] if args.quick else [0, 400])
    if any(p < 0 for p in regimes):
        parser.error("--pretrain values must be >= 0")
    if saved is not None:
        attack_rows = saved["attacks"]
    else:
        attack_rows = [
            row for pretrain in regimes for row in attack_runs(plan, microbatches, args.seed, pretrain)
        ]
    honest = SwarmSim(
        SimConfig(
            stages=2, replicas=3, microbatches=120 if args.quick else 300, seed=args.seed, keep_reports=True
        )
    )
    honest_summary = honest.run()
    print(
        f"honest run: blacklist {honest_summary['final_blacklist']}, false positives "
        f"{honest_summary['tensors']['honest_rejected']} / {honest_summary['tensors']['honest']}",
        flush=True,
    )
    slander_rows = slander_replay(honest.report_history, counts, honest.cfg.reputation)
    join_s = 100.0
    check_sim = SwarmSim(
        SimConfig(
            stages=2,
            replicas=3,
            microbatches=120 if args.quick else 300,
            seed=args.seed,
            sybils=Sybils(count=20, target=TARGET, join_s=join_s),
        )
    )
    cs = check_sim.run()
    check = dict(join_s=join_s, blacklisted=TARGET in check_sim.ever_blacklisted, score=cs["scores"][TARGET])
    print(
        f"in-simulation check, 20 Sybils from t={join_s:.0f}s: target blacklisted={check['blacklisted']} "
        f"score {check['score']}",
        flush=True,
    )
    # with --slander-only: the full run's time stays, and the slander re-run's is kept beside it
    wall_s = saved["meta"]["wall_s"] if saved is not None else time.perf_counter() - started
    meta = dict(
        quick=args.quick,
        microbatches=microbatches,
        microbatch_size=honest.cfg.microbatch_size,
        seq_len=honest.cfg.seq_len,
        wall_s=wall_s,
        honest_run=dict(
            false_positives=honest_summary["tensors"]["honest_rejected"],
            honest_tensors=honest_summary["tensors"]["honest"],
            blacklist=honest_summary["final_blacklist"],
        ),
    )
    if saved is not None:
        meta["slander_rerun_s"] = time.perf_counter() - started
    os.makedirs(args.out_dir, exist_ok=True)
    write_outputs(args.out_dir, attack_rows, slander_rows, check, meta)
    with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
        json.dump(dict(meta=meta, check=check, attacks=attack_rows, slander=slander_rows), f, indent=1)
    print(f"wrote {args.out_dir}/results.csv, results.md, results.png, summary.json in {meta['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
