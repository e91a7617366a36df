"""Evidence: signed tensors, recomputation audits of any stage in either direction, accusations others re-check.

Statistics (``swarm.sentinel``) see what a tensor looks like; they cannot see that it is *wrong*. Replicas of a stage
hold the same weights (within an optimizer step or two), so any replica can recompute what another one should have
sent, and signatures turn a recomputation into proof:

1. **Signed tensors.** Every tensor a hop sends travels with a :class:`TensorClaim`: the sender's signature (its
   libp2p RSA identity key, checked against its peer id with nothing but the key the claim carries) over the
   tensor's digest, the micro-batch, the direction, the stage, the sender's epoch, and the digests of the inputs it
   says it computed the tensor from. Forward: the input activations (or, at stage 0, the token ids the trainer
   signed). Backward: the input activations and the output-gradient (at the last stage, the labels the trainer
   signed). The receiver checks a claim before using the tensor (:func:`check_received`). A peer cannot later deny
   what it sent, nobody can attribute to it what it did not send, and a claim names exactly which signed inputs it
   rests on.
2. **Audits.** For a sampled share of hops, and for every hop whose sender is suspect, an auditor replica of the
   sender's stage, drawn so that anyone can re-check the draw (:func:`draw_auditor`: the lowest hash of (the
   trainer's revealed salt, the claim, candidate) among the stage's replicas other than the audited peer and its
   chain neighbours), recomputes the hop (:func:`recompute`) from the signed inputs with the weights of the claim's
   epoch and compares with the signed output (:func:`relative_error` against :class:`AuditTolerance`; replicas one
   step apart differ far more than small attacks do, ``experiments/audits/tolerance.py``).
3. **Accusations carry their evidence.** A failed audit becomes an :class:`Accusation`: the accused's claim, the
   claims of its inputs by *their* senders, and the tensors they cover. :func:`check_accusation` verifies every
   signature, digest and binding without any weights; :func:`reverify` recomputes it with the checker's own
   replica of the stage. :class:`ProofBook` collects the replicas' findings: an accusation is **proven** when,
   among the weighted replicas of that stage other than the accused, more confirm it than refute it and at least
   one confirmation comes from a replica other than the accuser. A proof blacklists at once
   (``swarm.reputation.aggregate(proven=...)``, no quorum of strikes needed); an accusation that other replicas
   refute costs its accuser a ``false_accusation`` strike in each refuter's ledger.

Limits: a stage with two replicas has no independent checker, so an audit there gives a strike, never a proof (a
lone liar among two cannot frame its partner, and cannot be proven wrong either); exact recomputation needs the
replicas' weights of the claim's epoch to be identical, which holds in the simulator (one weight copy per stage)
and not yet live, where replicas that miss averaging rounds drift apart by several percent.

Where it runs: the simulator (``experiments/sim``, ``SimConfig.evidence``) runs all of it. The stage server uses
``draw_auditor``, ``recompute`` and ``StageAuditConfig`` for audits of middle stages' gradients, with signed hop
reports (``swarm.protocol.HopReport.digests``) in place of claims and ``swarm.audit.judge`` in place of the exact
tolerance, and for audits of stage 0's activations from the trainer's signed tokens, recomputed with the weights of
the sender's epoch (``swarm.optimizer.StageOptimizer.weights_at``) and judged with tight thresholds (see
``docs/defences.md``).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import msgpack
import torch
from hivemind.utils.crypto import RSAPrivateKey

from swarm.identity import peer_id_of
from swarm.model import StageModule, causal_lm_loss
from swarm.protocol import (
    MAX_ID_CHARS,
    MAX_KEY_BYTES,
    MAX_SIGNATURE_BYTES,
    _verify,
    tensor_digest,
)
from swarm.sentinel import BACKWARD, FORWARD

TOKENS = (
    "tokens"  # the trainer's claim over a micro-batch's token ids (stage 0's input, the last stage's labels)
)
DIRECTIONS = (FORWARD, BACKWARD, TOKENS)
CLAIM_LABEL = b"swarm.claim.v1"
DIGEST_BYTES = 32
PROOF = "proof"  # the reason of a blacklist entry that rests on a proven accusation
FALSE_ACCUSATION = "false_accusation"  # a refuted accuser's strike reason
WITHHELD = "withheld"  # a receiver that would not hand an auditor the signed tensor it got


class EvidenceError(ValueError):
    """A claim or accusation that does not verify; the message says why."""


@dataclass(frozen=True)
class TensorClaim:
    """A sender's signed statement about one tensor it sent (see the module docstring)."""

    sender: str
    stage: int  # the sender's stage (-1 for the trainer's tokens)
    direction: str  # FORWARD, BACKWARD or TOKENS
    microbatch: str
    epoch: int
    digest: bytes  # tensor_digest of what was sent
    inputs: Tuple[bytes, ...]  # digests of the inputs it was computed from (none for tokens)
    public_key: bytes
    signature: bytes = b""

    def payload(self) -> bytes:
        return msgpack.packb(
            [
                CLAIM_LABEL,
                self.sender,
                self.stage,
                self.direction,
                self.microbatch,
                self.epoch,
                self.digest,
                list(self.inputs),
            ],
            use_bin_type=True,
        )

    @property
    def key(self) -> bytes:
        """A short id of this claim."""
        return hashlib.sha256(self.payload()).digest()

    @classmethod
    def create(
        cls,
        key: RSAPrivateKey,
        *,
        stage: int,
        direction: str,
        microbatch: str,
        epoch: int,
        tensor: torch.Tensor,
        inputs: Sequence[bytes] = (),
    ) -> "TensorClaim":
        public = key.get_public_key().to_bytes()
        unsigned = cls(
            sender=peer_id_of(public),
            stage=int(stage),
            direction=direction,
            microbatch=str(microbatch),
            epoch=int(epoch),
            digest=tensor_digest(tensor),
            inputs=tuple(inputs),
            public_key=public,
        )
        return cls(**{**unsigned.__dict__, "signature": key.sign(unsigned.payload())})

    def verify(self) -> None:
        """Well-formed and signed by the key whose peer id is ``sender``; raises EvidenceError otherwise."""
        if self.direction not in DIRECTIONS:
            raise EvidenceError(f"claim: unknown direction {self.direction!r}")
        if len(self.digest) != DIGEST_BYTES or any(len(d) != DIGEST_BYTES for d in self.inputs):
            raise EvidenceError("claim: digests must be 32 bytes")
        expected = {TOKENS: 0, FORWARD: 1, BACKWARD: 2}[self.direction]
        if len(self.inputs) != expected:
            raise EvidenceError(
                f"claim: a {self.direction} claim names {expected} inputs, got {len(self.inputs)}"
            )
        try:
            signer = peer_id_of(self.public_key)
        except ValueError as e:
            raise EvidenceError(f"claim: bad public key ({e})") from None
        if signer != self.sender:
            raise EvidenceError("claim: the key does not derive the sender's peer id")
        if not _verify(self.public_key, self.payload(), self.signature):
            raise EvidenceError(f"claim: bad signature by {self.sender[-8:]}")

    def covers(self, tensor: torch.Tensor) -> bool:
        return tensor_digest(tensor) == self.digest

    def to_wire(self) -> Dict[str, Any]:
        return dict(
            sender=self.sender,
            stage=self.stage,
            direction=self.direction,
            mb=self.microbatch,
            epoch=self.epoch,
            digest=self.digest,
            inputs=list(self.inputs),
            key=self.public_key,
            sig=self.signature,
        )

    @classmethod
    def from_wire(cls, value: Any) -> "TensorClaim":
        """Parse with bounds (no field larger than a claim needs); the signature is checked by :meth:`verify`."""
        if not isinstance(value, dict) or set(value) != {
            "sender",
            "stage",
            "direction",
            "mb",
            "epoch",
            "digest",
            "inputs",
            "key",
            "sig",
        }:
            raise EvidenceError("claim: wrong fields")

        def text(name: str) -> str:
            v = value[name]
            if not isinstance(v, str) or not 0 < len(v) <= MAX_ID_CHARS:
                raise EvidenceError(f"claim: {name} must be a string of 1..{MAX_ID_CHARS} characters")
            return v

        def blob(v: Any, what: str, limit: int) -> bytes:
            if not isinstance(v, bytes) or len(v) > limit:
                raise EvidenceError(f"claim: {what} must be at most {limit} bytes")
            return v

        for name in ("stage", "epoch"):
            v = value[name]
            if not isinstance(v, int) or isinstance(v, bool) or not -1 <= v < 2**40:
                raise EvidenceError(f"claim: {name} must be an integer")
        inputs = value["inputs"]
        if not isinstance(inputs, list) or len(inputs) > 2:
            raise EvidenceError("claim: inputs must be a list of at most 2 digests")
        return cls(
            sender=text("sender"),
            stage=value["stage"],
            direction=text("direction"),
            microbatch=text("mb"),
            epoch=value["epoch"],
            digest=blob(value["digest"], "digest", DIGEST_BYTES),
            inputs=tuple(blob(d, "an input digest", DIGEST_BYTES) for d in inputs),
            public_key=blob(value["key"], "key", MAX_KEY_BYTES),
            signature=blob(value["sig"], "sig", MAX_SIGNATURE_BYTES),
        )


