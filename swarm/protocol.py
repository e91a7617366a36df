"""The chain protocol: what travels with a micro-batch, who signs what, and how a failure is attributed.

Every field that a hop used to take on faith is now either signed by the peer it is about or derived from something
that is. Keys are the peers' libp2p identity keys (RSA; a peer id is the hash of its public key, so a signature
"by peer X" is checked without asking anyone: :func:`peer_id_of`).

**The request header** (:class:`ChainHeader`) is made and signed by the trainer, once per attempt: the run, the
trainer's peer id, the micro-batch id, the optimizer step, the whole route (one peer per stage), the digest of the
micro-batch's token ids (which are also its labels), a commitment to the attempt's auditors, and when it was
issued. Every hop checks it before doing any work (:meth:`ChainHeader.check`): signed by the trainer it names,
for this run, fresh, naming this peer at this stage, and sent by the peer before it in the route (the trainer
itself for stage 0). An honest hop never forwards a header that fails, so a failure is the sender's fault, and a
hop can no longer rewrite ``trainer``, ``mb``, ``step`` or the route. The last stage uses only labels whose
digest is the header's, deposited by the header's trainer (labels travel as a stream, like any tensor); stage 0
checks the token ids it is sent against the same digest.

**Audits** stay hidden from the audited peer: the header carries only ``audit_commitment`` = H(salt, auditors);
the salt and the auditors travel beside it (:func:`audit_reveal`) and every hop checks them against the
commitment (a hop cannot swap the auditors for its friends, nor strip them unnoticed); the penultimate stage
consumes them. Without an audit the commitment hides an empty list under a random salt, so the last stage cannot
tell whether it is audited.

**Activations** travel with their sender's signed claim (``swarm.evidence.TensorClaim``: the digest of what it
sends, of what it computed that from, and its epoch, for this request), which the receiver checks against what it
got and relays with its own: what a forward audit of a middle stage needs to bind the input it recomputes from to
the hop before it.

**Replies** carry one :class:`HopReport` per hop, each signed by the hop that made it: its verdict (ok, or the
error, and whom it blames: its ``upstream`` or ``downstream`` neighbour, or nobody), the loss (the last stage's),
its epoch and timings, bound to the header's digest. A hop relays the reports of the hops after it unchanged and
verifies them first (:func:`check_reports`): an intermediate peer can drop a reply, but it can neither forge nor
alter another hop's verdict, and the only peers it can blame are its own neighbours, in its own name.
:func:`resolve` turns a reply into who is at fault: the deepest hop that reported a failure of its own making
blames one of its neighbours (or nobody, with its reason); a reply that does not verify is the fault of the peer
that delivered it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import blake3
import msgpack
import torch
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from swarm.identity import peer_id_of

PROTOCOL = b"swarm.chain.v1"
MAX_HEADER_AGE_S = 600.0  # a header older than this is refused (a replayed old request)
MAX_CLOCK_SKEW_S = 60.0  # ... and one issued this far in the future
MAX_ROUTE = 64
MAX_ID_CHARS = 128
MAX_KEY_BYTES = 1024  # an OpenSSH RSA-2048 public key is ~380 bytes; RSA-4096 ~720
MAX_SIGNATURE_BYTES = 1024
MAX_REASON_CHARS = 300
SALT_BYTES = 16
UPSTREAM, DOWNSTREAM = (
    "upstream",
    "downstream",
)  # whom a hop may blame: the neighbours it exchanged tensors with
TIMING_FIELDS = ("fwd_s", "bwd_s", "opt_s", "wait_s", "total_s")


class ProtocolError(ValueError):
    """A header, report or reveal that does not verify; the message says why."""


# ---- identities and digests --------------------------------------------------------------------------------------
def tensor_digest(tensor: torch.Tensor) -> bytes:
    """BLAKE3 of a tensor's dtype, shape and bytes."""
    t = tensor.detach().to("cpu").contiguous()
    h = blake3.blake3(max_threads=1)
    h.update(str(t.dtype).encode())
    h.update(msgpack.packb(list(t.shape)))
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()


def _verify(public_key: bytes, payload: bytes, signature: bytes) -> bool:
    try:
        return RSAPublicKey.from_bytes(public_key).verify(payload, signature)
    except Exception:  # not an RSA key, garbage
        return False


