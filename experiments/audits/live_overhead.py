"""What live audits cost: CPU-seconds per token of a real 2 x 2 swarm with audits at their default rates against the
same swarm with every audit off, interleaved (off, on, off, on, ...), measured like the throughput benchmark.

    python experiments/audits/live_overhead.py              # 2 interleaved pairs (~15 minutes on 2 cores)
    python experiments/audits/live_overhead.py --repeats 3

"on" is the defaults: the trainer audits 10% of the last stage's gradients (``--audit-rate``), stage 1 has 10% of
stage 0's activations recomputed by other stage-0 replicas beside the micro-batch, every one of a newcomer's first
8 and every one SENTINEL rejects (``--recompute-rate``). "off" sets both rates to 0. Both arms shorten SENTINEL's
warm-up to 2 steps (forward audits start after it) so that the measured window (steps 3-10, as in
``experiments/throughput``) is audited. The CPU time of every process of the swarm (bootstrap, stage peers, their
p2p daemons, trainer) is read from /proc over the window; a run during which other processes took more than a tenth
of the cores is flagged. Writes ``live_overhead.json`` here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from experiments.throughput import procfs  # noqa: E402
from experiments.throughput.run import Shape, run_swarm  # noqa: E402

ARMS = {
    "off": (["--recompute-rate", "0"], ["--audit-rate", "0"]),
    "on": ([], []),
}
WARMUP = ["--sentinel-warmup-steps", "2"]


def _audits(run: dict) -> dict:
    """What the peers audited in one run (from their ledgers) and what the trainer audited."""
    peers = [p for p in run.get("peers", []) if p.get("role") == "stage"]
    count = lambda key: sum((p.get("audits") or {}).get(key, 0) for p in peers)  # noqa: E731
    return dict(
        trainer=run.get("trainer_audits"),
        forward=count("forward"),
        run=count("run"),
        served=count("served"),
        false_alarms=count("false_alarms"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=2, help="interleaved pairs")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds one run may take to start and run"
    )
    parser.add_argument("--out", default=HERE, help="where live_overhead.json goes")
    args = parser.parse_args()
    shape = Shape(quick=False)
    workdir = os.path.join(args.out, "live-overhead-run")
    os.makedirs(workdir, exist_ok=True)
    runs = []
    for repeat in range(args.repeats):
        for arm, (stage_extra, trainer_extra) in ARMS.items():
            load_before = procfs.loadavg()
            started = time.monotonic()
            run = run_swarm(
                shape,
                workdir,
                repeat,
                max_inflight=8,
                timeout_s=args.timeout,
                replicas=2,
                stage_extra=[*stage_extra, *WARMUP],
                trainer_extra=trainer_extra,
            )
            audits = _audits(run)
            run = {k: v for k, v in run.items() if k not in ("peers", "per_process")}
            run.update(
                arm=arm,
                repeat=repeat,
                audits=audits,
                total_s=time.monotonic() - started,
                loadavg_before=load_before,
                loadavg_after=procfs.loadavg(),
            )
            runs.append(run)
            print(
                f"repeat {repeat} {arm}: {run['tokens']} tokens, {run['cpu_s']:.1f} CPU-s, "
                f"{run['cpu_us_per_token']:.0f} us/token, {run['tokens_per_s']:.0f} tokens/s wall; audits {audits}; "
                f"other processes {run['others_cores']:.2f} cores" + (" FLAGGED" if run["contended"] else ""),
                flush=True,
            )
    by_arm = {arm: [r for r in runs if r["arm"] == arm] for arm in ARMS}
    median = {arm: statistics.median(r["cpu_us_per_token"] for r in rs) for arm, rs in by_arm.items()}
    paired = [
        on["cpu_us_per_token"] / off["cpu_us_per_token"] for off, on in zip(by_arm["off"], by_arm["on"])
    ]
    overhead = median["on"] / median["off"] - 1
    print(
        f"CPU per token: audits on {median['on']:.0f} us, off {median['off']:.0f} us (medians): "
        f"{overhead:+.1%} (paired ratios {', '.join(f'{x:.3f}' for x in paired)}); goal <= +10%"
    )
    out = dict(
        shape=dict(stages=2, replicas=2, **{k: getattr(shape, k) for k in ("warmup", "window", "steps")}),
        runs=runs,
        median_cpu_us_per_token=median,
        overhead=overhead,
        paired_ratios=paired,
        flagged=sum(r["contended"] for r in runs),
    )
    with open(os.path.join(args.out, "live_overhead.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
