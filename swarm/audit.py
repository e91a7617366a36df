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
3. :func:`judge` compares the gradients by cosine. Agreement ends the audit (both peers get a clean exchange in
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

import random
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

ROUTE, AUDIT, TIEBREAK = "route", "audit", "tiebreak"


@dataclass(kw_only=True)
class AuditConfig:
    """How often the trainer audits (``rate`` of all micro-batches; ``suspect_rate`` of those whose last-stage peer
    is a suspect), and how alike two gradients must be to agree (``min_cosine``). Measured on the tiny model (two
    stages, 8 x 64 tokens, AdamW 3e-3, over its first 120 steps): the same activations through last-stage weights
    one optimizer step apart 0.989-0.999, five steps apart 0.95-0.99; a sign flip -1; the gradient of another
    micro-batch (a replay) -0.02 to 0.02."""

    rate: float = 0.1
    suspect_rate: float = 1.0
    min_cosine: float = 0.5
    auditors: int = 2  # the first recomputes; the second breaks a tie

    def __post_init__(self) -> None:
        if not (0 <= self.rate <= 1 and 0 <= self.suspect_rate <= 1 and -1 < self.min_cosine < 1
                and 1 <= self.auditors <= 2):
            raise ValueError("audit: rate and suspect_rate in [0, 1], min_cosine in (-1, 1), auditors 1 or 2")


@dataclass
class AuditOutcome:
    """What an audit found: ``odd`` names the gradient that disagrees with the two others (None if nobody can be
    blamed), ``agree`` whether the route's gradient is confirmed, ``cosines`` the pairs compared."""

    agree: bool
    odd: Optional[str] = None
    cosines: Dict[str, float] = field(default_factory=dict)

    @property
    def needs_tiebreak(self) -> bool:
        return not self.agree and self.odd is None and f"{ROUTE}-{TIEBREAK}" not in self.cosines

    def reason(self) -> str:
        pairs = ", ".join(f"{k} {v:+.2f}" for k, v in self.cosines.items())
        if self.agree:
            return f"audit agrees (cosine {pairs})"
        if self.odd is None:
            return f"audit inconclusive: gradients disagree and no majority (cosine {pairs})"
        return f"audit: the {self.odd} gradient disagrees with two other replicas' (cosine {pairs})"


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine between two gradients; 0 when either is all zeros or their shapes differ."""
    if a.shape != b.shape:
        return 0.0
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    norm = float(a.norm() * b.norm())
    return float(a @ b) / norm if norm > 0 else 0.0


def judge(route: torch.Tensor, audit: torch.Tensor, tiebreak: Optional[torch.Tensor] = None,
          min_cosine: float = 0.5) -> AuditOutcome:
    """Compare the route's gradient with an auditor's and, if they disagree, with a tie-breaker's."""
    cosines = {f"{ROUTE}-{AUDIT}": cosine(route, audit)}
    if cosines[f"{ROUTE}-{AUDIT}"] >= min_cosine:
        return AuditOutcome(True, None, cosines)
    if tiebreak is None:
        return AuditOutcome(False, None, cosines)
    cosines[f"{ROUTE}-{TIEBREAK}"] = cosine(route, tiebreak)
    cosines[f"{AUDIT}-{TIEBREAK}"] = cosine(audit, tiebreak)
    route_ok = cosines[f"{ROUTE}-{TIEBREAK}"] >= min_cosine
    audit_ok = cosines[f"{AUDIT}-{TIEBREAK}"] >= min_cosine
    if route_ok and not audit_ok:
        return AuditOutcome(True, AUDIT, cosines)
    if audit_ok and not route_ok:
        return AuditOutcome(False, ROUTE, cosines)
    return AuditOutcome(False, None, cosines)


def pick_auditors(candidates: Sequence[str], route_peer: str, suspect: bool, cfg: AuditConfig,
                  rng: random.Random) -> List[str]:
    """The trainer's draw: [] (no audit) or up to ``cfg.auditors`` last-stage peers other than the route's, in
    random order. ``candidates``: the last stage's usable peers (not blacklisted, not banned)."""
    if rng.random() >= (cfg.suspect_rate if suspect else cfg.rate):
        return []
    others = [p for p in candidates if p != route_peer]
    rng.shuffle(others)
    return others[:cfg.auditors]
