"""One stage peer: serves a pipeline stage over hivemind P2P, checks what it receives, trains its weights.

The chain RPC (``rpc_chain``) carries one micro-batch through the rest of its chain: the receiver checks the
request's signed header (``swarm.protocol``: the trainer's, naming this peer at this stage and its sender as the
route's previous peer) and the incoming activations, runs its stage forward, calls the next peer of the route with
its outputs (activations travel peer to peer, never through the trainer), and receives the gradient of its outputs
in the reply. It checks that gradient, runs its backward, hands the micro-batch's gradients to the stage optimizer,
and replies upstream with the gradient of its own inputs and its signed hop report, followed by the later hops'
reports. The last stage computes the loss with labels that the trainer streamed to it directly (``rpc_labels``) and
whose digest is the signed header's, so no intermediate peer can alter or swap them.

Every tensor is attributable: the sender of activations is the libp2p peer on the other end of the inbound
stream, the sender of gradients is the peer this server called. A tensor that fails a check is never used:
the micro-batch is dropped here before it touches any weight, and this hop's signed report says which neighbour is
to blame, so the trainer can retry on another chain. Limits come from the swarm config (one micro-batch of its
shape), every inbound read has a deadline, label deposits are capped, and checks run off the event loop. Checks and
(for experiments) tampering plug in as hooks, so the server has no attack branches.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import hashlib
import logging
import os
import random
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import hivemind
import torch
from hivemind.p2p import P2PContext, PeerID, ServicerBase
from hivemind.proto import runtime_pb2

from swarm.admission import AdmissionCache, AdmissionPolicy
from swarm.audit import AUDIT, ROUTE, AuditConfig, AuditOutcome
from swarm.averaging import AGGREGATE, AVERAGING, STATE, AveragingHooks
from swarm.checkpoint import StageCheckpointer, StageState, check_model_matches, check_stage_params
from swarm.config import ModelConfig, to_dict
from swarm.dataplane import (
    DataPlaneClient,
    DataPlaneConfig,
    DataPlaneServer,
    EndpointBook,
    call_chain,
    endpoint_of,
    host_of_addrs,
)
from swarm.evidence import (
    EvidenceError,
    StageAuditConfig,
    TensorClaim,
    draw_auditor,
    recompute,
    relative_error,
)
from swarm.gate import Gate
from swarm.labels import LabelBox
from swarm.model import StageModule
from swarm.optimizer import OptimizerConfig, StageOptimizer
from swarm.peer_table import PeerTable
from swarm.protocol import (
    DOWNSTREAM,
    UPSTREAM,
    ChainHeader,
    HopReport,
    ProtocolError,
    audit_reveal,
    check_reports,
    tensor_digest,
)
from swarm.reachability import DIALBACK_COOLDOWN_S, DIALBACK_TIMEOUT_S, dial_back, dialback_addresses
from swarm.records import StageRecord
from swarm.replica_sync import param_sketch, sketch_distance, state_verdict
from swarm.reputation import ReputationConfig, ReputationLedger
from swarm.sentinel import BACKWARD, FORWARD, SentinelMonitor, Verdict
from swarm.stage_compute import StageCompute
from swarm.transport import (
    IDEMPOTENT,
    Received,
    TensorLimits,
    TransportError,
    as_received,
    pack,
    receive,
    single,
)

logger = logging.getLogger(__name__)


# (tensor, direction, metadata) -> the tensor to send; experiments plug adversaries in here
OutboundHook = Callable[[torch.Tensor, str, Dict[str, Any]], torch.Tensor]


def namespace(run_id: str) -> str:
    return f"{run_id}.stage"


@dataclass(kw_only=True)
class StageServerConfig:
    """How one stage peer serves: limits, timeouts, device."""

    run_id: str
    stage: int
    num_stages: int
    max_inflight: int = 8  # micro-batches held (forward done, waiting for gradients) at once
    hop_timeout_s: float = 120.0  # deadline for the rest of the chain to answer
    labels_timeout_s: float = 30.0
    read_timeout_s: float = (
        60.0  # deadline for reading a whole inbound request (a stream that stalls is dropped)
    )
    max_label_deposits: int = 64  # labels held at once for one trainer (the last stage) ...
    max_labels_total: int = 1024  # ... and for all trainers together
    max_batch: int = 1024
    max_seq_len: int = 8192
    compression: str = "none"
    device: str = "cpu"
    autocast_dtype: Optional[str] = None  # "bfloat16"/"float16" on CUDA
    announce_period_s: float = 5.0
    announce_ttl_s: float = 20.0
    audit: AuditConfig = field(
        default_factory=AuditConfig
    )  # how alike an auditor's gradient must be (swarm.audit)
    # recomputation audits of the next stage's gradients where it is a middle stage (swarm.evidence): this peer draws
    # auditors among that stage's other replicas; None: off. (The last stage's are the trainer's, swarm.audit.)
    stage_audit: Optional[StageAuditConfig] = field(default_factory=lambda: StageAuditConfig(rate=0.1))
    resync_period_s: float = 2.0  # how often a replica checks whether it missed its stage's optimizer steps
    limits: TensorLimits = field(default_factory=TensorLimits)
    # stage checkpoints (swarm.checkpoint): where, and every how many optimizer steps or seconds (one of the two)
    checkpoint_dir: Optional[str] = None
    checkpoint_every_steps: int = 0
    checkpoint_every_s: float = 0.0
    # chain tensors over direct TLS connections (swarm.dataplane) where the next peer announces one; P2P otherwise.
    # Used only without compression (the data plane sends raw tensors; the P2P path keeps the codecs)
    dataplane: bool = True
    dataplane_cfg: DataPlaneConfig = field(default_factory=DataPlaneConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.stage < self.num_stages:
            raise ValueError(f"stage must be in [0, {self.num_stages}), got {self.stage}")
        if self.max_inflight < 1 or self.hop_timeout_s <= 0 or self.read_timeout_s <= 0:
            raise ValueError("max_inflight must be >= 1, hop_timeout_s and read_timeout_s > 0")
        if not 1 <= self.max_label_deposits <= self.max_labels_total:
            raise ValueError("need 1 <= max_label_deposits <= max_labels_total")
        if self.checkpoint_dir and not (self.checkpoint_every_steps > 0 or self.checkpoint_every_s > 0):
            raise ValueError("a checkpoint directory needs checkpoint_every_steps or checkpoint_every_s > 0")


@dataclass
class StageStats:
    """Counters a stage peer keeps about its own work (exposed through rpc_info and its DHT record)."""

    served: int = 0  # micro-batches whose forward and backward completed here
    rejected_inputs: int = 0
    rejected_grads: int = 0
    failed_downstream: int = 0
    throughput_ema: float = 0.0  # samples/s of forward+backward compute
    # per-peer counters: bounded (peer ids are free to mint), the least recently counted peers forgotten first
    flagged: Dict[str, int] = field(default_factory=PeerTable)  # peer id -> tensors of theirs rejected
    # audits this stage ran: of the next stage's gradients, or of the previous one's activations (forward_audits)
    audits_run: int = 0
    forward_audits: int = 0
    audit_inputs_missing: int = 0  # forward audits of a middle stage that got no input to recompute from
    audits_failed: Dict[str, int] = field(
        default_factory=dict
    )  # outcome ("route", "audit", "inconclusive") -> count
    audits_served: int = 0  # audit-only micro-batches this (last) stage computed for others
    false_alarms: int = 0  # rejections of received activations that a forward audit cleared
    averaging_strikes: Dict[str, int] = field(
        default_factory=PeerTable
    )  # peer -> its contributions found far off
    refused_states: Dict[str, int] = field(default_factory=PeerTable)  # source -> states of its refused here
    caught_up: int = 0  # state downloads by the resync loop (this replica had missed stage steps)

    def audits(self) -> Dict[str, Any]:
        """The audit counters, as ``rpc_info`` and the launchers' summaries show them."""
        return dict(
            run=self.audits_run,
            failed=dict(self.audits_failed),
            served=self.audits_served,
            forward=self.forward_audits,
            false_alarms=self.false_alarms,
            inputs_missing=self.audit_inputs_missing,
        )

    def record_compute(self, samples: int, seconds: float, alpha: float = 0.1) -> None:
        rate = samples / max(seconds, 1e-6)
        self.throughput_ema = (
            rate if self.throughput_ema == 0 else (1 - alpha) * self.throughput_ema + alpha * rate
        )


class Refusal(Exception):
    """A request refused before its header verified: answered unsigned (the caller reports it in its own name).
    ``no_fault``: refused for a reason that is nobody's fault (this peer is leaving; the sender is blacklisted)."""

    def __init__(self, reason: str, no_fault: bool = False):
        super().__init__(reason)
        self.reason, self.no_fault = reason, no_fault


class ChainError(Exception):
    """A micro-batch cannot go on; ``blame`` is the peer at fault (None when nobody can be blamed).

    ``reports``: when the failure is a later hop's, its signed reports (wire form), relayed unchanged.

    ``judge``: set when the blamed peer's tensor was well-formed but a SENTINEL check rejected it, to the peer id of
    the receiver that did (the trainer bans such a peer only briefly and routes it to receivers that have not judged
    it yet, so that the independent evidence a swarm-wide verdict needs accumulates)."""

    def __init__(
        self,
        reason: str,
        blame: Optional[str] = None,
        blame_stage: Optional[int] = None,
        judge: Optional[str] = None,
        reports: Optional[List[Dict[str, Any]]] = None,
    ):
        super().__init__(reason)
        self.reason, self.blame, self.blame_stage, self.judge = reason, blame, blame_stage, judge
        self.reports = reports