def check_received(
    claim: TensorClaim,
    tensor: torch.Tensor,
    *,
    sender: str,
    stage: int,
    direction: str,
    microbatch: str,
    sent_inputs: Optional[Dict[int, bytes]] = None,
) -> None:
    """A receiver's check of the claim that came with a tensor: signed by the peer that sent it, about this tensor,
    this micro-batch, stage and direction. ``sent_inputs``: input digests the receiver knows (a backward claim's
    input 0 is the activation this receiver sent), which the claim must name. Raises EvidenceError."""
    claim.verify()
    if claim.sender != sender:
        raise EvidenceError(f"claim signed by {claim.sender[-8:]}, but {sender[-8:]} sent the tensor")
    if (claim.stage, claim.direction, claim.microbatch) != (stage, direction, microbatch):
        raise EvidenceError(
            f"claim is about stage {claim.stage} {claim.direction} of {claim.microbatch!r}, "
            f"expected stage {stage} {direction} of {microbatch!r}"
        )
    if not claim.covers(tensor):
        raise EvidenceError("claim's digest does not match the tensor sent")
    for i, digest in (sent_inputs or {}).items():
        if claim.inputs[i] != digest:
            raise EvidenceError(f"claim names an input {i} that is not the one this peer sent")


# ---- recomputation -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AuditTolerance:
    """The largest relative error (:func:`relative_error`) between an audited tensor and the auditor's
    recomputation that still counts as a match. An auditor recomputes with the weights of the epoch the claim names
    (the simulator's replicas share them; live replicas would need snapshots per epoch, not built yet), because
    replicas one step apart are far apart: measured (``experiments/audits/tolerance.py``, tiny model, 4 stages, AdamW lr 2e-3), one step apart
    up to 0.19 forward and 0.25 backward (two steps: 0.33 / 0.45), more than a x1.1 scaling (0.10) or noise at 0.1x
    RMS (0.098). With the same weights the recomputation was bit-identical on CPU in float32, across thread
    counts (error 0.0 on 351 + 348 hops). The defaults leave room for kernels that add in another order (GPU
    atomics, bf16 autocast), which this machine could not measure."""

    forward: float = 1e-3
    backward: float = 1e-3

    def __post_init__(self) -> None:
        if not (0 < self.forward < 1 and 0 < self.backward < 1):
            raise ValueError("audit tolerance: forward and backward in (0, 1)")

    def of(self, direction: str) -> float:
        return self.forward if direction == FORWARD else self.backward


