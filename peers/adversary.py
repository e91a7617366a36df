"""Byzantine behaviours for tests and experiments, plugged into a stage peer as a hook on outgoing tensors.

The library has no attack branches: :class:`Adversary` is an ``OutboundHook`` (tensor, direction, metadata) ->
tensor that a stage server calls on every activation it sends forward and every gradient it sends back.

Attacks (``magnitude`` m):
    noise     x + m * rms(x) * N(0, 1)
    signflip  -m * x
    scale     m * x
    zero      all zeros
    constant  every element = m * rms(x)
    random    i.i.d. normal with x's mean and standard deviation (matched moments, no structure)
    replay    a stale tensor this peer sent int(m) micro-batches earlier (same shape), instead of the fresh one
    alie      x + m * std_f(x): each feature shifted by m of its own standard deviations ("a little is enough")

Averaging attacks (on the stage's gradient all-reduce and state sharing, through ``swarm.averaging.AveragingHooks``;
``start_step`` counts this peer's averaging rounds):
    avg-scale       its gradient contribution x m (default -20)
    avg-signflip    its contribution x -m (default 1)
    avg-weight      claims m x its sample count (default 100) with a sign-flipped contribution
    avg-aggregate   as the aggregator of a part, returns m x the aggregate (default -5) to everyone, in the
                    gradient round and in the parameter round
    avg-equivocate  sends different gradients to different aggregators: each round, its honest contribution to some
                    and x -m (default 20) to the others, each picked with probability 1/2
    avg-state       serves joiners its parameters x m (default 5), and sends them so into the parameter round
    avg-progress    claims to be m epochs ahead of its stage in its progress records (default 1000)
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from typing import Any, Deque, Dict

import torch

from peers.attack_names import ATTACKS, AVERAGING_ATTACKS, CHAIN_ATTACKS, DIRECTIONS  # noqa: F401 (re-exported)

DEFAULT_MAGNITUDE = {
    "noise": 1.0,
    "signflip": 1.0,
    "scale": 10.0,
    "zero": 1.0,
    "constant": 1.0,
    "random": 1.0,
    "replay": 4.0,
    "alie": 2.0,
    "avg-scale": -20.0,
    "avg-signflip": 1.0,
    "avg-weight": 100.0,
    "avg-aggregate": -5.0,
    "avg-equivocate": 20.0,
    "avg-state": 5.0,
    "avg-progress": 1000.0,
}


@dataclass(kw_only=True)
class AttackConfig:
    name: str
    direction: str = "both"
    magnitude: float = float("nan")  # nan: the attack's default
    probability: float = 1.0  # per message
    start_step: int = 0  # the trainer's optimizer step from which to attack (honest before)
    seed: int = 0
    # > 0: a slow ramp: the attack grows linearly to its magnitude over this many messages it tampers with (noise,
    # alie, constant from 0; scale from 1), so it starts below every statistic's radar
    ramp: int = 0

    def __post_init__(self) -> None:
        if self.name not in ATTACKS:
            raise ValueError(f"unknown attack {self.name!r}; known: {', '.join(ATTACKS)}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"attack direction must be one of {DIRECTIONS}")
        if not 0 <= self.probability <= 1 or self.start_step < 0 or self.ramp < 0:
            raise ValueError("attack probability must be in [0, 1], start_step and ramp >= 0")
        if self.magnitude != self.magnitude:
            self.magnitude = DEFAULT_MAGNITUDE[self.name]


def tamper(x: torch.Tensor, name: str, magnitude: float, gen: torch.Generator) -> torch.Tensor:
    """Apply one attack (all but replay, which needs history) to a tensor."""
    x = x.detach().float()
    rms = x.pow(2).mean().sqrt()
    if name == "noise":
        return x + magnitude * rms * torch.randn(x.shape, generator=gen)
    if name == "signflip":
        return -magnitude * x
    if name == "scale":
        return magnitude * x
    if name == "zero":
        return torch.zeros_like(x)
    if name == "constant":
        return torch.full_like(x, float(magnitude * rms))
    if name == "random":
        return x.mean() + x.std() * torch.randn(x.shape, generator=gen)
    if name == "alie":
        flat = x.reshape(-1, x.shape[-1])
        return x + magnitude * flat.std(dim=0, unbiased=False)
    raise ValueError(f"attack {name!r} needs history; use Adversary")


class Adversary:
    """An outbound hook that tampers with a fraction of what a stage peer sends."""

    def magnitude(self) -> float:
        """The attack's magnitude now: the configured one, or its point on the ramp (``AttackConfig.ramp``)."""
        m, ramp = self.cfg.magnitude, self.cfg.ramp
        if ramp <= 0:
            return m
        share = min(1.0, (self.tampered + 1) / ramp)
        base = 1.0 if self.cfg.name == "scale" else 0.0
        return base + (m - base) * share

    def __init__(self, cfg: AttackConfig):
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.history: Dict[str, Deque[torch.Tensor]] = {}
        self.sent = 0
        self.tampered = 0

    def active(self, direction: str, meta: Dict[str, Any]) -> bool:
        step = meta.get("step", 0)
        return (
            self.cfg.direction in (direction, "both")
            and isinstance(step, int)
            and step >= self.cfg.start_step
            and self.rng.random() < self.cfg.probability
        )

    def __call__(self, x: torch.Tensor, direction: str, meta: Dict[str, Any]) -> torch.Tensor:
        self.sent += 1
        past = self.history.setdefault(direction, deque(maxlen=max(1, int(self.cfg.magnitude)) + 1))
        fresh = x.detach().cpu().float()
        out = fresh
        if self.active(direction, meta):
            if self.cfg.name == "replay":
                stale = past[0] if len(past) == past.maxlen else None
                if stale is not None and stale.shape == fresh.shape:
                    out = stale
            else:
                out = tamper(fresh, self.cfg.name, self.magnitude(), self.gen)
            if out is not fresh:
                self.tampered += 1
        past.append(fresh.clone())
        return out


