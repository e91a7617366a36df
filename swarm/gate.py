"""The gate of a hop: what a stage peer decides about every tensor it receives before it uses it, and what it
records about the sender. One implementation, used by the stage server (:mod:`swarm.stage_server`, off its event
loop) and by the in-process simulator (``experiments/sim``), so that the experiments measure the server's rules.

The rules:

- **Activations** (forward) get SENTINEL's verdict. At the last stage an accepted tensor is not yet an exchange in
  the ledger: its loss is judged next (:meth:`Gate.loss`), and that verdict is the one entry for those activations.
  Counting both checks as two clean exchanges halved the strike ratio of an attacker at the last stage's inputs
  (measured live: 5 strikes for 5 tampered tensors stood at 5 of 29 exchanges, below the verdict ratio).
- **Gradients** (backward) get SENTINEL's verdict; when the gradient is audited, an accepted one is not an entry
  yet either: the audit's verdict is (:meth:`Gate.audit`).
- **Forward audits** of a previous stage's activations (:meth:`Gate.forward_audit`): a rejection may wait for one
  (``defer_rejection``: cleared by a recomputation that agrees, it is a clean exchange, a false alarm, which raises
  the threshold of the statistic that rejected it for a while: :meth:`SentinelMonitor.cleared`), and an audited
  tensor's entry is the audit's (a strike when two other replicas agree against it).
- **Audits** compare the route's gradient with one auditor's and, if they disagree, a tie-breaker's
  (:func:`swarm.audit.judge`); every gradient that took part gets an entry (the odd one a strike), and the outcome
  says whether the route's gradient stands (``ok``), is refused (``route``), the auditor lied (``audit``: the
  route's gradient stands), or nobody can be told apart (``inconclusive``: refused, nobody blamed).

Pure and synchronous: no transport, no clock of its own. The callers fetch the auditors' gradients (an RPC in the
server, a recomputation in the simulator) and feed them to :meth:`Gate.judge_audit` one by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from swarm.audit import AUDIT, ROUTE, AuditConfig, AuditOutcome, judge
from swarm.reputation import ReputationLedger
from swarm.sentinel import BACKWARD, FORWARD, SentinelMonitor, Verdict

AUDIT_REASON = "audit"


@dataclass
class AuditVerdict:
    """The end of one audit: ``outcome`` (None: no auditor answered) and what it means for the route's gradient."""

    outcome: Optional[AuditOutcome]
    refused: bool  # the route's gradient must not be used
    blame: Optional[str]  # the peer whose gradient was refused, or None (stands, or nobody can be told apart)

    @property
    def kind(self) -> str:
        """``ok``, ``none`` (no auditor answered), ``route``, ``audit`` or ``inconclusive``."""
        if self.outcome is None:
            return "none"
        if self.outcome.agree and self.outcome.odd is None:
            return "ok"
        return self.outcome.odd or "inconclusive"