@dataclass(kw_only=True)
class StageAuditConfig:
    """When hops are audited by recomputation: ``rate`` of all hops (a draw per hop; the result may arrive after the
    micro-batch went on), every hop of a newcomer (its first ``newcomer_audits``), ``suspect_rate`` of the hops of a
    suspect sender (one a receiver rejected lately: the receiver waits for the audit), and with ``on_suspicion``
    every tensor SENTINEL rejects (the audit decides: cleared, it is used and counted as a false alarm; proven
    wrong, refused with proof). Cost: a forward audit recomputes one stage's forward, a backward audit its forward
    and backward, so ``rate`` 0.2 adds about 20% to a stage's compute in steady state."""

    rate: float = 0.2
    suspect_rate: float = 1.0
    on_suspicion: bool = True
    newcomer_audits: int = (
        8  # every hop of a sender is audited until this many of its hops were (a fresh id's)
    )
    tolerance: AuditTolerance = field(default_factory=AuditTolerance)

    def __post_init__(self) -> None:
        if not (0 <= self.rate <= 1 and 0 <= self.suspect_rate <= 1 and self.newcomer_audits >= 0):
            raise ValueError("stage audits: rate and suspect_rate in [0, 1], newcomer_audits >= 0")

    def rate_for(self, *, suspicious: bool, suspect: bool, audited_before: int) -> float:
        """The probability that a hop is audited: 1 for a tensor SENTINEL rejected (``on_suspicion``), for a suspect
        sender (``suspect_rate``) and for a sender with fewer than ``newcomer_audits`` audits; else ``rate``."""
        if suspicious and self.on_suspicion:
            return 1.0
        if suspect:
            return self.suspect_rate
        return 1.0 if audited_before < self.newcomer_audits else self.rate


