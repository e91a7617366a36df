"""SENTINEL-style checks of every tensor a stage receives, by momentum (EMA) monitoring of cheap statistics.

No computation is duplicated: each check reads the received tensor once in full and a fixed-size sample of it (see
"Cost and sampling" below) and, for gradients, the same sample of the activation this peer itself sent for the same
micro-batch. Per tensor ``x`` (activations ``[B, T, H]`` on the way forward, activation-gradients on the way back)
the monitor computes:

- ``log_rms``       log of the root mean square: scaling, zeroing, most noise;
- ``mean_shift``    (activations only) distance of the per-feature mean over tokens from its EMA, in units of the
                    per-feature spread (the median over features): ALIE-style shifts, random replacement;
- ``profile``       (activations only) 1 - cosine between the per-feature RMS profile and its EMA: replacement by
                    structureless data;
- ``token_spread``  per-feature standard deviation across tokens relative to the RMS: constant tensors;
- ``skew_align``    (activations only) cosine between the per-feature skewness and its EMA: odd moments flip
                    with the sign, so this catches sign flips that leave every even statistic intact;
- ``alignment``, ``norm_corr``, ``angle_corr`` (gradients only, against the activation this peer sent for the
                    same micro-batch): the cosine between the two, the correlation across tokens of their norms,
                    and of the per-token angle with the activation norm. Only the gradient *of these activations*
                    has this per-token structure: stale, foreign or sign-flipped gradients do not;
- ``replay``        the largest correlation between a random sketch of ``x`` and the sketches of recent tensors
                    of *other* micro-batches: a stale tensor replayed (even with a little noise on top);
- ``token_mismatch`` (the last stage, which has the micro-batch's tokens as labels, when its sender serves stage
                    0; with the loss) 1 - the mean cosine between each position's activation and the running mean
                    of the activations accepted for that position's token (hashed into ``token_buckets``): the
                    residual stream carries its token, so honest activations fit their tokens (measured on the tiny
                    model: 0.25 from scratch, 0.79 after 400 micro-batches) and activations of other data do not
                    (0.00 +- 0.04), however normal their statistics look: a replayed stale tensor, or one computed on
                    other tokens.

Each scalar is scored against two baselines, one for the sender and one for the whole population of senders
to this stage in this direction: ``z = |s - mean| / spread`` where ``mean`` and ``spread`` are EMAs (the spread an
EMA of absolute deviations). A baseline starts with a **warm-up**: its first ``warmup`` observations give no
statistical verdict; then it is initialised *robustly* from their median and median absolute deviation, so a
minority of peers that are bad from their very first message cannot poison it. Afterwards only accepted
tensors update a baseline, so an attacker cannot drag it along. The per-sender baseline catches a peer that
changes its behaviour (a "sleeper"); the population baseline catches one that was bad from the start while
honest peers are the majority. Hard checks need no history: non-finite values, all-zero tensors, absurd
magnitudes, (activations, once other senders are known) an RMS more than ``max_rms_ratio`` times off theirs, and
(gradients) the **causal tail**: in a causal LM trained on next-token loss the last position predicts nothing and
influences no other position, so an honest activation-gradient is exactly zero there at every stage boundary;
noise, shifts and replacements added to a gradient are not (``causal_tail_tolerance``).

What no statistic here sees: a gradient multiplied by -1 or by a modest factor. Every even statistic is unchanged
by a sign flip, and the odd ones (``alignment``, ``angle_corr``) are centred on zero for this model (measured:
alignment -0.0005 +- 0.0027), so a flipped gradient looks honest; honest gradient norms vary by an order of
magnitude between micro-batches, which hides scaling by 1.5. Those need redundancy (checking a sample of
micro-batches on a second peer) or robust averaging of the weights, not monitoring.

Cost and sampling. Everything runs on the device where the tensor lives (a GPU where there is one); the scalars
leave it together, once per check. Per check the cost is one pass over the whole tensor plus work on a sample whose
size does not depend on the tensor's:

- **Every element** (one pass, a sum of squares accumulated in float32, :meth:`SentinelMonitor.energy`): any NaN or
  infinity, an all-zero tensor, ``log_rms`` of the whole tensor, the causal tail (the last position of every
  sequence, read in full) and whether an element may exceed ``max_abs_value`` (the largest ``|x|`` is at most the
  norm; only when the norm leaves room is a second pass, min and max, made: a loud tensor, RMS above
  ``max_abs_value / sqrt(numel)``).
- **A random sample of ``sample_tokens`` tokens** (default 1024, the live swarm's whole micro-batch of 8 x 128;
  every token of a tensor no larger than that, so small tensors are checked exactly as before): every other
  statistic (per-feature moments, distances, skewness, the gradient-activation structure, the last stage's token
  fit). The tokens are drawn without replacement, afresh for every check, from a generator private to the monitor
  and seeded from the OS (``sample_seed`` fixes it for experiments only), so a sender cannot know which of its tokens
  will be read. The replay sketch is of tokens at fixed positions (a replay must line up with its original).

What a sample can and cannot see. Tampering spread over the tensor (noise, shifts, scaling, replacement, sign
flips of activations, ALIE) changes every token, so every sample shows it; the statistics of ``k`` sampled tokens
are about as precise as those of a whole tensor of ``k`` tokens (the live default is 1024 tokens). Tampering
confined to ``m`` of ``N`` tokens enters a check's sample with probability about ``1 - (1 - k/N)^m`` (at
8 x 2048 tokens and k = 1024: 6% for one token, 65% for 16, 98% for 64); the ``j`` of them that a sample holds move
a mean-like statistic by ``j/k`` of their per-token change, where a full check sees ``m/N``: the same on average,
concentrated in fewer checks. What sees
such tampering regardless of the sample: the full pass (non-finite or absurd values anywhere, and through
``log_rms`` any few tokens loud enough to change the tensor's energy) and the last stage's loss (every token). What
sees it neither way: a few tokens quietly replaced by plausible values. No statistic here, sampled or full, sees
them (diluted in the tensor), nor an audit (``swarm/audit.py`` compares whole gradients by cosine); the damage is
bounded by their share of the micro-batch's tokens.

Knobs (:class:`SentinelConfig`): ``threshold`` (z above which a tensor is rejected), ``warmup``, ``ema_decay``,
``replay_window`` and ``replay_threshold``, ``min_spread`` (a relative floor on each spread, so a statistic that
happened to be very stable does not turn tiny honest changes into huge z-scores), ``max_senders`` and
``sender_ttl_s`` (the bounds of the per-sender tables).

Bounded state: everything kept per sender lives in :class:`~swarm.peer_table.PeerTable` s of at most
``max_senders`` keys (one key per sender and direction; default 4096) and is otherwise per direction (three of
them) and of fixed size, so a flood of fresh sender ids costs a bounded amount of memory (see
:mod:`swarm.peer_table` for the bound and its measurement) and a bounded amount of work per check. What eviction
means (:class:`SentinelMonitor` has the details): an evicted sender is judged as a newcomer again (its own baseline
warms up anew; the population, relative-RMS, replay and hard checks judge it meanwhile), and an established sender
(a warm baseline, a momentum of ``momentum_min_count`` tensors, a suspect mark) is evicted only once every other key
of its table is established too.
"""

from __future__ import annotations

import math
import secrets
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Tuple

import torch

from swarm.peer_table import DEFAULT_MAX_PEERS, PeerTable

