"""Audits: a second last-stage replica recomputes the gradient of a sampled micro-batch, for what no statistic sees.

A gradient multiplied by -1, or a stale gradient of another micro-batch, has every statistic an honest one has
(see ``swarm/sentinel.py``). Replicas of a stage hold the same weights (they average gradients and step
together), so two honest replicas given the same activations and labels return (nearly) the same gradient, and a
tampered one points elsewhere. The protocol, for pipelines of two stages or more:

1. The trainer audits a micro-batch with probability ``rate``, and every micro-batch whose last-stage peer is a
   suspect (a receiver rejected one of its tensors lately): it picks up to two other last-stage replicas as
   auditors, deposits the labels with them too, and lists them in the request's ``audit`` field.
2. The penultimate stage removes ``audit`` before calling the last stage, so the audited peer cannot tell an
   audited micro-batch from any other. Once the route's gradient has passed its SENTINEL check, it sends the same
   activations to the first auditor with ``audit_only``: the auditor checks them, computes the loss and the
   gradient of its inputs, and neither trains on them nor counts them as served.
3. :func:`judge` compares the gradients by cosine and norm. Agreement ends the audit (both peers get a clean exchange in
   the ledger). On disagreement the second auditor breaks the tie: the gradient that disagrees with both others is
   the odd one; its sender gets a strike (``audit``), and if it is the route's peer the micro-batch is dropped and
   retried elsewhere, blaming it. Without a majority (no second auditor, or all three apart) nobody is blamed,
   and the micro-batch is retried: an auditor that lies cannot frame an honest peer alone.

Limits: a last stage with two replicas can only detect (retry), not attribute; two colluding replicas of the last
stage picked as auditor and tie-breaker of an honest peer can frame it (a majority of three); middle stages'
gradients are not audited (their gradient depends on the whole rest of the chain: auditing them means
re-running every later stage).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

ROUTE, AUDIT, TIEBREAK = "route", "audit", "tiebreak"


@dataclass(kw_only=True)
class AuditConfig:
    """How often the trainer audits (``rate`` of all micro-batches; ``suspect_rate`` of those whose last-stage peer
    is a suspect), and how alike two gradients must be to agree: cosine >= ``min_cosine`` and norms at most
    ``max_norm_ratio`` times apart. Measured on the tiny model (two stages, 8 x 64 tokens, AdamW 3e-3, over its first
    120 steps), the same activations through last-stage weights one optimizer step apart: cosine 0.989-0.999, norm
    ratio up to 1.21 (in the first 5 steps; 1.01 after 10); two steps apart 0.985, 1.29; five steps apart 0.95, 1.38.
    A sign flip has cosine -1, the gradient of another micro-batch (a replay) -0.02 to 0.02, a x1.5 scaling ratio
    1.5."""

    rate: float = 0.1
    suspect_rate: float = 1.0
    min_cosine: float = 0.5
    max_norm_ratio: float = 1.4
    auditors: int = 2  # the first recomputes; the second breaks a tie
    # how alike a forward recomputation of activations must be (``swarm.stage_server``: stage 0's output recomputed
    # from the trainer's tokens by another replica, with its weights of the epoch the sender claims) to agree, and
    # how far apart to blame anyone. Measured live (tiny model, CPU): in a 2 x 2 swarm whose replicas averaged every
    # round, relative error 0 to 4e-7 at the same epoch; in a 2 x 3 swarm on the loaded 2-core machine, where a
    # replica often missed a round and stepped alone, honest replicas at the same epoch were at cosine 0.992-0.9997
    # and norms up to 1.19x apart (one epoch apart, early in training: cosine 0.69, norms 2.6x apart). Between the
    # two bounds nobody is blamed and a SENTINEL rejection stands. A x1.5 scaling or noise at 0.5x RMS (cosine 0.89)
    # is apart; what agrees is within what honest replicas differ by anyway
    forward_min_cosine: float = 0.99
    forward_max_norm_ratio: float = 1.2
    forward_apart_cosine: float = 0.9
    forward_apart_ratio: float = 1.4

    def __post_init__(self) -> None:
        if not (
            0 <= self.rate <= 1
            and 0 <= self.suspect_rate <= 1
            and -1 < self.min_cosine < 1
            and self.max_norm_ratio > 1
            and -1 < self.forward_apart_cosine <= self.forward_min_cosine < 1
            and 1 < self.forward_max_norm_ratio <= self.forward_apart_ratio
            and 1 <= self.auditors <= 2
        ):
            raise ValueError(
                "audit: rate and suspect_rate in [0, 1], min_cosine in (-1, 1), max_norm_ratio > 1, "
                "-1 < forward_apart_cosine <= forward_min_cosine < 1, "
                "1 < forward_max_norm_ratio <= forward_apart_ratio, auditors 1 or 2"
            )


@dataclass
class AuditOutcome:
    """What an audit found: ``odd`` names the gradient that disagrees with the two others (None if nobody can be
    blamed), ``agree`` whether the route's gradient is confirmed, ``cosines`` the pairs compared."""

    agree: bool
    odd: Optional[str] = None
    cosines: Dict[str, float] = field(default_factory=dict)
    ratios: Dict[str, float] = field(default_factory=dict)  # the pairs' norm ratios (>= 1)
    what: str = "gradient"  # what was compared: "gradient", or "activations" (a forward audit)
    near: bool = (
        False  # the route's and the auditor's differ, but too little for a tie-breaker to blame anyone
    )

    @property
    def needs_tiebreak(self) -> bool:
        return (
            not (self.agree or self.near) and self.odd is None and f"{ROUTE}-{TIEBREAK}" not in self.cosines
        )

    def entries(self, route: str, answered: Sequence[str]) -> List[Tuple[str, bool]]:
        """The judging peer's ledger entries for this audit, (peer, clean) for the route's peer and each auditor that
        answered; none when inconclusive (so a liar frames nobody)."""
        if not self.agree and self.odd is None:
            return []
        return [(who, role != self.odd) for role, who in zip((ROUTE, AUDIT, TIEBREAK), [route, *answered])]

    def reason(self) -> str:
        digits = 2 if self.what == "gradient" else 5  # activations are compared far more closely
        pairs = ", ".join(
            f"{k} {v:+.{digits}f} x{self.ratios.get(k, 1.0):.{digits}f}" for k, v in self.cosines.items()
        )
        if self.agree and self.odd is None:
            return f"audit agrees (cosine, norm ratio: {pairs})"
        if self.odd is None:
            return f"audit inconclusive: {self.what} disagree and no majority (cosine, norm ratio: {pairs})"
        verb = "disagrees" if self.what == "gradient" else "disagree"
        return (
            f"audit: the {self.odd} {self.what} {verb} with two other replicas' (cosine, norm ratio: {pairs})"
        )


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine between two gradients; 0 when either is all zeros or their shapes differ."""
    if a.shape != b.shape:
        return 0.0
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    norm = float(a.norm() * b.norm())
    return float(a @ b) / norm if norm > 0 else 0.0


def norm_ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    """How many times larger the bigger of two gradients' norms is (>= 1; inf when exactly one is all zeros)."""
    na, nb = float(a.detach().double().norm()), float(b.detach().double().norm())
    if not (math.isfinite(na) and math.isfinite(nb)):
        return math.inf
    if na == nb:
        return 1.0
    return max(na, nb) / min(na, nb) if min(na, nb) > 0 else math.inf