def relative_error(claimed: torch.Tensor, expected: torch.Tensor) -> float:
    """``||claimed - expected|| / ||expected||`` in float64; inf when shapes differ or anything is not finite."""
    if claimed.shape != expected.shape:
        return math.inf
    a, b = claimed.detach().double().flatten(), expected.detach().double().flatten()
    den = float(b.norm())
    num = float((a - b).norm())
    if not (math.isfinite(num) and math.isfinite(den)):
        return math.inf
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def recompute(
    module: StageModule,
    direction: str,
    x_in: torch.Tensor,
    grad_out: Optional[torch.Tensor],
    tokens: Optional[torch.Tensor] = None,
    weights: Optional[Dict[str, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """What an honest replica holding ``module`` sends for this hop: ``(forward output, input gradient)``; with
    ``weights`` (parameters by name, for instance those of an earlier epoch) in place of the module's own.

    The forward output is the activations (the last stage's: its loss, as a 0-d float32 tensor); the input gradient
    (``direction == BACKWARD`` on a stage other than 0) comes from ``grad_out``, or at the last stage from the loss
    on ``tokens``. Neither the weights' gradients nor any optimizer state are touched: an audit never trains."""
    device = next(module.parameters()).device
    floating = x_in.is_floating_point()
    x = x_in.detach().to(device)
    if floating:
        x = x.float().requires_grad_(direction == BACKWARD)
    with torch.enable_grad():
        out = torch.func.functional_call(module, weights, (x,)) if weights else module(x)
        if module.is_last:
            out = causal_lm_loss(out, tokens.to(device)).float()
        grad = None
        if direction == BACKWARD and floating:
            if module.is_last:
                (grad,) = torch.autograd.grad(out, x)
            else:
                if grad_out is None:
                    raise ValueError("a backward recomputation of a middle stage needs the output-gradient")
                (grad,) = torch.autograd.grad(out, x, grad_out.to(device=device, dtype=out.dtype))
    return out.detach(), None if grad is None else grad.detach()


def audit_seed(salt: bytes, claim: TensorClaim) -> bytes:
    """What an audit draw is seeded with: the trainer's salt (committed to in its signed header before the hop,
    revealed after it, so the sender cannot grind its tensor's bytes towards a friendly auditor) and the claim."""
    return hashlib.sha256(
        salt + claim.digest + claim.microbatch.encode() + bytes([claim.stage % 256])
    ).digest()


def draw_auditor(candidates: Iterable[str], excluded: Iterable[str], seed: bytes) -> Optional[str]:
    """The auditor of a hop: among ``candidates`` (replicas of the audited stage) other than ``excluded`` (the
    audited peer and its chain neighbours), the one with the lowest SHA-256 of (seed, peer id). Deterministic in
    its inputs, so anyone holding the claim and the revealed salt (:func:`audit_seed`) and the stage's replicas can
    re-check that an auditor was not hand-picked; None when nobody is left."""
    excluded = set(excluded)
    pool = sorted(set(candidates) - excluded)
    if not pool:
        return None
    return min(pool, key=lambda p: hashlib.sha256(seed + p.encode()).digest())


# ---- accusations -------------------------------------------------------------------------------------------------
@dataclass
class Accusation:
    """A failed audit with what it rests on: the accused's ``claim`` and ``sent`` tensor, and for each of the claim's
    inputs the claim of its sender and the tensor (``inputs[i]`` covers ``claim.inputs[i]``). ``error`` is what the
    accuser measured."""

    accuser: str
    claim: TensorClaim
    sent: torch.Tensor
    inputs: List[Tuple[TensorClaim, torch.Tensor]]
    error: float = math.inf

    @property
    def accused(self) -> str:
        return self.claim.sender

    @property
    def key(self) -> bytes:
        return self.claim.key

    def tensors(self) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """``(x_in, grad_out, tokens)`` for :func:`recompute` (the inputs ordered as the claim names them; tokens
        empty where the hop needs none)."""
        tokens = next((t for c, t in self.inputs if c.direction == TOKENS), torch.empty(0, dtype=torch.long))
        x_in = self.inputs[0][1]
        grad_out = (
            self.inputs[1][1] if len(self.inputs) > 1 and self.inputs[1][0].direction == BACKWARD else None
        )
        return x_in, grad_out, tokens


def check_accusation(acc: Accusation, num_stages: int) -> None:
    """Everything about an accusation that needs no weights: every signature, every digest, and that the inputs are
    the ones the accused's claim names, signed by peers of the right stages for the same micro-batch. Raises
    EvidenceError (an accusation that fails here is malformed: its publisher gets the strike)."""
    claim = acc.claim
    claim.verify()
    if claim.direction not in (FORWARD, BACKWARD) or not 0 <= claim.stage < num_stages:
        raise EvidenceError("accusation: the accused claim is not a stage's forward or backward tensor")
    if claim.direction == BACKWARD and claim.stage == 0:
        raise EvidenceError("accusation: stage 0 sends no gradient")
    if not claim.covers(acc.sent):
        raise EvidenceError("accusation: the tensor is not the one the accused signed")
    if len(acc.inputs) != len(claim.inputs):
        raise EvidenceError("accusation: the inputs do not match the claim's")
    last = num_stages - 1
    if claim.direction == FORWARD and claim.stage == last:
        raise EvidenceError("accusation: the last stage sends no activations")
    # the signed inputs a claim rests on, as (stage, direction) of each input's own claim
    wanted = [(claim.stage - 1, FORWARD) if claim.stage > 0 else (-1, TOKENS)]
    if claim.direction == BACKWARD:
        wanted.append((claim.stage + 1, BACKWARD) if claim.stage < last else (-1, TOKENS))
    for (input_claim, tensor), digest, (stage, direction) in zip(acc.inputs, claim.inputs, wanted):
        input_claim.verify()
        if input_claim.digest != digest:
            raise EvidenceError("accusation: an input claim is not the one the accused's claim names")
        if (input_claim.stage, input_claim.direction, input_claim.microbatch) != (
            stage,
            direction,
            claim.microbatch,
        ):
            raise EvidenceError(
                f"accusation: input claim of stage {input_claim.stage} {input_claim.direction} for "
                f"{input_claim.microbatch!r}, expected stage {stage} {direction} for {claim.microbatch!r}"
            )
        if not input_claim.covers(tensor):
            raise EvidenceError("accusation: an input tensor is not the one its sender signed")


@dataclass(frozen=True)
class Finding:
    """One replica's re-check of an accusation: ``confirmed`` when its own recomputation differs from the accused's
    tensor by more than the tolerance."""

    confirmed: bool
    error: float
    reason: str = ""


def reverify(acc: Accusation, module: StageModule, tolerance: AuditTolerance) -> Finding:
    """Recompute the accused hop with this replica's ``module`` and compare. Call :func:`check_accusation` first."""
    x_in, grad_out, tokens = acc.tensors()
    out, grad = recompute(module, acc.claim.direction, x_in, grad_out, tokens)
    expected = out if acc.claim.direction == FORWARD else grad
    if expected is None:
        return Finding(False, 0.0, "nothing to recompute")
    err = relative_error(acc.sent.float(), expected.float())
    limit = tolerance.of(acc.claim.direction)
    return Finding(err > limit, err, f"relative error {err:.4g} vs tolerance {limit:.3g}")


@dataclass
class _Case:
    accuser: str
    accused: str
    stage: int
    direction: str
    findings: Dict[str, bool] = field(default_factory=dict)  # verifier -> confirmed

    def votes(self, allowed: Optional[set] = None) -> Tuple[int, bool]:
        """(confirmations, proven) counting the findings of ``allowed`` verifiers (None: all): proven when more
        confirm than refute and one confirmation is not the accuser's."""
        votes = {v: c for v, c in self.findings.items() if allowed is None or v in allowed}
        yes = sum(votes.values())
        independent = any(c and v != self.accuser for v, c in votes.items())
        return yes, yes > len(votes) - yes and independent


class ProofBook:
    """The accusations a peer has seen and the replicas' findings on them; which accused are proven (see the module
    docstring). Bounded to ``max_cases`` accusations, oldest first out."""

    def __init__(self, max_cases: int = 1024):
        self.max_cases = max_cases
        self._cases: "OrderedDict[bytes, _Case]" = OrderedDict()

    def accuse(self, acc: Accusation) -> bool:
        """Record an accusation (its accuser's own finding counts as a confirmation); False if already known."""
        if acc.key in self._cases:
            return False
        self._cases[acc.key] = _Case(acc.accuser, acc.accused, acc.claim.stage, acc.claim.direction)
        self._cases[acc.key].findings[acc.accuser] = True
        while len(self._cases) > self.max_cases:
            self._cases.popitem(last=False)
        return True

    def find(self, key: bytes, verifier: str, confirmed: bool) -> None:
        case = self._cases.get(key)
        if case is not None and verifier != case.accused:
            case.findings.setdefault(verifier, confirmed)

    def proven(self, weighted: Optional[Iterable[str]] = None) -> Dict[str, dict]:
        """``{accused: {"reason", "reporters", "strikes"}}`` for every proven accused (the blacklist entry's shape);
        ``weighted``: the verifiers whose findings count (None: all)."""
        allowed = None if weighted is None else set(weighted)
        out: Dict[str, dict] = {}
        for case in self._cases.values():
            yes, proven = case.votes(allowed)
            if proven:
                entry = out.setdefault(
                    case.accused,
                    {"reason": f"{PROOF}: stage {case.stage} {case.direction}", "reporters": 0, "strikes": 0},
                )
                entry["reporters"] = max(entry["reporters"], yes)
                entry["strikes"] += 1
        return out

    def refuted(self) -> List[Tuple[str, str]]:
        """``(refuter, accuser)`` for every refutation of a case that is not proven (its accuser's strikes)."""
        return [
            (v, case.accuser)
            for case in self._cases.values()
            if not case.votes()[1]
            for v, c in case.findings.items()
            if not c
        ]

    def __len__(self) -> int:
        return len(self._cases)
