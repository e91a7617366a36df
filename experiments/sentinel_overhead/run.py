"""Cost of the SENTINEL checks against the work they guard, measured in one run.

    python experiments/sentinel_overhead/run.py          # writes results.json beside this file
    python experiments/sentinel_overhead/run.py --quick  # a tiny run for the test suite

For the default model cut in 2 stages and micro-batches of 8 x 128 tokens, it times, alternating so that machine
noise hits both alike: (a) one training step of the pipeline for a micro-batch: stage 0 forward, stage 1 forward,
loss, backward of both, with checks off; (b) the same with the checks a peer runs on: the activation (stage 1),
the loss (stage 1) and the gradient with its activation as context (stage 0). The ratio (b - a) / a is the
overhead of checking every tensor; the goal is under 1% of step time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from swarm.config import DataConfig, ModelConfig  # noqa: E402
from swarm.data import MicroBatchStream, load_token_blocks  # noqa: E402
from swarm.model import StageModule, causal_lm_loss  # noqa: E402
from swarm.sentinel import BACKWARD, FORWARD, SentinelMonitor  # noqa: E402


def step(stages, ids, monitor=None, sender: int = 0) -> float:
    """One micro-batch through both stages; with a monitor, the three checks peers run. ``sender`` rotates the
    senders' names (3 replicas per stage, as in a swarm), so the monitors keep per-sender and cross-sender state."""
    started = time.perf_counter()
    act = stages[0](ids)
    mb = str(id(ids))
    if monitor is not None:
        monitor.check(act.detach(), f"s0-{sender % 3}", FORWARD, microbatch=mb, epoch=0)
    x = act.detach().requires_grad_(True)
    loss = causal_lm_loss(stages[1](x), ids)
    if monitor is not None:
        monitor.check_loss(loss.item(), f"s0-{sender % 3}", microbatch=mb, epoch=0)
    loss.backward()
    if monitor is not None:
        monitor.check(
            x.grad, f"s1-{(sender + 1) % 3}", BACKWARD, microbatch=mb, context=act.detach(), epoch=0
        )
    act.backward(x.grad)
    for stage in stages:
        stage.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (a stage peer uses 1 in swarm local)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = ModelConfig()
    stages = [StageModule(cfg, s, 2) for s in range(2)]
    stream = MicroBatchStream(load_token_blocks(DataConfig(seq_len=128, microbatch_size=8)), 8)
    monitor = SentinelMonitor()
    rounds = 6 if args.quick else 120
    for i in range(40 if not args.quick else 3):  # warm up both paths and the monitor's baselines
        step(stages, stream.microbatch(i), monitor, sender=i)
    off, on = [], []
    for i in range(rounds):
        ids = stream.microbatch(100 + i)
        off.append(step(stages, ids))
        on.append(step(stages, ids, monitor, sender=i))
    check_times = []
    acts = [
        stages[0](stream.microbatch(1000 + i)).detach() for i in range(rounds)
    ]  # distinct: no replay verdicts
    for i, act in enumerate(acts):
        started = time.perf_counter()
        monitor.check(act, f"s0-{i % 3}", FORWARD, microbatch=f"x{i}", epoch=0)
        check_times.append(time.perf_counter() - started)
    results = dict(
        threads=args.threads,
        rounds=rounds,
        tokens_per_microbatch=8 * 128,
        step_ms_checks_off=1000 * statistics.median(off),
        step_ms_checks_on=1000 * statistics.median(on),
        one_activation_check_ms=1000 * statistics.median(check_times),
        overhead=statistics.median(on) / statistics.median(off) - 1,
    )
    print(
        f"pipeline step per micro-batch: {results['step_ms_checks_off']:.1f} ms with checks off, "
        f"{results['step_ms_checks_on']:.1f} ms on (3 checks): overhead {100 * results['overhead']:.2f}%; "
        f"one activation check {results['one_activation_check_ms']:.2f} ms"
    )
    if not args.quick:
        with open(os.path.join(HERE, "results.json"), "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
