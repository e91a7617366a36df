"""DHT record schemas of a swarm and the validator that enforces them on every DHT node.

Keys (``run`` is the swarm's name, its run id):

- ``{run}.config``   subkey = owner's public key: the swarm's model/stage config (:class:`SwarmConfigRecord`)
- ``{run}.stage.{k}`` subkey = owner's public key: one peer's announcement for stage k (:class:`StageRecord`)
- ``{run}.reports``  subkey = owner's public key: one peer's tallies of its counterparts (:class:`ReputationReport`)
- ``{run}.blacklist`` subkey = owner's public key: one peer's aggregated blacklist verdicts (:class:`BlacklistRecord`)
- ``{run}.progress`` subkey = owner's public key: one trainer's progress (:class:`TrainerProgressRecord`)

Every subkey must carry the writer's RSA public key (``[owner:...]``), so hivemind's ``RSASignatureValidator``
makes each record owner-signed: nobody can write or overwrite a record in another peer's name. The signing key is
the peer's **libp2p identity key** (:class:`IdentitySignatureValidator`), so the owner marker names a peer id:
:func:`owner_peer_id` derives it exactly as libp2p does. A record that speaks for a peer (a stage record's or
progress record's ``peer_id``, a report's ``reporter``, a blacklist's ``publisher``: its ``SIGNER_FIELD``) is
accepted only when that field equals the peer id its owner key derives (:func:`check_signer`), so no key can
announce, report or publish in another peer's name. Which key owns the swarm config is the reader's decision
(:func:`swarm.network.fetch_swarm_config`).

On top of the signature, :class:`SwarmRecordValidator` checks the schema (types, bounded numbers, no NaN/inf,
short strings), the signer binding, and a bound on how far in the future a record may expire, so a record cannot
outlive its owner's heartbeats. Readers parse what they get with the same ``from_value`` functions and
:func:`parse_subkeyed`, so a record that slipped past an old or foreign DHT node is still rejected with a reason
before anyone uses it.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Callable, Dict, List, Optional, Tuple

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import ValueWithExpiration, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from swarm.identity import peer_id_of

logger = logging.getLogger(__name__)

RECORD_VERSION = 1
MAX_STAGES = 64
MAX_REPORT_ENTRIES = 256  # peers one reputation report or blacklist record may mention
MAX_REPORT_REASONS = 8  # distinct strike reasons per peer in a report
MAX_COUNT = 2**62  # bound on every tally
RECENT_WINDOW = 32  # a report's "recent_strikes" counts the strikes among this many latest exchanges
MAX_TTL_S = 600.0  # no record of ours may claim to live longer than this past "now"
STAGE_STATES = ("joining", "online", "offline")
OWNER_MARKER = b"[owner:"


class RecordError(ValueError):
    """A DHT record that does not match its schema; the message says why."""


def config_key(run_id: str) -> str:
    return f"{run_id}.config"


def stage_key(run_id: str, stage: int) -> str:
    return f"{run_id}.stage.{stage}"


def reports_key(run_id: str) -> str:
    return f"{run_id}.reports"


def blacklist_key(run_id: str) -> str:
    return f"{run_id}.blacklist"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise RecordError(message)


# ---- owners: the signing key is the libp2p identity key ---------------------------------------------------------
_OWNER_RE = re.compile(RSASignatureValidator.PUBLIC_KEY_REGEX)


@lru_cache(maxsize=4096)
def owner_peer_id(subkey: bytes) -> Optional[str]:
    """The base58 libp2p peer id of the RSA key in a subkey's ``[owner:...]`` marker (None: no single RSA key).

    libp2p's rule for RSA keys: the sha2-256 multihash of the protobuf ``PublicKey{Type: RSA, Data: DER
    SubjectPublicKeyInfo}`` (hivemind's ``PeerID.from_identity`` does the same from the private key). hivemind writes
    the marker's key in OpenSSH format (``RSAPublicKey.to_bytes``), so it is converted to DER first. Works on the raw
    marker and on its msgpack serialization alike (the bytes survive inside the bin payload)."""
    if not isinstance(subkey, bytes):
        return None
    keys = set(_OWNER_RE.findall(subkey))
    if len(keys) != 1:
        return None
    try:
        return peer_id_of(keys.pop())
    except Exception:  # malformed or unsupported key material: not an owner
        return None


def check_signer(subkey: Any, record: Any) -> None:
    """Raise :class:`RecordError` unless the peer a record speaks for (its ``SIGNER_FIELD``) is the subkey's owner.
    Records without a ``SIGNER_FIELD`` (the swarm config: its owner is checked by the reader) pass."""
    name = getattr(record, "SIGNER_FIELD", None)
    if name is None:
        return
    claimed, owner = getattr(record, name), owner_peer_id(subkey)
    _require(owner is not None, "record must be signed by an RSA identity key")
    _require(
        claimed == owner,
        f"{name} {claimed!r} is not the signer {owner!r}: a record about a peer must be "
        f"signed by that peer's identity key",
    )


class IdentitySignatureValidator(RSASignatureValidator):
    """hivemind's ``RSASignatureValidator`` signing with this peer's libp2p identity key (pass it in), so the
    ``[owner:...]`` marker of its records derives its peer id (:func:`owner_peer_id`).

    Records marked with the process-wide key (what a default ``RSASignatureValidator()`` uses: hivemind's own
    components such as the optimizer's progress tracker, whose validators merge into this one) are still signed with
    that key, exactly as before; validation is hivemind's, unchanged."""

    def __init__(self, private_key: Optional[RSAPrivateKey] = None):
        super().__init__(private_key)
        process_wide = RSAPrivateKey.process_wide()
        self._process_wide = (
            None if process_wide is self._private_key else RSASignatureValidator(process_wide)
        )

    def sign_value(self, record: DHTRecord) -> bytes:
        mine = self.local_public_key in record.key or self.local_public_key in (record.subkey or b"")
        if not mine and self._process_wide is not None:
            return self._process_wide.sign_value(record)
        return super().sign_value(record)


def _number(d: Dict[str, Any], name: str, lo: float, hi: float, integer: bool = False) -> float:
    _require(name in d, f"missing field {name!r}")
    value = d[name]
    if integer:
        _require(isinstance(value, int) and not isinstance(value, bool), f"{name} must be an integer")
    else:
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), f"{name} must be a number")
        _require(math.isfinite(value), f"{name} must be finite, got {value}")
    _require(lo <= value <= hi, f"{name}={value} is outside [{lo}, {hi}]")
    return value


