"""The state of a swarm as seen from its DHT: every stage peer, reputation and blacklists, the trainer's progress.

:func:`collect_status` reads what the swarm publishes (it needs a DHT node, a client-mode one is enough: the
reader need not be part of the swarm) and :func:`build_status` turns those records into a :class:`SwarmStatus`:
plain data, JSON-serialisable with :meth:`SwarmStatus.to_json`, rendered as text tables by :func:`render_text`.
Nothing here writes to the DHT.

Where each figure comes from:

- peers: the stage records ``{run}.stage.{k}`` (state, throughput, micro-batches served, device, addresses,
  ``updated_at``); a peer whose record expired is gone and not listed.
- reputation: the signed reports ``{run}.reports``, aggregated with :func:`swarm.reputation.aggregate` through a
  :class:`swarm.reputation_service.ReputationService`, as every peer does (a report counts only if signed by its
  reporter's identity key). One difference: a one-shot reader cannot observe how long a reporter has been around, so the
  age part of probation is waived (``probation_s = 0``); the verified-work part still applies.
- blacklisted and why: the blacklists peers publish under ``{run}.blacklist``; the swarm-wide verdict is
  :func:`swarm.reputation_service.swarm_verdict` (publishers holding a majority of the trust this reader's
  reputation aggregate gives them; none while reputation is not computed), the reason the one most publishers cite.
- totals: the trainers' progress records ``{run}.progress`` (:class:`swarm.records.TrainerProgressRecord`).

JSON schema (``swarm status --json``; version 1). Keys marked * are stable promises; others may be added:

.. code-block:: text

    {
      "schema": 1,
      "run_id": str, "queried_at": float (DHT time, seconds since the epoch),
      "num_stages": int, "model": {"layers": int|null, "hidden": int|null, "vocab": int|null},
      "stages"*: [                                  # one entry per stage 0..num_stages-1, in order
        {"stage"*: int, "online": int,
         "peers"*: [                                # online first, then by peer id
           {"peer_id"*: str, "short_id": str,        # short_id: the id's last 8 characters, as the logs print it
            "state"*: "joining" | "online" | "offline",
            "stage": int, "address": str|null, "addrs": [str],
            "throughput": float (samples/s), "served": int (micro-batches), "device": str,
            "reputation": float in [0, 1] | null,    # null: not computed; 1.0 also means "no evidence yet"
            "blacklisted": bool, "blacklist_reason": str|null,
            "blacklisted_by": int, "blacklist_publishers": int,
            "last_seen_s": float (seconds since the peer's last announcement), "updated_at": float}]}],
      "trainers": [{"peer_id": str, "state": "training"|"finished", "step": int, "steps_total": int,
                    "loss": float|null, "tokens": int, "tokens_per_s": float, "completed": int,
                    "dropped": int, "retried": int, "updated_at": float, "last_seen_s": float}],
      "totals": {                                   # over the trainers still training (else the last to finish)
                 "step": int|null, "loss": float|null, "tokens_per_s": float|null,
                 "microbatches_completed": int|null, "microbatches_dropped": int|null,
                 "peers_per_stage": [int] (online peers), "stages_without_peer": [int],
                 "peers_online": int, "peers_total": int, "peers_blacklisted": int},
      "notes": [str]                                # records that were ignored and why, reputation caveats
    }
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import multiprocessing
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from swarm import aio
from swarm.records import BlacklistRecord, SwarmConfigRecord, TrainerProgressRecord

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SHORT_ID_LEN = 8


class StatusError(RuntimeError):
    """The status could not be read; the message says why, in words for a user."""


@dataclass
class PeerStatus:
    peer_id: str
    short_id: str
    stage: int
    state: str
    address: Optional[str]
    addrs: List[str]
    throughput: float
    served: int
    device: str
    reputation: Optional[float]
    blacklisted: bool
    blacklist_reason: Optional[str]
    blacklisted_by: int
    blacklist_publishers: int
    last_seen_s: float
    updated_at: float


@dataclass
class StageStatus:
    stage: int
    online: int
    peers: List[PeerStatus] = field(default_factory=list)


@dataclass
class TrainerStatus:
    peer_id: str
    state: str
    step: int
    steps_total: int
    loss: Optional[float]
    tokens: int
    tokens_per_s: float
    completed: int
    dropped: int
    retried: int
    updated_at: float
    last_seen_s: float


@dataclass
class SwarmStatus:
    run_id: str
    queried_at: float
    num_stages: int
    model: Dict[str, Any]
    stages: List[StageStatus]
    trainers: List[TrainerStatus]
    totals: Dict[str, Any]
    notes: List[str] = field(default_factory=list)
    schema: int = SCHEMA_VERSION

    def to_json(self) -> Dict[str, Any]:
        """Plain dicts, lists, strings and numbers (no NaN/inf): ``json.dumps`` of this follows the schema above."""
        return _finite(asdict(self))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def short_id(peer_id: str) -> str:
    return peer_id[-SHORT_ID_LEN:]


def _blacklist_verdicts(
    blacklists: Dict[str, BlacklistRecord], weights: Dict[str, float]
) -> Dict[str, Dict[str, Any]]:
    """Per listed peer: the swarm-wide verdict (publishers weighed by ``weights``), how many publishers list it, and
    the reason most of them cite."""
    from swarm.reputation_service import swarm_verdict

    listed: Dict[str, List[Dict[str, Any]]] = {}
    for record in blacklists.values():
        for peer, entry in record.entries.items():
            listed.setdefault(peer, []).append(entry)
    verdicts = {}
    for peer, entries in listed.items():
        reasons = Counter(entry["reason"] for entry in entries)
        reason = min(reasons, key=lambda r: (-reasons[r], r))
        reporters = max(entry["reporters"] for entry in entries)
        strikes = max(entry["strikes"] for entry in entries)
        verdicts[peer] = dict(
            blacklisted=swarm_verdict(blacklists, peer, weights),
            listed_by=len(entries),
            reason=f"{reason} (listed by {len(entries)} of {len(blacklists)} publishers; "
            f"{reporters} reporters, {strikes} strikes)",
        )
    return verdicts


def build_status(
    run_id: str,
    config: Optional[SwarmConfigRecord],
    stage_peers: Dict[int, Sequence[Any]],
    *,
    progress: Sequence[TrainerProgressRecord] = (),
    blacklists: Optional[Dict[str, BlacklistRecord]] = None,
    reputation: Any = None,
    now: float,
    num_stages: Optional[int] = None,
    notes: Sequence[str] = (),
) -> SwarmStatus:
    """A :class:`SwarmStatus` from records already read (pure: no network).

    ``stage_peers`` maps a stage to its peers: :class:`swarm.network.PeerInfo` objects or bare
    :class:`swarm.records.StageRecord` s. ``reputation`` is a :class:`swarm.reputation.Aggregate` (or None: not
    computed). ``progress`` holds the trainers' records.
    """
    blacklists = blacklists or {}
    if num_stages is None:
        num_stages = config.num_stages if config is not None else (max(stage_peers, default=-1) + 1)
    verdicts = _blacklist_verdicts(blacklists, reputation.weights if reputation is not None else {})
    stages: List[StageStatus] = []
    for stage in range(num_stages):
        peers = []
        for item in stage_peers.get(stage, ()):
            record = getattr(item, "record", item)
            verdict = verdicts.get(record.peer_id)
            peers.append(
                PeerStatus(
                    peer_id=record.peer_id,
                    short_id=short_id(record.peer_id),
                    stage=stage,
                    state=record.state,
                    address=record.addrs[0] if record.addrs else None,
                    addrs=list(record.addrs),
                    throughput=round(record.throughput, 3),
                    served=record.served,
                    device=record.device,
                    reputation=None if reputation is None else round(reputation.score(record.peer_id), 4),
                    blacklisted=bool(verdict and verdict["blacklisted"]),
                    blacklist_reason=verdict["reason"] if verdict else None,
                    blacklisted_by=verdict["listed_by"] if verdict else 0,
                    blacklist_publishers=len(blacklists),
                    last_seen_s=round(max(0.0, now - record.updated_at), 1),
                    updated_at=record.updated_at,
                )
            )
        peers.sort(key=lambda p: (p.state != "online", p.peer_id))
        stages.append(StageStatus(stage=stage, online=sum(p.state == "online" for p in peers), peers=peers))

    trainers = sorted(
        (
            TrainerStatus(
                peer_id=r.peer_id,
                state=r.state,
                step=r.step,
                steps_total=r.steps_total,
                loss=r.loss,
                tokens=r.tokens,
                tokens_per_s=r.tokens_per_s,
                completed=r.completed,
                dropped=r.dropped,
                retried=r.retried,
                updated_at=r.updated_at,
                last_seen_s=round(max(0.0, now - r.updated_at), 1),
            )
            for r in progress
        ),
        key=lambda t: -t.updated_at,
    )
    return SwarmStatus(
        run_id=run_id,
        queried_at=now,
        num_stages=num_stages,
        model=_model_summary(config),
        stages=stages,
        trainers=trainers,
        totals=_totals(stages, trainers),
        notes=list(notes),
    )


def _model_summary(config: Optional[SwarmConfigRecord]) -> Dict[str, Any]:
    model = config.model if config is not None else {}
    return dict(
        layers=model.get("num_layers"), hidden=model.get("hidden_size"), vocab=model.get("vocab_size")
    )


def _totals(stages: List[StageStatus], trainers: List[TrainerStatus]) -> Dict[str, Any]:
    # the trainers still training; if none is, the one that finished last (trainers are sorted freshest first)
    active = [t for t in trainers if t.state == "training"] or trainers[:1]
    with_loss = [t for t in active if t.loss is not None]
    return dict(
        step=max((t.step for t in active), default=None),
        loss=with_loss[0].loss if with_loss else None,
        tokens_per_s=round(sum(t.tokens_per_s for t in active), 2) if active else None,
        microbatches_completed=sum(t.completed for t in active) if active else None,
        microbatches_dropped=sum(t.dropped for t in active) if active else None,
        peers_per_stage=[s.online for s in stages],
        stages_without_peer=[s.stage for s in stages if s.online == 0],
        peers_online=sum(s.online for s in stages),
        peers_total=sum(len(s.peers) for s in stages),
        peers_blacklisted=sum(p.blacklisted for s in stages for p in s.peers),
    )


# ---- text ---------------------------------------------------------------------------------------------------------
WIDTH = 80  # every line of the text fits a classic terminal
COLUMNS = ("PEER", "STATE", "RATE/S", "SERVED", "REP", "SEEN", "ADDRESS")


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _age(seconds: float) -> str:
    """``_ago`` without the "ago", for the table's SEEN column."""
    return _ago(seconds)[: -len(" ago")]


