"""Reputation aggregation speed: the linear aggregation against the quadratic one it replaced, in the same run.

    python experiments/reputation_speed/run.py           # 1,000 / 2,000 / 10,000 peers (a few minutes on 2 cores)
    python experiments/reputation_speed/run.py --quick   # 200 and 500 peers, for the test suite (seconds)

Both algorithms get the same synthetic reports (:func:`synthetic`) and must return the same aggregate (checked on
every size). Repeats are interleaved (old, new, new, old, ...) so that both see the same machine; each call is timed
in wall seconds and in CPU seconds of this process (``time.process_time``), and min and median are reported. The
load average is recorded before and after; a run whose load exceeded the core count is flagged as loaded.

Also measured: a repeated aggregation over unchanged inputs, as the reputation service makes one every
``report_period_s`` when no report changed (:class:`swarm.reputation.Aggregator` then compares the reports, parsed
afresh, with the last ones and reuses its result).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import sys
import time
from functools import partial

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from experiments.reputation_speed import baseline  # noqa: E402
from swarm.records import RECENT_WINDOW, ReputationReport  # noqa: E402
from swarm.reputation import Aggregator, ReputationConfig, aggregate  # noqa: E402

ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"  # base58, as peer ids are
NOW = 10_000.0


def synthetic(peers: int, entries: int = 64, stages: int = 8, seed: int = 0):
    """Reports of a swarm of ``peers`` stage peers: ``stages`` stages, peer i serves stage i mod ``stages`` and 2%
    also serve the next one (peers move); every peer reports on ``entries`` counterparts drawn from its own and
    the adjacent stages (the only ones it exchanges tensors with), 0-200 clean exchanges each and an honest peer's
    occasional false strike (1 in 16). 1% of the peers are attackers: every honest reporter that names one has
    5-60 strikes against it, and each attacker slanders 30% of the peers it names (50 strikes). 5% of the reporters
    are on probation (first seen now). Returns (reports, first_seen, now, stages)."""
    rng = random.Random(seed)
    ids = ["Qm" + "".join(rng.choice(ALPHABET) for _ in range(44)) for _ in range(peers)]
    stage_of = {p: {i % stages} for i, p in enumerate(ids)}
    for p in rng.sample(ids, peers // 50):
        s = next(iter(stage_of[p]))
        stage_of[p].add(min(s + 1, stages - 1))
    by_stage = [[] for _ in range(stages)]
    for p, served in stage_of.items():
        for s in served:
            by_stage[s].append(p)
    attackers = set(rng.sample(ids, max(1, peers // 100)))
    first_seen = {p: (NOW if rng.random() < 0.05 else 0.0) for p in ids}
    reports = {}
    for p in ids:
        near = sorted(
            {q for s in stage_of[p] for t in (s - 1, s, s + 1) if 0 <= t < stages for q in by_stage[t]} - {p}
        )
        report = {}
        for q in rng.sample(near, min(entries, len(near))):
            clean = rng.randint(0, 200)
            if q in attackers and p not in attackers:
                strikes = rng.randint(5, 60)
            elif p in attackers and rng.random() < 0.3:
                clean, strikes = 0, 50
            else:
                strikes = 1 if rng.random() < 1 / 16 else 0
            report[q] = {
                "clean": clean,
                "strikes": strikes,
                "reasons": {"log_rms": strikes} if strikes else {},
                "recent_strikes": min(strikes, RECENT_WINDOW),
            }
        reports[p] = ReputationReport(reporter=p, issued_at=NOW, entries=report)
    return reports, first_seen, NOW, stage_of


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def summary(values):
    return {"min": min(values), "median": statistics.median(values), "all": values}


def measure(peers: int, entries: int, repeats: int, old_repeats: int) -> dict:
    reports, first_seen, now, stages = synthetic(peers, entries)
    cfg = ReputationConfig()
    runs = {"old": {"wall": [], "cpu": []}, "new": {"wall": [], "cpu": []}}
    results = {}
    calls = {
        "old": lambda: baseline.aggregate(reports, first_seen, now, cfg, stages=stages),
        "new": lambda: aggregate(reports, first_seen, now, cfg, stages=stages),
    }
    for k in range(repeats):
        order = ("old", "new") if k % 2 == 0 else ("new", "old")
        for name in order:
            if name == "old" and k >= old_repeats:
                continue
            results[name], wall, cpu = timed(calls[name])
            runs[name]["wall"].append(wall)
            runs[name]["cpu"].append(cpu)
    identical = results["old"] == results["new"]
    # the service's case when nothing changed: compare, reuse
    aggregator = Aggregator(cfg)
    aggregator(reports, first_seen, now, stages=stages)
    unchanged = {"wall": [], "cpu": []}
    for _ in range(repeats):
        # as the service reads them: the same reports parsed afresh (equal, not the same objects), republished later
        again = {
            r: ReputationReport(reporter=r, issued_at=now + 5, entries=copy.deepcopy(report.entries))
            for r, report in reports.items()
        }
        _, wall, cpu = timed(partial(aggregator, again, first_seen, now + 5, stages=stages))
        unchanged["wall"].append(wall)
        unchanged["cpu"].append(cpu)
    agg = results["new"]
    return {
        "peers": peers,
        "entries_per_report": entries,
        "entries_total": sum(len(r.entries) for r in reports.values()),
        "identical": identical,
        "blacklisted": len(agg.blacklist),
        "weighted_reporters": int(sum(agg.weights.values())),
        "rounds": agg.rounds,
        "old": {key: summary(v) for key, v in runs["old"].items()},
        "new": {key: summary(v) for key, v in runs["new"].items()},
        "unchanged_reused": {key: summary(v) for key, v in unchanged.items()},
        "reused": aggregator.reused,
    }


def render(out: dict) -> str:
    lines = [
        "# Reputation aggregation: linear (new) against quadratic (old), same run",
        "",
        f"Commit {out['commit']}, {out['cores']} cores, load average {out['load_before']:.2f} before and "
        f"{out['load_after']:.2f} after{' (LOADED: above the core count)' if out['loaded'] else ''}; "
        f"{out['repeats']} interleaved repeats (old: {out['old_repeats']} at 10,000 peers), min / median.",
        "",
        "| peers | entries | old wall s | old CPU s | new wall s | new CPU s | speed-up (median wall) "
        "| unchanged inputs, reused: wall s | same result | blacklisted |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for row in out["rows"]:
        old, new, reuse = row["old"], row["new"], row["unchanged_reused"]
        lines.append(
            f"| {row['peers']:,} | {row['entries_total']:,} | {old['wall']['min']:.3f} / {old['wall']['median']:.3f} "
            f"| {old['cpu']['min']:.3f} / {old['cpu']['median']:.3f} "
            f"| {new['wall']['min']:.4f} / {new['wall']['median']:.4f} "
            f"| {new['cpu']['min']:.4f} / {new['cpu']['median']:.4f} "
            f"| {old['wall']['median'] / new['wall']['median']:.0f}x "
            f"| {reuse['wall']['min']:.4f} / {reuse['wall']['median']:.4f} "
            f"| {'yes' if row['identical'] else 'NO'} | {row['blacklisted']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="200 and 500 peers, 2 repeats, no files written")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.quick:
        plan, repeats = [(200, 64, 2), (500, 64, 2)], 2
    else:
        repeats = args.repeats
        plan = [
            (1000, 64, repeats),
            (2000, 64, repeats),
            (10000, 64, 3),
            (1000, 256, repeats),
            (10000, 256, 3),
        ]
    load_before = os.getloadavg()[0]
    rows = []
    for peers, entries, old_repeats in plan:
        row = measure(peers, entries, repeats, min(old_repeats, repeats))
        rows.append(row)
        print(
            f"{peers} peers x {entries} entries: old wall {row['old']['wall']['median']:.3f} s "
            f"(CPU {row['old']['cpu']['median']:.3f}), new wall {row['new']['wall']['median']:.4f} s "
            f"(CPU {row['new']['cpu']['median']:.4f}), unchanged reused {row['unchanged_reused']['wall']['median']:.4f} s, "
            f"identical {row['identical']}",
            flush=True,
        )
        if not row["identical"]:
            sys.exit(f"the two aggregations disagree at {peers} peers")
    load_after = os.getloadavg()[0]
    cores = os.cpu_count()
    commit = os.popen(f"git -C {ROOT} rev-parse --short HEAD").read().strip()
    dirty = bool(os.popen(f"git -C {ROOT} status --porcelain -- swarm").read().strip())
    out = {
        "commit": commit + ("+ (uncommitted swarm/ changes)" if dirty else ""),
        "cores": cores,
        "load_before": load_before,
        "load_after": load_after,
        "loaded": max(load_before, load_after) > cores,
        "repeats": repeats,
        "old_repeats": min(3, repeats),
        "rows": rows,
    }
    print(render(out))
    if not args.quick:
        with open(os.path.join(HERE, "results.json"), "w") as f:
            json.dump(out, f, indent=1)
        with open(os.path.join(HERE, "results.md"), "w") as f:
            f.write(render(out))


if __name__ == "__main__":
    main()