def _string(
    d: Dict[str, Any], name: str, max_len: int = 256, choices: Optional[Tuple[str, ...]] = None
) -> str:
    _require(name in d, f"missing field {name!r}")
    value = d[name]
    _require(isinstance(value, str), f"{name} must be a string")
    _require(0 < len(value) <= max_len, f"{name} must have 1..{max_len} characters")
    if choices is not None:
        _require(value in choices, f"{name}={value!r} is not one of {choices}")
    return value


def _check_fields(d: Any, allowed: set) -> None:
    _require(isinstance(d, dict), f"record value must be a dict, got {type(d).__name__}")
    extra = set(d) - allowed
    _require(not extra, f"unknown fields {sorted(extra)}")
    _require(d.get("version") == RECORD_VERSION, f"unsupported record version {d.get('version')!r}")


@dataclass(kw_only=True)
class StageRecord:
    """One peer's announcement that it serves a stage: who it is, its state and measured throughput."""

    peer_id: str  # libp2p peer id (base58) that routers call
    stage: int
    state: str = "online"
    throughput: float = 0.0  # samples per second this peer measured for itself (forward + backward)
    served: int = 0  # micro-batches served since start
    device: str = "cpu"
    updated_at: float = 0.0  # DHT time of the announcement
    addrs: List[str] = field(default_factory=list)  # optional: multiaddrs the peer is reachable at (<= 8)
    admission: Optional[Dict[str, Any]] = None  # optional: proof of work / allowlist token (swarm.admission)
    # optional: the direct tensor connection (swarm.dataplane): {"host": IP, "port": int, "cert": sha256 hex of the
    # TLS certificate the peer presents}; covered by the record's signature like every field
    dataplane: Optional[Dict[str, Any]] = None
    version: int = RECORD_VERSION

    FIELDS = {"peer_id", "stage", "state", "throughput", "served", "device", "updated_at", "version"}
    OPTIONAL_FIELDS = {"addrs", "admission", "dataplane"}
    SIGNER_FIELD = "peer_id"  # must be the peer id of the record's owner key (check_signer)

    def to_value(self) -> Dict[str, Any]:
        value = asdict(self)
        for name in self.OPTIONAL_FIELDS:  # absent when empty: such a record stays readable by older readers
            if not value[name]:
                del value[name]
        return value

    @classmethod
    def from_value(cls, value: Any) -> "StageRecord":
        _check_fields(value, cls.FIELDS | cls.OPTIONAL_FIELDS)
        return cls(
            peer_id=_string(value, "peer_id", max_len=128),
            stage=int(_number(value, "stage", 0, MAX_STAGES - 1, integer=True)),
            state=_string(value, "state", choices=STAGE_STATES),
            throughput=float(_number(value, "throughput", 0.0, 1e9)),
            served=int(_number(value, "served", 0, 2**62, integer=True)),
            device=_string(value, "device", max_len=64),
            updated_at=float(_number(value, "updated_at", 0.0, 1e11)),
            addrs=_string_list(value, "addrs", max_items=MAX_ADDRS, max_len=256) if "addrs" in value else [],
            admission=_admission(value),
            dataplane=_dataplane(value),
        )


