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
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from typing import Any, Deque, Dict

import torch

ATTACKS = ("noise", "signflip", "scale", "zero", "constant", "random", "replay", "alie")
DIRECTIONS = ("forward", "backward", "both")
DEFAULT_MAGNITUDE = {"noise": 1.0, "signflip": 1.0, "scale": 10.0, "zero": 1.0, "constant": 1.0, "random": 1.0,
                     "replay": 4.0, "alie": 2.0}


@dataclass(kw_only=True)
class AttackConfig:
    name: str
    direction: str = "both"
    magnitude: float = float("nan")  # nan: the attack's default
    probability: float = 1.0  # per message
    start_step: int = 0  # the trainer's optimizer step from which to attack (honest before)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in ATTACKS:
            raise ValueError(f"unknown attack {self.name!r}; known: {', '.join(ATTACKS)}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"attack direction must be one of {DIRECTIONS}")
        if not 0 <= self.probability <= 1 or self.start_step < 0:
            raise ValueError("attack probability must be in [0, 1] and start_step >= 0")
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

    def __init__(self, cfg: AttackConfig):
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.history: Dict[str, Deque[torch.Tensor]] = {}
        self.sent = 0
        self.tampered = 0

    def active(self, direction: str, meta: Dict[str, Any]) -> bool:
        step = meta.get("step", 0)
        return (self.cfg.direction in (direction, "both") and isinstance(step, int) and step >= self.cfg.start_step
                and self.rng.random() < self.cfg.probability)

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
                out = tamper(fresh, self.cfg.name, self.cfg.magnitude, self.gen)
            if out is not fresh:
                self.tampered += 1
        past.append(fresh.clone())
        return out