FORWARD, BACKWARD = "forward", "backward"
LOSS = "loss"  # the last stage's loss on received activations: a free check of what statistics cannot see
SCALARS = (
    "log_rms",
    "mean_shift",
    "profile",
    "skew_align",
    "token_spread",
    "alignment",
    "norm_corr",
    "angle_corr",
)
# distances and spikes are suspicious only when large; the others in both directions
ONE_SIDED = {"mean_shift", "profile", "loss", "token_mismatch"}
DISTANCES = {"mean_shift", "profile", "skew_align"}
LATEST = 4  # accepted tensors remembered per sender and direction as references for the others
# a statistic's threshold after a false alarm, relative to the cleared score (see SentinelMonitor.cleared): measured
# on the tests' traffic, a tensor cleared at 13.3 spreads from the population's baseline was then 14.5 from its
# sender's own, so a raise to just above the score would reject it again
TUNING_MARGIN = 1.2


@dataclass(kw_only=True)
class SentinelConfig:
    """Knobs of the monitors; see the module docstring."""

    threshold: float = 12.0
    warmup_steps: int = 0  # optimizer steps of training during which only hard checks give verdicts
    max_rms_ratio: float = 4.0  # a hard bound on activations: RMS this many times off what others send now
    warmup: int = 12
    ema_decay: float = 0.9
    min_spread: float = (
        0.02  # relative floor on each statistic's spread (fraction of |mean|, or absolute near 0)
    )
    window: int = 64  # accepted tensors the population baseline keeps per direction
    momentum_decay: float = 0.75
    momentum_threshold: float = 3.0
    momentum_clip: float = 6.0  # one tensor moves a sender's momentum by at most (1 - decay) x this
    momentum_min_count: int = 4
    replay_window: int = 64
    replay_threshold: float = 0.95
    sketch_dim: int = 256  # tokens sampled for the replay sketch
    # far above anything honest: the residual stream of a model trained from scratch grows past 1e4 (measured in the
    # simulator after ~650 micro-batches: every honest stage-0 peer was rejected for it and blacklisted)
    max_abs_value: float = 1e6
    # gradients: RMS at the last position, relative to the whole tensor's, above which it is rejected (None: off).
    # Exactly zero for honest gradients of a causal LM trained on next-token loss (see hard_check); the tolerance
    # leaves room for lossy wire compression
    causal_tail_tolerance: Optional[float] = 0.01
    token_buckets: int = 1024  # hashed token ids of the last stage's token-fit check (0: off)
    token_decay: float = 0.99  # per accepted tensor: the token means follow training
    seed: int = 0
    # bounds of the per-sender tables (keys: sender x direction); see SentinelMonitor. At least ``window``, so that the
    # tables of recently seen senders never evict one that a verdict still looks at
    max_senders: int = DEFAULT_MAX_PEERS
    sender_ttl_s: Optional[float] = (
        None  # a sender not heard from for this long is forgotten (None: only by size)
    )
    max_shapes: int = 4  # hidden sizes whose replay projection is cached (a sender picks the shape it sends)
    # tokens drawn at random for the statistics of a larger tensor (0: every token); see "Cost and sampling" in the
    # module docstring. The default is the live swarm's micro-batch (8 x 128), so there nothing changes
    sample_tokens: int = 1024
    # seed of the token sample; None: drawn from the OS when the monitor starts, so a sender cannot predict which of
    # its tokens are looked at. Set it only for reproducible experiments
    sample_seed: Optional[int] = None
    # false alarms tune the threshold (SentinelMonitor.cleared): a statistic whose rejection an audit cleared gets its
    # threshold, in that direction, raised to 1.2x the cleared score, at most this factor of ``threshold``;
    # the raise relaxes back towards 1 by ``tuning_decay`` per check in that direction (0.99: half-life 69 checks)
    max_tuning: float = 1.5
    tuning_decay: float = 0.99

    def __post_init__(self) -> None:
        if not (self.threshold > 0 and self.warmup >= 3 and 0 < self.ema_decay < 1):
            raise ValueError("sentinel: threshold > 0, warmup >= 3, ema_decay in (0, 1)")
        if not (0 < self.replay_threshold <= 1 and self.replay_window >= 0 and self.min_spread > 0):
            raise ValueError("sentinel: replay_threshold in (0, 1], replay_window >= 0, min_spread > 0")
        if not (
            self.max_senders >= max(self.window, 1)
            and self.max_shapes >= 1
            and (self.sender_ttl_s is None or self.sender_ttl_s > 0)
        ):
            raise ValueError("sentinel: max_senders >= window, max_shapes >= 1, sender_ttl_s > 0 (or None)")
        if not (self.sample_tokens == 0 or self.sample_tokens >= 16):
            raise ValueError("sentinel: sample_tokens is 0 (every token) or >= 16")
        if not (self.max_tuning >= 1 and 0 < self.tuning_decay <= 1):
            raise ValueError("sentinel: max_tuning >= 1, tuning_decay in (0, 1]")


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
    baseline: str = (
        ""  # "sender", "population", "relative", "momentum", "drift", "hard", "replay" or "warmup"
    )
    # a rejection that counts against the sender in reputation; False when another sender was just rejected for the
    # same statistic in the same direction (more likely training drift than two attackers: the tensor is still
    # rejected, but it is no evidence about this sender)
    evidence: bool = True

    def __str__(self) -> str:
        return self.reason


