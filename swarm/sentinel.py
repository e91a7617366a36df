"""SENTINEL-style checks of every tensor a stage receives, by momentum (EMA) monitoring of cheap statistics.

No computation is duplicated: each check reads the received tensor once or twice (O(size)) and, for gradients,
the activation this peer itself sent for the same micro-batch. Per tensor ``x`` (activations ``[B, T, H]`` on the
way forward, activation-gradients on the way back) the monitor computes:

- ``log_rms``       log of the root mean square: scaling, zeroing, most noise;
- ``mean_shift``    distance of the per-feature mean over tokens from its EMA, in units of the per-feature spread
                    (a diagonal Mahalanobis distance): sign flips, ALIE-style shifts, random replacement;
- ``profile``       1 - cosine between the per-feature RMS profile and its EMA: replacement by structureless data;
- ``token_spread``  per-feature standard deviation across tokens relative to the RMS: constant tensors;
- ``log_peak``      log of max|x| / RMS: spikes;
- ``alignment``     (gradients only) cosine between the gradient and the activation it belongs to: sign flips of
                    gradients, which keep every marginal statistic intact;
- ``replay``        the largest correlation between a random sketch of ``x`` and the sketches of recent tensors
                    of *other* micro-batches: a stale tensor replayed (even with a little noise on top).

Each scalar is scored against two baselines, one for the sender and one for the whole population of senders
to this stage in this direction: ``z = |s - mean| / spread`` where ``mean`` and ``spread`` are EMAs (the spread an
EMA of absolute deviations). A baseline starts with a **warm-up**: its first ``warmup`` observations give no
statistical verdict; then it is initialised *robustly* from their median and median absolute deviation, so a
minority of peers that are bad from their very first message cannot poison it. Afterwards only accepted
tensors update a baseline, so an attacker cannot drag it along. The per-sender baseline catches a peer that
changes its behaviour (a "sleeper"); the population baseline catches one that was bad from the start while
honest peers are the majority. Hard checks need no history: non-finite values, all-zero tensors, absurd
magnitudes.

Knobs (:class:`SentinelConfig`): ``threshold`` (z above which a tensor is rejected), ``warmup``, ``ema_decay``,
``replay_window`` and ``replay_threshold``, ``min_spread`` (a relative floor on each spread, so a statistic that
happened to be very stable does not turn tiny honest changes into huge z-scores).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional, Tuple

import torch

FORWARD, BACKWARD = "forward", "backward"
SCALARS = ("log_rms", "mean_shift", "profile", "token_spread", "log_peak", "alignment")


@dataclass(kw_only=True)
class SentinelConfig:
    """Knobs of the monitors; see the module docstring."""

    threshold: float = 8.0
    warmup: int = 12
    ema_decay: float = 0.9
    min_spread: float = 0.02  # relative floor on each statistic's spread (fraction of |mean|, or absolute near 0)
    replay_window: int = 64
    replay_threshold: float = 0.95
    sketch_dim: int = 256  # tokens sampled for the replay sketch
    max_abs_value: float = 1e4
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.threshold > 0 and self.warmup >= 3 and 0 < self.ema_decay < 1):
            raise ValueError("sentinel: threshold > 0, warmup >= 3, ema_decay in (0, 1)")
        if not (0 < self.replay_threshold <= 1 and self.replay_window >= 0 and self.min_spread > 0):
            raise ValueError("sentinel: replay_threshold in (0, 1], replay_window >= 0, min_spread > 0")


@dataclass
class Verdict:
    """The outcome of checking one tensor."""

    accepted: bool
    sender: str
    direction: str
    score: float  # the largest z-score (or the replay correlation / hard-check value for those reasons)
    threshold: float
    reason: str  # human-readable; "ok" when accepted
    statistic: str = ""
    baseline: str = ""  # "sender", "population", "hard", "replay" or "warmup"

    def __str__(self) -> str:
        return self.reason


class _Baseline:
    """EMA mean and spread of the scalar statistics, plus EMA vectors of per-feature mean, std and RMS profile."""

    def __init__(self, cfg: SentinelConfig):
        self.cfg = cfg
        self.count = 0
        self.warm: List[Tuple[Dict[str, float], Dict[str, torch.Tensor]]] = []
        self.mean: Dict[str, float] = {}
        self.spread: Dict[str, float] = {}
        self.vectors: Dict[str, torch.Tensor] = {}

    @property
    def ready(self) -> bool:
        return self.count >= self.cfg.warmup

    def _floor(self, name: str) -> float:
        return max(self.cfg.min_spread * abs(self.mean[name]), self.cfg.min_spread * 0.5)

    def scores(self, scalars: Dict[str, float]) -> Dict[str, float]:
        return {name: abs(value - self.mean[name]) / max(self.spread[name], self._floor(name))
                for name, value in scalars.items() if name in self.mean}

    def update(self, scalars: Dict[str, float], vectors: Dict[str, torch.Tensor]) -> None:
        self.count += 1
        if not self.mean and self.count <= self.cfg.warmup:
            self.warm.append((dict(scalars), {k: v.clone() for k, v in vectors.items()}))
            if self.count == self.cfg.warmup:
                self._init_from_warmup()
            return
        a = 1 - self.cfg.ema_decay
        for name, value in scalars.items():
            if name not in self.mean:
                self.mean[name], self.spread[name] = value, abs(value) * 0.1
                continue
            deviation = abs(value - self.mean[name])
            self.mean[name] += a * (value - self.mean[name])
            self.spread[name] += a * (deviation - self.spread[name])
        for name, vec in vectors.items():
            if name in self.vectors and self.vectors[name].shape == vec.shape:
                self.vectors[name].lerp_(vec, a)
            else:
                self.vectors[name] = vec.clone()

    def _init_from_warmup(self) -> None:
        """Median / MAD of the warm-up observations: robust to a minority of bad senders."""
        names = set().union(*(s.keys() for s, _ in self.warm))
        for name in names:
            values = torch.tensor([s[name] for s, _ in self.warm if name in s], dtype=torch.float64)
            median = float(values.median())
            self.mean[name] = median
            self.spread[name] = 1.4826 * float((values - median).abs().median())
        for name in set().union(*(v.keys() for _, v in self.warm)):
            stack = [v[name] for _, v in self.warm if name in v and v[name].shape == self.warm[0][1][name].shape]
            self.vectors[name] = torch.stack(stack).median(dim=0).values
        self.warm = []


class SentinelMonitor:
    """Checks incoming tensors of one receiving peer; call :meth:`check` for every tensor before using it."""

    def __init__(self, cfg: Optional[SentinelConfig] = None):
        self.cfg = cfg or SentinelConfig()
        self.population: Dict[str, _Baseline] = {}
        self.senders: Dict[Tuple[str, str], _Baseline] = {}
        self.sketches: Dict[str, Deque[Tuple[str, torch.Tensor]]] = {}
        self._projections: Dict[int, torch.Tensor] = {}
        self.checked = 0
        self.rejected = 0

    # ---- statistics ------------------------------------------------------------------------------------------
    def _projection(self, hidden: int) -> torch.Tensor:
        if hidden not in self._projections:
            gen = torch.Generator().manual_seed(self.cfg.seed + hidden)
            self._projections[hidden] = torch.randn(hidden, generator=gen) / math.sqrt(hidden)
        return self._projections[hidden]

    def statistics(
        self, x: torch.Tensor, context: Optional[torch.Tensor] = None
    ) -> Tuple[Dict[str, float], Dict[str, torch.Tensor], torch.Tensor]:
        """Scalar statistics, per-feature vectors and the replay sketch of one tensor ``[..., H]``."""
        x = x.detach().float()
        flat = x.reshape(-1, x.shape[-1])  # tokens x features
        eps = 1e-12
        rms = float(flat.pow(2).mean().sqrt())
        feat_mean = flat.mean(dim=0)
        feat_std = flat.std(dim=0, unbiased=False) if flat.shape[0] > 1 else torch.zeros_like(feat_mean)
        feat_rms = flat.pow(2).mean(dim=0).sqrt()
        scalars = {
            "log_rms": math.log(rms + eps),
            "token_spread": float(feat_std.mean()) / (rms + eps),
            "log_peak": math.log(float(flat.abs().max()) / (rms + eps) + eps),
        }
        if context is not None and context.shape == x.shape:
            c = context.detach().float().reshape(-1)
            scalars["alignment"] = float(torch.dot(flat.reshape(-1), c) / (flat.norm() * c.norm() + eps))
        # sketch: a random projection of a fixed sample of tokens, centred, for replay detection
        proj = flat @ self._projection(flat.shape[-1])
        step = max(1, proj.numel() // self.cfg.sketch_dim)
        sketch = proj[::step][: self.cfg.sketch_dim]
        sketch = sketch - sketch.mean()
        sketch = sketch / (sketch.norm() + eps)
        return scalars, {"feat_mean": feat_mean, "feat_std": feat_std, "feat_rms": feat_rms}, sketch

    @staticmethod
    def _vector_scalars(base: _Baseline, vectors: Dict[str, torch.Tensor]) -> Dict[str, float]:
        """Distances of this tensor's per-feature vectors from the baseline's EMA vectors."""
        out: Dict[str, float] = {}
        ema_mean, ema_std, ema_rms = (base.vectors.get(k) for k in ("feat_mean", "feat_std", "feat_rms"))
        if ema_mean is not None and ema_std is not None and ema_mean.shape == vectors["feat_mean"].shape:
            scale = ema_std.clamp_min(float(ema_std.mean()) * 1e-3 + 1e-12)
            out["mean_shift"] = float(((vectors["feat_mean"] - ema_mean) / scale).pow(2).mean().sqrt())
        if ema_rms is not None and ema_rms.shape == vectors["feat_rms"].shape:
            cos = torch.nn.functional.cosine_similarity(vectors["feat_rms"], ema_rms, dim=0)
            out["profile"] = float(1 - cos)
        return out

    # ---- verdicts --------------------------------------------------------------------------------------------
    def hard_check(self, x: torch.Tensor, sender: str, direction: str) -> Optional[Verdict]:
        if not x.is_floating_point():
            return None
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            return Verdict(False, sender, direction, float(bad), 0.0, f"{bad} non-finite values", "finite", "hard")
        if x.numel() and not bool(x.any()):
            return Verdict(False, sender, direction, 0.0, 0.0, "all values are zero", "zeros", "hard")
        peak = float(x.abs().max()) if x.numel() else 0.0
        if peak > self.cfg.max_abs_value:
            return Verdict(False, sender, direction, peak, self.cfg.max_abs_value,
                           f"absurd magnitude: max |x| = {peak:.3g}", "peak", "hard")
        return None

    def check(
        self,
        x: torch.Tensor,
        sender: str,
        direction: str,
        microbatch: str = "",
        context: Optional[torch.Tensor] = None,
    ) -> Verdict:
        """Judge one received tensor. ``microbatch`` identifies its data (retries of the same data share it);
        ``context`` is, for gradients, the activation this peer sent for the same micro-batch."""
        self.checked += 1
        verdict = self.hard_check(x, sender, direction)
        if verdict is not None:
            self.rejected += 1
            return verdict
        scalars, vectors, sketch = self.statistics(x, context if direction == BACKWARD else None)
        verdict = self._replay(sketch, sender, direction, microbatch)
        if verdict is None:
            pop = self.population.setdefault(direction, _Baseline(self.cfg))
            own = self.senders.setdefault((sender, direction), _Baseline(self.cfg))
            verdict = self._judge(pop, "population", scalars, vectors, sender, direction)
            if verdict.accepted:
                verdict = self._judge(own, "sender", scalars, vectors, sender, direction)
            if verdict.accepted:
                for base in (pop, own):
                    base.update(dict(scalars, **self._vector_scalars(base, vectors)) if base.ready else scalars, vectors)
        if verdict.accepted:
            window = self.sketches.setdefault(direction, deque(maxlen=self.cfg.replay_window))
            window.append((microbatch, sketch))
        else:
            self.rejected += 1
        return verdict

    def _judge(self, base: _Baseline, name: str, scalars: Dict[str, float], vectors: Dict[str, torch.Tensor],
               sender: str, direction: str) -> Verdict:
        if not base.ready:
            return Verdict(True, sender, direction, 0.0, self.cfg.threshold, "ok (warm-up)", "", "warmup")
        scores = base.scores(dict(scalars, **self._vector_scalars(base, vectors)))
        stat, score = max(scores.items(), key=lambda kv: kv[1]) if scores else ("", 0.0)
        if score > self.cfg.threshold:
            return Verdict(False, sender, direction, score, self.cfg.threshold,
                           f"{stat} is {score:.1f} spreads from the {name} baseline (threshold {self.cfg.threshold:g})",
                           stat, name)
        return Verdict(True, sender, direction, score, self.cfg.threshold, "ok", stat, name)

    def _replay(self, sketch: torch.Tensor, sender: str, direction: str, microbatch: str) -> Optional[Verdict]:
        window = self.sketches.get(direction)
        if not window or sketch.numel() < 8:
            return None
        others = [s for mb, s in window if mb != microbatch and s.shape == sketch.shape]
        if not others:
            return None
        corr = float(torch.stack(others).mv(sketch).max())
        if corr > self.cfg.replay_threshold:
            return Verdict(False, sender, direction, corr, self.cfg.replay_threshold,
                           f"replay: correlates {corr:.3f} with a recent tensor of another micro-batch",
                           "replay", "replay")
        return None


@dataclass
class SentinelLedger:
    """Per-peer tallies of verdicts (clean and rejected, by direction and reason) for the reputation layer."""

    clean: Dict[str, Dict[str, int]] = field(default_factory=dict)
    strikes: Dict[str, Dict[str, int]] = field(default_factory=dict)
    reasons: Dict[str, Dict[str, int]] = field(default_factory=dict)

    def record(self, verdict: Verdict) -> None:
        book = self.clean if verdict.accepted else self.strikes
        per_peer = book.setdefault(verdict.sender, {})
        per_peer[verdict.direction] = per_peer.get(verdict.direction, 0) + 1
        if not verdict.accepted:
            reasons = self.reasons.setdefault(verdict.sender, {})
            key = verdict.statistic or verdict.baseline
            reasons[key] = reasons.get(key, 0) + 1

    def flagged(self, peer: str) -> int:
        return sum(self.strikes.get(peer, {}).values())

    def as_dict(self) -> Dict[str, Dict]:
        return {"clean": self.clean, "strikes": self.strikes, "reasons": self.reasons}
