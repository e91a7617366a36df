"""The trainer: holds the data, feeds micro-batches through chains of stage peers, accounts for every one.

Several micro-batches are in flight at once (``max_inflight``), so different stages work on different
micro-batches at the same time (pipelining across chains). For each micro-batch the trainer asks the router for
a chain, streams the labels straight to the chain's last peer, and sends the token ids to its first peer under a
header it signs (``swarm.protocol``); the activations then travel peer to peer and the reply carries one signed
report per hop, the last stage's with the loss. A failed attempt names the peer to blame (from the signed reports:
the deepest hop that failed of its own making names a neighbour; a reply that does not verify blames its deliverer);
the trainer bans it locally and retries on another chain, up to ``max_attempts``, then drops the micro-batch
with the reason; a tensor a check rejected is never re-sent to the same check (with a single replica on either
side of that hop the micro-batch is dropped at once). The :class:`MicroBatchLedger` guarantees each micro-batch
ends exactly once: completed, or dropped with a reason; retries are counted separately.

An optimizer step, from the trainer's view, is ``microbatches_per_step`` consecutive micro-batches: the
stage replicas step together once the swarm has accumulated that many samples (``target_batch_size``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import hivemind
import torch
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from swarm.admission import AdmissionPolicy
from swarm.audit import AuditConfig, pick_auditors
from swarm.data import MicroBatchStream
from swarm.dataplane import DataPlaneClient, Endpoint, call_chain, endpoint_of
from swarm.network import cancel_task, fetch_stage_peers, identity_key, owner_subkey
from swarm.protocol import ChainHeader, ProtocolError, check_reports, resolve
from swarm.records import MAX_TTL_S, TrainerProgressRecord, progress_key
from swarm.reputation import ReputationConfig
from swarm.reputation_service import ReputationService, read_published_blacklists
from swarm.router import NoRouteError, Router
from swarm.stage_server import StageServer, namespace
from swarm.transport import (
    TensorLimits,
    TransportError,
    aiter_messages,
    pack,
    receive,
    single,
)

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class TrainerConfig:
    run_id: str
    num_stages: int
    steps: int
    microbatches_per_step: int
    max_inflight: int = 4
    max_attempts: int = 5
    chain_timeout_s: float = 180.0
    wait_for_peers_s: float = 120.0  # how long a micro-batch may wait for a usable chain
    refresh_peers_s: float = 2.0
    compression: str = "none"
    metrics_path: Optional[str] = None
    progress_period_s: float = (
        5.0  # how often the trainer refreshes its {run}.progress record (and after each step)
    )
    progress_ttl_s: float = 30.0
    progress_final_ttl_s: float = 120.0  # the last record ("finished") stays readable this long after the run
    # a resumed swarm (its config's ``resumed_from``): steps are numbered, and the data read, from here on
    first_step: int = 0
    # send chains' token ids to the first stage over its direct connection (swarm.dataplane) where its record
    # announces one; P2P otherwise, and always with compression
    dataplane: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1 or self.microbatches_per_step < 1 or self.max_inflight < 1 or self.max_attempts < 1:
            raise ValueError("steps, microbatches_per_step, max_inflight and max_attempts must be >= 1")
        if self.first_step < 0:
            raise ValueError("first_step must be >= 0")
        if not (
            0 < self.progress_period_s < self.progress_ttl_s <= MAX_TTL_S
            and 0 < self.progress_final_ttl_s <= MAX_TTL_S
        ):
            raise ValueError(
                "progress: need 0 < progress_period_s < progress_ttl_s <= MAX_TTL_S and "
                "0 < progress_final_ttl_s <= MAX_TTL_S"
            )


class MicroBatchLedger:
    """Every micro-batch ends exactly once (completed or dropped); retries are counted, never double-counted."""

    def __init__(self) -> None:
        self.outcome: Dict[int, str] = {}
        self.loss: Dict[int, float] = {}
        self.drop_reason: Dict[int, str] = {}
        self.retried = 0
        self.retry_reasons: Counter = Counter()

    def retry(self, index: int, reason: str) -> None:
        if index in self.outcome:
            raise RuntimeError(f"micro-batch {index} already ended as {self.outcome[index]}")
        self.retried += 1
        self.retry_reasons[reason.split(":")[0][:80]] += 1

    def complete(self, index: int, loss: float) -> None:
        self._end(index, "completed")
        self.loss[index] = loss

    def drop(self, index: int, reason: str) -> None:
        self._end(index, "dropped")
        self.drop_reason[index] = reason

    def _end(self, index: int, outcome: str) -> None:
        if index in self.outcome:
            raise RuntimeError(f"micro-batch {index} already ended as {self.outcome[index]}, not {outcome}")
        self.outcome[index] = outcome

    def counts(self) -> Dict[str, int]:
        values = list(self.outcome.values())
        return dict(
            completed=values.count("completed"), retried=self.retried, dropped=values.count("dropped")
        )


class TimingStats:
    """Mean seconds per micro-batch for each stage (forward, backward, optimizer) and for whole chains."""

    def __init__(self) -> None:
        self._sums: Dict[str, Dict[str, float]] = {}
        self._counts: Counter = Counter()

    def add(self, key: Any, parts: Dict[str, float]) -> None:
        key = f"stage{key}" if isinstance(key, int) else str(key)
        sums = self._sums.setdefault(key, {})
        for name, value in parts.items():
            sums[name] = sums.get(name, 0.0) + value
        self._counts[key] += 1

    def means(self) -> Dict[str, Dict[str, float]]:
        return {
            key: {name: round(total / self._counts[key], 5) for name, total in sums.items()}
            for key, sums in sorted(self._sums.items())
        }


@dataclass
class Attempt:
    ok: bool
    loss: float = float("nan")
    reason: str = ""
    blame: Optional[str] = None
    judge: Optional[str] = (
        None  # the receiver whose SENTINEL check rejected the blamed peer's tensor (ChainError)
    )
    hop_times_s: Dict[str, float] = field(default_factory=dict)


MAX_AVOIDING_PICKS = 8  # chains tried for a retry that repeats no rejected hop (see Trainer._chain_avoiding)


def repeated_hop(chain: Sequence[str], rejected: Set[Tuple[str, str]]) -> Optional[Tuple[str, str]]:
    """The (sender, judge) pair of ``rejected`` that ``chain`` would repeat, as neighbours in either direction (a
    rejected activation goes forward, a rejected gradient back), or None: retrying a micro-batch on such a chain
    sends the same tensor to the same check, which is how a stage with one replica lost micro-batches after five
    identical rejections, each a strike on the sender."""
    for a, b in zip(chain, chain[1:]):
        for pair in ((a, b), (b, a)):
            if pair in rejected:
                return pair
    return None


async def _bounded(awaitable, seconds: float, what: str):
    """Await with a deadline, without waiting for a cancellation that may itself hang; None (and a warning) on
    timeout."""
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        task.cancel()
        logger.warning(f"gave up after {seconds:.0f}s: {what}")
        return None
    return task.result()


class Trainer:
    """Drives training over the swarm. ``await run()`` returns the summary dict."""

    def __init__(
        self,
        cfg: TrainerConfig,
        dht: hivemind.DHT,
        stream: MicroBatchStream,
        *,
        router: Optional[Router] = None,
        on_step: Optional[Callable[[Dict[str, Any]], None]] = None,
        reputation: Optional[ReputationConfig] = None,
        admission: Optional[AdmissionPolicy] = None,
        admission_token: Optional[str] = None,
        audit: Optional[AuditConfig] = None,
        identity_key=None,
    ):
        self.cfg, self.dht, self.stream = cfg, dht, stream
        self.identity_key = identity_key  # this trainer's libp2p identity key: it signs every request header
        # audits of the last stage's gradients (swarm.audit); None: never (a single-stage swarm has nothing to audit)
        self.audit = audit if audit is not None and cfg.num_stages >= 2 else None
        self.audit_rng = random.Random()
        self.audits = 0  # micro-batch attempts sent with auditors
        self.router = router or Router(cfg.num_stages)
        self.router.microbatch_size = stream.microbatch_size
        self.ledger = MicroBatchLedger()
        self.on_step = on_step
        self.limits = TensorLimits()
        self.p2p: Optional[hivemind.P2P] = None
        self.peer_id = ""
        self.tokens = 0
        self.metrics: List[Dict[str, Any]] = []
        self.timing = TimingStats()
        self._stub_cls = StageServer  # stubs are generated from the server's RPC signatures
        self.reputation_cfg = reputation
        self.reputation: Optional[ReputationService] = None
        self.blacklisted_at: Dict[
            str, int
        ] = {}  # peer -> micro-batches ended when this trainer first saw it banned
        self.first_rejected_at: Dict[
            str, int
        ] = {}  # peer -> micro-batches ended at the first SENTINEL rejection of it
        self.chosen_at_blacklist: Dict[str, int] = {}  # peer -> times the router had chosen it by then
        self._progress_kick: Optional[asyncio.Event] = None
        self._progress_stop = False
        self.admission = admission if admission is not None and admission.enabled else None
        self.admission_token = admission_token
        self.admission_proof: Optional[Dict[str, Any]] = (
            None  # sent with every request, when the swarm asks for one
        )
        self.dataplane: Optional[DataPlaneClient] = None
        self.endpoints: Dict[str, Endpoint] = {}  # peer id -> data plane endpoint its stage record announces

    # ---- progress on the DHT (for `swarm status`) ----------------------------------------------------------------
    def progress_record(self, state: str = "training") -> TrainerProgressRecord:
        last = self.metrics[-1] if self.metrics else None
        counts = self.ledger.counts()
        elapsed = max(last["elapsed_s"] if last is not None else 0.0, 1e-9)  # the rate up to the last step
        loss = last["loss"] if last is not None else None
        return TrainerProgressRecord(
            peer_id=self.peer_id or "unknown",
            state=state,
            step=self.cfg.first_step + len(self.metrics),
            steps_total=self.cfg.first_step + self.cfg.steps,
            loss=float(loss) if loss is not None and 0.0 <= loss <= 1e6 else None,
            tokens=self.tokens,
            tokens_per_s=float(min(self.tokens / elapsed, 1e12)),
            completed=counts["completed"],
            dropped=counts["dropped"],
            retried=counts["retried"],
            updated_at=get_dht_time(),
        )

    async def publish_progress(self, state: str = "training") -> bool:
        """Store this trainer's progress record (signed, ttl ``progress_ttl_s``); False if the DHT refused it."""
        try:
            ttl = self.cfg.progress_final_ttl_s if state == "finished" else self.cfg.progress_ttl_s
            future = self.dht.store(
                progress_key(self.cfg.run_id),
                self.progress_record(state).to_value(),
                get_dht_time() + ttl,
                subkey=owner_subkey(self.dht),
                return_future=True,
            )
            return bool(await asyncio.wait_for(future, timeout=min(10.0, self.cfg.progress_ttl_s)))
        except Exception as e:  # progress is for onlookers: it must never disturb training
            logger.debug(f"could not publish progress: {type(e).__name__}: {e}")
            return False

    async def _progress_loop(self) -> None:
        # asyncio.wait, not wait_for: wait_for swallows a cancellation that coincides with the event being set
        # (Python 3.11), and this loop is cancelled right after the last step sets it; the flag is a second stop
        while not self._progress_stop:
            await self.publish_progress()
            kick = asyncio.ensure_future(self._progress_kick.wait())
            try:
                await asyncio.wait({kick}, timeout=self.cfg.progress_period_s)
            finally:
                kick.cancel()
            self._progress_kick.clear()

    async def refresh_peers(self) -> None:
        loop = asyncio.get_event_loop()
        peers = await loop.run_in_executor(
            None, fetch_stage_peers, self.dht, self.cfg.run_id, self.cfg.num_stages, self.admission
        )
        self.router.update(peers)
        found = {info.peer_id: endpoint_of(info.record) for infos in peers.values() for info in infos}
        self.endpoints = {peer: endpoint for peer, endpoint in found.items() if endpoint is not None}

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.refresh_peers_s)
            try:
                await self.refresh_peers()
            except Exception as e:
                logger.warning(f"could not refresh peers from the DHT: {e}")

    def _stub(self, peer: str):
        return self._stub_cls.get_stub(
            self.p2p, PeerID.from_base58(peer), namespace=namespace(self.cfg.run_id)
        )

    async def _deposit_labels(self, peer: str, mb: str, ids: torch.Tensor, timeout: float) -> Optional[str]:
        """Stream the labels of ``mb`` to a last-stage peer; None when it took them, else why not."""
        try:
            reply = await self._stub(peer).rpc_labels(
                aiter_messages(pack({"mb": mb, "admission": self.admission_proof}, [ids])), timeout=timeout
            )
            meta = (await receive(single(reply), self.limits)).metadata
            return None if meta.get("ok") is True else f"refused the labels: {str(meta.get('error'))[:200]}"
        except Exception as e:
            return f"labels not delivered: {type(e).__name__}: {e}"

    async def _attempt(self, index: int, attempt: int, chain: List[str], ids: torch.Tensor) -> Attempt:
        mb = f"{index}.{attempt}"
        why = await self._deposit_labels(chain[-1], mb, ids, timeout=min(30.0, self.cfg.chain_timeout_s))
        if why is not None:
            return Attempt(False, reason=f"last stage {why}", blame=chain[-1])
        auditors = await self._auditors(chain, mb, ids)
        header, reveal = ChainHeader.create(
            self.identity_key,
            run_id=self.cfg.run_id,
            trainer=self.peer_id,
            mb=mb,
            step=index // self.cfg.microbatches_per_step,
            route=chain,
            tokens=ids,
            auditors=auditors,
            now=time.time(),
        )
        meta = dict(header=header.to_wire(), audit=reveal, admission=self.admission_proof)
        try:
            received = await call_chain(
                self.dataplane,
                chain[0],
                self.endpoints.get(chain[0]),
                self._stub(chain[0]).rpc_chain,
                meta,
                [ids],
                self.limits,
                self.cfg.chain_timeout_s,
                self.cfg.compression,
            )
        except asyncio.TimeoutError:
            return Attempt(
                False, reason=f"chain timed out after {self.cfg.chain_timeout_s:.0f}s", blame=chain[0]
            )
        except TransportError as e:
            return Attempt(False, reason=f"malformed reply: {e}", blame=chain[0])
        except Exception as e:
            return Attempt(False, reason=f"first peer unreachable: {type(e).__name__}: {e}", blame=chain[0])
        reply = received.metadata
        if "reports" not in reply:  # refused before it verified the header (the one it was sent is valid)
            no_fault = reply.get("no_fault") is True
            return Attempt(
                False,
                reason=f"stage 0 peer refused: {str(reply.get('error', 'no reason'))[:200]}",
                blame=None if no_fault else chain[0],
            )
        try:
            verdict = resolve(header, check_reports(header, reply["reports"], 0, chain[0]))
        except (
            ProtocolError
        ) as e:  # the first peer delivered what does not verify: its fault, whoever made it
            return Attempt(False, reason=f"invalid reply: {e}", blame=chain[0])
        if not verdict.ok:
            return Attempt(False, reason=verdict.reason, blame=verdict.blame, judge=verdict.judge)
        hop_times = {}
        for report in verdict.reports:
            parts = {
                k: report.timings[k] for k in ("fwd_s", "bwd_s", "opt_s", "wait_s") if k in report.timings
            }
            if len(parts) == 4:
                hop_times[report.peer] = (
                    parts["fwd_s"] + parts["bwd_s"] + parts["opt_s"]
                )  # busy time, not queueing
                self.timing.add(report.stage, parts)
        return Attempt(True, loss=verdict.loss, hop_times_s=hop_times)

    async def _auditors(self, chain: List[str], mb: str, ids: torch.Tensor) -> List[str]:
        """Draw this attempt's auditors (``swarm.audit.pick_auditors``) and deposit the labels with them; an auditor
        that does not take them is left out (an audit is best effort: the micro-batch never waits for one)."""
        if self.audit is None:
            return []
        drawn = pick_auditors(
            self.router.usable(self.cfg.num_stages - 1),
            chain[-1],
            self.router.is_suspect(chain[-1]),
            self.audit,
            self.audit_rng,
        )

        async def deposit(peer: str) -> bool:
            why = await self._deposit_labels(peer, mb, ids, timeout=min(10.0, self.cfg.chain_timeout_s))
            if why is not None:
                logger.debug(f"auditor {peer[-8:]} {why} of {mb}")
            return why is None

        taken = await asyncio.gather(*(deposit(peer) for peer in drawn))
        auditors = [peer for peer, ok in zip(drawn, taken) if ok]
        self.audits += bool(auditors)
        return auditors

    async def _pick_chain(self) -> List[str]:
        deadline = time.monotonic() + self.cfg.wait_for_peers_s
        while True:
            try:
                return self.router.pick_chain()
            except NoRouteError as e:
                if time.monotonic() > deadline:
                    raise
                logger.debug(f"waiting for peers: {e}")
                await asyncio.sleep(min(1.0, self.cfg.refresh_peers_s))
                await self.refresh_peers()

    def _chain_avoiding(self, chain: List[str], rejected: Set[Tuple[str, str]]) -> Optional[List[str]]:
        """Another chain than ``chain`` (which repeats a rejected hop; released here) that repeats none: each hop it
        would repeat is avoided without its judge (another check) or without its sender (another tensor), breadth
        first over what to leave out, at most ``MAX_AVOIDING_PICKS`` picks; None if none was found."""
        self.router.release(chain)
        queue: List[Tuple[str, ...]] = [()]
        seen = {()}
        for _ in range(MAX_AVOIDING_PICKS):
            if not queue:
                break
            exclude = queue.pop(0)
            try:
                chain = self.router.pick_chain(exclude=exclude)
            except NoRouteError:
                continue
            hop = repeated_hop(chain, rejected)
            if hop is None:
                return chain
            self.router.release(chain)
            for peer in (hop[1], hop[0]):
                wider = tuple(sorted({*exclude, peer}))
                if wider not in seen:
                    seen.add(wider)
                    queue.append(wider)
        return None

    async def run_microbatch(self, index: int) -> None:
        """Run one micro-batch to its end: completed, or dropped after ``max_attempts``."""
        ids = self.stream.microbatch(index + self.cfg.first_step * self.cfg.microbatches_per_step)
        reason = ""
        rejected: Set[Tuple[str, str]] = set()  # (sender, judge): hops whose check rejected this micro-batch
        for attempt in range(self.cfg.max_attempts):
            try:
                chain = await self._pick_chain()
            except NoRouteError as e:
                self.ledger.drop(index, str(e))
                return
            hop = repeated_hop(chain, rejected)
            if (
                hop is not None
            ):  # the same tensor to the same check would be rejected again, at a strike's cost
                chain = self._chain_avoiding(chain, rejected)
                if chain is None:
                    self.ledger.drop(
                        index,
                        f"{reason}; not re-sent: no chain avoids the {len(rejected)} check(s) that rejected "
                        f"its tensors (...{hop[0][-8:]} -> ...{hop[1][-8:]} among them)",
                    )
                    return
            if attempt > 0:
                self.ledger.retry(index, reason)
            started = time.perf_counter()
            try:
                result = await self._attempt(index, attempt, chain, ids)
            finally:
                self.router.release(chain)
            if result.ok:
                self.timing.add("chain", {"total_s": time.perf_counter() - started})
            if result.ok:
                self.router.report_success(chain, result.hop_times_s)
                self.ledger.complete(index, result.loss)
                self.tokens += ids.numel()
                return
            reason = result.reason
            then = "retried" if attempt + 1 < self.cfg.max_attempts else "no attempts left"
            if result.blame is not None:
                duration = self.router.report_failure(result.blame, reason, judge=result.judge)
                if result.judge is not None:
                    self.first_rejected_at.setdefault(result.blame, len(self.ledger.outcome))
                    rejected.add((result.blame, result.judge))
                logger.info(
                    f"micro-batch {index} attempt {attempt + 1} failed ({reason}); {then}, "
                    f"without ...{result.blame[-8:]} for {duration:.0f}s (one failure can be a tolerated false alarm; "
                    f"only repeated, independent reports blacklist a peer)"
                )
            else:
                logger.info(f"micro-batch {index} attempt {attempt + 1} failed ({reason}); {then}")
        self.ledger.drop(index, f"gave up after {self.cfg.max_attempts} attempts; last error: {reason}")

    async def run(self) -> Dict[str, Any]:
        self.p2p = await self.dht.replicate_p2p()
        self.peer_id = str(self.p2p.peer_id)
        self.identity_key = self.identity_key or identity_key(self.dht)
        if self.identity_key is None:
            raise ValueError(
                "the trainer signs its requests with its DHT's identity key: make the DHT with "
                "swarm.network.create_dht, or pass identity_key"
            )
        if (
            self.admission is not None and self.admission_proof is None
        ):  # solve the work, check the token first
            self.admission_proof = await asyncio.get_event_loop().run_in_executor(
                None, self.admission.prove, self.peer_id, self.admission_token
            )
        if self.cfg.dataplane and self.cfg.compression == "none":
            self.dataplane = DataPlaneClient(self.peer_id, self.identity_key)
        if self.reputation_cfg is not None:
            self.reputation = ReputationService(
                self.dht,
                self.cfg.run_id,
                self.cfg.num_stages,
                self.reputation_cfg,
                self.peer_id,
                admission=self.admission,
            )
            self.router.is_blacklisted = self._is_blacklisted
            self.reputation.start()
        await self.refresh_peers()
        refresher = asyncio.get_event_loop().create_task(self._refresh_loop())
        self._progress_kick = asyncio.Event()
        progress = asyncio.get_event_loop().create_task(self._progress_loop())
        metrics_file = open(self.cfg.metrics_path, "w") if self.cfg.metrics_path else None
        total = self.cfg.steps * self.cfg.microbatches_per_step
        started = time.perf_counter()
        window = asyncio.Semaphore(self.cfg.max_inflight)
        tasks: Dict[int, asyncio.Task] = {}

        async def launch(index: int) -> None:
            async with window:
                await self.run_microbatch(index)

        try:
            next_index = 0
            for step in range(self.cfg.steps):
                end = (step + 1) * self.cfg.microbatches_per_step
                # keep the window full across step boundaries: no pipeline flush between steps
                while next_index < min(total, end + self.cfg.max_inflight):
                    tasks[next_index] = asyncio.get_event_loop().create_task(launch(next_index))
                    next_index += 1
                await asyncio.gather(
                    *(tasks.pop(i) for i in range(step * self.cfg.microbatches_per_step, end))
                )
                losses = [
                    self.ledger.loss[i]
                    for i in range(step * self.cfg.microbatches_per_step, end)
                    if i in self.ledger.loss
                ]
                row = dict(
                    step=self.cfg.first_step + step,
                    loss=sum(losses) / len(losses) if losses else None,
                    tokens=self.tokens,
                    elapsed_s=round(time.perf_counter() - started, 3),
                    completed=len(losses),
                    dropped=self.cfg.microbatches_per_step - len(losses),
                    retried=self.ledger.retried,
                )
                self.metrics.append(row)
                if metrics_file:
                    metrics_file.write(json.dumps(row) + "\n")
                    metrics_file.flush()
                if self.on_step:
                    self.on_step(row)
                self._progress_kick.set()  # the background loop publishes; the step never waits for the DHT
        finally:
            for task in tasks.values():
                task.cancel()
            refresher.cancel()
            self._progress_stop = True
            await _bounded(cancel_task(progress), 5.0, "stopping the progress loop")
            if metrics_file:
                metrics_file.close()
            if self.dataplane is not None:
                self.dataplane.close()
        # wind-down: every wait is bounded, so a DHT that stopped answering cannot keep a finished run from ending
        await _bounded(self.publish_progress("finished"), 15.0, "publishing the final progress")
        verdicts = {}
        if self.reputation is not None:
            await _bounded(self.reputation.stop(), 10.0, "stopping the reputation loop")
            try:
                verdicts = (
                    await _bounded(
                        read_published_blacklists(self.dht, self.cfg.run_id),
                        15.0,
                        "reading the published blacklists",
                    )
                    or {}
                )
            except Exception as e:
                logger.warning(f"could not read the published blacklists: {e}")
        return self.summary(time.perf_counter() - started, verdicts)

    def _is_blacklisted(self, peer: str) -> bool:
        if self.reputation is None or not self.reputation.is_blacklisted(peer):
            return False
        if peer not in self.blacklisted_at:
            self.blacklisted_at[peer] = len(self.ledger.outcome)
            state = self.router.peers.get(peer)
            self.chosen_at_blacklist[peer] = state.chosen if state is not None else 0
        return True

    def summary(self, elapsed_s: float, blacklists: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        losses = [row["loss"] for row in self.metrics if row["loss"] is not None]
        counts = self.ledger.counts()
        total = self.cfg.steps * self.cfg.microbatches_per_step
        assert counts["completed"] + counts["dropped"] == total, "every micro-batch must end exactly once"
        peers = [dict(peer_id=self.peer_id, stage=None, role="trainer")]
        for state in sorted(self.router.peers.values(), key=lambda s: (s.stage, s.peer_id)):
            entry = dict(
                peer_id=state.peer_id,
                stage=state.stage,
                role="stage",
                chosen=state.chosen,
                succeeded=state.succeeded,
                failed=state.failed,
                time_ema_s=state.time_ema_s,
            )
            if self.reputation is not None:
                entry.update(
                    reputation=round(self.reputation.score(state.peer_id), 4),
                    blacklisted=self.reputation.swarm_verdict(blacklists or {}, state.peer_id),
                    blacklist_reason=self.reputation.reason(state.peer_id),
                    first_rejected_after_microbatches=self.first_rejected_at.get(state.peer_id),
                    blacklisted_after_microbatches=self.blacklisted_at.get(state.peer_id),
                    chosen_after_blacklisted=(
                        state.chosen - self.chosen_at_blacklist[state.peer_id]
                        if state.peer_id in self.chosen_at_blacklist
                        else None
                    ),
                )
            peers.append(entry)
        return dict(
            steps=len(self.metrics),
            loss_first=losses[0] if losses else None,
            loss_last=losses[-1] if losses else None,
            tokens=self.tokens,
            elapsed_s=round(elapsed_s, 3),
            tokens_per_s=round(self.tokens / max(elapsed_s, 1e-9), 2),
            microbatches=counts,
            drop_reasons=dict(Counter(self.ledger.drop_reason.values()).most_common(10)),
            retry_reasons=dict(self.ledger.retry_reasons.most_common(10)),
            timing=self.timing.means(),
            audits=self.audits,
            dataplane=self.dataplane.stats.to_dict() if self.dataplane is not None else None,
            peers=peers,
        )