# ---- field checks --------------------------------------------------------------------------------------------
def _str(value: Any, what: str, max_chars: int = MAX_ID_CHARS) -> str:
    if not (isinstance(value, str) and 0 < len(value) <= max_chars):
        raise ProtocolError(f"{what} must be a string of 1..{max_chars} characters")
    return value


def _bytes(value: Any, what: str, max_bytes: int, exact: Optional[int] = None) -> bytes:
    if not (
        isinstance(value, bytes) and 0 < len(value) <= max_bytes and (exact is None or len(value) == exact)
    ):
        raise ProtocolError(f"{what} must be {exact or f'1..{max_bytes}'} bytes")
    return value


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if not (isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi):
        raise ProtocolError(f"{what} must be an integer in [{lo}, {hi}]")
    return value


def _float(value: Any, what: str) -> float:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
        raise ProtocolError(f"{what} must be a finite number")
    return float(value)


# ---- the request header --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChainHeader:
    """One attempt of one micro-batch, as its trainer signed it (see the module doc)."""

    run_id: str
    trainer: str
    mb: str
    step: int
    route: Tuple[str, ...]
    labels_digest: bytes
    audit_commitment: bytes
    issued_at: float
    key: bytes  # the trainer's public key (its peer id is derived from it)
    signature: bytes = b""

    def payload(self) -> bytes:
        return msgpack.packb(
            [
                PROTOCOL,
                self.run_id,
                self.trainer,
                self.mb,
                self.step,
                list(self.route),
                self.labels_digest,
                self.audit_commitment,
                self.issued_at,
                self.key,
            ],
            use_bin_type=True,
        )

    @property
    def digest(self) -> bytes:
        """What hop reports bind to: this header, signature included."""
        return blake3.blake3(self.payload() + self.signature, max_threads=1).digest()

    @classmethod
    def create(
        cls,
        key: RSAPrivateKey,
        *,
        run_id: str,
        trainer: str,
        mb: str,
        step: int,
        route: Sequence[str],
        tokens: torch.Tensor,
        auditors: Sequence[str] = (),
        now: float,
    ) -> Tuple["ChainHeader", Dict[str, Any]]:
        """A signed header and the audit reveal that travels beside it (auditors may be empty)."""
        salt = os.urandom(SALT_BYTES)
        header = cls(
            run_id=run_id,
            trainer=trainer,
            mb=mb,
            step=step,
            route=tuple(route),
            labels_digest=tensor_digest(tokens),
            audit_commitment=audit_commitment(salt, auditors),
            issued_at=float(now),
            key=key.get_public_key().to_bytes(),
        )
        header = cls(**{**header.__dict__, "signature": key.sign(header.payload())})
        return header, dict(salt=salt, auditors=list(auditors))

    def to_wire(self) -> Dict[str, Any]:
        return dict(
            run=self.run_id,
            trainer=self.trainer,
            mb=self.mb,
            step=self.step,
            route=list(self.route),
            labels=self.labels_digest,
            audit=self.audit_commitment,
            at=self.issued_at,
            key=self.key,
            sig=self.signature,
        )

    @classmethod
    def from_wire(cls, value: Any) -> "ChainHeader":
        if not isinstance(value, dict):
            raise ProtocolError("the request needs a signed 'header' map")
        route = value.get("route")
        if not (isinstance(route, list) and 1 <= len(route) <= MAX_ROUTE):
            raise ProtocolError(f"header.route must list 1..{MAX_ROUTE} peers")
        return cls(
            run_id=_str(value.get("run"), "header.run"),
            trainer=_str(value.get("trainer"), "header.trainer"),
            mb=_str(value.get("mb"), "header.mb", 256),
            step=_int(value.get("step"), "header.step", 0, 2**62),
            route=tuple(_str(p, "header.route[]") for p in route),
            labels_digest=_bytes(value.get("labels"), "header.labels", 32, exact=32),
            audit_commitment=_bytes(value.get("audit"), "header.audit", 32, exact=32),
            issued_at=_float(value.get("at"), "header.at"),
            key=_bytes(value.get("key"), "header.key", MAX_KEY_BYTES),
            signature=_bytes(value.get("sig"), "header.sig", MAX_SIGNATURE_BYTES),
        )

    def check(
        self,
        *,
        run_id: str,
        stage: int,
        me: str,
        sender: str,
        now: float,
        audit_only: bool = False,
        forward_audit: bool = False,
        auditors: Sequence[str] = (),
        fetch: bool = False,
    ) -> None:
        """Raise :class:`ProtocolError` unless this header may be served by ``me`` at ``stage``, coming from
        ``sender``: signed by the trainer it names, for this run, fresh, and ``me`` and ``sender`` where the route
        puts them (an auditor, ``audit_only``, is called by the route's penultimate peer in place of its last; a
        forward auditor, ``forward_audit``, another replica of ``stage``, by the route's peer of the stage after, or
        when that stage is the last, by one of the trainer's ``auditors`` of it: the revealed list, checked against
        the header's commitment by :func:`audit_reveal`, which got the same activations in an audit-only request;
        ``fetch``: the route's peer of ``stage`` is asked for the activations it sent, by the route's peer two stages
        on, which has the next stage's output from them recomputed)."""
        if self.run_id != run_id:
            raise ProtocolError(f"header is for run {self.run_id!r}, not {run_id!r}")
        if not 0 <= stage < len(self.route):
            raise ProtocolError(f"header route has no stage {stage}")
        if forward_audit:
            if stage + 1 >= len(self.route):
                raise ProtocolError(
                    "a forward audit is asked of a stage before the last, by the stage after it"
                )
            if self.route[stage] == me:
                raise ProtocolError("an audit is asked of another replica than the route's")
            audit_peer = stage + 2 == len(self.route) and sender in auditors
            if sender != self.route[stage + 1] and not audit_peer:
                raise ProtocolError(
                    f"a forward audit of stage {stage} must come from {self.route[stage + 1][-8:]}, "
                    f"not {sender[-8:]}"
                )
        elif fetch:
            if self.route[stage] != me:
                raise ProtocolError("the activations a hop sent are fetched from the route's peer")
            if stage + 2 >= len(self.route) or sender != self.route[stage + 2]:
                raise ProtocolError(
                    f"the activations stage {stage} sent are fetched by the route's peer two stages on, "
                    f"not {sender[-8:]}"
                )
        elif audit_only:
            if stage == 0:
                raise ProtocolError("an audit is asked of a stage after the first, by the stage before it")
            if self.route[stage] == me:
                raise ProtocolError("an audit is asked of another replica than the route's")
        elif self.route[stage] != me:
            raise ProtocolError(
                f"header route names {self.route[stage][-8:]} at stage {stage}, not this peer"
            )
        expected = self.trainer if stage == 0 else self.route[stage - 1]
        if not (forward_audit or fetch) and sender != expected:
            raise ProtocolError(
                f"request for stage {stage} must come from {expected[-8:]}, not {sender[-8:]}"
            )
        if not (now - MAX_HEADER_AGE_S <= self.issued_at <= now + MAX_CLOCK_SKEW_S):
            raise ProtocolError(f"header issued {now - self.issued_at:.0f}s ago: stale or from the future")
        self.check_signature()

    def check_signature(self) -> None:
        try:
            signer = peer_id_of(self.key)
        except Exception:
            raise ProtocolError("header.key is not an RSA public key") from None
        if signer != self.trainer:
            raise ProtocolError("header is signed by a key that is not the named trainer's")
        if not _verify(self.key, self.payload(), self.signature):
            raise ProtocolError("header signature does not verify")