class StageServer(ServicerBase):
    """Serves one pipeline stage. Create, then ``await start()``; ``await shutdown()`` leaves cleanly."""

    def __init__(
        self,
        cfg: StageServerConfig,
        model_cfg: ModelConfig,
        dht: hivemind.DHT,
        optimizer_cfg: OptimizerConfig,
        *,
        sentinel: Optional[SentinelMonitor] = None,
        outbound_hook: Optional[OutboundHook] = None,
        reputation: Optional[ReputationConfig] = None,
        admission: Optional[AdmissionPolicy] = None,
        admission_token: Optional[str] = None,
        averaging_hooks: Optional[AveragingHooks] = None,
        identity_key=None,
    ):
        self.cfg, self.model_cfg, self.dht = cfg, model_cfg, dht
        # the swarm's admission rule (swarm.admission): senders must prove they were let in; so must this peer
        self.admission = admission if admission is not None and admission.enabled else None
        self.admission_cache = AdmissionCache(self.admission) if self.admission is not None else None
        self.admission_token = admission_token
        self.admission_proof: Optional[Dict[str, Any]] = None
        self.device = torch.device(cfg.device)
        self.module = StageModule(model_cfg, cfg.stage, cfg.num_stages).to(self.device)
        self.module.train()
        self.optimizer = StageOptimizer(
            self.module, optimizer_cfg, dht, run_id=f"{cfg.run_id}_stage{cfg.stage}", hooks=averaging_hooks
        )
        self.optimizer.set_state_check(self._check_state)
        self.compute = StageCompute(self.module, self.optimizer, self.device, cfg.autocast_dtype)
        self.averaging_hooks = averaging_hooks
        self.checkpointer = (
            StageCheckpointer(
                cfg.checkpoint_dir,
                cfg.stage,
                cfg.num_stages,
                every_steps=cfg.checkpoint_every_steps,
                every_s=cfg.checkpoint_every_s,
            )
            if cfg.checkpoint_dir
            else None
        )
        if self.checkpointer is not None:
            self.compute.after_step = self._maybe_checkpoint
        self.restored_from: Optional[str] = None  # the checkpoint or export this peer started from
        self._params_serving: Dict[str, float] = {}  # caller -> monotonic time of its last parameter download
        self.sentinel = sentinel  # None: received tensors are used unchecked (baselines only)
        self.ledger = ReputationLedger()  # what this peer saw of each counterpart; published as its report
        # every received tensor's verdicts, recorded once per exchange: the same code as the simulator's
        self.gate = Gate(
            sentinel,
            self.ledger,
            self.cfg.audit.min_cosine,
            self.cfg.audit.max_norm_ratio,
            (self.cfg.audit.forward_min_cosine, self.cfg.audit.forward_max_norm_ratio),
            (self.cfg.audit.forward_apart_cosine, self.cfg.audit.forward_apart_ratio),
        )
        # recomputation audits of a middle next stage (swarm.evidence): audits run per peer, its stage's replicas
        self._recomputed: Dict[str, int] = {}
        self._replicas: Dict[int, Tuple[float, List[str]]] = {}
        self._recompute_served: "collections.OrderedDict[bytes, None]" = collections.OrderedDict()
        self._audit_rng = random.Random()
        self._background_audits: Set["asyncio.Task"] = set()  # sampled forward audits in flight
        # the activations this hop sent on its route, while their micro-batch is in flight (header digest -> tensor):
        # the stage after the next fetches them to have the next stage's forward recomputed (``fetch`` requests)
        self._sent: Dict[bytes, torch.Tensor] = {}
        self.outbound_hook = outbound_hook
        self.reputation_cfg = reputation
        self.reputation = None  # a ReputationService once started (if reputation is configured)
        self.stats = StageStats()
        self.labels = LabelBox(
            ttl_s=max(cfg.labels_timeout_s * 4, 60.0),
            per_trainer=cfg.max_label_deposits,
            total=cfg.max_labels_total,
        )
        self.identity_key = identity_key  # this peer's libp2p identity key: it signs this hop's reports
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="stage-compute"
        )
        # SENTINEL's checks and audit judging: one thread, so the monitor's state has a single writer, and off the
        # event loop, which only routes
        self.checks = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage-checks")
        self.p2p: Optional[hivemind.P2P] = None
        self.peer_id: str = ""
        self._slots: Optional[asyncio.Semaphore] = None
        self.record: Optional[StageRecord] = None
        self.announcer = None
        self.draining = False  # set by drain(): new micro-batches are refused, the ones in flight finish
        self.inflight = 0  # rpc_chain calls being handled now
        self._dialback_lock: Optional[asyncio.Lock] = None
        self._dialback_last: Dict[str, float] = {}  # caller -> monotonic time of its last dial-back
        self._resync_task: Optional[asyncio.Task] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._sketch_last: Dict[str, float] = {}  # caller -> monotonic time of its last state sketch
        self.dataplane: Optional[DataPlaneServer] = None  # inbound chain requests over direct connections
        self.dataplane_client: Optional[DataPlaneClient] = None  # outbound, to the next stage's peers
        self.next_endpoints: Optional[EndpointBook] = None

    # ---- lifecycle ---------------------------------------------------------------------------------------
    async def start(
        self, load_state: bool = True, load_progress: Optional[Callable[..., Any]] = None
    ) -> None:
        """Announce ``joining``, load the stage's state from online replicas, announce ``online``.

        ``load_progress(optimizer, replicas)``, if given, returns a context manager entered around the download
        (the CLI's progress bar)."""
        from swarm.network import (  # network <- stage_server, kept local to the call
            Announcer,
            fetch_stage_peers,
            identity_key,
            record_addresses,
        )

        self.p2p = await self.dht.replicate_p2p()
        self._fetch_stage_peers = fetch_stage_peers
        self._loop = asyncio.get_event_loop()
        self.peer_id = str(self.p2p.peer_id)
        self.identity_key = self.identity_key or identity_key(self.dht)
        if self.identity_key is None:
            raise ValueError(
                "a stage peer signs its reports with its DHT's identity key: make the DHT with "
                "swarm.network.create_dht, or pass identity_key"
            )
        self._slots = asyncio.Semaphore(self.cfg.max_inflight)
        self._dialback_lock = asyncio.Lock()
        await self.add_p2p_handlers(self.p2p, namespace=namespace(self.cfg.run_id))
        if (
            self.admission is not None and self.admission_proof is None
        ):  # solve the work, check the token first
            self.admission_proof = await asyncio.get_event_loop().run_in_executor(
                None, self.admission.prove, self.peer_id, self.admission_token
            )
        self.record = StageRecord(
            peer_id=self.peer_id,
            stage=self.cfg.stage,
            state="joining",
            device=str(self.device),
            admission=self.admission_proof,
        )
        self.record.addrs = await asyncio.get_event_loop().run_in_executor(None, record_addresses, self.dht)
        if self.cfg.dataplane and self.cfg.compression == "none":
            self._start_dataplane(fetch_stage_peers)
        self.announcer = Announcer(
            self.dht, self.cfg.run_id, self.record, self.cfg.announce_period_s, self.cfg.announce_ttl_s
        )
        await self.announcer.publish()
        loop = asyncio.get_event_loop()
        if load_state:
            peers = await loop.run_in_executor(
                None, fetch_stage_peers, self.dht, self.cfg.run_id, self.cfg.num_stages
            )
            others = [
                p
                for p in peers.get(self.cfg.stage, [])
                if p.peer_id != self.peer_id and p.record.state == "online"
            ]
            if others and self.restored_from is not None:
                # restored: the replicas' quorum decides (the resync loop downloads if a quorum of them is ahead)
                logger.info(
                    f"stage {self.cfg.stage}: {len(others)} replica(s) online; keeping the state restored from "
                    f"{self.restored_from} (epoch {self.optimizer.epoch}) unless a quorum of them is ahead"
                )
            elif others:
                logger.info(f"stage {self.cfg.stage}: {len(others)} replica(s) online, loading their state")
                watch = (
                    load_progress(self.optimizer, len(others)) if load_progress else contextlib.nullcontext()
                )
                with watch:
                    await loop.run_in_executor(self.executor, self.optimizer.load_state_from_peers)
        self.record.state = "online"
        self.announcer.start()
        if self.optimizer.hivemind:
            self._resync_task = asyncio.create_task(self._resync_loop())
        if self.reputation_cfg is not None:
            from swarm.reputation_service import ReputationService

            self.reputation = ReputationService(
                self.dht,
                self.cfg.run_id,
                self.cfg.num_stages,
                self.reputation_cfg,
                self.peer_id,
                ledger=self.ledger,
                publish_blacklist=True,
                admission=self.admission,
                admission_proof=self.admission_proof,
            )
            if self.sentinel is not None:  # a blacklisted sender is no reference for the others any more
                self.reputation.on_blacklisted.append(
                    lambda peer: self.checks.submit(self.sentinel.forget, peer)
                )
            self.reputation.start()
        logger.info(f"serving stage {self.cfg.stage}/{self.cfg.num_stages} as {self.peer_id}")

    def _start_dataplane(self, fetch_stage_peers) -> None:
        """Listen for direct chain connections on this peer's host (announced in its record), and dial the next
        stage's peers directly where their records announce it (``swarm.dataplane``)."""
        host = host_of_addrs(self.record.addrs) or "127.0.0.1"
        server = DataPlaneServer(
            self.peer_id, self._serve_chain, self.cfg.limits, self._loop, self.cfg.dataplane_cfg
        )
        try:
            endpoint = server.start(host)
        except OSError:  # an announced address that is not this host's (NAT): listen everywhere
            try:
                endpoint = server.start("::" if ":" in host else "0.0.0.0")
            except OSError as e:
                logger.warning(f"stage {self.cfg.stage}: no data plane ({e}); tensors go over P2P")
                return
            endpoint = type(endpoint)(host, endpoint.port, endpoint.cert)
        self.dataplane = server
        self.record.dataplane = endpoint.to_value()
        self.dataplane_client = DataPlaneClient(self.peer_id, self.identity_key, self.cfg.dataplane_cfg)
        if self.cfg.stage + 1 < self.cfg.num_stages:
            run_id, stage, num_stages = self.cfg.run_id, self.cfg.stage + 1, self.cfg.num_stages

            async def fetch():
                peers = await asyncio.get_event_loop().run_in_executor(
                    None, partial(fetch_stage_peers, self.dht, run_id, num_stages, stages=[stage])
                )
                found = {info.peer_id: endpoint_of(info.record) for info in peers.get(stage, [])}
                return {peer: endpoint for peer, endpoint in found.items() if endpoint is not None}

            self.next_endpoints = EndpointBook(fetch)
        logger.info(f"stage {self.cfg.stage}: data plane on {endpoint.host}:{endpoint.port}")

    async def _resync_loop(self) -> None:
        """Download the stage's state when this replica missed its optimizer steps (``StageOptimizer.should_catch_up``).

        Without it a replica that the routers stopped picking (slow, or judged a suspect for a while) stays behind
        until its next micro-batch, which it then computes with stale weights; and replicas that a run leaves
        epochs apart stay so. Runs on the compute thread, so never in the middle of a step; an attempt that does not
        bring the replica level (the peers ahead left) is retried with a doubling pause, up to a minute."""
        loop = asyncio.get_event_loop()
        pause = self.cfg.resync_period_s
        while True:
            await asyncio.sleep(pause)
            try:
                self.record_averaging()
                if self.draining or not self.optimizer.should_catch_up():
                    pause = self.cfg.resync_period_s
                    continue
                behind = self.optimizer.epochs_behind
                logger.info(
                    f"stage {self.cfg.stage}: {behind} optimizer step(s) behind the other replicas, "
                    f"loading their state"
                )
                await loop.run_in_executor(self.executor, self.optimizer.load_state_from_peers)
                self.stats.caught_up += 1
                caught_up = self.optimizer.epochs_behind == 0
                pause = self.cfg.resync_period_s if caught_up else min(2 * pause, 60.0)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the loop must outlive any one failed download
                logger.warning(f"stage {self.cfg.stage}: catching up with the other replicas failed: {e!r}")
                pause = min(2 * pause, 60.0)

    def record_averaging(self) -> None:
        """Count what the stage's averaging learnt about the other replicas since the last call: each contribution
        this replica aggregated (clean, or an ``averaging`` strike when it lay far outside the honest spread) and each
        state it refused (a ``state`` strike against the source); and tell the averagers who is blacklisted."""
        for peer, clean, reason in self.optimizer.drain_averaging_outcomes():
            # a wrong aggregate is proven by the signed inputs that do not reproduce it: it weighs as a whole
            # accusation (min_strikes), since the prover stops using that aggregator and will see no more of it
            count = (
                self.reputation_cfg.min_strikes
                if not clean and reason == AGGREGATE and self.reputation_cfg
                else 1
            )
            for _ in range(count):
                self.ledger.record(peer, clean, AVERAGING, reason)
            if not clean:
                self.stats.averaging_strikes[peer] = self.stats.averaging_strikes.get(peer, 0) + count
                what = {
                    AVERAGING: "gradient contribution was far outside the other replicas' spread (clipped), "
                    "against their direction, or with an impossible sample count",
                    AGGREGATE: "aggregate is wrong: its signed inputs do not reproduce it (not used any more)",
                    STATE: "parameters in the parameter round lay far from the others' (or its aggregate would "
                    "have moved this replica far)",
                }.get(reason, "aggregator gave no valid evidence for a re-check")
                logger.warning(f"stage {self.cfg.stage}: {peer[-8:]}'s {what}; {count} {reason} strike(s)")
        for source, _reason in self.optimizer.drain_refused_states():
            self.ledger.record(source, False, STATE, STATE)
            self.stats.refused_states[source] = self.stats.refused_states.get(source, 0) + 1
        if self.reputation is not None:
            self.optimizer.set_excluded(self.reputation.aggregate.blacklist.keys())

    def _check_state(self, source: str, epoch: int, params) -> Optional[str]:
        """``state_check`` of the stage's state downloads (runs on the compute thread): ask the other online
        replicas for a sketch of their parameters under a seed picked here, and compare (``state_verdict``).

        A state that is not ahead of this replica's own epoch is also held against this replica's own parameters:
        such a download can bring nothing new, and at a swarm's start (epoch 0, every replica initialised alike
        from the same seed) the source may be the only replica online, with no quorum to ask (seen live: two honest
        replicas loaded x5 weights from a lone poisoner that way)."""
        if self._loop is None:
            return None
        cfg = self.optimizer.cfg.robust
        seed = int.from_bytes(os.urandom(8), "little") >> 1
        mine = param_sketch(params, seed, cfg.state_sketch_dims)
        if epoch <= self.optimizer.epoch:
            own = param_sketch([p.detach() for p in self.module.parameters()], seed, cfg.state_sketch_dims)
            distance = sketch_distance(mine, own)
            if distance > cfg.state_tolerance:
                why = (
                    f"its epoch {epoch} is not ahead of this replica's ({self.optimizer.epoch}), yet its parameters "
                    f"differ from this replica's own (relative distance {distance:.3g} > {cfg.state_tolerance})"
                )
                logger.info(f"stage {self.cfg.stage}: state of epoch {epoch} from {source[-8:]}: {why}")
                return why
        future = asyncio.run_coroutine_threadsafe(
            self._replica_sketches(source, seed, cfg.state_sketch_dims), self._loop
        )
        try:
            answers = future.result(timeout=30.0)
        except Exception as e:
            answers = []
            logger.warning(f"stage {self.cfg.stage}: could not ask the other replicas about a state: {e!r}")
        distances = [
            sketch_distance(mine, sketch) for peer_epoch, sketch in answers if abs(peer_epoch - epoch) <= 1
        ]
        ok, why = state_verdict(distances, cfg.state_tolerance)
        logger.info(f"stage {self.cfg.stage}: state of epoch {epoch} from {source[-8:]}: {why}")
        return None if ok else why

    async def _replica_sketches(self, source: str, seed: int, dims: int) -> List[Tuple[int, List[float]]]:
        """(epoch, sketch) from every other online, not blacklisted replica of this stage but ``source``."""
        from swarm.network import fetch_stage_peers  # network <- stage_server, kept local to the call

        peers = await asyncio.get_event_loop().run_in_executor(
            None, fetch_stage_peers, self.dht, self.cfg.run_id, self.cfg.num_stages
        )
        others = [
            p.peer_id
            for p in peers.get(self.cfg.stage, [])
            if p.record.state == "online"
            and p.peer_id not in (self.peer_id, source)
            and not self.is_banned(p.peer_id)
        ]

        async def ask(peer: str):
            stub = StageServer.get_stub(
                self.p2p, PeerID.from_base58(peer), namespace=namespace(self.cfg.run_id)
            )
            return await ask_state_sketch(stub, seed, dims, limits=self.cfg.limits, timeout=20.0)

        answers = await asyncio.gather(*(ask(peer) for peer in others[:8]))
        return [a for a in answers if a is not None]

    def not_admitted(self, sender: str, meta: Dict[str, Any]) -> Optional[str]:
        """Why the swarm's admission rule refuses this sender (its proof travels in the request), or None."""
        if self.admission_cache is None:
            return None
        reason = self.admission_cache.reason(sender, meta.get("admission"))
        return f"refused: sender is not admitted to this swarm ({reason})" if reason else None

    def is_banned(self, peer: str) -> Optional[str]:
        return self.reputation.reason(peer) if self.reputation is not None else None

    async def drain(self, grace_s: float) -> int:
        """Start leaving: announce ``offline`` (routers stop choosing this peer), refuse new micro-batches, and
        wait up to ``grace_s`` for the ones in flight to finish. Returns how many were still in flight."""
        self.draining = True
        if self.announcer is not None:
            await self.announcer.stop(offline=True)
        deadline = time.monotonic() + grace_s
        while self.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.inflight:
            logger.warning(
                f"stage {self.cfg.stage}: leaving with {self.inflight} micro-batch(es) unfinished after "
                f"{grace_s:.0f}s; their trainers retry them elsewhere"
            )
        return self.inflight

    async def shutdown(self) -> None:
        logger.info(f"stage {self.cfg.stage}: leaving (served {self.stats.served} micro-batches)")
        if self._resync_task is not None:
            self._resync_task.cancel()
        for task in list(self._background_audits):
            task.cancel()
        if self.reputation is not None:
            await self.reputation.stop()
        if self.announcer is not None:
            await self.announcer.stop(offline=True)
        if self.p2p is not None:
            await self.remove_p2p_handlers(self.p2p, namespace=namespace(self.cfg.run_id))
        if self.dataplane is not None:
            self.dataplane.close()
        if self.dataplane_client is not None:
            self.dataplane_client.close()
        if self.checkpointer is not None:  # the state as it leaves: a restart continues from here
            await asyncio.get_event_loop().run_in_executor(self.executor, self._final_checkpoint)
        await asyncio.get_event_loop().run_in_executor(self.executor, self.optimizer.shutdown)
        self.executor.shutdown(wait=False)
        self.checks.shutdown(wait=False)

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def snapshot(self) -> StageState:
        """Copies of this stage's parameters and optimizer state at its current epoch (on the compute thread)."""
        params = self._parameter_copies()
        opt = self.optimizer.state_dict()
        optimizer_state = {
            "state": {
                i: {
                    k: (v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v)
                    for k, v in entry.items()
                }
                for i, entry in opt["state"].items()
            },
            "param_groups": [
                {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in g.items()}
                for g in opt["param_groups"]
            ],
        }
        meta = dict(
            model=to_dict(self.model_cfg),
            stage=self.cfg.stage,
            num_stages=self.cfg.num_stages,
            run_id=self.cfg.run_id,
            peer_id=self.peer_id,
            saved_at=time.time(),
        )
        return StageState(params=params, optimizer=optimizer_state, epoch=self.optimizer.epoch, meta=meta)

    def restore(self, state: StageState, where: str) -> None:
        """Start from ``state`` (a checkpoint's, or an export's with no optimizer state): checked against this
        stage's model and cut first; raises CheckpointError. Call before ``start``."""
        if state.meta:
            check_model_matches(
                state.meta, to_dict(self.model_cfg), self.cfg.stage, self.cfg.num_stages, where
            )
        params = check_stage_params(state.params, self.module, where)
        names = [n for n, p in self.module.named_parameters() if p.requires_grad]
        self.optimizer.restore([params[n] for n in names], state.optimizer, state.epoch)
        self.restored_from = where
        if self.checkpointer is not None:
            self.checkpointer.mark(state.epoch)
        logger.info(f"stage {self.cfg.stage}: restored from {where} at epoch {state.epoch}")

    def _maybe_checkpoint(self) -> None:
        try:
            self.checkpointer.maybe_save(self.optimizer.epoch, self.snapshot)
        except Exception as e:  # a checkpoint must never fail a micro-batch
            logger.warning(f"stage {self.cfg.stage}: checkpoint snapshot failed: {e!r}")

    def _final_checkpoint(self) -> None:
        try:
            if self.checkpointer.saved_epoch != self.optimizer.epoch:
                self.checkpointer.save_now(self.snapshot())
            self.checkpointer.wait(timeout=60.0)
        except Exception as e:
            logger.warning(f"stage {self.cfg.stage}: final checkpoint failed: {e!r}")

    def param_checksum(self) -> float:
        """A cheap fingerprint of this stage's weights: replicas in sync report (nearly) the same number."""
        with torch.no_grad():
            return float(sum(p.double().sum() + p.double().abs().sum() for p in self.module.parameters()))

    def refresh_record(self) -> None:
        if self.record is not None:
            self.record.served = self.stats.served
            self.record.throughput = float(min(self.stats.throughput_ema, 1e9))

    # ---- RPCs ---------------------------------------------------------------------------------------------
    async def rpc_info(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        """A peer's view of itself, for `swarm status` and tests."""
        info = dict(
            peer_id=self.peer_id,
            stage=self.cfg.stage,
            num_stages=self.cfg.num_stages,
            state=self.record.state if self.record else "joining",
            served=self.stats.served,
            inflight=self.inflight,
            rejected_inputs=self.stats.rejected_inputs,
            rejected_grads=self.stats.rejected_grads,
            failed_downstream=self.stats.failed_downstream,
            throughput=self.stats.throughput_ema,
            epoch=self.optimizer.epoch,
            flagged=_top(self.stats.flagged, INFO_PEERS),
            device=str(self.device),
            sentinel=self.sentinel is not None,
            # bounded whatever the number of peers ever seen (peer ids are free to mint): the peers with the most
            # strikes, then the most exchanges, as in a published report
            ledger=dict(list(self.ledger.to_report(self.peer_id, 0.0).entries.items())[:INFO_LEDGER]),
            blacklist=dict(list(self.reputation.aggregate.blacklist.items())[:INFO_PEERS])
            if self.reputation
            else {},
            param_checksum=await asyncio.get_event_loop().run_in_executor(None, self.param_checksum),
            averaging=dict(
                strikes=_top(self.stats.averaging_strikes, INFO_PEERS),
                refused_states=_top(self.stats.refused_states, INFO_PEERS),
                caught_up=self.stats.caught_up,
            ),
            audits=self.stats.audits(),
            dataplane=dict(
                server=self.dataplane.stats.to_dict() if self.dataplane else None,
                client=self.dataplane_client.stats.to_dict() if self.dataplane_client else None,
            ),
        )
        return pack(info, message_type=runtime_pb2.ExpertResponse)[0]

    async def rpc_labels(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        """A trainer deposits the labels of one micro-batch at the last stage (streamed like any tensor; bounded by
        the micro-batch limits and by ``max_label_deposits`` per trainer)."""
        sender = str(context.remote_id)
        try:
            if not self.module.is_last:
                raise TransportError("labels go to the last stage only")
            received = await self._receive(requests)
            refused = self.not_admitted(sender, received.metadata)
            if refused:
                raise TransportError(refused)
            mb = received.metadata.get("mb")
            if (
                not (isinstance(mb, str) and 0 < len(mb) <= 256)
                or len(received.tensors) != 1
                or received.tensors[0].dtype != torch.int64
            ):
                raise TransportError("labels need an 'mb' id and one int64 tensor")
            labels = received.tensors[0]
            if labels.ndim != 2:
                raise TransportError(f"labels must be a [batch, seq] tensor, got {tuple(labels.shape)}")
            self._check_shape(labels)
            if int(labels.min()) < 0 or int(labels.max()) >= self.model_cfg.vocab_size:
                raise TransportError("labels must be token ids inside the vocabulary")
            self.labels.put((sender, mb), labels)
            reply = {"ok": True}
        except TransportError as e:
            reply = {"ok": False, "error": str(e)}
        except asyncio.TimeoutError:
            reply = {"ok": False, "error": f"labels not received within {self.cfg.read_timeout_s:.0f}s"}
        return pack(reply, message_type=runtime_pb2.ExpertResponse)[0]

    async def _receive(self, requests: AsyncIterator[runtime_pb2.ExpertRequest]):
        """Read a whole inbound request within this server's limits and ``read_timeout_s``."""
        return await asyncio.wait_for(receive(requests, self.cfg.limits), self.cfg.read_timeout_s)

    def _check_shape(self, x: torch.Tensor) -> None:
        """A micro-batch's [batch, seq] within this server's limits (the swarm's micro-batch size and sequence
        length, when the peer was started from a swarm config)."""
        if x.ndim < 2 or not (
            1 <= x.shape[0] <= self.cfg.max_batch
            and 2 <= x.shape[1] <= min(self.cfg.max_seq_len, self.model_cfg.max_position_embeddings)
        ):
            raise TransportError(
                f"batch/sequence size {tuple(x.shape[:2])} outside this server's limits "
                f"({self.cfg.max_batch} x {self.cfg.max_seq_len})"
            )

    async def rpc_chain(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Forward one micro-batch through this stage and the rest of its route, then backward; see module doc.
        The same request handling serves the data plane (``_serve_chain``); this is its P2P wrapper."""
        reply, tensors = await self._serve_chain(str(context.remote_id), partial(self._receive, requests))
        for message in pack(
            reply, tensors, compression=self.cfg.compression, message_type=runtime_pb2.ExpertResponse
        ):
            yield message

    async def _serve_chain(
        self, sender: str, read: Callable[[], Any]
    ) -> Tuple[Dict[str, Any], List[torch.Tensor]]:
        """One chain request from ``sender`` (authenticated by the transport: libp2p's ``remote_id`` or the data
        plane's identity proof), read by ``await read()``: returns the reply's metadata and tensors.

        The reply holds this hop's signed report followed by the later hops' (``swarm.protocol``), or, for a
        request refused before its header verified, an unsigned refusal."""
        started = time.perf_counter()
        self.inflight += 1
        header: Optional[ChainHeader] = None
        tensors: List[torch.Tensor] = []
        try:
            try:
                if self.draining:  # the trainer retries elsewhere without blaming anyone
                    raise Refusal(f"stage {self.cfg.stage} peer is leaving", no_fault=True)
                banned = self.is_banned(sender)
                if banned:
                    raise Refusal(f"refused: sender is blacklisted ({banned})", no_fault=True)
                try:
                    received: Received = await read()
                except TransportError as e:
                    self._reject(sender, f"malformed message: {e}", FORWARD)
                    raise Refusal(f"malformed message: {e}") from None
                except asyncio.TimeoutError:
                    raise Refusal(f"request not received within {self.cfg.read_timeout_s:.0f}s") from None
                refused = self.not_admitted(sender, received.metadata)
                if refused:
                    raise Refusal(refused)
                header = self._verify_header(received.metadata, sender)
            except Refusal as e:
                return dict(ok=False, error=e.reason, no_fault=e.no_fault), []
            try:
                tensors, report = await self._chain(received, header, sender)
                later: List[Dict[str, Any]] = report.pop("reports")
            except ChainError as e:
                report, later = self._failure(e, header, sender), e.reports or []
            except Exception as e:  # a bug must not take the server down; report it without blaming anyone
                logger.exception(f"stage {self.cfg.stage}: internal error")
                report, later = dict(ok=False, error=f"internal error at stage {self.cfg.stage}: {e!r}"), []
        finally:
            self.inflight -= 1
        report.setdefault("timings", {})["total_s"] = time.perf_counter() - started
        signed = HopReport.create(
            self.identity_key, header_digest=header.digest, stage=self.cfg.stage, peer=self.peer_id, **report
        )
        return dict(reports=[signed.to_wire()] + later), tensors

    def _failure(self, e: ChainError, header: ChainHeader, sender: str) -> Dict[str, Any]:
        """This hop's report of a failure: whom it blames, relative to itself (it can blame only the neighbours
        it exchanged tensors with), or a relay of a later hop's signed failure."""
        if e.reports:
            return dict(ok=False, error=e.reason[:300], relay=True)
        route = header.route
        downstream = route[self.cfg.stage + 1] if self.cfg.stage + 1 < len(route) else None
        blame = (
            UPSTREAM
            if e.blame is not None and e.blame == sender
            else DOWNSTREAM
            if e.blame is not None and e.blame == downstream
            else None
        )
        return dict(
            ok=False, error=e.reason[:300], blame=blame, judged=blame is not None and e.judge is not None
        )

    def _verify_header(self, meta: Dict[str, Any], sender: str) -> ChainHeader:
        """The request's signed header (``swarm.protocol.ChainHeader``), checked for this peer; raises Refusal."""
        forward_audit = meta.get("recompute") is True and meta.get("direction") == FORWARD
        fetch = meta.get("fetch") is True and not forward_audit
        try:
            header = ChainHeader.from_wire(meta.get("header"))
            # a forward audit may come from one of the trainer's last-stage auditors (which got the activations in
            # an audit-only request): it shows the reveal, which must match the header's commitment
            auditors = audit_reveal(header, meta["audit"]) if forward_audit and "audit" in meta else []
            header.check(
                run_id=self.cfg.run_id,
                stage=self.cfg.stage,
                me=self.peer_id,
                sender=sender,
                now=time.time(),
                audit_only=not (forward_audit or fetch)
                and (meta.get("audit_only") is True or meta.get("recompute") is True),
                forward_audit=forward_audit,
                auditors=auditors,
                fetch=fetch,
            )
        except ProtocolError as e:
            self._reject(sender, f"bad header: {e}", FORWARD)
            raise Refusal(f"bad header: {e}") from None
        if len(header.route) != self.cfg.num_stages:
            raise Refusal(
                f"header route has {len(header.route)} stages; this swarm has {self.cfg.num_stages}"
            )
        return header

    async def rpc_state_sketch(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        """A random sketch of this replica's parameters under the caller's seed (``swarm.averaging.param_sketch``),
        with its epoch: how a replica that downloaded the stage's state checks it against the others. It costs a
        pass over the parameters, so one request per caller per SKETCH_COOLDOWN_S, and at most 256 dimensions."""
        caller = str(context.remote_id)
        try:
            received = await receive(single(request), self.cfg.limits)
            seed, dims = received.metadata.get("seed"), received.metadata.get("dims")
            if not (type(seed) is int and 0 <= seed < 2**63 and type(dims) is int and 1 <= dims <= 256):
                raise TransportError("need an integer 'seed' in [0, 2^63) and 'dims' in [1, 256]")
            now = time.monotonic()
            if now - self._sketch_last.get(caller, -SKETCH_COOLDOWN_S) < SKETCH_COOLDOWN_S:
                raise TransportError(f"one state sketch per {SKETCH_COOLDOWN_S:.0f}s per peer; retry later")
            if len(self._sketch_last) > 4096:
                self._sketch_last.clear()
            self._sketch_last[caller] = now
            params = [p.detach() for p in self.module.parameters()]
            epoch = self.optimizer.epoch
            # not on the compute thread, which may be waiting out an averaging round: a sketch taken during a step is
            # off by at most that step, well inside the tolerance
            sketch = await asyncio.get_event_loop().run_in_executor(None, param_sketch, params, seed, dims)
            reply = {"ok": True, "epoch": epoch, "sketch": [float(v) for v in sketch]}
        except TransportError as e:
            reply = {"ok": False, "error": str(e)}
        return pack(reply, message_type=runtime_pb2.ExpertResponse)[0]

    async def rpc_parameters(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """This replica's parameters (names in the first message's metadata, with its epoch): what ``swarm export``
        gathers, checking each stage's download against the other replicas' sketches as a joiner does. A whole copy
        of the stage, so rationed: at most MAX_PARAMS_DOWNLOADS at once and one per caller per PARAMS_COOLDOWN_S."""
        caller, now = str(context.remote_id), time.monotonic()
        busy = sum(1 for t in self._params_serving.values() if t < 0)
        last = self._params_serving.get(caller)
        if busy >= MAX_PARAMS_DOWNLOADS or (last is not None and now - abs(last) < PARAMS_COOLDOWN_S):
            for message in pack(
                {
                    "ok": False,
                    "error": f"one parameter download per {PARAMS_COOLDOWN_S:.0f}s per peer; retry later",
                },
                message_type=runtime_pb2.ExpertResponse,
            ):
                yield message
            return
        if len(self._params_serving) > 1024:
            self._params_serving = {k: v for k, v in self._params_serving.items() if v < 0}
        self._params_serving[caller] = -now  # negative: being served now
        try:
            loop = asyncio.get_event_loop()
            # on the compute thread: a copy between micro-batches, never half-way through an optimizer step
            copies, epoch = await loop.run_in_executor(
                self.executor, lambda: (self._parameter_copies(), self.optimizer.epoch)
            )
            names, tensors = list(copies), list(copies.values())
            if self.averaging_hooks is not None and self.averaging_hooks.state is not None:
                tensors = list(self.averaging_hooks.state(tensors))
            messages = await loop.run_in_executor(
                None,
                partial(
                    pack,
                    {"ok": True, "epoch": epoch, "names": names},
                    tensors,
                    message_type=runtime_pb2.ExpertResponse,
                ),
            )
            for message in messages:
                yield message
        finally:
            self._params_serving[caller] = time.monotonic()

    def _parameter_copies(self) -> Dict[str, torch.Tensor]:
        """CPU copies of this stage's parameters by name (on the compute thread: never half-way through a step)."""
        with torch.no_grad():
            return {n: p.detach().to("cpu", copy=True) for n, p in self.module.named_parameters()}

    async def rpc_dialback(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        """Reachability check for a joining peer: dial the caller back at the addresses it lists, from a fresh
        libp2p host (the caller's existing connection to this peer proves nothing), and say which worked.

        Only the caller's own peer id is dialled (libp2p's handshake fails at an address where someone else
        listens); at most DIALBACK_MAX_ADDRS addresses, one dial-back at a time, one per caller per
        DIALBACK_COOLDOWN_S, each address bounded by DIALBACK_TIMEOUT_S."""
        caller = context.remote_id
        try:
            received = await receive(single(request), self.cfg.limits)
            maddrs = dialback_addresses(received.metadata.get("maddrs"), str(caller))
            now = time.monotonic()
            last = self._dialback_last.get(str(caller))
            if last is not None and now - last < DIALBACK_COOLDOWN_S:
                raise TransportError(f"one dial-back per {DIALBACK_COOLDOWN_S:.0f}s per peer; retry later")
            if self._dialback_lock is None or self._dialback_lock.locked():
                raise TransportError("busy with another dial-back; retry later")
            if len(self._dialback_last) > 4096:
                self._dialback_last.clear()
            self._dialback_last[str(caller)] = now
            async with self._dialback_lock:
                results = await dial_back(caller, maddrs, DIALBACK_TIMEOUT_S)
            reply = {"ok": True, "results": results}
        except TransportError as e:
            reply = {"ok": False, "error": str(e)}
        return pack(reply, message_type=runtime_pb2.ExpertResponse)[0]

    # ---- the chain ----------------------------------------------------------------------------------------
    def _reject(self, sender: str, reason: str, direction: str, verdict: bool = False) -> ChainError:
        """Count and log a rejected tensor; ``verdict``: a SENTINEL check rejected it (else it was malformed)."""
        self.stats.flagged[sender] = self.stats.flagged.get(sender, 0) + 1
        if direction == FORWARD:
            self.stats.rejected_inputs += 1
        else:
            self.stats.rejected_grads += 1
        stage = self.cfg.stage - 1 if direction == FORWARD else self.cfg.stage + 1
        logger.info(f"stage {self.cfg.stage}: rejected {direction} tensor from {sender[-8:]}: {reason}")
        return ChainError(
            f"stage {self.cfg.stage} rejected {direction} tensor: {reason}",
            blame=sender,
            blame_stage=stage,
            judge=self.peer_id if verdict else None,
        )

    def _enforce(self, verdict, sender: str, direction: str) -> None:
        """Raise (blaming ``sender``) if the gate rejected its tensor; None: nothing was checked."""
        if verdict is not None and not verdict.accepted:
            raise self._reject(sender, verdict.reason, direction, verdict=True)

    async def _check_activations(
        self,
        x: torch.Tensor,
        sender: str,
        header: ChainHeader,
        epoch: Optional[int],
        source: Union[torch.Tensor, bytes, None] = None,
        reveal: Any = None,
    ) -> None:
        """SENTINEL's verdict on received activations (:meth:`Gate.activations`, on the checks thread: statistics
        over a whole tensor cost milliseconds, and the event loop routes); a rejection raises and blames the sender.
        Token ids from the trainer are validated (range, digest) in _validate_request instead.

        Activations can be recomputed by other replicas of the sender's stage (:meth:`_forward_audit`) from their
        ``source``: stage 0's from the trainer's tokens, which came with them; a middle stage's from the input it
        says it computed them from (its digest: the input is fetched from the hop before it). With ``stage_audit``
        on, a rejection waits for that audit (``on_suspicion``: cleared, the tensor is used and the alarm was false),
        a suspect sender's tensors are audited before use, and a sampled share of the others (``rate``, every one of
        a newcomer's first hops) after use, off the micro-batch's path; none before SENTINEL's warm-up steps are
        over. ``reveal``: the trainer's audit reveal that came with
        the request, shown to the forward auditors (a last-stage auditor in an audit-only request is not the
        route's next hop; the reveal names it)."""
        cfg = self.cfg.stage_audit
        # none while SENTINEL warms up: replicas drift apart fastest then (measured: a replica that stepped alone in
        # the first steps was at cosine 0.90 and norms 1.42x apart from its partners at the same epoch)
        warmup = self.gate.sentinel.cfg.warmup_steps if self.gate.sentinel is not None else 0
        audits = cfg is not None and source is not None and header.step >= warmup
        suspect = audits and self._suspect(sender)
        planned = audits and self._draw_forward_audit(sender, suspect)
        verdict = await self._off_loop(
            self.gate.activations,
            x,
            sender,
            microbatch=_data_key(header),
            step=header.step,
            epoch=epoch,
            last_stage=self.module.is_last,
            defer_rejection=audits and cfg.on_suspicion,
            audited=planned,
        )
        suspicious = verdict is not None and not verdict.accepted
        if audits and (suspicious and cfg.on_suspicion or planned and suspect):
            await self._forward_audit(x, sender, header, source, verdict, epoch, reveal)
        elif planned and suspicious:  # rejected, and no audit may clear it (on_suspicion off)
            self.gate.settle(verdict, None)
            self._enforce(verdict, sender, FORWARD)
        elif (
            planned
        ):  # a sampled audit of a tensor SENTINEL accepted: its result may arrive after the micro-batch
            task = asyncio.create_task(self._forward_audit(x, sender, header, source, verdict, epoch, reveal))
            self._background_audits.add(task)
            task.add_done_callback(self._background_audit_done)
        else:
            self._enforce(verdict, sender, FORWARD)

    def _suspect(self, peer: str) -> bool:
        """A peer with a strike in this peer's recent exchanges with it."""
        tally = self.ledger.tallies.get(peer)
        return tally is not None and any(tally.recent)

    def _draw_forward_audit(self, sender: str, suspect: bool) -> bool:
        """Whether the activations ``sender`` sent are audited whatever SENTINEL says (``StageAuditConfig.rate_for``:
        a suspect's at ``suspect_rate``, a newcomer's first ones, else ``rate``); sampled audits run beside the
        micro-batch, at most MAX_BACKGROUND_AUDITS at a time (none is drawn beyond)."""
        cfg = self.cfg.stage_audit
        rate = cfg.rate_for(suspicious=False, suspect=suspect, audited_before=self._recomputed.get(sender, 0))
        if not suspect and len(self._background_audits) >= MAX_BACKGROUND_AUDITS:
            return False
        return rate >= 1 or (rate > 0 and self._audit_rng.random() < rate)

    def _background_audit_done(self, task: "asyncio.Task") -> None:
        self._background_audits.discard(task)
        if task.cancelled():
            return
        e = task.exception()
        if isinstance(e, ChainError):  # the tensor was used already: its sender's strike is recorded
            logger.info(f"stage {self.cfg.stage}: a sampled audit found, after the fact: {e.reason}")
        elif e is not None:
            logger.error(f"stage {self.cfg.stage}: a sampled forward audit failed: {e!r}")

    async def _forward_audit(
        self,
        x: torch.Tensor,
        sender: str,
        header: ChainHeader,
        source: Union[torch.Tensor, bytes],
        verdict: Optional[Verdict],
        epoch: Optional[int] = None,
        reveal: Any = None,
    ) -> None:
        """Ask up to two other replicas of the sender's stage (drawn by ``swarm.evidence.draw_auditor``, seeded with
        the trainer's signed header, so this peer cannot pick them) to recompute the activations from ``source``
        (stage 0: the tokens; a middle stage: the digest of its input, which :meth:`_fetch_input` gets from the hop
        before it) with their weights of ``epoch`` (the sender's claim; replicas hold the current and the previous),
        and judge the sender's against theirs (``swarm.audit.judge`` with the forward bounds; a second replica
        breaks a tie). The sender's ledger entry is :meth:`Gate.forward_audit`'s; raises (blaming the sender) if its
        tensor is refused. With no input to recompute from, or no auditor, nobody is blamed and SENTINEL's verdict
        stands."""
        input_: Optional[torch.Tensor] = source if isinstance(source, torch.Tensor) else None
        if isinstance(source, bytes):
            try:
                input_ = await self._fetch_input(header, source, x)
            except ChainError as e:
                logger.info(f"stage {self.cfg.stage}: no input to audit micro-batch {header.mb}: {e.reason}")
                self.stats.audit_inputs_missing += 1
        replicas = [] if input_ is None else await self._stage_replicas(self.cfg.stage - 1)
        seed = hashlib.sha256(header.digest + b"forward").digest()
        drawn: List[str] = []
        answers: List[Tuple[str, torch.Tensor]] = []
        outcome: Optional[AuditOutcome] = None
        self._recomputed[sender] = self._recomputed.get(sender, 0) + 1
        while len(drawn) < 2:
            auditor = draw_auditor(replicas, {sender, self.peer_id, *drawn}, seed)
            if auditor is None:
                break
            drawn.append(auditor)
            try:
                answer = await self._ask_forward(auditor, header, input_, x, epoch, reveal)
            except ChainError as e:
                logger.info(
                    f"stage {self.cfg.stage}: forward auditor {auditor[-8:]} gave no activations: {e.reason}"
                )
                continue
            answers.append((auditor, answer))
            outcome = await self._off_loop(self.gate.judge_audit, x, list(answers), FORWARD)
            if not outcome.needs_tiebreak:
                break
        meaning = self.gate.forward_audit(
            sender, outcome, [a for a, _ in answers], verdict, self.module.is_last
        )
        rejected = verdict is not None and not verdict.accepted
        self._count_audit(meaning.kind, answers)
        if outcome is not None:
            self.stats.forward_audits += 1
            error = await self._off_loop(
                relative_error, x, answers[0][1]
            )  # a pass over the tensor: off the loop
            logger.info(
                f"stage {self.cfg.stage}: micro-batch {header.mb}: forward {outcome.reason()}, relative error "
                f"{error:.2g} at epoch {epoch}" + (f" (SENTINEL: {verdict.reason})" if rejected else "")
            )
        if rejected and not meaning.refused:
            self.stats.false_alarms += 1
        if meaning.refused:
            reason = outcome.reason() if outcome is not None and outcome.odd == ROUTE else verdict.reason
            raise self._reject(sender, reason, FORWARD, verdict=True)

    def _count_audit(self, kind: str, answers: List[Tuple[str, torch.Tensor]]) -> None:
        """Count an audit by its outcome's kind (``AuditVerdict.kind``); an auditor found lying is flagged."""
        if kind == "none":
            return
        self.stats.audits_run += 1
        if kind == "ok":
            return
        self.stats.audits_failed[kind] = self.stats.audits_failed.get(kind, 0) + 1
        if kind == AUDIT:
            self.stats.flagged[answers[0][0]] = self.stats.flagged.get(answers[0][0], 0) + 1

    async def _ask_forward(
        self,
        auditor: str,
        header: ChainHeader,
        source: torch.Tensor,
        x: torch.Tensor,
        epoch: Optional[int],
        reveal: Any = None,
    ) -> torch.Tensor:
        """``auditor``'s recomputation (another replica of the previous stage) of the activations of ``source`` (that
        stage's input: tokens for stage 0); raises ChainError (blaming nobody: this is no hop of the route) if it
        gives none that could be compared."""
        meta = dict(
            header=header.to_wire(),
            recompute=True,
            direction=FORWARD,
            epoch=epoch,
            admission=self.admission_proof,
        )
        if reveal is not None:
            meta["audit"] = reveal
        received = await self._ask_aside(auditor, self.cfg.stage - 1, header, meta, [source])
        if len(received.tensors) != 1:
            raise ChainError("a forward audit's reply holds one tensor", blame=None)
        answer = received.tensors[0]
        if answer.shape != x.shape or not answer.is_floating_point():
            raise ChainError(f"recomputed activations {tuple(answer.shape)} != {tuple(x.shape)}", blame=None)
        return answer.to(self.device)

    async def _check_gradient(
        self,
        grad: torch.Tensor,
        sender: str,
        header: ChainHeader,
        sent: torch.Tensor,
        epoch: Any,
        audited: bool,
    ) -> None:
        verdict = await self._off_loop(
            self.gate.gradient,
            grad,
            sender,
            sent=sent,
            microbatch=_data_key(header),
            step=header.step,
            epoch=_epoch(epoch),
            audited=audited,
        )
        self._enforce(verdict, sender, BACKWARD)

    async def _check_loss(
        self,
        loss: float,
        sender: str,
        header: ChainHeader,
        sender_epoch: Optional[int],
        x: torch.Tensor,
        labels: torch.Tensor,
    ) -> None:
        """The last stage's loss on the sender's activations, judged before any backward (:meth:`Gate.loss`)."""
        verdict = await self._off_loop(
            self.gate.loss,
            loss,
            sender,
            microbatch=_data_key(header),
            step=header.step,
            epoch=sender_epoch,
            activations=x,
            tokens=labels,
            attributable=self.cfg.stage == 1,
        )
        self._enforce(verdict, sender, FORWARD)

    def _auditors(self, header: ChainHeader, meta: Dict[str, Any], sender: str) -> List[str]:
        """The auditors the trainer asked for (``swarm.audit``), from the reveal that travels beside the header and
        must match its signed commitment at every hop (a hop that swapped or stripped them is blamed); only the
        penultimate stage consults them, and never the audited peer or itself."""
        try:
            auditors = audit_reveal(header, meta.get("audit"))
        except ProtocolError as e:
            raise ChainError(
                f"stage {self.cfg.stage}: {e}", blame=sender, blame_stage=self.cfg.stage - 1
            ) from None
        if self.cfg.stage != self.cfg.num_stages - 2:
            return []
        if len(set(auditors)) != len(auditors) or {header.route[-1], self.peer_id} & set(auditors):
            logger.info(f"stage {self.cfg.stage}: ignoring a malformed audit request {str(auditors)[:80]}")
            return []
        return auditors

    async def _audit(
        self,
        grad: torch.Tensor,
        peer: str,
        auditors: List[str],
        header: ChainHeader,
        meta: Dict[str, Any],
        out: torch.Tensor,
        evidence: Optional[torch.Tensor] = None,
        tokens: Optional[torch.Tensor] = None,
        made_from: Optional[Tuple[bytes, int]] = None,
    ) -> None:
        """Ask the auditors for the gradient of the same activations and judge the route's against theirs
        (``swarm.audit.judge``); the verdict is the route peer's ledger entry for this gradient. Raises (blaming
        ``peer``) if the route's gradient is the odd one, or (blaming nobody) if no majority can be formed.
        ``evidence``: a middle stage's output-gradient (signed by the stage after it), which its auditors
        recompute from (``meta["recompute"]``); the last stage's auditors compute from the labels instead.
        ``tokens``: stage 0's input, sent beside its activations so that the auditor can have them recomputed
        (:meth:`_forward_audit`) before it rejects them; ``made_from``: what this hop computed them from and its epoch,
        for its signed claim (:meth:`_call_next`)."""
        answers: List[Tuple[str, torch.Tensor]] = []
        outcome: Optional[AuditOutcome] = None
        for auditor in auditors:
            try:
                answer = (
                    await self._call_next(
                        auditor,
                        header,
                        meta if evidence is not None else dict(meta, audit_only=True),
                        out,
                        timeout_s=min(self.cfg.hop_timeout_s, 30.0),
                        extra=[evidence] if evidence is not None else [tokens] if tokens is not None else (),
                        made_from=made_from if evidence is None else None,
                    )
                )[0]
            except ChainError as e:
                logger.info(f"stage {self.cfg.stage}: auditor {auditor[-8:]} gave no gradient: {e.reason}")
                continue
            answers.append((auditor, answer))
            outcome = await self._off_loop(self.gate.judge_audit, grad, list(answers))
            if not outcome.needs_tiebreak:
                break
        verdict = self.gate.audit(peer, outcome, [auditor for auditor, _ in answers])
        self._count_audit(verdict.kind, answers)
        if verdict.kind in ("none", "ok"):
            return
        logger.info(f"stage {self.cfg.stage}: micro-batch {header.mb}: {outcome.reason()}")
        if verdict.kind == AUDIT:
            return
        if verdict.blame is not None:
            raise self._reject(peer, outcome.reason(), BACKWARD, verdict=True)
        if evidence is not None:
            # a middle stage's replicas drift apart between averaging rounds more than the last stage's: with no
            # majority, the gradient that passed SENTINEL is used (nobody blamed), rather than the micro-batch lost
            return
        raise ChainError(f"stage {self.cfg.stage}: {outcome.reason()}", blame=None)

    def _validate_request(
        self, header: ChainHeader, tensors: List[torch.Tensor], sender: str
    ) -> torch.Tensor:
        if len(tensors) != 1:
            raise ChainError(f"expected exactly one input tensor, got {len(tensors)}", blame=sender)
        x = tensors[0]
        self._check_input(header, x, sender)
        return x

    def _split_tokens(
        self, header: ChainHeader, tensors: List[torch.Tensor], sender: str
    ) -> Tuple[List[torch.Tensor], Optional[torch.Tensor]]:
        """A route request to stage 1 may carry, after stage 0's activations, the micro-batch's token ids (stage 0's
        input, which the trainer signed in the header): what a forward audit recomputes those activations from.
        Returns the other tensors and the tokens (None: not sent); tokens that are not the header's are the
        sender's lie."""
        if self.cfg.stage != 1 or len(tensors) != 2:
            return tensors, None
        tokens = tensors[1]
        if (
            tokens.dtype != torch.int64
            or tokens.shape != tensors[0].shape[:2]
            or tensor_digest(tokens) != header.labels_digest
        ):
            raise ChainError("the token ids beside the activations are not the header's", blame=sender)
        return tensors[:1], tokens

    def _check_input(self, header: ChainHeader, x: torch.Tensor, sender: str) -> None:
        if self.module.is_first:
            ok = x.dtype == torch.int64 and x.ndim == 2
            expected = "int64 token ids [batch, seq]"
        else:
            ok = x.is_floating_point() and x.ndim == 3 and x.shape[-1] == self.model_cfg.hidden_size
            expected = f"float activations [batch, seq, {self.model_cfg.hidden_size}]"
        if not ok:
            raise ChainError(f"bad input {tuple(x.shape)} {x.dtype}: expected {expected}", blame=sender)
        try:
            self._check_shape(x)
        except TransportError as e:
            raise ChainError(str(e), blame=sender) from None
        if self.module.is_first:
            if int(x.min()) < 0 or int(x.max()) >= self.model_cfg.vocab_size:
                raise ChainError("token ids outside the vocabulary", blame=sender)
            if tensor_digest(x) != header.labels_digest:
                raise ChainError("token ids do not match the header's digest", blame=sender)

    async def _chain(
        self, received, header: ChainHeader, sender: str
    ) -> Tuple[List[torch.Tensor], Dict[str, Any]]:
        """This hop's work on a request whose header verified: returns the upstream gradient and this hop's report
        fields (with the later hops' reports under ``reports``); a failure raises ChainError."""
        meta = received.metadata
        if meta.get("recompute") is True:
            return await self._serve_recompute(received, header, sender)
        if meta.get("fetch") is True:
            return self._serve_fetch(header, sender)
        audit_only = meta.get("audit_only") is True
        if audit_only and not self.module.is_last:
            raise ChainError(
                "'audit_only' asks the last stage for a gradient; this peer serves a middle stage",
                blame=sender,
            )
        # on the stage's device from here on: SENTINEL's statistics run where the tensor lives (a GPU peer's checks
        # would otherwise cost CPU time beside the GPU's compute, and mix devices with its own activations)
        inputs, tokens = self._split_tokens(header, received.tensors, sender)
        x = self._validate_request(header, inputs, sender)
        x_digest = tensor_digest(x)  # what this hop received, bound into its signed report
        # the sender's signed claim on these activations (None at stage 0: the trainer's header covers the tokens),
        # and, from a middle-stage sender, the digest of its input as the hop before it signed to have sent it: a
        # forward audit fetches that input (an auditor in an audit-only request may not fetch)
        claim = None if self.module.is_first else self._check_claim(header, meta, x_digest, sender)
        sender_epoch = claim.epoch if claim is not None else None
        audit_source: Union[torch.Tensor, bytes, None] = tokens  # what a forward audit recomputes from
        if claim is not None and self.cfg.stage >= 2:
            claimed_input = self._check_input_claim(header, meta, claim, sender)
            if not audit_only:
                audit_source = claimed_input
        sent_tokens = x if self.module.is_first else None  # passed on: the next hop's forward audits use them
        x = x.to(self.device)
        auditors = [] if self.module.is_last else self._auditors(header, meta, sender)
        grad_out_wire: Optional[torch.Tensor] = None  # the next stage's gradient as it came, for the evidence
        if audit_only:  # the penultimate stage passes the reveal on to its auditors: this one must be listed
            try:
                listed = audit_reveal(header, meta.get("audit"))
            except ProtocolError as e:
                raise ChainError(f"audit request: {e}", blame=sender) from None
            if self.peer_id not in listed:
                raise ChainError("audit request to a peer the trainer did not pick", blame=sender)
        await self._check_activations(
            x,
            sender,
            header,
            sender_epoch,
            audit_source,
            meta.get("audit"),
        )
        loop = asyncio.get_event_loop()
        loss: Optional[float] = None
        async with self._slots:
            queued = time.perf_counter()
            # the epoch of the weights this forward uses, read on the thread that steps (a step queued before this
            # forward would otherwise make it claim the epoch before): receivers and auditors compare like with like
            epoch, (x, out, fwd_s) = await loop.run_in_executor(self.executor, self._forward, x)
            wait_s = time.perf_counter() - queued - fwd_s
            later: List[Dict[str, Any]] = []
            try:
                if self.module.is_last:
                    key = (header.trainer, header.mb)
                    if self.labels.used(key):
                        raise ChainError(
                            f"micro-batch {header.mb} was computed here already (a replay)", blame=sender
                        )
                    try:
                        labels = await self.labels.take(key, self.cfg.labels_timeout_s)
                    except asyncio.TimeoutError:
                        raise ChainError(
                            f"labels for micro-batch {header.mb} never arrived", blame=None
                        ) from None
                    except TransportError as e:
                        raise ChainError(str(e), blame=None) from None
                    if (
                        tensor_digest(labels) != header.labels_digest
                    ):  # the trainer's own labels contradict its header
                        raise ChainError(
                            f"labels deposited for {header.mb} do not match its header", blame=None
                        )
                    if labels.shape != out.shape[:2]:
                        raise ChainError(
                            f"labels {tuple(labels.shape)} do not match inputs {tuple(out.shape[:2])}",
                            blame=sender,
                        )
                    loss_t, loss_s = await loop.run_in_executor(self.executor, self.compute.loss, out, labels)
                    fwd_s += loss_s
                    await self._check_loss(float(loss_t.detach()), sender, header, sender_epoch, x, labels)
                    if audit_only:  # the gradient for a penultimate stage's audit: no training on it
                        loss, grad_in, bwd_s = await loop.run_in_executor(
                            self.executor, self.compute.audit_gradient, x, loss_t
                        )
                        opt_s = 0.0
                    else:
                        loss, grad_in, bwd_s, opt_s = await loop.run_in_executor(
                            self.executor, self.compute.backward_loss, x, loss_t
                        )
                else:
                    next_meta = dict(header=meta["header"], admission=self.admission_proof)
                    if claim is not None:  # what this hop computed from, as its sender signed it: the input
                        next_meta["input_claim"] = meta["claim"]  # the next hop's forward audits fetch
                    # what its signed claim says the activations were computed from, and with which weights
                    made_from = (header.labels_digest if self.module.is_first else x_digest, epoch)
                    if self.cfg.stage + 1 < self.cfg.num_stages - 1:
                        next_meta["audit"] = meta.get(
                            "audit"
                        )  # checked again at the next hop; the last never sees it
                    next_peer = header.route[self.cfg.stage + 1]
                    grad_out, later, next_epoch, wire = await self._call_next(
                        next_peer,
                        header,
                        next_meta,
                        out.detach(),
                        extra=[sent_tokens] if sent_tokens is not None else (),
                        made_from=made_from,
                    )
                    grad_out_wire = wire[0]
                    recomputers = await self._recomputers(header, next_peer)
                    await self._check_gradient(
                        grad_out,
                        next_peer,
                        header,
                        out.detach(),
                        next_epoch,
                        audited=bool(auditors) or bool(recomputers),
                    )
                    if recomputers:  # a middle stage's gradient: recomputed from its signed inputs
                        await self._audit(
                            grad_out,
                            next_peer,
                            recomputers,
                            header,
                            dict(next_meta, recompute=True),
                            out.detach(),
                            evidence=wire[1],
                        )
                    if auditors:
                        audit_meta = dict(next_meta, audit=meta.get("audit"))
                        await self._audit(
                            grad_out,
                            header.route[self.cfg.stage + 1],
                            auditors,
                            header,
                            audit_meta,
                            out.detach(),
                            tokens=sent_tokens,
                            made_from=made_from,
                        )
                    grad_in, bwd_s, opt_s = await loop.run_in_executor(
                        self.executor, self.compute.backward, x, out, grad_out
                    )
            except BaseException:
                del x, out  # drop the graph: this micro-batch never reaches the optimizer
                raise
        if audit_only:
            self.stats.audits_served += 1
        else:
            self.stats.served += 1
            self.stats.record_compute(x.shape[0], fwd_s + bwd_s + opt_s)
            self.refresh_record()
        tensors = [] if self.module.is_first else [self._outbound(grad_in, BACKWARD, header)]
        digests: Tuple[bytes, ...] = ()
        if tensors and not audit_only:  # the signed tensors: what it sent back, computed from what
            # the next hop's gradient digest, checked against that gradient in _call_next (not hashed again)
            source = header.labels_digest if self.module.is_last else HopReport.from_wire(later[0]).digests[0]
            digests = (tensor_digest(as_received(tensors[0], self.cfg.compression)), x_digest, source)
            if not self.module.is_last:  # the next stage's signed gradient travels up with this hop's own
                tensors.append(grad_out_wire)
        timings = dict(fwd_s=fwd_s, bwd_s=bwd_s, opt_s=opt_s, wait_s=wait_s)
        return tensors, dict(
            ok=True,
            loss=float(loss) if loss is not None else None,
            epoch=epoch,
            timings=timings,
            reports=later,
            digests=digests,
        )

    async def _call_next(
        self,
        peer: str,
        header: ChainHeader,
        meta: Dict[str, Any],
        out: torch.Tensor,
        timeout_s: Optional[float] = None,
        extra: Sequence[torch.Tensor] = (),
        made_from: Optional[Tuple[bytes, int]] = None,
    ) -> Tuple[torch.Tensor, List[Dict[str, Any]], Optional[int], List[torch.Tensor]]:
        """Send ``out`` (and ``extra`` tensors: a recomputation's output-gradient) to ``peer`` (the next stage's route
        peer, or an auditor), with this hop's signed claim on it when ``made_from`` (the digest of what it was
        computed from, and the epoch of the weights) is given, and return the gradient it sent back, its signed reports (checked:
        ``swarm.protocol.check_reports``), its epoch, and the reply's tensors as they came: the gradient, then for a
        middle stage the next-but-one stage's gradient it relayed (the evidence of what its own was computed from).
        A failure raises ChainError: this hop's own claim about ``peer`` (unreachable, timed out, a malformed or
        unsigned reply, tensors its own signed report does not cover), or the later hops' signed reports relayed."""
        try:
            peer_id = PeerID.from_base58(peer)
        except Exception:
            raise ChainError(f"route holds an invalid peer id {peer[:20]!r}", blame=None) from None
        sent = self._outbound(out, FORWARD, header)
        stage = self.cfg.stage + 1
        timeout_s = timeout_s or self.cfg.hop_timeout_s
        if made_from is not None:  # a digest and a signature: off the event loop
            claim = await self._off_loop(self._claim, header, sent, *made_from)
            meta = dict(meta, claim=claim.to_wire())
        audit = meta.get("audit_only") is True or meta.get("recompute") is True
        try:
            if not audit:  # held while the next hops work on it: the stage after the next may fetch it
                self._sent[header.digest] = sent
            endpoint = await self.next_endpoints.get(peer) if self.next_endpoints is not None else None
            received = await call_chain(
                self.dataplane_client,
                peer,
                endpoint,
                self.get_stub(self.p2p, peer_id, namespace=namespace(self.cfg.run_id)).rpc_chain,
                meta,
                [sent, *extra],
                self.cfg.limits,
                timeout_s,
                self.cfg.compression,
            )
        except asyncio.TimeoutError:
            self.stats.failed_downstream += 1
            raise ChainError(
                f"stage {stage} peer timed out after {timeout_s:.0f}s", blame=peer, blame_stage=stage
            ) from None
        except TransportError as e:
            self.stats.failed_downstream += 1
            raise self._reject(peer, f"malformed reply: {e}", BACKWARD) from e
        except Exception as e:
            self.stats.failed_downstream += 1
            raise ChainError(
                f"stage {stage} peer unreachable: {type(e).__name__}: {e}", blame=peer, blame_stage=stage
            ) from None
        finally:
            if not audit:
                self._sent.pop(header.digest, None)
        reply = received.metadata
        if "reports" not in reply:  # refused before it verified the header: its word against this hop's
            self.stats.failed_downstream += 1
            no_fault = reply.get("no_fault") is True
            raise ChainError(
                f"stage {stage} peer refused: {str(reply.get('error', 'no reason'))[:200]}",
                blame=None if no_fault else peer,
                blame_stage=None if no_fault else stage,
            )
        try:
            # an auditor's reply to a recomputation holds its own report only
            reports = check_reports(
                header, reply["reports"], stage, peer, alone=meta.get("recompute") is True
            )
        except ProtocolError as e:
            self.stats.failed_downstream += 1
            raise self._reject(peer, f"invalid reply: {e}", BACKWARD) from None
        if not reports[0].ok:
            self.stats.failed_downstream += 1
            raise ChainError(f"stage {stage}: {reports[0].error}", reports=reply["reports"])
        relays = not audit and stage < self.cfg.num_stages - 1  # a middle stage relays its input gradient
        if len(received.tensors) != 1 + relays:
            raise self._reject(peer, f"reply needs {1 + relays} gradient tensors", BACKWARD)
        if not audit:
            self._check_signed_tensors(peer, reports, sent, received.tensors, header)
        grad = received.tensors[0].to(self.device)  # checked and used where this stage's activations live
        if grad.shape != out.shape or not grad.is_floating_point():
            raise self._reject(
                peer, f"gradient shape {tuple(grad.shape)} != activation shape {tuple(out.shape)}", BACKWARD
            )
        return grad, reply["reports"], reports[0].epoch, list(received.tensors)

    def _check_signed_tensors(
        self,
        peer: str,
        reports: List[HopReport],
        sent: torch.Tensor,
        tensors: List[torch.Tensor],
        header: ChainHeader,
    ) -> None:
        """The next hop's signed report must cover what it sent back and name what it got: the gradient's digest,
        the activations this hop sent, and the gradient it computed from (the next-but-one hop's own signed digest,
        relayed as a second tensor) or the labels. Any mismatch is the next hop's: it signed it, or relayed it."""
        digests = reports[0].digests
        if len(digests) != 3:
            raise self._reject(peer, "its report does not sign the tensors it sent", BACKWARD)
        if tensor_digest(tensors[0]) != digests[0]:
            raise self._reject(peer, "its gradient is not the one its report signs", BACKWARD)
        if tensor_digest(as_received(sent, self.cfg.compression)) != digests[1]:
            raise self._reject(peer, "its report names other activations than this peer sent", BACKWARD)
        if len(tensors) == 1 and digests[2] != header.labels_digest:
            raise self._reject(peer, "its report names other labels than the trainer's", BACKWARD)
        if len(tensors) > 1:
            below = reports[1].digests if len(reports) > 1 else ()
            # a lossy codec that is not idempotent re-quantizes the relayed gradient: its digest cannot match then
            relayed_ok = self.cfg.compression not in IDEMPOTENT or tensor_digest(tensors[1]) == digests[2]
            if not relayed_ok or not below or below[0] != digests[2]:
                raise self._reject(peer, "it relayed a gradient the next stage did not sign", BACKWARD)

    async def _recomputers(self, header: ChainHeader, peer: str) -> List[str]:
        """The auditors of ``peer``'s gradient, when it serves a middle stage and this micro-batch is drawn
        (``StageAuditConfig.rate_for``: every hop of a newcomer or a suspect, else ``rate``): up to two other
        replicas of its stage (not its chain neighbours), drawn by ``swarm.evidence.draw_auditor`` seeded with the
        trainer's signed header, so this peer cannot pick them."""
        cfg, stage = self.cfg.stage_audit, self.cfg.stage + 1
        if cfg is None or stage >= self.cfg.num_stages - 1:
            return []
        rate = cfg.rate_for(
            suspicious=False, suspect=self._suspect(peer), audited_before=self._recomputed.get(peer, 0)
        )
        if rate <= 0 or (rate < 1 and self._audit_rng.random() >= rate):
            return []
        replicas = await self._stage_replicas(stage)
        excluded = {peer, self.peer_id, *header.route[stage + 1 : stage + 2]}
        seed = hashlib.sha256(header.digest + b"recompute").digest()
        drawn: List[str] = []
        for _ in range(2):
            auditor = draw_auditor(replicas, excluded | set(drawn), seed)
            if auditor is None:
                break
            drawn.append(auditor)
        if drawn:
            self._recomputed[peer] = self._recomputed.get(peer, 0) + 1
        return drawn

    async def _stage_replicas(self, stage: int) -> List[str]:
        """The online, not banned peers announcing ``stage`` (from the DHT, cached for 10 s)."""
        cached = self._replicas.get(stage)
        if cached is None or time.monotonic() - cached[0] > 10.0:
            run_id, num_stages = self.cfg.run_id, self.cfg.num_stages
            try:
                peers = await asyncio.get_event_loop().run_in_executor(
                    None, partial(self._fetch_stage_peers, self.dht, run_id, num_stages, stages=[stage])
                )
            except Exception as e:
                logger.debug(f"stage {self.cfg.stage}: no replicas of stage {stage}: {e!r}")
                peers = {}
            found = [i.peer_id for i in peers.get(stage, []) if i.record.state == "online"]
            cached = self._replicas[stage] = (time.monotonic(), found)
        return [p for p in cached[1] if not self.is_banned(p)]

    def _serve_fetch(self, header: ChainHeader, sender: str) -> Tuple[List[torch.Tensor], Dict[str, Any]]:
        """The activations this hop sent on ``header``'s route, to the route's peer two stages on (the header check
        admits no other), which has the next stage's forward from them recomputed; once per request (a header cannot
        buy more traffic), and only while the micro-batch is in flight here (nobody's fault if not)."""
        served = header.digest + b"fetch"
        if served in self._recompute_served:
            raise ChainError("these activations were fetched already", blame=sender)
        sent = self._sent.get(header.digest)
        if sent is None:
            raise ChainError("the activations of this request are not held here (any more)", blame=None)
        self._recompute_served[served] = None
        while len(self._recompute_served) > MAX_RECOMPUTE_SEEN:
            self._recompute_served.popitem(last=False)
        return [sent], dict(ok=True, loss=None, epoch=self.optimizer.epoch, timings={}, reports=[])

    async def _fetch_input(self, header: ChainHeader, claimed: bytes, x: torch.Tensor) -> torch.Tensor:
        """The input the previous (middle) stage's route peer computed ``x`` from: the activations the hop before it
        sent, fetched from that hop (``fetch``), which must be the ones it signed to have sent (``claimed``, their
        digest). Raises ChainError, blaming nobody: a hop that no longer holds them, or serves others than it signed
        (it is no neighbour of this peer's; the audit is what is lost)."""
        source = header.route[self.cfg.stage - 2]
        meta = dict(header=header.to_wire(), fetch=True, admission=self.admission_proof)
        received = await self._ask_aside(source, self.cfg.stage - 2, header, meta, [])
        if len(received.tensors) != 1 or received.tensors[0].shape != x.shape:
            raise ChainError("the fetched input is not one tensor shaped like the activations", blame=None)
        fetched = received.tensors[0]
        if tensor_digest(fetched) != claimed:
            raise ChainError(
                f"stage {self.cfg.stage - 2} served other activations than it signed to have sent",
                blame=None,
            )
        return fetched

    def _claim(self, header: ChainHeader, sent: torch.Tensor, source: bytes, epoch: int) -> TensorClaim:
        """This hop's signed claim on the activations it sends (``swarm.evidence.TensorClaim``, the simulator's):
        for this request (its header's digest), computed from ``source`` at ``epoch``."""
        return TensorClaim.create(
            self.identity_key,
            stage=self.cfg.stage,
            direction=FORWARD,
            microbatch=header.digest.hex(),
            epoch=epoch,
            tensor=as_received(sent, self.cfg.compression),
            inputs=(source,),
        )

    def _received_claim(self, header: ChainHeader, value: Any, stage: int, sender: str) -> TensorClaim:
        """A forward claim from the wire: signed by ``sender`` about its activations at ``stage`` for this request;
        raises ProtocolError."""
        try:
            claim = TensorClaim.from_wire(value)
            claim.verify()
        except EvidenceError as e:
            raise ProtocolError(str(e)) from None
        if (claim.sender, claim.stage, claim.direction, claim.microbatch) != (
            sender,
            stage,
            FORWARD,
            header.digest.hex(),
        ):
            raise ProtocolError(
                f"it is not stage {stage}'s claim, by {sender[-8:]}, on this request's activations"
            )
        return claim

    def _check_claim(
        self, header: ChainHeader, meta: Dict[str, Any], x_digest: bytes, sender: str
    ) -> TensorClaim:
        """The sender's signed claim on the activations it sent (digest ``x_digest``): its own, about these
        activations, and at stage 1 computed from the header's tokens; anything else is the sender's lie."""
        try:
            claim = self._received_claim(header, meta.get("claim"), self.cfg.stage - 1, sender)
        except ProtocolError as e:
            raise ChainError(f"activations without their sender's valid claim: {e}", blame=sender) from None
        if claim.digest != x_digest:
            raise ChainError("its signed claim names other activations than it sent", blame=sender)
        if self.cfg.stage == 1 and claim.inputs[0] != header.labels_digest:
            raise ChainError("its signed claim names other token ids than the header's", blame=sender)
        return claim

    def _check_input_claim(
        self, header: ChainHeader, meta: Dict[str, Any], claim: TensorClaim, sender: str
    ) -> bytes:
        """A middle-stage sender relays the claim the hop before it signed on the activations it sent it (checked by
        the sender when it got them): the input the sender says it computed from (``claim.inputs``) must be those.
        Returns their digest, which the input fetched for a forward audit must have (:meth:`_fetch_input`)."""
        before = self.cfg.stage - 2
        try:
            relayed = self._received_claim(header, meta.get("input_claim"), before, header.route[before])
        except ProtocolError as e:
            raise ChainError(f"no valid claim of stage {before} relayed: {e}", blame=sender) from None
        if relayed.digest != claim.inputs[0]:
            raise ChainError(
                f"it claims to have computed from other activations than stage {before} signed to have sent it",
                blame=sender,
            )
        return claim.inputs[0]

    async def _ask_aside(
        self, peer: str, stage: int, header: ChainHeader, meta: Dict[str, Any], tensors: List[torch.Tensor]
    ) -> Received:
        """A request for an audit's sake to ``peer`` of ``stage``, which is not this hop's next one (an auditor, or
        the hop before the previous one): its reply must hold its own signed report, ok. Raises ChainError blaming
        nobody otherwise (its word against this peer's: the audit is what is lost)."""
        try:
            peer_id = PeerID.from_base58(peer)
        except Exception:
            raise ChainError(f"invalid peer id {peer[:20]!r}", blame=None) from None
        try:
            received = await call_chain(
                self.dataplane_client,
                peer,
                None,
                self.get_stub(self.p2p, peer_id, namespace=namespace(self.cfg.run_id)).rpc_chain,
                meta,
                tensors,
                self.cfg.limits,
                min(self.cfg.hop_timeout_s, 30.0),
                self.cfg.compression,
            )
        except asyncio.TimeoutError:
            raise ChainError("timed out", blame=None) from None
        except Exception as e:
            raise ChainError(f"unreachable: {type(e).__name__}: {e}", blame=None) from None
        reply = received.metadata
        if "reports" not in reply:
            raise ChainError(f"refused: {str(reply.get('error', 'no reason'))[:200]}", blame=None)
        try:
            reports = check_reports(header, reply["reports"], stage, peer, alone=True)
        except ProtocolError as e:
            raise ChainError(f"invalid reply: {e}", blame=None) from None
        if not reports[0].ok:
            raise ChainError(str(reports[0].error)[:200], blame=None)
        return received

    async def _serve_recompute(
        self, received, header: ChainHeader, sender: str
    ) -> Tuple[List[torch.Tensor], Dict[str, Any]]:
        """An audit of another replica of this stage: for a middle stage, the gradient of its input for the sender's
        activations and the output-gradient it got; for stage 0 (``direction: forward``), its activations of the
        trainer's tokens with its weights of the epoch asked for. Nothing is trained and the tensors are not
        SENTINEL's business (they are another hop's); only a well-formed request is computed, once."""
        forward = received.metadata.get("direction") == FORWARD
        if forward and self.module.is_last:
            raise ChainError("a forward audit is asked of a stage before the last", blame=sender)
        if not forward and (self.module.is_first or self.module.is_last):
            raise ChainError("a recomputation audit is asked of a middle stage", blame=sender)
        # one audit per request and asker (the header check admits at most three askers: the route's next hop and
        # the trainer's two auditors of the last stage): a header cannot buy more compute
        served = header.digest + sender.encode()
        if served in self._recompute_served:
            raise ChainError("this request was audited here already", blame=sender)
        self._recompute_served[served] = None
        while len(self._recompute_served) > MAX_RECOMPUTE_SEEN:
            self._recompute_served.popitem(last=False)
        if (
            forward
        ):  # the activations of stage 0 of the trainer's tokens (checked against its signed header), or of
            # a middle stage of the input the receiver fetched from the hop before it
            ids = self._validate_request(header, received.tensors, sender)
            epoch = _epoch(received.metadata.get("epoch"))
            # a sender one step ahead: this replica is usually finishing the same averaging round (seen live: most
            # "not held" answers were one epoch behind); a bounded wait, on the event loop only
            deadline = time.monotonic() + FORWARD_AUDIT_WAIT_S
            while epoch == self.optimizer.epoch + 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            work = partial(self._forward_at, epoch, ids.to(self.device))
        else:
            if len(received.tensors) != 2:
                raise ChainError("a recomputation audit needs activations and their gradient", blame=sender)
            x = self._validate_request(header, received.tensors[:1], sender)
            g = received.tensors[1]
            if g.shape != x.shape or not g.is_floating_point() or not bool(torch.isfinite(g).all()):
                raise ChainError(
                    "the output-gradient of an audit must be finite and shaped like the input", blame=sender
                )
            work = partial(_input_gradient, self.module, x.to(self.device), g.to(self.device))
        started = time.perf_counter()
        async with self._slots:
            out = await asyncio.get_event_loop().run_in_executor(self.executor, work)
        if out is None:  # nobody's fault: replicas hold the current epoch's weights and the one before
            raise ChainError(
                f"weights of epoch {epoch} not held here (at {self.optimizer.epoch})", blame=None
            )
        self.stats.audits_served += 1
        timings = dict(fwd_s=0.0, bwd_s=0.0, opt_s=0.0, wait_s=0.0)
        timings["fwd_s" if forward else "bwd_s"] = time.perf_counter() - started
        return [self._outbound(out, FORWARD if forward else BACKWARD, header)], dict(
            ok=True, loss=None, epoch=self.optimizer.epoch, timings=timings, reports=[]
        )

    def _forward(self, x: torch.Tensor) -> Tuple[int, Tuple[torch.Tensor, torch.Tensor, float]]:
        return self.optimizer.epoch, self.compute.forward(x)

    def _forward_at(self, epoch: Optional[int], x: torch.Tensor) -> Optional[torch.Tensor]:
        """This stage's output for ``x`` with its weights of ``epoch`` (None: the current ones); None if they are not
        held any more (on the compute thread, which is the one that steps)."""
        weights = self.optimizer.weights_at(self.optimizer.epoch if epoch is None else epoch)
        if weights is None:
            return None
        return recompute(self.module, FORWARD, x, None, weights=weights)[0]

    def _outbound(self, tensor: torch.Tensor, direction: str, header: ChainHeader) -> torch.Tensor:
        tensor = tensor.detach()
        if self.outbound_hook is not None:
            tensor = self.outbound_hook(
                tensor, direction, dict(trainer=header.trainer, mb=header.mb, step=header.step)
            )
        return tensor.to("cpu", torch.float32) if tensor.is_floating_point() else tensor.cpu()

    async def _off_loop(self, fn, *args, **kwargs):
        return await asyncio.get_event_loop().run_in_executor(self.checks, partial(fn, *args, **kwargs))

    # ---- compute (runs on the single compute thread) ---------------------------------------------------------


FORWARD_AUDIT_WAIT_S = 3.0  # how long a forward auditor one epoch behind the sender waits to get there
MAX_BACKGROUND_AUDITS = 2  # sampled forward audits in flight at once (each holds one received tensor)
MAX_RECOMPUTE_SEEN = 4096  # request digests remembered by an auditor (a header lives 10 minutes)
INFO_PEERS, INFO_LEDGER = 64, 128  # per-peer entries in rpc_info (it must stay under its readers' 64 KiB)


SKETCH_COOLDOWN_S = 2.0
# parameter downloads (swarm export): how many are served at once, and how often one caller may have one
MAX_PARAMS_DOWNLOADS = 2
PARAMS_COOLDOWN_S = 5.0


async def ask_state_sketch(
    stub, seed: int, dims: int, *, limits: TensorLimits, timeout: float, retry_after_s: Optional[float] = None
) -> Optional[Tuple[int, List[float]]]:
    """``(epoch, sketch)`` from a stage peer's ``rpc_state_sketch`` under ``seed``, or None if it gave no well-formed
    one. With ``retry_after_s``, a peer that answered "retry later" (its per-caller cooldown) is asked once more."""
    for attempt in range(2):
        try:
            reply = await stub.rpc_state_sketch(pack(dict(seed=seed, dims=dims))[0], timeout=timeout)
            meta = (await receive(single(reply), limits)).metadata
        except Exception as e:
            logger.debug(f"no state sketch: {e!r}")
            return None
        sketch, epoch = meta.get("sketch"), meta.get("epoch")
        if (
            meta.get("ok")
            and type(epoch) is int
            and isinstance(sketch, list)
            and len(sketch) == dims
            and all(isinstance(v, float) for v in sketch)
        ):
            return epoch, sketch
        if attempt == 0 and retry_after_s is not None and "retry later" in str(meta.get("error", "")):
            await asyncio.sleep(retry_after_s)
            continue
        return None
    return None


def _input_gradient(module: StageModule, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    return recompute(module, BACKWARD, x, grad_out)[1]


def _top(counts: Dict[str, int], n: int) -> Dict[str, int]:
    """The ``n`` largest counts."""
    return dict(sorted(counts.items(), key=lambda item: -item[1])[:n]) if len(counts) > n else dict(counts)


def _data_key(header: ChainHeader) -> str:
    """What SENTINEL's replay check keys on: the trainer and the micro-batch's index (its retries share their data)."""
    return f"{header.trainer}:{header.mb.split('.')[0]}"


def _epoch(value: Any) -> Optional[int]:
    """A sender's claimed optimizer epoch, if it is a plausible one (it only picks which senders to compare with)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**40 else None