class AveragingAdversary:
    """Averaging attacks as :class:`swarm.averaging.AveragingHooks` (see the module doc for each one)."""

    def __init__(self, cfg: AttackConfig):
        if cfg.name not in AVERAGING_ATTACKS:
            raise ValueError(f"{cfg.name!r} is not an averaging attack")
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.rounds = 0  # averaging rounds this peer took part in (counted in its averager process)
        self._lied_to: dict = {}  # avg-equivocate: this round's aggregators, and whether each one is lied to

    def _active(self) -> bool:
        return self.rounds >= self.cfg.start_step and self.rng.random() < self.cfg.probability

    def contribution(self, tensors):
        self.rounds += 1
        self._lied_to = {}
        m, name = self.cfg.magnitude, self.cfg.name
        if not self._active() or name not in ("avg-scale", "avg-signflip", "avg-weight"):
            return tensors
        if name == "avg-scale":
            return [m * t for t in tensors]
        return [-(m if name == "avg-signflip" else 1.0) * t for t in tensors]

    def part(self, aggregator: str, part: torch.Tensor) -> torch.Tensor:
        """avg-equivocate: each round, its honest contribution to some of the other aggregators and -m x it to the
        others (each one picked with probability 1/2, anew every round)."""
        if self.cfg.name != "avg-equivocate":
            return part
        if aggregator not in self._lied_to:
            self._lied_to[aggregator] = self._active() and self.rng.random() < 0.5
        return -self.cfg.magnitude * part if self._lied_to[aggregator] else part

    def weight(self, claimed: float) -> float:
        return claimed * self.cfg.magnitude if self.cfg.name == "avg-weight" and self._active() else claimed

    def aggregate(self, part: torch.Tensor) -> torch.Tensor:
        return part * self.cfg.magnitude if self.cfg.name == "avg-aggregate" and self._active() else part

    def state(self, tensors):
        return (
            [t * self.cfg.magnitude if t.is_floating_point() else t for t in tensors]
            if self.cfg.name == "avg-state"
            else tensors
        )

    def progress(self, epoch: int) -> int:
        return epoch + int(self.cfg.magnitude) if self.cfg.name == "avg-progress" else epoch

    def hooks(self):
        from swarm.averaging import AveragingHooks

        hooks = {
            "avg-aggregate": dict(aggregate=self.aggregate),
            "avg-state": dict(state=self.state),
            "avg-weight": dict(contribution=self.contribution, weight=self.weight),
            "avg-equivocate": dict(contribution=self.contribution, part=self.part),
            "avg-progress": dict(progress=self.progress),
        }
        return AveragingHooks(**hooks.get(self.cfg.name, dict(contribution=self.contribution)))