def audit_commitment(salt: bytes, auditors: Sequence[str]) -> bytes:
    return blake3.blake3(
        msgpack.packb([PROTOCOL, b"audit", salt, list(auditors)], use_bin_type=True), max_threads=1
    ).digest()


def audit_reveal(header: ChainHeader, reveal: Any) -> List[str]:
    """The auditors of this attempt, from the reveal travelling beside ``header``; raises if it does not match the
    signed commitment (swapped, stripped or malformed)."""
    if not (
        isinstance(reveal, dict)
        and isinstance(reveal.get("salt"), bytes)
        and len(reveal["salt"]) == SALT_BYTES
        and isinstance(reveal.get("auditors"), list)
        and len(reveal["auditors"]) <= 2
    ):
        raise ProtocolError("the request needs the audit reveal (salt and at most 2 auditors)")
    auditors = [_str(p, "audit.auditors[]") for p in reveal["auditors"]]
    if audit_commitment(reveal["salt"], auditors) != header.audit_commitment:
        raise ProtocolError("the audit reveal does not match the header's commitment")
    return auditors


# ---- hop reports -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HopReport:
    """One hop's verdict on one micro-batch, signed by that hop (see the module doc)."""

    header_digest: bytes
    stage: int
    peer: str
    ok: bool
    loss: Optional[float] = None  # the last stage's loss (None elsewhere, and on failure)
    epoch: Optional[int] = None  # the optimizer epoch of the weights this hop used
    error: str = ""
    blame: Optional[str] = None  # UPSTREAM, DOWNSTREAM or None (nobody)
    judged: bool = False  # a SENTINEL check of this hop rejected the blamed neighbour's well-formed tensor
    relay: bool = False  # the failure is downstream's, reported by the next report (this hop blames nobody)
    timings: Dict[str, float] = field(default_factory=dict)
    # the hop's signed tensors: (digest of the gradient it sent back, of the activations it received, of the
    # gradient it received from the next stage, or at the last stage of the labels); empty: it sent no gradient
    digests: Tuple[bytes, ...] = ()
    key: bytes = b""
    signature: bytes = b""

    def payload(self) -> bytes:
        return msgpack.packb(
            [
                PROTOCOL,
                b"report",
                self.header_digest,
                self.stage,
                self.peer,
                self.ok,
                self.loss,
                self.epoch,
                self.error,
                self.blame,
                self.judged,
                self.relay,
                [self.timings.get(k) for k in TIMING_FIELDS],
                self.key,
            ]
            + (
                [list(self.digests)] if self.digests else []
            ),  # absent in reports without tensors (and older ones)
            use_bin_type=True,
        )

    @classmethod
    def create(cls, key: RSAPrivateKey, **fields) -> "HopReport":
        report = cls(key=key.get_public_key().to_bytes(), **fields)
        return cls(**{**report.__dict__, "signature": key.sign(report.payload())})

    def to_wire(self) -> Dict[str, Any]:
        return dict(
            h=self.header_digest,
            stage=self.stage,
            peer=self.peer,
            ok=self.ok,
            loss=self.loss,
            epoch=self.epoch,
            error=self.error,
            blame=self.blame,
            judged=self.judged,
            relay=self.relay,
            t=[self.timings.get(k) for k in TIMING_FIELDS],
            key=self.key,
            sig=self.signature,
            **({"d": list(self.digests)} if self.digests else {}),
        )

    @classmethod
    def from_wire(cls, value: Any) -> "HopReport":
        if not isinstance(value, dict):
            raise ProtocolError("a report must be a map")
        loss, epoch, blame, error = (
            value.get("loss"),
            value.get("epoch"),
            value.get("blame"),
            value.get("error", ""),
        )
        timings = value.get("t")
        if not (isinstance(timings, list) and len(timings) == len(TIMING_FIELDS)):
            raise ProtocolError("report.t must list the hop's timings")
        if not (
            isinstance(value.get("ok"), bool)
            and isinstance(value.get("judged"), bool)
            and isinstance(value.get("relay"), bool)
        ):
            raise ProtocolError("report.ok, .judged and .relay must be booleans")
        if blame not in (None, UPSTREAM, DOWNSTREAM):
            raise ProtocolError(f"report.blame must be {UPSTREAM!r}, {DOWNSTREAM!r} or nil")
        if not (isinstance(error, str) and len(error) <= MAX_REASON_CHARS):
            raise ProtocolError(f"report.error must be a string of at most {MAX_REASON_CHARS} characters")
        digests = value.get("d", [])
        if not (isinstance(digests, list) and len(digests) in (0, 3)):
            raise ProtocolError("report.d must list 3 digests, or be absent")
        return cls(
            header_digest=_bytes(value.get("h"), "report.h", 32, exact=32),
            stage=_int(value.get("stage"), "report.stage", 0, MAX_ROUTE - 1),
            peer=_str(value.get("peer"), "report.peer"),
            ok=value["ok"],
            loss=None if loss is None else _float(loss, "report.loss"),
            epoch=None if epoch is None else _int(epoch, "report.epoch", 0, 2**62),
            error=error,
            blame=blame,
            judged=value["judged"],
            relay=value["relay"],
            timings={k: _float(v, "report.t[]") for k, v in zip(TIMING_FIELDS, timings) if v is not None},
            key=_bytes(value.get("key"), "report.key", MAX_KEY_BYTES),
            signature=_bytes(value.get("sig"), "report.sig", MAX_SIGNATURE_BYTES),
            digests=tuple(_bytes(d, "report.d[]", 32, exact=32) for d in digests),
        )


