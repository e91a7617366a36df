"""Cost of one SENTINEL check at a 1B-model activation (8 x 2048 x 2048) against that stage's forward+backward.

    flock /tmp/live.lock python experiments/sentinel_overhead/scale.py           # writes scale.json beside this file
    python experiments/sentinel_overhead/scale.py --quick                         # a tiny run (seconds)

In one run, interleaved round by round so that machine noise hits all alike, on the same device (``--device``,
the CPU by default, one torch thread as a stage peer in ``swarm local``):

- the forward check (activations) and the backward check (a gradient, with the activation it belongs to as
  context) of :class:`~swarm.sentinel.SentinelMonitor` as it is now ("sampled": one full pass, statistics on a
  random sample of ``sample_tokens`` tokens), and of the previous algorithm ("full": every statistic over every
  token, kept here only as the baseline), each monitor warmed up first (``--warmup`` checks from three senders) so
  that every check runs the whole path (baselines, distances, momentum, replay window);
- the forward check of a loud activation (RMS 1000): the one case where the new hard check needs a second full pass
  (min and max), because the tensor's norm leaves room for an element above ``max_abs_value``;
- the forward+backward of a middle stage of the ``llama-1b`` preset (hidden 2048, 32 heads, 8 KV heads,
  intermediate 8192; ``--layers`` decoder layers) built from its config with the project's ``StageModule``, at
  ``--fb-batch`` sequences of ``--seq`` tokens. A 8 x 2048 forward+backward of a 1B-model layer on one CPU thread
  takes minutes, so by default it runs one sequence of 2048 and the result is multiplied by 8 / ``fb_batch``:
  sequences of a batch are independent work (the attention stays at the full 2048 length), so this scales
  linearly, and a larger batch is if anything more efficient per sequence, i.e. the estimate errs on the low side
  of the stage's cost and so on the high side of the checks' share.

Every timing reports wall seconds and the process's CPU seconds (all threads), min and median over the rounds, and
the load average before and after; a run whose load average exceeded the core count is flagged in the output.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from swarm.config import model_preset  # noqa: E402
from swarm.model import StageModule  # noqa: E402
from swarm.sentinel import BACKWARD, FORWARD, SentinelConfig, SentinelMonitor, Verdict  # noqa: E402


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm() + 1e-12))


class FullPassMonitor(SentinelMonitor):
    """The previous algorithm, as the baseline only: every statistic over every token, a min/max pass for the hard
    checks and two more passes for the causal tail, the gradient-activation products computed twice, and about ten
    separate synchronising scalar reads. Everything else (the verdict path) is the library's."""

    @staticmethod
    def energy(x: torch.Tensor) -> None:  # the old check had no shared full pass
        return None

    def statistics(
        self, x: torch.Tensor, context: Optional[torch.Tensor] = None, **_
    ) -> Tuple[Dict[str, float], Dict[str, torch.Tensor], torch.Tensor]:
        x = x.detach().float()
        flat = x.reshape(-1, x.shape[-1])
        eps = 1e-12
        feat_mean = flat.mean(dim=0)
        centred = flat - feat_mean
        centred_sq = centred.square()
        feat_var = centred_sq.mean(dim=0)
        feat_std = feat_var.sqrt()
        feat_rms = (feat_var + feat_mean.square()).sqrt()
        rms = float(feat_rms.square().mean().sqrt())
        feat_skew = (centred_sq * centred).mean(dim=0) / (feat_std.pow(3) + eps)
        scalars = {"log_rms": math.log(rms + eps), "token_spread": float(feat_std.mean()) / (rms + eps)}
        if context is not None and context.shape == x.shape:
            ctx = context.detach().float().reshape(-1, x.shape[-1])
            scalars["alignment"] = float((flat * ctx).sum() / (flat.norm() * ctx.norm() + eps))
            if flat.shape[0] > 2:
                g_norm, a_norm = flat.norm(dim=1), ctx.norm(dim=1)
                cos = (flat * ctx).sum(dim=1) / (g_norm * a_norm + eps)
                scalars["norm_corr"] = _corr(g_norm, a_norm)
                scalars["angle_corr"] = _corr(cos, a_norm)
        proj = flat @ self._projection(flat.shape[-1], flat.device)
        step = max(1, proj.numel() // self.cfg.sketch_dim)
        sketch = proj[::step][: self.cfg.sketch_dim]
        sketch = sketch - sketch.mean()
        sketch = sketch / (sketch.norm() + eps)
        vectors = {"feat_mean": feat_mean, "feat_std": feat_std, "feat_rms": feat_rms}
        if context is None:
            vectors["feat_skew"] = feat_skew
        return scalars, vectors, sketch

    def hard_check(self, x: torch.Tensor, sender: str, direction: str, **_) -> Optional[Verdict]:
        if not x.is_floating_point() or not x.numel():
            return None
        low, high = (float(v) for v in torch.aminmax(x.detach()))
        if not (math.isfinite(low) and math.isfinite(high)):
            return Verdict(False, sender, direction, 0.0, 0.0, "non-finite values", "finite", "hard")
        if low == 0.0 and high == 0.0:
            return Verdict(False, sender, direction, 0.0, 0.0, "all values are zero", "zeros", "hard")
        if max(-low, high) > self.cfg.max_abs_value:
            return Verdict(False, sender, direction, 0.0, 0.0, "absurd magnitude", "peak", "hard")
        if direction == BACKWARD and self.cfg.causal_tail_tolerance is not None and x.ndim == 3:
            tail = float(x[:, -1].float().pow(2).mean().sqrt())
            whole = float(x.float().pow(2).mean().sqrt())
            if tail > self.cfg.causal_tail_tolerance * whole:
                return Verdict(False, sender, direction, 0.0, 0.0, "causal tail", "causal_tail", "hard")
        return None


def timed(fn, *args) -> Tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process, result) of one call; the device is synchronised around it."""
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn(*args)
    sync()
    return time.perf_counter() - wall, time.process_time() - cpu, value


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def summary(samples: List[Tuple[float, float]]) -> Dict[str, float]:
    walls, cpus = [s[0] for s in samples], [s[1] for s in samples]
    return dict(
        wall_min_s=min(walls),
        wall_median_s=statistics.median(walls),
        cpu_min_s=min(cpus),
        cpu_median_s=statistics.median(cpus),
        walls_s=walls,
        cpus_s=cpus,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes, no results written")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (a stage peer uses 1 in swarm local)"
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--warmup", type=int, default=40, help="checks per monitor before timing (every baseline warm)"
    )
    parser.add_argument("--layers", type=int, default=1, help="decoder layers of the timed stage")
    parser.add_argument("--fb-batch", type=int, default=1, help="sequences of the timed forward+backward")
    parser.add_argument("--sample-tokens", type=int, default=SentinelConfig().sample_tokens)
    args = parser.parse_args()
    if args.quick:
        args.batch, args.seq, args.hidden, args.rounds, args.warmup, args.fb_batch = 2, 64, 64, 2, 13, 2
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load_before = os.getloadavg()
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch, args.seq, args.hidden)

    def tensors() -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        act = torch.randn(shape, generator=gen, device=device)
        grad = torch.randn(shape, generator=gen, device=device) * 1e-3
        grad[:, -1] = 0  # an honest gradient of a causal LM: zero at the last position
        return act, grad, act * 1000  # the loud one: RMS 1000, so sqrt(energy) > max_abs_value here

    cfg = SentinelConfig(sample_tokens=args.sample_tokens, sample_seed=0)
    variants = {
        "forward_full": (FullPassMonitor(cfg), FORWARD),
        "forward_sampled": (SentinelMonitor(cfg), FORWARD),
        "forward_sampled_loud": (SentinelMonitor(cfg), FORWARD),
        "backward_full": (FullPassMonitor(cfg), BACKWARD),
        "backward_sampled": (SentinelMonitor(cfg), BACKWARD),
    }

    def run_check(name: str, i: int, act, grad, loud) -> Verdict:
        monitor, direction = variants[name]
        x = {FORWARD: loud if name.endswith("loud") else act, BACKWARD: grad}[direction]
        context = act if direction == BACKWARD else None
        return monitor.check(x, f"s{i % 3}", direction, microbatch=str(i), context=context, epoch=0)

    for i in range(args.warmup):
        act, grad, loud = tensors()
        for name in variants:
            run_check(name, i, act, grad, loud)
    stage_cfg = model_preset("llama-1b", num_layers=args.layers + 2)
    if args.quick:
        stage_cfg = model_preset("tiny", num_layers=args.layers + 2, hidden_size=args.hidden)
    stage = StageModule(stage_cfg, 1, 3, device=device)  # the middle stage: hidden states in and out
    assert stage.layer_range[1] - stage.layer_range[0] == args.layers, stage.layer_range
    fb_input = torch.randn(args.fb_batch, args.seq, stage_cfg.hidden_size, generator=gen, device=device)

    def forward_backward() -> None:
        x = fb_input.clone().requires_grad_(True)
        out = stage(x)
        out.backward(torch.ones_like(out))
        stage.zero_grad(set_to_none=True)

    forward_backward()  # allocator and kernels warm
    samples: Dict[str, List[Tuple[float, float]]] = {name: [] for name in variants}
    samples["stage_forward_backward"] = []
    verdicts: Dict[str, List[str]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        act, grad, loud = tensors()
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate: no variant always runs first
        for name in order:
            wall, cpu, verdict = timed(run_check, name, 1000 + r, act, grad, loud)
            samples[name].append((wall, cpu))
            verdicts[name].append(verdict.reason)
        samples["stage_forward_backward"].append(timed(forward_backward)[:2])
        print(
            f"round {r}: "
            + ", ".join(f"{name} {1000 * samples[name][-1][0]:.0f} ms" for name in samples)
            + f" (load {os.getloadavg()[0]:.1f})",
            flush=True,
        )
    load_after = os.getloadavg()
    result = {name: summary(s) for name, s in samples.items()}
    scale = args.batch / args.fb_batch
    fb = result["stage_forward_backward"]
    fb_scaled = {k: v * scale for k, v in fb.items() if not isinstance(v, list)}
    pair = {
        algo: {
            kind: result[f"forward_{algo}"][f"{kind}_median_s"]
            + result[f"backward_{algo}"][f"{kind}_median_s"]
            for kind in ("wall", "cpu")
        }
        for algo in ("full", "sampled")
    }
    shares = {
        algo: {kind: pair[algo][kind] / fb_scaled[f"{kind}_median_s"] for kind in ("wall", "cpu")}
        for algo in pair
    }
    cores = os.cpu_count() or 1
    report = dict(
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__,
        threads=args.threads,
        cores=cores,
        load_average_before=load_before,
        load_average_after=load_after,
        loaded=max(load_before[0], load_after[0]) > cores,
        tensor_shape=list(shape),
        sample_tokens=args.sample_tokens,
        rounds=args.rounds,
        warmup_checks=args.warmup,
        stage=dict(
            preset="tiny" if args.quick else "llama-1b",
            layers=args.layers,
            hidden=stage_cfg.hidden_size,
            intermediate=stage_cfg.intermediate_size,
            measured_batch=args.fb_batch,
            seq=args.seq,
            scaled_by=scale,
        ),
        timings=result,
        stage_forward_backward_scaled_to_batch=fb_scaled,
        checks_per_microbatch_median_s=pair,  # one forward check + one backward check
        share_of_stage_forward_backward=shares,
        last_verdicts={name: v[-1] for name, v in verdicts.items()},
    )
    print(json.dumps({k: report[k] for k in ("load_average_before", "load_average_after", "loaded")}))
    for name, s in result.items():
        print(
            f"{name:24s} wall min {1000 * s['wall_min_s']:9.1f} ms  median {1000 * s['wall_median_s']:9.1f} ms   "
            f"cpu min {1000 * s['cpu_min_s']:9.1f} ms  median {1000 * s['cpu_median_s']:9.1f} ms"
        )
    print(
        f"stage forward+backward scaled x{scale:g} to batch {args.batch}: wall median "
        f"{fb_scaled['wall_median_s']:.2f} s, cpu median {fb_scaled['cpu_median_s']:.2f} s"
    )
    for algo in shares:
        print(
            f"{algo:8s} forward+backward checks per micro-batch: {1000 * pair[algo]['wall']:.1f} ms wall, "
            f"{1000 * pair[algo]['cpu']:.1f} ms cpu = {100 * shares[algo]['wall']:.3f}% (wall) / "
            f"{100 * shares[algo]['cpu']:.3f}% (cpu) of the stage's forward+backward"
        )
    if report["loaded"]:
        print(
            f"WARNING: load average above the core count ({cores}): wall times are inflated, read the CPU times"
        )
    print("last verdicts:", report["last_verdicts"])
    if not args.quick:
        name = "scale.json" if device.type == "cpu" else f"scale_{device.type}.json"
        with open(os.path.join(HERE, name), "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