def _short_addr(addr: Optional[str]) -> str:
    if not addr:
        return "-"
    return addr.split("/p2p/")[0] or addr


def _number(value: float, digits: int = 2) -> str:
    """A figure in at most about 9 characters (a record may carry up to 1e9 samples/s, 2**62 micro-batches)."""
    text = f"{value:.{digits}f}"
    return text if len(text) <= 9 else f"{value:.3g}"


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 3, 0)] + "..."


def _wrap(text: str, indent: str = "  ") -> List[str]:
    """A line of prose in lines of at most WIDTH characters, continuation lines indented."""
    import textwrap

    return textwrap.wrap(
        text, WIDTH, subsequent_indent=indent, break_long_words=True, break_on_hyphens=False
    ) or [""]


def _table(rows: List[Sequence[str]], indent: str = "  ") -> List[str]:
    """Columns padded to their widest cell; the last column (the address) gets what is left of WIDTH."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        head = indent + "".join(cell.ljust(w) + "  " for cell, w in zip(row, widths))
        lines.append(_fit(head + _fit(row[-1], max(WIDTH - len(head), 8)), WIDTH).rstrip())
    return lines


def render_text(status: SwarmStatus) -> str:
    """The status as text, every line at most :data:`WIDTH` characters: a header, the trainers, the totals, and one
    table per stage (a peer's blacklisting on a line under its row). A swarm with no peer and no trainer says so
    instead of listing empty stages."""
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(status.queried_at))
    m = status.model
    model = f"{m.get('layers')} layers x {m.get('hidden')} hidden" if m.get("layers") else "unknown"
    lines = _wrap(f"swarm {status.run_id!r} as of {when}")
    lines += _wrap(f"model: {model} in {status.num_stages} stages")
    totals = status.totals
    if not totals["peers_total"] and not status.trainers:
        lines += _wrap(
            "nobody answers for this swarm: none of its peers or trainers announces itself. It has stopped, or "
            "its peers have not started yet (the DHT answered; a peer's record expires about 20 s after it "
            "leaves)."
        )
        lines += [f"note: {line}" for note in status.notes for line in _wrap(note)]
        return "\n".join(lines)
    for t in status.trainers:
        loss = "n/a" if t.loss is None else f"{t.loss:.4f}"
        of = f"/{t.steps_total}" if t.steps_total else ""
        lines += _wrap(
            f"trainer {short_id(t.peer_id)} ({t.state}), updated {_ago(t.last_seen_s)}: step {t.step}{of}, "
            f"loss {loss}"
        )
        lines += _wrap(
            f"  {t.tokens_per_s:.1f} tokens/s; micro-batches {t.completed} completed, {t.dropped} dropped, "
            f"{t.retried} retried"
        )
    if not status.trainers:
        lines += _wrap("trainer: none has published progress (no trainer running, or it has not started yet)")
    loss = "n/a" if totals["loss"] is None else f"{totals['loss']:.4f}"
    tps = "n/a" if totals["tokens_per_s"] is None else f"{totals['tokens_per_s']:.1f}"
    step = "n/a" if totals["step"] is None else str(totals["step"])
    empty = ", ".join(map(str, totals["stages_without_peer"])) or "none"
    lines += _wrap(f"totals: step {step}, loss {loss}, {tps} tokens/s; stages with no peer: {empty}")
    lines += _wrap(
        f"peers: {totals['peers_online']} online of {totals['peers_total']}, {totals['peers_blacklisted']} "
        f"blacklisted; online per stage {totals['peers_per_stage']}"
    )
    for stage in status.stages:
        lines.append("")
        if not stage.peers:
            lines.append(f"stage {stage.stage}: no peer")
            continue
        lines.append(f"stage {stage.stage}: {stage.online} online of {len(stage.peers)}")
        rows: List[Sequence[str]] = [COLUMNS]
        under: Dict[int, str] = {}
        for p in stage.peers:
            if p.blacklisted:
                under[len(rows)] = f"blacklisted: {p.blacklist_reason}"
            elif p.blacklisted_by:
                under[len(rows)] = (
                    f"listed by {p.blacklisted_by} of {p.blacklist_publishers} (not blacklisted)"
                )
            rows.append(
                (
                    p.short_id,
                    p.state,
                    _number(p.throughput),
                    _number(p.served, 0),
                    "n/a" if p.reputation is None else f"{p.reputation:.2f}",
                    _age(p.last_seen_s),
                    _short_addr(p.address),
                )
            )
        for i, line in enumerate(_table(rows)):
            lines.append(line)
            if i in under:
                lines += _wrap(" " * 12 + under[i], indent=" " * 14)
    for note in status.notes:
        lines += _wrap(f"note: {note}")
    return "\n".join(lines)


# ---- reading from a DHT --------------------------------------------------------------------------------------------
def connect(run_id: str, initial_peers: Sequence[str], timeout_s: float = 15.0, **kwargs):
    """Join the DHT in client mode, or raise :class:`StatusError` within about ``timeout_s`` seconds.

    hivemind's startup either raises (the p2p daemon cannot reach any initial peer) or can hang; both end here
    in a StatusError, and any DHT process this call started is stopped.
    """
    from swarm.network import check_peer_addrs, create_dht

    if not initial_peers:
        raise StatusError("no initial peer given")
    try:
        check_peer_addrs(initial_peers)
    except ValueError as e:
        raise StatusError(str(e)) from None
    before = set(multiprocessing.active_children())
    outcome: Dict[str, Any] = {}

    def start() -> None:
        try:
            outcome["dht"] = create_dht(
                run_id, initial_peers, client_mode=True, wait_timeout_s=timeout_s, **kwargs
            )
        except Exception as e:  # reported to the caller below
            outcome["error"] = e

    thread = threading.Thread(target=start, name="status-connect", daemon=True)
    thread.start()
    thread.join(timeout_s + 5.0)
    if "dht" in outcome:
        return outcome["dht"]
    for child in set(multiprocessing.active_children()) - before:  # the DHT process this call started
        child.terminate()
        child.join(2.0)
        if child.is_alive():
            child.kill()
    where = " ".join(initial_peers)
    error = outcome.get("error")
    if error is None or isinstance(error, TimeoutError):
        raise StatusError(
            f"no answer from the DHT at {where} within {timeout_s:.0f}s: is a peer of the swarm "
            f"running there, and is the address reachable from here?"
        )
    detail = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    if "bootstrap" in detail:
        detail = "no initial peer answered"
    raise StatusError(
        f"cannot reach the DHT at {where}: {detail}. Is a peer of the swarm running there, "
        f"and is the address reachable from here?"
    )


def _reputation_config(config: SwarmConfigRecord):
    """The swarm's reputation settings with the age part of probation waived (see the module docstring)."""
    from swarm.reputation import ReputationConfig

    settings = config.extra.get("reputation") if isinstance(config.extra.get("reputation"), dict) else {}
    try:
        cfg = ReputationConfig(**settings)
    except (TypeError, ValueError):
        cfg = ReputationConfig()
    return dataclasses.replace(cfg, probation_s=0.0)


class StatusReader:
    """Reads a swarm's status from a DHT node, again and again (``--watch``) in one event loop."""

    def __init__(self, dht, run_id: str, *, timeout_s: float = 15.0):
        self.dht, self.run_id = dht, run_id
        self.timeout_s = timeout_s
        self.config: Optional[SwarmConfigRecord] = None
        self.service = None

    async def read(self) -> SwarmStatus:
        """One status, within ``timeout_s`` (else :class:`StatusError`)."""
        try:
            return await asyncio.wait_for(self._read(), timeout=self.timeout_s)
        except asyncio.TimeoutError:
            raise StatusError(f"reading the swarm's records took longer than {self.timeout_s:.0f}s") from None

    async def _read(self) -> SwarmStatus:
        from hivemind.utils import get_dht_time

        from swarm.network import fetch_stage_peers, fetch_swarm_config
        from swarm.records import parse_subkeyed, progress_key
        from swarm.reputation_service import ReputationService, read_published_blacklists

        loop = asyncio.get_event_loop()
        notes: List[str] = []
        if self.config is None:
            try:
                self.config = await loop.run_in_executor(
                    None, fetch_swarm_config, self.dht, self.run_id, max(1.0, self.timeout_s / 2)
                )
            except TimeoutError as e:
                raise StatusError(str(e)) from None
        config = self.config
        stage_peers = await loop.run_in_executor(
            None, fetch_stage_peers, self.dht, self.run_id, config.num_stages
        )
        entry = await self.dht.get(progress_key(self.run_id), latest=True, return_future=True)
        parsed, rejected = parse_subkeyed(entry, TrainerProgressRecord.from_value, "trainer progress")
        notes.extend(rejected)
        latest: Dict[str, TrainerProgressRecord] = {}
        for record, _ in parsed.values():
            if record.peer_id not in latest or latest[record.peer_id].updated_at < record.updated_at:
                latest[record.peer_id] = record
        blacklists = await read_published_blacklists(self.dht, self.run_id)

        reputation = None
        try:
            if self.service is None:
                peer_id = await loop.run_in_executor(
                    None, lambda: str(self.dht.peer_id)
                )  # asks the DHT process
                self.service = ReputationService(
                    self.dht, self.run_id, config.num_stages, _reputation_config(config), peer_id=peer_id
                )
            reputation = await self.service.refresh()
            if not any(w > 0 for w in reputation.weights.values()):
                notes.append(
                    "reputation: no reporter has verified work yet, so every score is neutral (1.00)"
                )
        except Exception as e:  # reputation is one column; the rest of the status still stands
            notes.append(f"reputation not computed: {type(e).__name__}: {e}")
        return build_status(
            self.run_id,
            config,
            stage_peers,
            progress=list(latest.values()),
            blacklists=blacklists,
            reputation=reputation,
            now=get_dht_time(),
            notes=notes,
        )


def read_status(dht, run_id: str, timeout_s: float = 15.0) -> SwarmStatus:
    """One status from a running DHT node (a blocking convenience around :class:`StatusReader`)."""
    return aio.run(StatusReader(dht, run_id, timeout_s=timeout_s).read())