def check_reports(
    header: ChainHeader, wire: Any, first_stage: int, first_peer: str, alone: bool = False
) -> List[HopReport]:
    """The reports of a reply from the hop at ``first_stage`` (``first_peer``: the route's peer there, or an
    auditor), each signed by the peer it names, for this header, one per stage in order, every one but the last
    relaying a failure or vouching for an ok downstream; raises :class:`ProtocolError` otherwise (the fault of the
    peer that delivered the reply). ``alone``: the reply of a recomputation audit, one report that calls no one."""
    if alone and not (isinstance(wire, list) and len(wire) == 1):
        raise ProtocolError("a recomputation audit's reply holds one report")
    if not (isinstance(wire, list) and 1 <= len(wire) <= len(header.route) - first_stage):
        raise ProtocolError("a reply needs one report per hop from its sender on")
    reports = [HopReport.from_wire(w) for w in wire]
    digest = header.digest
    for i, report in enumerate(reports):
        stage = first_stage + i
        expected = first_peer if i == 0 else header.route[stage]
        if report.stage != stage or report.peer != expected:
            raise ProtocolError(f"report {i} must be stage {stage}'s, by {expected[-8:]}")
        if report.header_digest != digest:
            raise ProtocolError(f"stage {stage}'s report is for another request")
        try:
            signer = peer_id_of(report.key)
        except Exception:
            raise ProtocolError(f"stage {stage}'s report key is not an RSA public key") from None
        if signer != report.peer or not _verify(report.key, report.payload(), report.signature):
            raise ProtocolError(f"stage {stage}'s report is not signed by its peer")
        last = stage == len(header.route) - 1
        more = i + 1 < len(reports)
        if report.ok:
            if last != (report.loss is not None):
                raise ProtocolError(f"stage {stage}'s ok report must carry the loss iff it is the last stage")
            if not last and not more and not alone:
                raise ProtocolError(f"stage {stage} reports ok without the reports of the stages after it")
        elif more and not report.relay:
            raise ProtocolError(f"stage {stage}'s failure is its own, yet reports of later stages follow")
        if more and report.ok and not reports[i + 1].ok:
            raise ProtocolError(f"stage {stage} reports ok over a failed stage {stage + 1}")
        if report.relay and (report.ok or not more or reports[i + 1].ok):
            raise ProtocolError(f"stage {stage} relays a failure that the next report does not show")
    return reports


