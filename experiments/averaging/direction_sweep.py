"""The direction test's two references on a synthetic stage: when each catches a sign flip, and what it costs.

Three replicas, one sending its gradient flipped, judged by an honest aggregator (sender 0) with the library's
``SliceJudge`` and ``DirectionTest`` over 64 rounds. Each replica's gradient is a slowly drifting true gradient plus
Gaussian noise of ``--noises`` x its scale (per-coordinate SNR 1/noise^2: small batches). Printed per noise level and
seed: the round at which the flip is first reported with both references (the aggregator's own recent gradients and
the round's leave-one-out mean) and with leave-one-out alone, and how often an honest sender was reported; then the
steady-state mean cosines (rounds 20-63) of the flip and of an honest sender against each reference.

    python experiments/averaging/direction_sweep.py      # about a minute; writes direction_sweep.json here
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from statistics import mean

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from swarm.averaging import AveragingConfig, DirectionTest, SliceJudge, update_reference  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def run(noise: float, seed: int, rounds: int = 64, dim: int = 4000) -> dict:
    cfg = AveragingConfig()
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(dim, generator=gen)
    both, loo_only = DirectionTest(cfg), DirectionTest(cfg)
    reference, caught, caught_loo, honest_flags = None, None, None, 0
    cosines = {"flip_ref": [], "flip_loo": [], "honest_ref": [], "honest_loo": []}
    for r in range(rounds):
        g = direction + 0.3 * torch.randn(dim, generator=gen)
        sends = [g + noise * torch.randn(dim, generator=gen) for _ in range(3)]
        sends[2] = -sends[2]
        reference = update_reference(reference, [sends[0]], cfg.direction_momentum)
        judge = SliceJudge(3, cfg, own_index=0)
        judge.combine([0, 1, 2], sends, reference=reference[0])
        loo, ref = judge.cosines(), judge.reference_cosines()
        if both.observe("flip", loo[2], ref[2]) and caught is None:
            caught = r
        if loo_only.observe("flip", loo[2]) and caught_loo is None:
            caught_loo = r
        honest_flags += bool(both.observe("honest", loo[1], ref[1])) + bool(
            loo_only.observe("honest", loo[1])
        )
        for key, value in (
            ("flip_ref", ref[2]),
            ("flip_loo", loo[2]),
            ("honest_ref", ref[1]),
            ("honest_loo", loo[1]),
        ):
            cosines[key].append(value)
    steady = {k: round(mean(v[20:]), 4) for k, v in cosines.items()}
    return dict(noise=noise, seed=seed, caught=caught, caught_leave_one_out_only=caught_loo, honest_flags=honest_flags,
                steady_cosines=steady)  # fmt: skip


def _rounds(rows, key: str) -> str:
    return ",".join("-" if r[key] is None else str(r[key]) for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--noises", type=float, nargs="+", default=[4.0, 8.0, 12.0, 16.0, 20.0])
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--out", default=os.path.join(HERE, "direction_sweep.json"))
    args = parser.parse_args()
    rows = [run(noise, seed) for noise in args.noises for seed in range(args.seeds)]
    print(f"{'noise':>5} {'caught (both refs)':<28} {'caught (leave-one-out only)':<30} honest flags")
    for noise in args.noises:
        sel = [r for r in rows if r["noise"] == noise]
        print(
            f"{noise:>5g} {_rounds(sel, 'caught'):<28} {_rounds(sel, 'caught_leave_one_out_only'):<30} {sum(r['honest_flags'] for r in sel)}"
        )
    print("steady-state mean cosines (rounds 20-63, mean over seeds):")
    for noise in args.noises:
        sel = [r["steady_cosines"] for r in rows if r["noise"] == noise]
        print(f"  noise {noise:g}: " + ", ".join(f"{k} {mean(s[k] for s in sel):+.3f}" for k in sel[0]))
    with open(args.out, "w") as f:
        json.dump(dict(rounds=64, replicas=3, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