def _corr_tensor(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation as a 0-d tensor on the inputs' device (no synchronisation)."""
    a, b = a - a.mean(), b - b.mean()
    return (a * b).sum() / (a.norm() * b.norm() + 1e-12)


def vector_distances(ema: Dict[str, torch.Tensor], vectors: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Distances of one tensor's per-feature vectors from a baseline's EMA vectors (``mean_shift``, ``profile``)."""
    out: Dict[str, float] = {}
    ema_mean, ema_std, ema_rms = (ema.get(k) for k in ("feat_mean", "feat_std", "feat_rms"))
    if ema_mean is not None and ema_std is not None and ema_mean.shape == vectors["feat_mean"].shape:
        scale = ema_std.clamp_min(float(ema_std.mean()) * 1e-3 + 1e-12)
        # logs: these distances are positive and heavy-tailed; on a log scale honest variation is even
        # the median over features, not the mean: a few unusual features in an honest batch do not count, a shift
        # of every feature (ALIE, sign flips, replacement) does
        out["mean_shift"] = math.log(float(((vectors["feat_mean"] - ema_mean) / scale).abs().median()) + 1e-6)
    ema_skew = ema.get("feat_skew")
    if ema_skew is not None and "feat_skew" in vectors and ema_skew.shape == vectors["feat_skew"].shape:
        out["skew_align"] = float(
            torch.nn.functional.cosine_similarity(vectors["feat_skew"], ema_skew, dim=0)
        )
    if ema_rms is not None and ema_rms.shape == vectors["feat_rms"].shape:
        cos = float(torch.nn.functional.cosine_similarity(vectors["feat_rms"], ema_rms, dim=0))
        out["profile"] = math.log(max(1 - cos, 0.0) + 1e-6)
    return out


def _median(values: List[float]) -> float:
    """The lower median (as torch's), in plain Python: these lists are short and checked per tensor."""
    return sorted(values)[(len(values) - 1) // 2]


def _robust(values: List[float]) -> Tuple[float, float]:
    """Median and normal-consistent MAD: unmoved by a minority of outliers."""
    median = _median(values)
    return median, 1.4826 * _median([abs(v - median) for v in values])


def _z(
    name: str, value: float, center: float, spread: float, min_spread: float, signed: bool = False
) -> float:
    deviation = value - center
    if name in ONE_SIDED:
        deviation = max(deviation, 0.0)
    elif not signed:
        deviation = abs(deviation)
    floor = max(min_spread * abs(center), min_spread * 0.5)
    return deviation / max(spread, floor)


class _Population:
    """The baseline of all senders to this peer in one direction.

    Scalars: a window of the last ``window`` accepted values, scored by median / MAD, so a minority of bad
    senders cannot move the centre or inflate the spread even while they are still being accepted (during
    warm-up). Vectors (per-feature mean, std, RMS profile): EMAs ("momentum"), initialised by the coordinate-wise
    median of the first ``warmup`` tensors and afterwards moved only by accepted tensors.
    """

    def __init__(self, cfg: SentinelConfig):
        self.cfg = cfg
        self.window: Deque[Dict[str, float]] = deque(maxlen=cfg.window)
        self.window_senders: Deque[str] = deque(maxlen=cfg.window)  # who sent each window entry
        self.past_deviations: Deque[Dict[str, float]] = deque(maxlen=max(cfg.warmup, cfg.window // 2))
        self.vectors: Dict[str, torch.Tensor] = {}
        self._warm_vectors: List[Dict[str, torch.Tensor]] = []
        self._has_vectors = False
        # medians of the windows, recomputed only when a window changed (a check asks for each several times)
        self._version = 0
        self._cache: Dict[Tuple[str, str], Tuple[int, Any]] = {}

    def _cached(self, kind: str, name: str, compute):
        hit = self._cache.get((kind, name))
        if hit is not None and hit[0] == self._version:
            return hit[1]
        value = compute()
        self._cache[(kind, name)] = (self._version, value)
        return value

    def window_stats(self, name: str) -> Tuple[int, float, float]:
        """(count, median, MAD) of a statistic over the window; with three or more senders in it, the median is
        the median of the senders' own medians (one vote per sender): a receiver that happened to get most of its
        first tensors from one bad sender does not take that sender for the norm (measured: in a 4 x 3 swarm one
        receiver did, and rejected its honest senders for 5-11x RMS 59 times)."""

        def compute():
            by_sender: Dict[str, List[float]] = {}
            values = []
            for sender, entry in zip(self.window_senders, self.window):
                if name in entry:
                    values.append(entry[name])
                    by_sender.setdefault(sender, []).append(entry[name])
            if not values:
                return 0, 0.0, 0.0
            if len(by_sender) < 3:
                return (len(values), *_robust(values))
            center = _median([_median(v) for v in by_sender.values()])
            return len(values), center, 1.4826 * _median([abs(v - center) for v in values])

        return self._cached("window", name, compute)

    @property
    def ready(self) -> bool:
        vectors_ready = bool(self.vectors) or (
            not self._warm_vectors and len(self.window) > 0 and not self._has_vectors
        )
        return vectors_ready and len(self.window) >= self.cfg.warmup

    def distances(self, vectors: Dict[str, torch.Tensor]) -> Dict[str, float]:
        return vector_distances(self.vectors, vectors) if self.vectors else {}

    def _min_count(self, name: str) -> int:
        # distances from the EMA vectors exist only once the vectors do, and their spread needs more samples
        # than a plain statistic's (measured: the first ones after warm-up made false alarms)
        return self.cfg.warmup + (8 if name in DISTANCES else 0)

    def deviations(
        self, scalars: Dict[str, float], centers: Optional[Dict[str, float]] = None
    ) -> Dict[str, float]:
        """Signed deviation of each statistic from its reference: the other senders' current values where given
        (drift that moves everyone alike cancels out), else the window's median."""
        out = {}
        for name, value in scalars.items():
            count, median, _ = self.window_stats(name)
            if count >= self._min_count(name):
                center = centers[name] if centers and name in centers else median
                out[name] = value - center
        return out

    def spread(self, name: str) -> float:
        """Noise level of a statistic: the MAD of past deviations from their references at the time. Measured
        against concurrent references, it does not grow when training drifts the statistic over the window."""

        def compute():
            past = [abs(entry[name]) for entry in self.past_deviations if name in entry]
            if len(past) >= self.cfg.warmup:
                return 1.4826 * _median(past)
            return self.window_stats(name)[2]

        return self._cached("spread", name, compute)

    def scores(
        self, scalars: Dict[str, float], signed: bool = False, centers: Optional[Dict[str, float]] = None
    ) -> Dict[str, float]:
        """z-scores: deviations (see :meth:`deviations`) in units of :meth:`spread`."""
        out = {}
        for name, deviation in self.deviations(scalars, centers).items():
            reference = scalars[name] - deviation
            out[name] = _z(name, scalars[name], reference, self.spread(name), self.cfg.min_spread, signed)
        return out

    def update(
        self,
        scalars: Dict[str, float],
        vectors: Dict[str, torch.Tensor],
        accepted: bool,
        deviations: Optional[Dict[str, float]] = None,
        sender: str = "",
    ) -> None:
        """Follow the traffic, rejected tensors included but bounded: scalars enter the window clipped to
        ``threshold`` spreads (so honest drift still moves the median while a minority pushing one way cannot
        move it far), and rejected tensors move the vector EMAs at a quarter of the rate. Without this, a baseline
        that rejects the drifted honest traffic would never catch up and reject everything from then on."""
        if self.ready:
            clipped = {}
            for name, value in scalars.items():
                count, center, spread = self.window_stats(name)
                if count >= self.cfg.warmup:
                    bound = self.cfg.threshold * max(spread, self.cfg.min_spread * max(abs(center), 0.5))
                    value = min(max(value, center - bound), center + bound)
                clipped[name] = value
            scalars = clipped
        if deviations:
            self.past_deviations.append(
                {
                    name: max(-bound_, min(bound_, d))
                    for name, d in deviations.items()
                    for bound_ in [self.cfg.threshold * max(self.spread(name), 1e-9)]
                }
            )
        self.window.append(scalars)
        self.window_senders.append(sender)
        self._version += 1
        self._has_vectors = self._has_vectors or bool(vectors)
        if not vectors:
            return
        if self.vectors:
            rate = (1 - self.cfg.ema_decay) * (1.0 if accepted else 0.25)
            for name, vec in vectors.items():
                if name in self.vectors and self.vectors[name].shape == vec.shape:
                    self.vectors[name].lerp_(vec, rate)
            return
        self._warm_vectors.append({k: v.clone() for k, v in vectors.items()})
        if len(self._warm_vectors) >= self.cfg.warmup:
            first = self._warm_vectors[0]
            for name in first:
                stack = [
                    v[name] for v in self._warm_vectors if name in v and v[name].shape == first[name].shape
                ]
                self.vectors[name] = torch.stack(stack).median(dim=0).values
            self._warm_vectors = []


class _SenderEMA:
    """One sender's baseline: EMA mean and EMA spread (of absolute deviations) of each statistic, initialised
    robustly from its first ``warmup`` accepted tensors. Catches a sender that changes its behaviour."""

    def __init__(self, cfg: SentinelConfig):
        self.cfg = cfg
        self.count = 0
        self.mean: Dict[str, float] = {}
        self.spread: Dict[str, float] = {}
        self._warm: List[Dict[str, float]] = []

    @property
    def ready(self) -> bool:
        return self.count >= self.cfg.warmup and bool(self.mean)

    def scores(self, scalars: Dict[str, float]) -> Dict[str, float]:
        return {
            name: _z(name, value, self.mean[name], self.spread[name], self.cfg.min_spread)
            for name, value in scalars.items()
            if name in self.mean
        }

    def update(self, scalars: Dict[str, float]) -> None:
        self.count += 1
        if not self.mean:
            self._warm.append(dict(scalars))
            if len(self._warm) >= self.cfg.warmup:
                for name in set.intersection(*(set(w) for w in self._warm)):
                    self.mean[name], self.spread[name] = _robust([w[name] for w in self._warm])
                self._warm = []
            return
        a = 1 - self.cfg.ema_decay
        for name, value in scalars.items():
            if name in self.mean:
                # clipped, so a sudden change (a sleeper waking up) moves the baseline only gradually while
                # slow drift is followed; the population and momentum checks still judge the new behaviour
                bound = self.cfg.threshold * max(
                    self.spread[name], self.cfg.min_spread * max(abs(self.mean[name]), 0.5)
                )
                value = min(max(value, self.mean[name] - bound), self.mean[name] + bound)
                deviation = abs(value - self.mean[name])
                self.mean[name] += a * (value - self.mean[name])
                self.spread[name] += a * (deviation - self.spread[name])


class SentinelMonitor:
    """Checks incoming tensors of one receiving peer; call :meth:`check` for every tensor before using it.

    Per-sender state is kept in :class:`~swarm.peer_table.PeerTable` s of at most ``cfg.max_senders`` keys, each
    forgotten after ``cfg.sender_ttl_s`` without news (if set; ``clock`` measures it). What eviction means, table by
    table:

    - ``senders`` (each sender's own baseline): an evicted sender is judged as a **newcomer** again: its baseline
      warms up anew over ``warmup`` tensors, during which only the population, relative-RMS, momentum, replay and
      hard checks judge it. Warm baselines are protected: a flood of fresh ids evicts each other first, and evicts
      a warm one only once all ``max_senders`` keys are warm (``warmup`` accepted tensors per fresh id).
    - ``momentum``, ``momentum_count``, ``relative``: an evicted sender's momentum starts again from zero and needs
      ``momentum_min_count`` tensors before it is judged, and it is no longer a suspect. Momenta of at least
      ``momentum_min_count`` tensors and suspect marks are protected as above.
    - ``last_seen``, ``latest`` (who sent recently, and their latest accepted values as references): least recently
      used first, without protection. Verdicts read only the senders of the last ``window`` checks, and a key is
      evicted only after ``max_senders >= window`` other senders wrote after it, so eviction here changes no verdict.
    - ``_projections`` (one random projection per hidden size, for the replay sketch): ``max_shapes`` sizes; an
      evicted one is recomputed from the seed, identically.
    """

    def __init__(self, cfg: Optional[SentinelConfig] = None, *, clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg or SentinelConfig()
        self.clock = clock
        min_count, half = self.cfg.momentum_min_count, self.cfg.momentum_threshold / 2
        self.population: Dict[str, _Population] = {}  # per direction (fixed by the caller, not by senders)
        self.senders: PeerTable[Tuple[str, str], _SenderEMA] = self._table(lambda key, ema: ema.ready)
        self.sketches: Dict[str, Deque[Tuple[str, torch.Tensor]]] = {}
        self.momentum: PeerTable[Tuple[str, str], Dict[str, float]] = self._table(
            lambda key, state: self.momentum_count.get(key, 0) >= min_count
        )
        self.momentum_count: PeerTable[Tuple[str, str], int] = self._table(
            lambda key, count: count >= min_count
        )
        self.relative: PeerTable[Tuple[str, str], Dict[str, float]] = self._table(
            lambda key, relative: any(abs(v) > half for v in relative.values())
        )
        self.recent_rejections: Dict[str, Deque[Tuple[int, str, str, int]]] = {}
        # direction -> (when, sender, statistic, sign, z) of every population verdict over the threshold
        self.recent_outliers: Dict[str, Deque[Tuple[int, str, str, int, float]]] = {}
        self.last_seen: Dict[str, PeerTable[str, int]] = {}  # direction -> sender -> when it last sent
        # direction -> sender -> its last accepted (when, statistics, epoch)
        # (a list of at most LATEST entries: a deque's block costs 600 B, thousands of times over in a flood)
        self.latest: Dict[str, PeerTable[str, List[Tuple[int, Dict[str, float], Optional[int]]]]] = {}
        self._projections: PeerTable[int, torch.Tensor] = PeerTable(self.cfg.max_shapes)
        # (direction, statistic) -> the factor its threshold is raised by after false alarms (see cleared)
        self.tuning: Dict[Tuple[str, str], float] = {}
        self.false_alarms = 0
        # token_mismatch: decayed sums and counts of accepted activations per hashed token id
        self.token_sums: Optional[torch.Tensor] = None
        self.token_counts: Optional[torch.Tensor] = None
        self.checked = 0
        self.rejected = 0
        # the token sample's generator: private, and by default seeded from the OS (see SentinelConfig.sample_seed)
        seed = self.cfg.sample_seed if self.cfg.sample_seed is not None else secrets.randbits(63)
        self._sampler = torch.Generator().manual_seed(seed)

    def _table(self, protect: Optional[Callable[[Any, Any], bool]] = None) -> PeerTable:
        return PeerTable(self.cfg.max_senders, self.cfg.sender_ttl_s, clock=self.clock, protect=protect)

    def _per_direction(self, tables: Dict[str, PeerTable], direction: str) -> PeerTable:
        table = tables.get(direction)
        if table is None:
            table = tables[direction] = self._table()
        return table

    @staticmethod
    def _since(table: Optional[PeerTable], horizon: int) -> Iterator[Tuple[str, int]]:
        """(sender, when) of a ``last_seen`` table with ``when >= horizon``, newest first: the table is in the order of
        its writes, so only the recent senders are read, however many the table holds."""
        for sender, when in table.newest() if table is not None else ():
            if when < horizon:
                return
            yield sender, when

    def forget(self, sender: str) -> None:
        """Drop what is kept about ``sender`` as a reference for the others (call it when the sender is blacklisted
        or leaves): its latest values, its momentum and its place among the recently seen senders. Its own
        baseline stays, in case it comes back."""
        for by_sender in (self.latest, self.last_seen):
            for entries in by_sender.values():
                entries.pop(sender, None)
        for key in [k for k in self.momentum if k[0] == sender]:
            self.momentum.pop(key, None)
            self.momentum_count.pop(key, None)
            self.relative.pop(key, None)

    # ---- statistics ------------------------------------------------------------------------------------------
    def _projection(self, hidden: int, device: torch.device) -> torch.Tensor:
        projection = self._projections.get(hidden)
        if projection is None:
            gen = torch.Generator().manual_seed(self.cfg.seed + hidden)
            projection = torch.randn(hidden, generator=gen) / math.sqrt(hidden)
        if projection.device != device:
            projection = projection.to(device)
        self._projections[hidden] = projection
        return projection

    def sample_rows(self, num_tokens: int, device: torch.device) -> Optional[torch.Tensor]:
        """Indices (sorted, on ``device``) of ``cfg.sample_tokens`` tokens drawn without replacement, afresh for
        every call from the monitor's private generator; None when the tensor has no more tokens than that (then
        every token is used)."""
        k = self.cfg.sample_tokens
        if not k or num_tokens <= k:
            return None
        rows = torch.randperm(num_tokens, generator=self._sampler)[:k].sort().values
        return rows.to(device)

    @staticmethod
    def energy(x: torch.Tensor) -> float:
        """Sum of the squares of every element, accumulated in float32 or wider: the one pass over the whole tensor.
        Non-finite when any element is (or when a square overflows float32: a magnitude beyond 1e19)."""
        flat = x.detach().reshape(-1)
        if not flat.is_floating_point():
            flat = flat.float()
        if flat.dtype in (torch.float32, torch.float64):
            return float(torch.dot(flat, flat))  # BLAS: the fastest full reduction on a CPU
        return float(torch.linalg.vector_norm(flat, dtype=torch.float32).square())

    def statistics(
        self,
        x: torch.Tensor,
        context: Optional[torch.Tensor] = None,
        *,
        energy: Optional[float] = None,
    ) -> Tuple[Dict[str, float], Dict[str, torch.Tensor], torch.Tensor]:
        """Scalar statistics, per-feature vectors and the replay sketch of one tensor ``[..., H]``, on the tensor's own
        device. ``log_rms`` is of the whole tensor (``energy``, computed here if not given); the rest are of a random
        sample of ``cfg.sample_tokens`` tokens (the same ones of ``context``), or of every token of a smaller tensor.
        The scalars leave the device together, once."""
        x = x.detach()
        flat = x.reshape(-1, x.shape[-1])  # tokens x features
        num_tokens, hidden = flat.shape
        eps = 1e-12
        if energy is None:
            energy = self.energy(x)
        rows = self.sample_rows(num_tokens, flat.device)
        sample = (flat if rows is None else flat.index_select(0, rows)).float()
        # per-feature moments from two passes over the sample (torch's std over dim 0 is several times slower)
        feat_mean = sample.mean(dim=0)
        centred = sample - feat_mean
        cubed = centred.square()
        feat_var = cubed.mean(dim=0)
        feat_std = feat_var.sqrt()
        feat_rms = (feat_var + feat_mean.square()).sqrt()
        sample_rms = feat_rms.square().mean().sqrt()
        feat_skew = cubed.mul_(centred).mean(dim=0) / (
            feat_std.pow(3) + eps
        )  # odd: flips with the tensor's sign
        names = ["token_spread"]
        values = [feat_std.mean() / (sample_rms + eps)]
        if context is not None and context.shape == x.shape:
            ctx = context.detach().reshape(-1, hidden)
            ctx = (ctx if rows is None else ctx.index_select(0, rows)).float()
            # per-token dot products, once: the global cosine and the per-token angles both come from them
            dots = (sample * ctx).sum(dim=1)
            g_norm, a_norm = sample.norm(dim=1), ctx.norm(dim=1)
            names.append("alignment")
            values.append(dots.sum() / (g_norm.norm() * a_norm.norm() + eps))
            if sample.shape[0] > 2:
                # per-token structure that only the gradient *of these activations* has: tokens with large
                # activations get small gradients (and a typical angle), stale or foreign gradients do not
                cos = dots / (g_norm * a_norm + eps)
                names += ["norm_corr", "angle_corr"]  # angle_corr is odd in the gradient: flips with its sign
                values += [_corr_tensor(g_norm, a_norm), _corr_tensor(cos, a_norm)]
        # sketch: a random projection of tokens at fixed positions (the same in every check, or a replay would not
        # line up with its original), centred, for replay detection
        step = max(1, num_tokens // self.cfg.sketch_dim)
        sketch = flat[::step][: self.cfg.sketch_dim].float() @ self._projection(hidden, flat.device)
        sketch = sketch - sketch.mean()
        sketch = sketch / (sketch.norm() + eps)
        scalars = dict(zip(names, torch.stack(values).tolist()))
        scalars["log_rms"] = math.log(math.sqrt(energy / max(x.numel(), 1)) + eps)
        vectors = {"feat_mean": feat_mean, "feat_std": feat_std, "feat_rms": feat_rms}
        if context is None:
            # activations only: the skewness of activation-gradients is too noisy (measured: it caused most false
            # positives on gradients); their sign is checked against the activation instead (angle_corr)
            vectors["feat_skew"] = feat_skew
        return scalars, vectors, sketch

    # ---- verdicts --------------------------------------------------------------------------------------------
    def hard_check(
        self, x: torch.Tensor, sender: str, direction: str, *, energy: Optional[float] = None
    ) -> Optional[Verdict]:
        """Checks that need no history, of every element: non-finite values, an all-zero tensor, an absurd magnitude
        and (gradients) the causal tail. One pass (:meth:`energy`, reused by :meth:`statistics` when given); a second
        (min and max) only when the tensor's norm leaves room for an element beyond ``max_abs_value``."""
        if not x.is_floating_point():
            return None
        if not x.numel():
            return None
        x = x.detach()
        if energy is None:
            energy = self.energy(x)
        if not math.isfinite(energy):
            bad = int((~torch.isfinite(x)).sum())  # only on the way to a rejection
            if bad:
                return Verdict(
                    False, sender, direction, float(bad), 0.0, f"{bad} non-finite values", "finite", "hard"
                )
            # every element is finite but their squares overflow: the magnitude check below rejects it
        if energy == 0.0:
            # a sum of squares is zero only if every element is (or is below ~1e-19, whose square underflows)
            return Verdict(False, sender, direction, 0.0, 0.0, "all values are zero", "zeros", "hard")
        if (
            not math.sqrt(energy) <= self.cfg.max_abs_value
        ):  # max |x| <= the norm: otherwise no element can be
            low, high = (float(v) for v in torch.aminmax(x))
            peak = max(-low, high)
            if peak > self.cfg.max_abs_value:
                return Verdict(
                    False,
                    sender,
                    direction,
                    peak,
                    self.cfg.max_abs_value,
                    f"absurd magnitude: max |x| = {peak:.3g}",
                    "peak",
                    "hard",
                )
        if (
            direction == BACKWARD
            and self.cfg.causal_tail_tolerance is not None
            and x.ndim == 3
            and x.shape[1] > 1
        ):
            # causal LM: the last position's output predicts nothing (it has no next token), and in a causal model
            # it influences no other position, so the honest gradient there is exactly zero at every stage boundary
            tail = float(x[:, -1].float().pow(2).mean().sqrt())
            whole = math.sqrt(energy / x.numel())
            if tail > self.cfg.causal_tail_tolerance * whole:
                return Verdict(
                    False,
                    sender,
                    direction,
                    tail / whole,
                    self.cfg.causal_tail_tolerance,
                    f"gradient at the last position is {tail / whole:.3g} of the tensor's RMS; a causal "
                    f"LM's is zero there",
                    "causal_tail",
                    "hard",
                )
        return None

    def check(
        self,
        x: torch.Tensor,
        sender: str,
        direction: str,
        microbatch: str = "",
        context: Optional[torch.Tensor] = None,
        step: Optional[int] = None,
        epoch: Optional[int] = None,
    ) -> Verdict:
        """Judge one received tensor. ``microbatch`` identifies its data (retries of the same data share it);
        ``context`` is, for gradients, the activation this peer sent for the same micro-batch; ``step`` is the
        training step it belongs to: before ``warmup_steps``, while the model changes fastest, only hard checks
        and replay give verdicts (the baselines still learn); ``epoch`` is the optimizer epoch of the sender's
        weights that produced the tensor: it is compared with other senders at the same epoch where there are any
        (honest replicas one optimizer step apart differ, most early in training)."""
        self.checked += 1
        self._relax(direction)
        energy = self.energy(x) if x.is_floating_point() and x.numel() else None
        verdict = self.hard_check(x, sender, direction, energy=energy)
        if verdict is not None:
            self.rejected += 1
            return verdict
        scalars, vectors, sketch = self.statistics(
            x, context if direction == BACKWARD else None, energy=energy
        )
        if direction == BACKWARD:
            # no per-feature distances on gradients: every attack they caught there is caught by the causal tail
            # from its first message, and their baselines cannot follow the per-feature drift of honest gradients
            # (measured in a live 2 x 3 run: all three honest stage-1 peers rejected at once for mean_shift)
            vectors = {}
        verdict = self._replay(sketch, sender, direction, microbatch)
        if verdict is None:
            pop = self.population.setdefault(direction, _Population(self.cfg))
            own = self.senders.setdefault((sender, direction), _SenderEMA(self.cfg))
            scalars.update(pop.distances(vectors))
            signed = pop.scores(scalars, signed=True) if pop.ready else {}
            centers = self._centers(direction, sender, epoch)
            warm = pop.ready
            self._per_direction(self.last_seen, direction)[sender] = self.checked
            verdict = self._judge(pop, "population", scalars, sender, direction, centers)
            if not verdict.accepted:
                deviation = pop.deviations(scalars, centers).get(verdict.statistic, 0.0)
                verdict = self._shared_drift(verdict, deviation) or verdict
            # activations only: the RMS of honest gradients varies by an order of magnitude between micro-batches
            if direction == FORWARD and verdict.accepted:
                verdict = self._relative_rms(scalars, sender, epoch, pop) or verdict
            momentum = self._momentum(sender, direction, signed)
            if verdict.accepted and momentum is not None:
                verdict = momentum
            if (
                verdict.accepted and verdict.baseline != "drift"
            ):  # a shared drift moves each sender's own baseline too
                verdict = self._judge(own, "sender", scalars, sender, direction)
                if not verdict.accepted:
                    deviation = scalars[verdict.statistic] - own.mean.get(verdict.statistic, 0.0)
                    verdict = self._shared_drift(verdict, deviation) or verdict
            if step is not None and step < self.cfg.warmup_steps and not verdict.accepted:
                verdict = Verdict(
                    True,
                    sender,
                    direction,
                    verdict.score,
                    verdict.threshold,
                    f"ok (early training, would be: {verdict.reason})",
                    verdict.statistic,
                    "warmup",
                )
            self._feed(
                pop, sender, direction, verdict, signed, scalars, vectors, pop.deviations(scalars, centers)
            )
            if not verdict.accepted and verdict.baseline in ("population", "sender", "momentum", "relative"):
                sign = 1 if signed.get(verdict.statistic, 0.0) >= 0 else -1
                verdict.evidence = verdict.evidence and not self._shared_recently(
                    sender, direction, verdict.statistic, sign
                )
            if verdict.accepted and warm:
                self._remember(direction, sender, scalars, epoch)
            if verdict.accepted or verdict.baseline == "sender":
                own.update(
                    scalars
                )  # a sender's own baseline follows it (clipped), or drift would lock it out
        if verdict.accepted:
            window = self.sketches.setdefault(direction, deque(maxlen=self.cfg.replay_window))
            window.append((microbatch, sketch))
        else:
            self.rejected += 1
        return verdict

    # ---- the last stage: checks that need the micro-batch's tokens ----------------------------------------------
    def _token_ids(self, x: torch.Tensor, tokens: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if (
            not self.cfg.token_buckets
            or tokens is None
            or x.dim() != 3
            or tuple(tokens.shape) != tuple(x.shape[:2])
            or tokens.is_floating_point()
        ):
            return None
        return tokens.reshape(-1).to(x.device).long() % self.cfg.token_buckets

    def _token_sample(self, x: torch.Tensor, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The activations (float) and token ids of a random sample of positions (every position of a small tensor)."""
        flat = x.detach().reshape(-1, x.shape[-1])
        rows = self.sample_rows(flat.shape[0], flat.device)
        if rows is not None:
            flat, ids = flat.index_select(0, rows), ids.index_select(0, rows)
        return flat.float(), ids

    def token_fit(self, x: torch.Tensor, tokens: Optional[torch.Tensor]) -> Optional[float]:
        """Mean cosine between each position's activation (centred) and the running mean of the accepted activations
        of its token (centred), over the positions whose token was seen before; None until a quarter are."""
        ids = self._token_ids(x, tokens)
        if ids is None or self.token_sums is None or self.token_sums.shape[1] != x.shape[-1]:
            return None
        flat, ids = self._token_sample(x, ids)
        known = self.token_counts[ids] >= 1.0
        if int(known.sum()) < max(8, flat.shape[0] // 4):
            return None
        seen = self.token_counts >= 1.0
        means = self.token_sums[seen] / self.token_counts[seen, None]
        token_means = self.token_sums[ids[known]] / self.token_counts[ids[known], None]
        cos = torch.nn.functional.cosine_similarity(
            flat[known] - flat.mean(dim=0), token_means - means.mean(dim=0), dim=1
        )
        return float(cos.mean())

    def _learn_tokens(self, x: torch.Tensor, tokens: Optional[torch.Tensor]) -> None:
        ids = self._token_ids(x, tokens)
        if ids is None:
            return
        flat, ids = self._token_sample(x, ids)
        if self.token_sums is None or self.token_sums.shape[1] != flat.shape[1]:
            self.token_sums = torch.zeros(self.cfg.token_buckets, flat.shape[1], device=flat.device)
            self.token_counts = torch.zeros(self.cfg.token_buckets, device=flat.device)
        self.token_sums.mul_(self.cfg.token_decay).index_add_(0, ids, flat)
        self.token_counts.mul_(self.cfg.token_decay).index_add_(
            0, ids, torch.ones_like(ids, dtype=flat.dtype)
        )

    def check_loss(
        self,
        loss: float,
        sender: str,
        microbatch: str = "",
        step: Optional[int] = None,
        epoch: Optional[int] = None,
        activations: Optional[torch.Tensor] = None,
        tokens: Optional[torch.Tensor] = None,
        attributable: bool = True,
    ) -> Verdict:
        """Judge the loss the last stage computed on ``sender``'s ``activations``, before any backward, and how well
        those activations fit the micro-batch's ``tokens`` (the labels; ``token_mismatch``, see the module
        docstring).

        Activations that look statistically normal but belong to other data (a replayed stale tensor, a shuffled
        one) give a loss above the usual and do not fit their tokens: both checks cost next to nothing.

        ``attributable`` False: the sender computed these activations from another peer's (it does not serve stage
        0), so a bad fit may come from any stage before it, and the token fit is not checked (measured in a 4 x 6
        simulation: activations that honest stage-2 peers computed from a stage-1 attacker's undetected sign flips
        did not fit their tokens at stage 3, and three honest stage-2 peers were blacklisted for it; counted as no
        evidence instead, the refusals steered the router away from the honest stage-2 peers rather than the
        attacker, and no attacker was blacklisted).
        """
        self.checked += 1
        self._relax(LOSS)
        if not math.isfinite(loss):
            self.rejected += 1
            return Verdict(False, sender, LOSS, float("inf"), 0.0, "non-finite loss", "loss", "hard")
        pop = self.population.setdefault(LOSS, _Population(self.cfg))
        scalars = {"loss": math.log(max(loss, 1e-6))}
        fit = self.token_fit(activations, tokens) if activations is not None and attributable else None
        if fit is not None:
            scalars["token_mismatch"] = 1.0 - fit
        signed = pop.scores(scalars, signed=True) if pop.ready else {}
        centers = self._centers(LOSS, sender, epoch)
        warm = pop.ready
        self._per_direction(self.last_seen, LOSS)[sender] = self.checked
        verdict = self._judge(pop, "population", scalars, sender, LOSS, centers)
        momentum = self._momentum(sender, LOSS, signed)
        if verdict.accepted and momentum is not None:
            verdict = momentum
        if step is not None and step < self.cfg.warmup_steps and not verdict.accepted:
            verdict = Verdict(
                True,
                sender,
                LOSS,
                verdict.score,
                verdict.threshold,
                f"ok (early training, would be: {verdict.reason})",
                verdict.statistic,
                "warmup",
            )
        self._feed(pop, sender, LOSS, verdict, signed, scalars, {}, pop.deviations(scalars, centers))
        if verdict.accepted and warm:
            self._remember(LOSS, sender, scalars, epoch)
        if verdict.accepted and activations is not None and attributable:
            self._learn_tokens(activations, tokens)
        if not verdict.accepted:
            self.rejected += 1
            verdict.direction = FORWARD  # it is the activations that are rejected
        return verdict

    def _remember(
        self, direction: str, sender: str, scalars: Dict[str, float], epoch: Optional[int] = None
    ) -> None:
        entries = self._per_direction(self.latest, direction).setdefault(sender, [])
        entries.append((self.checked, dict(scalars), epoch))
        del entries[:-LATEST]

    def _representatives(
        self, direction: str, sender: str, epoch: Optional[int] = None
    ) -> List[Dict[str, float]]:
        """The other senders' latest accepted values, one entry per sender: from weights of the same optimizer
        epoch where that sender has one, else its latest. Only tensors accepted by a warm baseline are remembered,
        so an attacker's tensors never serve as a reference, not even those of the warm-up."""
        representatives = []
        latest = self.latest.get(direction)
        for other, entries in latest.newest() if latest is not None else ():
            if self.checked - entries[-1][0] > self.cfg.window:
                break  # the table is in the order of the latest entries: every older one is stale too
            if other == sender or self.suspect(other, direction):
                continue
            fresh = [
                (values, when_epoch)
                for when, values, when_epoch in entries
                if self.checked - when <= self.cfg.window
            ]
            if not fresh:
                continue
            same = [values for values, when_epoch in fresh if epoch is not None and when_epoch == epoch]
            representatives.append(same[-1] if same else fresh[-1][0])
        return representatives

    def _centers(self, direction: str, sender: str, epoch: Optional[int] = None) -> Dict[str, float]:
        """The median over the other senders of their representative values (see :meth:`_representatives`).

        Training moves every honest sender's statistics at once (each optimizer step shifts them all); judged
        against history alone, honest tensors right after a big step look like outliers. Judged against what the
        other senders send *now*, from weights of the same epoch (honest replicas one optimizer step apart
        differ, most early in training), only a sender that differs from its peers stands out. A sender that lies
        about its epoch gains nothing: an epoch nobody else has is compared with everyone's latest."""
        representatives = self._representatives(direction, sender, epoch)
        if not representatives:
            return {}
        names = set.intersection(*(set(values) for values in representatives))
        return {name: _median([values[name] for values in representatives]) for name in names}

    def _shared_drift(self, verdict: Verdict, deviation: float) -> Optional[Verdict]:
        """A baseline's verdict is overturned when most of the senders recently seen deviate alike: training moved
        them all (an optimizer step, a learning-rate change), and an honest majority that drifts together is the
        new normal. Measured in a live 2 x 3 run: after such a step every honest stage-0 peer was rejected for
        token_spread for 30 micro-batches, and both were blacklisted. "Most": a strict majority, and at least two,
        of the *other* senders seen in the last half window of checks (so an attacker's own outliers can never carry
        an honest majority's verdict on it, nor one honest sender's drift an attacker's). "Alike": the same
        statistic, the same sign, and not more than ``5x`` the smallest of those deviations (a sender far beyond
        the shared drift is still rejected). Suspects count too: drift makes honest senders look suspect. Hard and
        relative-RMS checks still apply afterwards (and momentum, which compares senders with each other)."""
        direction, sender, stat = verdict.direction, verdict.sender, verdict.statistic
        sign = 1 if deviation >= 0 else -1
        outliers = self.recent_outliers.setdefault(direction, deque(maxlen=self.cfg.window))
        outliers.append((self.checked, sender, stat, sign, verdict.score))
        horizon = self.checked - self.cfg.window // 2
        active = {s for s, _ in self._since(self.last_seen.get(direction), horizon)}
        alike: Dict[str, float] = {}
        for when, other, other_stat, other_sign, z in outliers:
            if (
                other != sender
                and when >= horizon
                and other_stat == stat
                and other_sign == sign
                and other in active
            ):
                alike[other] = min(z, alike.get(other, math.inf))
        others = active - {sender}
        if len(alike) < 2 or 2 * len(alike) <= len(others):
            return None  # at least two others: with one, an attacker and an honest sender could each excuse the other
        if verdict.score > 5 * min(alike.values()):
            return None
        return Verdict(
            True,
            sender,
            direction,
            verdict.score,
            verdict.threshold,
            f"ok (drift shared by {len(alike)} of the {len(others)} other senders: {verdict.reason})",
            stat,
            "drift",
        )

    def _relative_rms(
        self,
        scalars: Dict[str, float],
        sender: str,
        epoch: Optional[int],
        pop: Optional["_Population"] = None,
    ) -> Optional[Verdict]:
        """No statistics needed to see an activation ``max_rms_ratio`` times louder or quieter than what the other
        senders send now: rejected when it is that far off from a majority of them (with two others, from both:
        one other sender that is itself off cannot get an honest one rejected). With a single other sender to
        compare with, it must also be that far off the population's centre (one vote per sender): measured in a
        4 x 3 swarm, an attacker's x10 tensors accepted during a receiver's warm-up were the only reference at
        first, and honest senders were rejected against it 59 times."""
        others = [
            values["log_rms"]
            for values in self._representatives(FORWARD, sender, epoch)
            if "log_rms" in values
        ]
        if not others:
            return None
        ratios = sorted(math.exp(abs(scalars["log_rms"] - value)) for value in others)
        ratio = ratios[(len(ratios) + 1) // 2 - 1]  # off by at least this much from a majority of them
        if ratio <= self.cfg.max_rms_ratio:
            return None
        basis, evidence = f"{len(others)} other senders", True
        if len(others) == 1 and pop is not None:
            count, center, _ = pop.window_stats("log_rms")
            off_center = math.exp(abs(scalars["log_rms"] - center))
            if count >= self.cfg.warmup and off_center <= self.cfg.max_rms_ratio:
                return None
            voters = len(set(pop.window_senders))
            basis = f"1 other sender, and {off_center:.1f}x off the centre of {count} recent tensors of {voters} senders"
            # the tensor is refused either way, but it is evidence against its sender only if that centre is one vote
            # per sender of three or more (see _Population.window_stats): one reference alone, or a centre most of
            # whose tensors came from one sender, cannot tell which is off (measured in a live 2 x 3 run: a receiver
            # that had seen mostly the attacker rejected both honest senders against it)
            evidence = count >= self.cfg.warmup and voters >= 3
        return Verdict(
            False,
            sender,
            FORWARD,
            ratio,
            self.cfg.max_rms_ratio,
            f"RMS is {ratio:.1f}x off what the other senders send now ({basis})",
            "log_rms",
            "relative",
            evidence=evidence,
        )

    def _judge(
        self,
        base,
        name: str,
        scalars: Dict[str, float],
        sender: str,
        direction: str,
        centers: Optional[Dict[str, float]] = None,
    ) -> Verdict:
        if not base.ready:
            return Verdict(True, sender, direction, 0.0, self.cfg.threshold, "ok (warm-up)", "", "warmup")
        scores = base.scores(scalars, centers=centers) if centers else base.scores(scalars)
        # the statistic furthest past its own threshold (raised by false alarms: see cleared)
        stat, score = (
            max(scores.items(), key=lambda kv: kv[1] / self.threshold(direction, kv[0]))
            if scores
            else ("", 0.0)
        )
        threshold = self.threshold(direction, stat)
        if score > threshold:
            return Verdict(
                False,
                sender,
                direction,
                score,
                threshold,
                f"{stat} is {score:.1f} spreads from the {name} baseline (threshold {threshold:.3g})",
                stat,
                name,
            )
        return Verdict(True, sender, direction, score, threshold, "ok", stat, name)

    # ---- false alarms ------------------------------------------------------------------------------------------
    def threshold(self, direction: str, statistic: str) -> float:
        """The z-score above which ``statistic`` rejects in ``direction``: ``cfg.threshold``, raised after false
        alarms."""
        return self.cfg.threshold * self.tuning.get((direction, statistic), 1.0)

    def cleared(self, verdict: Verdict) -> None:
        """A recomputation audit found the tensor this monitor rejected honest (a false alarm): its statistic's
        threshold in its direction rises to ``TUNING_MARGIN`` times the score it had, at most ``cfg.max_tuning``
        times ``cfg.threshold``, so that the honest drift that caused it (which goes on, and shows in the sender's
        own baseline too) stops being rejected; :meth:`_relax` brings it back. Only statistical verdicts against a
        baseline tune anything (a hard check, a replay or a relative RMS bound is never loosened). The raise is per direction and statistic, not per sender: an attacker
        cannot raise it (only a tensor that other replicas recompute alike clears a rejection), but while it lasts it
        is looser for every sender; audits back it."""
        self.false_alarms += 1
        if verdict.accepted or verdict.baseline not in ("population", "sender") or not verdict.statistic:
            return
        key = (verdict.direction, verdict.statistic)
        wanted = min(self.cfg.max_tuning, TUNING_MARGIN * verdict.score / self.cfg.threshold)
        self.tuning[key] = max(self.tuning.get(key, 1.0), wanted)

    def _relax(self, direction: str) -> None:
        """Each check in ``direction`` brings its raised thresholds back towards ``cfg.threshold``."""
        for key in [k for k in self.tuning if k[0] == direction]:
            factor = 1.0 + (self.tuning[key] - 1.0) * self.cfg.tuning_decay
            if factor < 1.001:
                del self.tuning[key]
            else:
                self.tuning[key] = factor

    def _momentum(self, sender: str, direction: str, signed: Dict[str, float]) -> Optional[Verdict]:
        """EMA of each statistic's signed deviation from the population, per sender, compared with the other
        senders' (their median): training drift moves every honest sender alike and cancels out; a sender that is
        consistently off, even by a few spreads per tensor, stands out after a handful of tensors."""
        if not signed:
            return None
        key = (sender, direction)
        state = self.momentum.setdefault(key, {})
        count = self.momentum_count.get(key, 0) + 1
        self.momentum_count[key] = count
        b = self.cfg.momentum_decay
        for name, z in signed.items():
            z = max(
                -self.cfg.momentum_clip, min(self.cfg.momentum_clip, z)
            )  # one wild value must not dominate
            state[name] = b * state.get(name, 0.0) + (1 - b) * z
        # only senders still sending: a departed or blacklisted one's momentum is frozen, and compared with it an
        # honest majority that drifts together looks persistently off (measured in live 2 x 3 runs, right after
        # the attacker was blacklisted)
        # (the loss too: it once compared with every sender that ever had a momentum, reading the whole table on
        # each check, and a flood of one-message Sybils made every loss check cost thousands of reads)
        seen = self.last_seen.get(direction)
        candidates = [(s, direction) for s, _ in self._since(seen, self.checked - self.cfg.window)]
        peers = [
            k
            for k in candidates
            if self.momentum_count.get(k, 0) >= self.cfg.momentum_min_count and k in self.momentum
        ]
        # with two senders the median cannot tell which one is off: relative momentum needs three or more
        if count < self.cfg.momentum_min_count or len(peers) < 3:
            return None
        relative = {}
        for name, value in state.items():
            others = [self.momentum[k].get(name, 0.0) for k in peers]
            relative[name] = value - _median(others)
        self.relative[key] = relative
        stat, value = max(relative.items(), key=lambda kv: abs(kv[1]))
        if abs(value) > self.cfg.momentum_threshold:
            return Verdict(
                False,
                sender,
                direction,
                abs(value),
                self.cfg.momentum_threshold,
                f"{stat} of this sender is persistently {value:+.1f} spreads off the other senders "
                f"(momentum threshold {self.cfg.momentum_threshold:g})",
                stat,
                "momentum",
            )
        return None

    def _feed(
        self,
        pop: "_Population",
        sender: str,
        direction: str,
        verdict: Verdict,
        signed: Dict[str, float],
        scalars: Dict[str, float],
        vectors: Dict[str, torch.Tensor],
        deviations: Optional[Dict[str, float]] = None,
    ) -> None:
        """What feeds the population baseline: accepted tensors of senders that are not suspect (a persistent
        small deviation, accepted one tensor at a time, must not become "normal"), and rejected ones only when
        another sender was recently rejected for the same statistic in the same direction: that is drift of the
        whole population (training moves every honest sender alike), which the baseline must follow or it would
        reject everything from then on; one sender alone is an outlier."""
        sign = 1 if signed.get(verdict.statistic, 0.0) >= 0 else -1
        if not verdict.accepted and verdict.baseline in ("population", "momentum", "relative"):
            self.recent_rejections.setdefault(direction, deque(maxlen=self.cfg.window)).append(
                (self.checked, sender, verdict.statistic, sign)
            )
        if not self.suspect(sender, direction) and (
            verdict.accepted or self._drift(sender, direction, verdict.statistic, sign)
        ):
            pop.update(scalars, vectors, verdict.accepted, deviations, sender)

    def _shared_recently(self, sender: str, direction: str, statistic: str, sign: int) -> bool:
        """Whether another sender deviated in ``statistic`` with the same sign within the last half window of
        checks (an outlier of any baseline, or a rejection), the horizon of the drift rule. A quarter window was too
        short: in a live 2 x 3 run the two honest stage-0 peers drifted alike in token_spread for a minute, each
        receiver saw one of them every ~10 checks, and half of their rejections counted as strikes."""
        horizon = self.checked - self.cfg.window // 2
        outliers = self.recent_outliers.get(direction, ())
        rejections = self.recent_rejections.get(direction, ())
        return any(
            other != sender and stat == statistic and sgn == sign and when >= horizon
            for when, other, stat, sgn, _ in outliers
        ) or any(
            other != sender and stat == statistic and sgn == sign and when >= horizon
            for when, other, stat, sgn in rejections
        )

    def _drift(self, sender: str, direction: str, statistic: str, sign: int) -> bool:
        recent = self.recent_rejections.get(direction, ())
        return any(
            other != sender and stat == statistic and sgn == sign and self.checked - when <= self.cfg.window
            for when, other, stat, sgn in recent
        )

    def suspect(self, sender: str, direction: str) -> bool:
        """Whether a sender's momentum is past half the threshold (its tensors stay out of the population window)."""
        relative = self.relative.get((sender, direction), {})
        return any(abs(v) > self.cfg.momentum_threshold / 2 for v in relative.values())

    def _replay(
        self, sketch: torch.Tensor, sender: str, direction: str, microbatch: str
    ) -> Optional[Verdict]:
        window = self.sketches.get(direction)
        if not window or sketch.numel() < 8:
            return None
        others = [s for mb, s in window if mb != microbatch and s.shape == sketch.shape]
        if not others:
            return None
        corr = float(torch.stack(others).mv(sketch).max())
        if corr > self.cfg.replay_threshold:
            return Verdict(
                False,
                sender,
                direction,
                corr,
                self.cfg.replay_threshold,
                f"replay: correlates {corr:.3f} with a recent tensor of another micro-batch",
                "replay",
                "replay",
            )
        return None