def alike(
    a: torch.Tensor, b: torch.Tensor, min_cosine: float, max_norm_ratio: float
) -> Tuple[bool, float, float]:
    """Whether two gradients agree: (agree, cosine, norm ratio)."""
    cos, ratio = cosine(a, b), norm_ratio(a, b)
    return cos >= min_cosine and ratio <= max_norm_ratio, cos, ratio


def judge(
    route: torch.Tensor,
    audit: torch.Tensor,
    tiebreak: Optional[torch.Tensor] = None,
    min_cosine: float = 0.5,
    max_norm_ratio: float = 1.4,
    what: str = "gradient",
    apart: Optional[Tuple[float, float]] = None,
) -> AuditOutcome:
    """Compare the route's gradient (or ``what`` else was recomputed) with an auditor's and, if they disagree, with a
    tie-breaker's. ``apart`` (min cosine, max norm ratio): how far a tensor must be from the two others to be the odd
    one (default: not alike); between alike and apart, nobody is blamed."""
    outcome = AuditOutcome(False, what=what)

    def pair(name: str, a: torch.Tensor, b: torch.Tensor) -> Tuple[bool, bool]:
        ok, cos, ratio = alike(a, b, min_cosine, max_norm_ratio)
        outcome.cosines[name], outcome.ratios[name] = cos, ratio
        return ok, (not ok if apart is None else cos < apart[0] or ratio > apart[1])

    route_audit, route_audit_far = pair(f"{ROUTE}-{AUDIT}", route, audit)
    if route_audit:
        outcome.agree = True
        return outcome
    outcome.near = not route_audit_far
    if tiebreak is None or outcome.near:
        return outcome
    route_ok, route_far = pair(f"{ROUTE}-{TIEBREAK}", route, tiebreak)
    audit_ok, audit_far = pair(f"{AUDIT}-{TIEBREAK}", audit, tiebreak)
    if route_ok and audit_far:
        outcome.agree, outcome.odd = True, AUDIT
    elif route_far and not audit_far:
        outcome.odd = ROUTE
    return outcome


def pick_auditors(
    candidates: Sequence[str], route_peer: str, suspect: bool, cfg: AuditConfig, rng: random.Random
) -> List[str]:
    """The trainer's draw: [] (no audit) or up to ``cfg.auditors`` last-stage peers other than the route's, in
    random order. ``candidates``: the last stage's usable peers (not blacklisted, not banned)."""
    if rng.random() >= (cfg.suspect_rate if suspect else cfg.rate):
        return []
    others = [p for p in candidates if p != route_peer]
    rng.shuffle(others)
    return others[: cfg.auditors]
