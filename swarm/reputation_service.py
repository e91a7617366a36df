"""Reputation over the DHT: publish this peer's signed report, read everyone's, aggregate, enforce, publish.

Each stage peer publishes its :class:`~swarm.reputation.ReputationLedger` as a signed report under
``{run}.reports`` (subkey: its RSA key) every ``report_period_s``. Every participant (stage peers and trainers)
reads all reports and runs :func:`~swarm.reputation.aggregate` itself; no one has to be trusted to compute the
verdicts. Stage peers publish the blacklist they computed under ``{run}.blacklist`` (with reason and evidence
count per entry) for operators and scripts; routers and servers act on their own computation.

A record is signed with its writer's libp2p identity key, and readers accept a report or a blacklist only when its
``reporter`` / ``publisher`` is the peer id that key derives (:func:`swarm.records.check_signer`): nobody can
report or publish in another peer's name, and no lookup is needed to bind a key to a peer.

The swarm-wide verdict on the published blacklists (:func:`swarm_verdict`) weighs each publisher by the trust its
reports earned in the reader's own aggregate (:attr:`Aggregate.weights <swarm.reputation.Aggregate>`: probation,
verified work, not blacklisted), never by head count: identities on probation publishing blacklists change nothing.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Callable, Dict, List, Mapping, Optional, Set

import hivemind
from hivemind.utils import get_dht_time

from swarm.admission import AdmissionPolicy
from swarm.network import cancel_task, fetch_stage_peers, owner_subkey
from swarm.records import (
    BlacklistRecord,
    ReputationReport,
    blacklist_key,
    parse_subkeyed,
    reports_key,
)
from swarm.reputation import Aggregate, Aggregator, ReputationConfig, ReputationLedger, aggregate

logger = logging.getLogger(__name__)

# (peer id) -> the RSA public key marker that peer says is its own, or None if it cannot be asked


class ReputationService:
    """Publishes this peer's report (if it has a ledger), aggregates everyone's, and answers "is X banned?"."""

    def __init__(
        self,
        dht: hivemind.DHT,
        run_id: str,
        num_stages: int,
        cfg: ReputationConfig,
        peer_id: str,
        *,
        ledger: Optional[ReputationLedger] = None,
        publish_blacklist: bool = False,
        admission: Optional[AdmissionPolicy] = None,
        admission_proof: Optional[dict] = None,
    ):
        self.dht, self.run_id, self.num_stages, self.cfg = dht, run_id, num_stages, cfg
        self.peer_id, self.ledger = peer_id, ledger
        self.publish_blacklist = publish_blacklist
        # identities the swarm's admission rule does not let in: their reports and records are ignored
        self.admission = admission if admission is not None and admission.enabled else None
        self.admission_proof = admission_proof
        self.first_seen: Dict[str, float] = {}
        self.stages_of: Dict[
            str, Set[int]
        ] = {}  # peer id -> stages it announced (only neighbours can witness)
        self.aggregate: Aggregate = aggregate({}, {}, get_dht_time(), cfg)
        # recomputes only when the reports, the eligible reporters or the stages changed (Aggregator), in its own
        # thread: never on the event loop that routes this peer's chain RPCs, never two at once, and never queued
        # behind (or ahead of) the DHT reads that share the loop's default executor
        self._aggregator = Aggregator(cfg)
        self._executor: Optional[ThreadPoolExecutor] = None
        self.banned_since: Dict[str, float] = {}
        self.on_blacklisted: List[Callable[[str], None]] = []  # called once with each newly blacklisted peer
        self._task: Optional[asyncio.Task] = None

    # ---- verdicts ----------------------------------------------------------------------------------------------
    def is_blacklisted(self, peer: str) -> bool:
        return peer in self.aggregate.blacklist

    def reason(self, peer: str) -> Optional[str]:
        entry = self.aggregate.blacklist.get(peer)
        if entry is None:
            return None
        return (
            f"blacklisted by {entry['reporters']} reporters: {entry['reason']} ({entry['strikes']} strikes)"
        )

    def score(self, peer: str) -> float:
        return self.aggregate.score(peer)

    # ---- one round -----------------------------------------------------------------------------------------------
    async def publish_report(self) -> bool:
        if self.ledger is None:
            return False
        report = self.ledger.to_report(self.peer_id, get_dht_time())
        report.admission = self.admission_proof
        return await self._store(reports_key(self.run_id), report.to_value())

    async def _store(self, key: str, value) -> bool:
        try:
            return bool(
                await self.dht.store(
                    key,
                    value,
                    get_dht_time() + self.cfg.report_ttl_s,
                    subkey=owner_subkey(self.dht),
                    return_future=True,
                )
            )
        except Exception as e:
            logger.warning(f"could not publish {key}: {e}")
            return False

    async def refresh(self) -> Aggregate:
        """Read reports and stage records, aggregate (a report is read only if signed by its reporter's key)."""
        loop = asyncio.get_event_loop()
        now = get_dht_time()
        stages = await loop.run_in_executor(
            None, fetch_stage_peers, self.dht, self.run_id, self.num_stages, self.admission
        )
        # every stage a peer ever announced, kept after its record expires (a blacklisted peer that left stays
        # blacklisted when it comes back); every one, not its latest: a peer may move between stages
        for stage, infos in stages.items():
            for info in infos:
                self.first_seen.setdefault(info.peer_id, now)
                self.stages_of.setdefault(info.peer_id, set()).add(stage)
        entry = await self.dht.get(reports_key(self.run_id), latest=True, return_future=True)
        parsed, rejected = parse_subkeyed(entry, ReputationReport.from_value, "reputation report")
        for note in rejected:
            logger.debug(note)
        reports: Dict[str, ReputationReport] = {}
        for report, _ in parsed.values():
            if self.admission is not None and not self.admission.admits(report.reporter, report.admission):
                logger.debug(f"ignored the report of {report.reporter[-8:]}: not admitted")
                continue
            self.first_seen.setdefault(report.reporter, now)
            if report.reporter in reports and reports[report.reporter].issued_at >= report.issued_at:
                continue
            reports[report.reporter] = report
        # every report read is bound to its reporter (parse_subkeyed checked that its key derives the reporter's id)
        # off the event loop (aggregation is linear in the entries, yet 0.2 s at 10,000 reporters); on copies, so
        # nothing it reads changes under it
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reputation")
        self.aggregate = await loop.run_in_executor(
            self._executor,
            partial(
                self._aggregator,
                reports,
                dict(self.first_seen),
                now,
                stages={peer: frozenset(s) for peer, s in self.stages_of.items()},
            ),
        )
        for peer in self.aggregate.blacklist:
            if peer not in self.banned_since:
                self.banned_since[peer] = now
                logger.info(f"blacklisted {peer[-8:]}: {self.reason(peer)}")
                for listener in self.on_blacklisted:
                    listener(peer)
        if self.publish_blacklist:
            record = self.aggregate.to_blacklist_record(self.peer_id, now)
            await self._store(blacklist_key(self.run_id), record.to_value())
        return self.aggregate

    async def _loop(self) -> None:
        while True:
            try:
                await self.publish_report()
                await self.refresh()
            except Exception as e:  # reputation must never take a peer down
                logger.warning(f"reputation round failed: {type(e).__name__}: {e}")
            await asyncio.sleep(self.cfg.report_period_s)

    def start(self) -> None:
        self._task = asyncio.get_event_loop().create_task(self._loop())

    async def stop(self) -> None:
        await cancel_task(self._task)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def swarm_verdict(self, blacklists: Dict[str, BlacklistRecord], peer: str) -> bool:
        """:func:`swarm_verdict` with the publishers weighed by this service's current aggregate."""
        return swarm_verdict(blacklists, peer, self.aggregate.weights)


async def read_published_blacklists(dht: hivemind.DHT, run_id: str) -> Dict[str, BlacklistRecord]:
    """Every peer's published blacklist, by publisher peer id (newest per publisher)."""
    entry = await dht.get(blacklist_key(run_id), latest=True, return_future=True)
    parsed, _ = parse_subkeyed(entry, BlacklistRecord.from_value, "blacklist")
    out: Dict[str, BlacklistRecord] = {}
    for record, _ in parsed.values():
        if record.publisher not in out or out[record.publisher].issued_at < record.issued_at:
            out[record.publisher] = record
    return out


def swarm_verdict(blacklists: Dict[str, BlacklistRecord], peer: str, weights: Mapping[str, float]) -> bool:
    """The swarm-wide verdict: listed by publishers holding a strict majority of the trusted weight.

    ``weights`` are the reader's trust in each peer as a reporter (:attr:`swarm.reputation.Aggregate.weights`:
    zero on probation, without verified work, or blacklisted), so a publisher counts as much as its reports do and
    a crowd of fresh identities counts for nothing. Publishers that trusted publishers holding a majority of the
    weight list are left out (their say about others is void), as in the reader's own aggregate.
    """
    trusted = {p: w for p in blacklists if (w := float(weights.get(p, 0.0))) > 0}
    total = sum(trusted.values())

    def listing(target: str) -> float:
        return sum(w for p, w in trusted.items() if target in blacklists[p].entries)

    voters = {p: w for p, w in trusted.items() if listing(p) * 2 <= total}
    if not voters:
        return False
    return sum(w for p, w in voters.items() if peer in blacklists[p].entries) * 2 > sum(voters.values())