class Gate:
    """SENTINEL's checks and the audit's judgement of one stage peer, with every verdict recorded in its reputation
    ledger exactly once per exchange (see the module's rules). ``sentinel`` None: tensors are used unchecked (the
    baselines of experiments), nothing is recorded for them."""

    def __init__(
        self,
        sentinel: Optional[SentinelMonitor],
        ledger: ReputationLedger,
        min_cosine: float = 0.5,
        max_norm_ratio: float = 1.4,
        forward_alike: Tuple[float, float] = (
            AuditConfig.forward_min_cosine,
            AuditConfig.forward_max_norm_ratio,
        ),
        forward_apart: Tuple[float, float] = (
            AuditConfig.forward_apart_cosine,
            AuditConfig.forward_apart_ratio,
        ),
    ):
        self.sentinel, self.ledger = sentinel, ledger
        self.min_cosine, self.max_norm_ratio = min_cosine, max_norm_ratio
        # (min cosine, max norm ratio) of recomputed activations that agree, and beyond which they are apart
        self.forward_alike, self.forward_apart = forward_alike, forward_apart

    def activations(
        self,
        x: torch.Tensor,
        sender: str,
        *,
        microbatch: str,
        step: Optional[int],
        epoch: Optional[int],
        last_stage: bool,
        defer_rejection: bool = False,
        audited: bool = False,
    ) -> Optional[Verdict]:
        """SENTINEL's verdict on received activations (None: not checked: no SENTINEL, or token ids, which the
        caller validates by range and digest). At the last stage an acceptance is recorded by :meth:`loss`.
        ``defer_rejection``: a rejection is not recorded yet; an audit decides it (:meth:`settle`, or
        :meth:`forward_audit`); ``audited``: an audit follows either way and records the entry."""
        if self.sentinel is None or not x.is_floating_point():
            return None
        verdict = self.sentinel.check(x, sender, FORWARD, microbatch=microbatch, step=step, epoch=epoch)
        if audited:
            return verdict
        if verdict.accepted and not last_stage or not verdict.accepted and not defer_rejection:
            self.ledger.record_verdict(verdict)
        return verdict

    def loss(
        self,
        loss: float,
        sender: str,
        *,
        microbatch: str,
        step: Optional[int],
        epoch: Optional[int],
        activations: torch.Tensor,
        tokens: torch.Tensor,
        attributable: bool,
    ) -> Optional[Verdict]:
        """The last stage's loss on the sender's activations, judged before any backward: the ledger's one entry for
        those activations. ``attributable``: the sender's own computation made them (stage 1's sender is stage 0,
        fed by the trainer), so an absurd loss is evidence against it."""
        if self.sentinel is None:
            return None
        verdict = self.sentinel.check_loss(
            loss,
            sender,
            microbatch=microbatch,
            step=step,
            epoch=epoch,
            activations=activations,
            tokens=tokens,
            attributable=attributable,
        )
        self.ledger.record_verdict(verdict)
        return verdict

    def gradient(
        self,
        grad: torch.Tensor,
        sender: str,
        *,
        sent: torch.Tensor,
        microbatch: str,
        step: Optional[int],
        epoch: Optional[int],
        audited: bool,
        defer_rejection: bool = False,
    ) -> Optional[Verdict]:
        """SENTINEL's verdict on a received gradient of ``sent`` (this hop's output). When ``audited``, an acceptance
        is recorded by :meth:`audit` instead; with ``defer_rejection`` a rejection waits for :meth:`settle`."""
        if self.sentinel is None:
            return None
        verdict = self.sentinel.check(
            grad, sender, BACKWARD, microbatch=microbatch, context=sent, step=step, epoch=epoch
        )
        if verdict.accepted and not audited or not verdict.accepted and not defer_rejection:
            self.ledger.record_verdict(verdict)
        return verdict

    def settle(self, verdict: Verdict, wrong: Optional[bool], reason: str = "") -> None:
        """The end of a rejection that waited for a recomputation audit (``swarm.evidence``): ``wrong`` True (the
        audit proved the tensor wrong: a strike under ``reason``), False (the audit cleared it: a false alarm, a
        clean exchange) or None (no audit could decide: SENTINEL's strike stands, as without audits)."""
        if wrong is None:
            self.ledger.record_verdict(verdict)
        else:
            self.ledger.record(verdict.sender, not wrong, verdict.direction, reason if wrong else "")
            if not wrong and self.sentinel is not None:  # a false alarm tunes the threshold that raised it
                self.sentinel.cleared(verdict)

    def judge_audit(
        self, tensor: torch.Tensor, answers: Sequence[Tuple[str, torch.Tensor]], direction: str = BACKWARD
    ) -> AuditOutcome:
        """The audit so far: the route's tensor (a gradient, or ``FORWARD`` activations) against the first one or
        two auditors' recomputations. The caller asks a further auditor while ``outcome.needs_tiebreak``."""
        tiebreak = answers[1][1] if len(answers) > 1 else None
        if direction == FORWARD:
            cos, ratio = self.forward_alike
            return judge(tensor, answers[0][1], tiebreak, cos, ratio, "activations", self.forward_apart)
        return judge(tensor, answers[0][1], tiebreak, self.min_cosine, self.max_norm_ratio)

    def audit(self, route_peer: str, outcome: Optional[AuditOutcome], answered: List[str]) -> AuditVerdict:
        """Record an audit's outcome (``answered``: the auditors whose gradients it compared, in order) and say what
        it means for the route's gradient. No answer at all: the gradient stands on SENTINEL's verdict alone."""
        if outcome is None:
            self.ledger.record(route_peer, True, BACKWARD)
            return AuditVerdict(None, False, None)
        for who, clean in outcome.entries(route_peer, answered):
            self.ledger.record(who, clean, BACKWARD, AUDIT_REASON)
        return self._meaning(route_peer, outcome)

    def forward_audit(
        self,
        route_peer: str,
        outcome: Optional[AuditOutcome],
        answered: List[str],
        verdict: Optional[Verdict],
        last_stage: bool,
    ) -> AuditVerdict:
        """Record a forward audit of received activations whose entry :meth:`activations` left to it (``audited``,
        or a rejection deferred): ``verdict`` is SENTINEL's on them. The route's one entry: a strike (``audit``) when
        two other replicas agree against it; otherwise, when an auditor's recomputation agrees with it (a rejection
        cleared: a false alarm) or nobody could decide on a tensor SENTINEL accepted, a clean exchange (at the last
        stage :meth:`loss` records it); a rejection nobody could decide stands with SENTINEL's strike. The auditors
        get entries as in :meth:`audit`."""
        rejected = verdict is not None and not verdict.accepted
        if outcome is not None:
            for who, clean in outcome.entries(route_peer, answered)[1:]:
                self.ledger.record(who, clean, FORWARD, AUDIT_REASON)
        decided = outcome is not None and (outcome.agree or outcome.odd is not None)
        if decided and outcome.odd == ROUTE:
            self.ledger.record(route_peer, False, FORWARD, AUDIT_REASON)
            return AuditVerdict(outcome, True, route_peer)
        if rejected and not decided:
            self.ledger.record_verdict(verdict)
            return AuditVerdict(outcome, True, route_peer)
        # cleared: a false alarm, which tunes the threshold that raised it
        if rejected and self.sentinel is not None:
            self.sentinel.cleared(verdict)
        if not last_stage:
            self.ledger.record(route_peer, True, FORWARD)
        return AuditVerdict(outcome, False, None)

    def _meaning(self, route_peer: str, outcome: AuditOutcome) -> AuditVerdict:
        if outcome.odd == ROUTE:
            return AuditVerdict(outcome, True, route_peer)
        if outcome.odd == AUDIT or (outcome.agree and outcome.odd is None):
            return AuditVerdict(outcome, False, None)
        return AuditVerdict(outcome, True, None)  # inconclusive: refused, nobody blamed