MAX_TOKEN_CHARS = 512
_CERT_RE = re.compile(r"[0-9a-f]{64}")


def _dataplane(d: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The optional data plane endpoint: ``{"host": IP literal, "port": 1..65535, "cert": 64 hex digits}``."""
    if "dataplane" not in d:
        return None
    value = d["dataplane"]
    _require(
        isinstance(value, dict) and set(value) == {"host", "port", "cert"},
        "dataplane must be {host, port, cert}",
    )
    host = _string(value, "host", max_len=64)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise RecordError(f"dataplane host {host!r} is not an IP address") from None
    port = int(_number(value, "port", 1, 65535, integer=True))
    cert = _string(value, "cert", max_len=64)
    _require(_CERT_RE.fullmatch(cert) is not None, "dataplane cert must be 64 lowercase hex digits")
    return dict(host=host, port=port, cert=cert)


def _admission(d: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The optional admission proof: ``{"pow": nonce, "token": str}`` (whether it admits is the reader's check)."""
    if "admission" not in d:
        return None
    value = d["admission"]
    _require(
        isinstance(value, dict) and set(value) <= {"pow", "token"}, "admission must be a dict of pow/token"
    )
    if "pow" in value:
        _number(value, "pow", 0, 2**63 - 1, integer=True)
    if "token" in value:
        _string(value, "token", max_len=MAX_TOKEN_CHARS)
    return dict(value)


MAX_ADDRS = 8  # addresses one stage record may list


def _string_list(d: Dict[str, Any], name: str, max_items: int, max_len: int) -> List[str]:
    value = d[name]
    _require(
        isinstance(value, list) and len(value) <= max_items,
        f"{name} must be a list of at most {max_items} items",
    )
    for item in value:
        _require(
            isinstance(item, str) and 0 < len(item) <= max_len,
            f"{name}: items must be strings of 1..{max_len} characters",
        )
    return list(value)


@dataclass(kw_only=True)
class SwarmConfigRecord:
    """The swarm's identity: its model config and training shape, published by its creator."""

    run_id: str
    model: Dict[str, Any]  # ModelConfig as a dict
    num_stages: int
    seq_len: int
    microbatch_size: int
    target_batch_size: int  # samples per optimizer step, summed over all replicas of a stage
    lr: float
    created_at: float = 0.0
    extra: Dict[str, Any] = field(default_factory=dict)  # forward-compatible knobs (e.g. sentinel settings)
    version: int = RECORD_VERSION

    FIELDS = {
        "run_id",
        "model",
        "num_stages",
        "seq_len",
        "microbatch_size",
        "target_batch_size",
        "lr",
        "created_at",
        "extra",
        "version",
    }

    def to_value(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_value(cls, value: Any) -> "SwarmConfigRecord":
        from swarm.config import ModelConfig  # config has no dependencies; imported lazily to keep this light

        _check_fields(value, cls.FIELDS)
        model = value.get("model")
        _require(isinstance(model, dict) and len(model) <= 64, "model must be a dict of at most 64 fields")
        try:
            ModelConfig(**model)
        except (TypeError, ValueError, ArithmeticError) as e:  # int(inf) raises OverflowError
            raise RecordError(f"invalid model config: {e}") from e
        extra = value.get("extra", {})
        _require(isinstance(extra, dict) and len(extra) <= 64, "extra must be a dict of at most 64 fields")
        return cls(
            run_id=_string(value, "run_id", max_len=128),
            model=model,
            num_stages=int(_number(value, "num_stages", 1, MAX_STAGES, integer=True)),
            seq_len=int(_number(value, "seq_len", 2, 65536, integer=True)),
            microbatch_size=int(_number(value, "microbatch_size", 1, 4096, integer=True)),
            target_batch_size=int(_number(value, "target_batch_size", 1, 2**31, integer=True)),
            lr=float(_number(value, "lr", 0.0, 10.0)),
            created_at=float(_number(value, "created_at", 0.0, 1e11)),
            extra=extra,
        )


def _peer_entries(
    value: Dict[str, Any], name: str, parse_entry: Callable[[str, Any], Dict[str, Any]]
) -> Dict:
    """Parse a bounded dict {peer id: entry} with ``parse_entry``; returns a fresh, normalized dict."""
    _require(name in value, f"missing field {name!r}")
    entries = value[name]
    _require(isinstance(entries, dict), f"{name} must be a dict")
    _require(len(entries) <= MAX_REPORT_ENTRIES, f"{name} must have at most {MAX_REPORT_ENTRIES} peers")
    parsed = {}
    for peer, entry in entries.items():
        _require(
            isinstance(peer, str) and 0 < len(peer) <= 128,
            f"{name}: peer ids must be strings of 1..128 characters",
        )
        _require(isinstance(entry, dict), f"{name}[{peer!r}] must be a dict")
        parsed[peer] = parse_entry(peer, entry)
    return parsed


def _report_entry(peer: str, entry: Dict[str, Any]) -> Dict[str, Any]:
    extra = set(entry) - {"clean", "strikes", "reasons", "recent_strikes"}
    _require(not extra, f"entries[{peer!r}]: unknown fields {sorted(extra)}")
    _require("reasons" in entry, f"entries[{peer!r}]: missing field 'reasons'")
    reasons = entry["reasons"]
    _require(
        isinstance(reasons, dict) and len(reasons) <= MAX_REPORT_REASONS,
        f"entries[{peer!r}].reasons must be a dict of at most {MAX_REPORT_REASONS} reasons",
    )
    for reason, count in reasons.items():
        _require(
            isinstance(reason, str) and 0 < len(reason) <= 32,
            f"entries[{peer!r}].reasons: names must be strings of 1..32 characters",
        )
        _require(
            isinstance(count, int) and not isinstance(count, bool) and 0 <= count <= MAX_COUNT,
            f"entries[{peer!r}].reasons[{reason!r}] must be an integer in [0, {MAX_COUNT}]",
        )
    parsed = {
        "clean": int(_number(entry, "clean", 0, MAX_COUNT, integer=True)),
        "strikes": int(_number(entry, "strikes", 0, MAX_COUNT, integer=True)),
        "reasons": dict(reasons),
    }
    if "recent_strikes" in entry:  # optional (reports of older peers lack it)
        recent = int(_number(entry, "recent_strikes", 0, RECENT_WINDOW, integer=True))
        _require(recent <= parsed["strikes"], f"entries[{peer!r}]: recent_strikes exceeds strikes")
        parsed["recent_strikes"] = recent
    return parsed


def _blacklist_entry(peer: str, entry: Dict[str, Any]) -> Dict[str, Any]:
    extra = set(entry) - {"reason", "reporters", "strikes"}
    _require(not extra, f"entries[{peer!r}]: unknown fields {sorted(extra)}")
    return {
        "reason": _string(entry, "reason", max_len=200),
        "reporters": int(_number(entry, "reporters", 1, MAX_COUNT, integer=True)),
        "strikes": int(_number(entry, "strikes", 0, MAX_COUNT, integer=True)),
    }


@dataclass(kw_only=True)
class ReputationReport:
    """One peer's local tallies of its counterparts: ``entries[peer] = {"clean", "strikes", "reasons"}``.

    ``clean`` and ``strikes`` count the exchanges with that peer that passed / failed the sentinel's checks;
    ``reasons`` counts strikes by reason (statistic name); the optional ``recent_strikes`` counts the strikes among
    the latest ``RECENT_WINDOW`` exchanges (so a peer honest for hours that turns bad is judged on what it does
    now). How reports are weighed is :mod:`swarm.reputation`.
    """

    reporter: str  # the writer's peer id: must be the one its signing key derives (check_signer)
    issued_at: float = 0.0  # DHT time
    entries: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    admission: Optional[Dict[str, Any]] = None  # optional: the reporter's admission proof (swarm.admission)
    version: int = RECORD_VERSION

    FIELDS = {"reporter", "issued_at", "entries", "version"}
    SIGNER_FIELD = "reporter"

    def to_value(self) -> Dict[str, Any]:
        value = asdict(self)
        if value["admission"] is None:
            del value["admission"]
        return value

    @classmethod
    def from_value(cls, value: Any) -> "ReputationReport":
        _check_fields(value, cls.FIELDS | {"admission"})
        return cls(
            reporter=_string(value, "reporter", max_len=128),
            issued_at=float(_number(value, "issued_at", 0.0, 1e11)),
            entries=_peer_entries(value, "entries", _report_entry),
            admission=_admission(value),
        )


@dataclass(kw_only=True)
class BlacklistRecord:
    """One peer's blacklist verdicts: ``entries[peer] = {"reason", "reporters", "strikes"}`` (the evidence)."""

    publisher: str  # the writer's peer id: must be the one its signing key derives (check_signer)
    issued_at: float = 0.0  # DHT time
    entries: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    version: int = RECORD_VERSION

    FIELDS = {"publisher", "issued_at", "entries", "version"}
    SIGNER_FIELD = "publisher"

    def to_value(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_value(cls, value: Any) -> "BlacklistRecord":
        _check_fields(value, cls.FIELDS)
        return cls(
            publisher=_string(value, "publisher", max_len=128),
            issued_at=float(_number(value, "issued_at", 0.0, 1e11)),
            entries=_peer_entries(value, "entries", _blacklist_entry),
        )


class SwarmRecordValidator(RecordValidatorBase):
    """Rejects records under this swarm's keys that are unsigned, malformed, speak for a peer other than their
    signer, or claim too long a life.

    DHT keys reach validators hashed, so the validator precomputes the hashes of every key this swarm uses.
    Runs after hivemind's ``RSASignatureValidator`` (which has a higher priority), on the stripped value.
    """

    def __init__(self, run_id: str, max_ttl_s: float = MAX_TTL_S):
        self.run_id = run_id
        self.max_ttl_s = max_ttl_s
        self._parsers: Dict[bytes, Tuple[str, Callable[[Any], Any]]] = {
            DHTID.generate(source=config_key(run_id)).to_bytes(): ("config", SwarmConfigRecord.from_value)
        }
        for stage in range(MAX_STAGES):
            key = DHTID.generate(source=stage_key(run_id, stage)).to_bytes()
            self._parsers[key] = ("stage", StageRecord.from_value)
        for key, kind, parse in (
            (reports_key(run_id), "report", ReputationReport.from_value),
            (blacklist_key(run_id), "blacklist", BlacklistRecord.from_value),
            (progress_key(run_id), "progress", TrainerProgressRecord.from_value),
        ):
            self._parsers[DHTID.generate(source=key).to_bytes()] = (kind, parse)

    def validate(self, record: DHTRecord) -> bool:
        entry = self._parsers.get(record.key)
        if entry is None:
            return True  # not one of ours (e.g. hivemind's own optimizer records)
        kind, parse = entry
        try:
            check_record(record, parse, self.max_ttl_s)
        except RecordError as e:
            logger.debug(f"rejected {kind} record of swarm {self.run_id!r}: {e}")
            return False
        return True

    def merge_with(self, other: RecordValidatorBase) -> bool:
        if isinstance(other, SwarmRecordValidator) and other.run_id == self.run_id:
            return True
        return False


def check_record(record: DHTRecord, parse: Callable[[Any], Any], max_ttl_s: float = MAX_TTL_S) -> Any:
    """Parse one (signature-stripped) record, check that it speaks for its signer (:func:`check_signer`), or raise
    :class:`RecordError` with the reason."""
    _require(
        record.subkey is not None and OWNER_MARKER in record.subkey,
        "record must be owner-signed (subkey must hold the owner's public key)",
    )
    _require(
        record.expiration_time <= get_dht_time() + max_ttl_s,
        f"record expires more than {max_ttl_s:.0f}s in the future",
    )
    try:
        value = DHTProtocol.serializer.loads(record.value)
    except Exception as e:  # msgpack raises many types on garbage
        raise RecordError(f"undecodable value: {type(e).__name__}") from e
    parsed = parse(value)
    check_signer(record.subkey, parsed)
    return parsed


def make_validators(run_id: str, private_key: Optional[RSAPrivateKey] = None) -> List[RecordValidatorBase]:
    """The validators every DHT node of this swarm should run (signature first, then schema and signer binding).
    ``private_key``: the node's libp2p identity key, which signs its records (None: the process-wide key)."""
    return [IdentitySignatureValidator(private_key), SwarmRecordValidator(run_id)]


def parse_subkeyed(
    entry: Any, parse: Callable[[Any], Any], what: str
) -> Tuple[Dict[bytes, Tuple[Any, float]], List[str]]:
    """Parse a ``dht.get(key)`` result of a subkeyed key into {subkey: (record, expiration)} and rejection notes.

    Values arrive already stripped of their signature and verified by the DHT node; the schema and the signer
    binding (:func:`check_signer`) are checked again here so that a record accepted by a foreign or outdated node is
    still refused.
    """
    records: Dict[bytes, Tuple[Any, float]] = {}
    rejected: List[str] = []
    if entry is None or not isinstance(entry.value, dict):
        return records, rejected
    if not all(isinstance(item, ValueWithExpiration) for item in entry.value.values()):
        # a plain dict stored without subkeys (e.g. accepted by a foreign node) is not a dictionary of records
        return records, [f"{what}: not a dictionary of subkeys"]
    now = get_dht_time()
    for subkey, item in entry.value.items():
        if item.expiration_time < now:
            continue
        if not (isinstance(subkey, bytes) and OWNER_MARKER in subkey):
            rejected.append(f"{what}: unsigned subkey")
            continue
        try:
            record = parse(item.value)
            check_signer(subkey, record)
            records[subkey] = (record, item.expiration_time)
        except RecordError as e:
            rejected.append(f"{what}: {e}")
    return records, rejected


# ---- trainer progress -----------------------------------------------------------------------------------------
TRAINER_STATES = ("training", "finished")


def progress_key(run_id: str) -> str:
    return f"{run_id}.progress"


@dataclass(kw_only=True)
class TrainerProgressRecord:
    """One trainer's progress, for ``swarm status``: optimizer steps done, recent loss, throughput, micro-batches.

    ``loss`` is the mean loss of the last optimizer step's completed micro-batches; None (or absent) before the
    first step, or if that step completed none.
    """

    peer_id: str  # the trainer's libp2p peer id
    state: str = "training"
    step: int = 0  # optimizer steps completed
    steps_total: int = 0  # steps this trainer was asked for (0: unknown)
    loss: Optional[float] = None
    tokens: int = 0  # tokens of completed micro-batches
    tokens_per_s: float = 0.0
    completed: int = 0  # micro-batches completed
    dropped: int = 0  # micro-batches dropped
    retried: int = 0  # retries (not micro-batches)
    updated_at: float = 0.0  # DHT time
    version: int = RECORD_VERSION

    FIELDS = {
        "peer_id",
        "state",
        "step",
        "steps_total",
        "loss",
        "tokens",
        "tokens_per_s",
        "completed",
        "dropped",
        "retried",
        "updated_at",
        "version",
    }
    SIGNER_FIELD = "peer_id"

    def to_value(self) -> Dict[str, Any]:
        value = asdict(self)
        if value["loss"] is None:
            del value["loss"]
        return value

    @classmethod
    def from_value(cls, value: Any) -> "TrainerProgressRecord":
        _check_fields(value, cls.FIELDS)
        loss = None
        if value.get("loss") is not None:
            loss = float(_number(value, "loss", 0.0, 1e6))
        return cls(
            peer_id=_string(value, "peer_id", max_len=128),
            state=_string(value, "state", choices=TRAINER_STATES),
            step=int(_number(value, "step", 0, MAX_COUNT, integer=True)),
            steps_total=int(_number(value, "steps_total", 0, MAX_COUNT, integer=True)),
            loss=loss,
            tokens=int(_number(value, "tokens", 0, MAX_COUNT, integer=True)),
            tokens_per_s=float(_number(value, "tokens_per_s", 0.0, 1e12)),
            completed=int(_number(value, "completed", 0, MAX_COUNT, integer=True)),
            dropped=int(_number(value, "dropped", 0, MAX_COUNT, integer=True)),
            retried=int(_number(value, "retried", 0, MAX_COUNT, integer=True)),
            updated_at=float(_number(value, "updated_at", 0.0, 1e11)),
        )