@dataclass
class Verdict:
    """Who is at fault for a failed micro-batch (or the loss of one that completed), from the signed reports."""

    ok: bool
    loss: Optional[float] = None
    reason: str = ""
    blame: Optional[str] = None  # a peer id (a route peer, an auditor, or None: nobody)
    blame_stage: Optional[int] = None
    judge: Optional[str] = None  # the hop whose SENTINEL check rejected the blamed peer's tensor
    reports: List[HopReport] = field(default_factory=list)


def resolve(header: ChainHeader, reports: List[HopReport]) -> Verdict:
    """The outcome of checked reports (:func:`check_reports`): ok with the last stage's loss, or the deepest failure
    a hop made itself, blaming the neighbour it names (its ``upstream`` is the trainer for stage 0: nobody here)."""
    if reports[0].ok:
        return Verdict(True, loss=reports[-1].loss, reports=reports)
    origin = next(r for r in reports if not r.relay)
    stage = origin.stage
    blame, blame_stage = None, None
    if origin.blame == UPSTREAM and stage > 0:
        blame, blame_stage = header.route[stage - 1], stage - 1
    elif origin.blame == DOWNSTREAM and stage + 1 < len(header.route):
        blame, blame_stage = header.route[stage + 1], stage + 1
    return Verdict(
        False,
        reason=origin.error or f"stage {stage} failed",
        blame=blame,
        blame_stage=blame_stage,
        judge=origin.peer if origin.judged and blame is not None else None,
        reports=reports,
    )
