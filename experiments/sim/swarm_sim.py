"""An in-process swarm: the project's own SENTINEL, reputation and router code on real tensors, without a network.

    from experiments.sim.swarm_sim import SimConfig, Byzantine, run_sim
    result = run_sim(SimConfig(stages=2, replicas=3, byzantine=[Byzantine(stage=0, replica=1, attack="scale")]))

What is real: every stage peer has its own :class:`~swarm.sentinel.SentinelMonitor` and
:class:`~swarm.reputation.ReputationLedger`; the trainer has a :class:`~swarm.router.Router` (with its
:class:`~swarm.router.LocalBans`); activations and gradients are those of the project's model
(:class:`~swarm.model.StageModule`, trained with AdamW on the shipped corpus, so their statistics drift as in
training); Byzantine peers tamper through :class:`peers.adversary.Adversary`, called exactly as the stage server
calls its outbound hook; reports are ``ledger.to_report(...)`` round-tripped through the DHT record validator
(``to_value`` / ``ReputationReport.from_value``) and aggregated with :func:`~swarm.reputation.aggregate`, called as
``ReputationService.refresh`` calls it (``first_seen`` from stage records and reports, probation by age on a
simulated clock, vouched work).

What is simulated (and why it does not change what the checks see):

- **Transport**: a function call instead of hivemind P2P. The receiver still knows the sender (the chain's
  previous / next peer), as the libp2p connection tells a real peer.
- **One weight copy per stage**: the R replicas of a stage share one :class:`StageModule` and one AdamW. In the
  real swarm the replicas average gradients and step together (``swarm/optimizer.py``), so their weights are
  equal after every step; sharing one copy is that, without R-fold compute. Every stage steps every
  ``microbatches_per_step`` micro-batches of the trainer (the trainer's step), with the gradients of the
  micro-batches that reached its backward.
- **Sequential micro-batches**: one micro-batch at a time (no two in flight), so the router's in-flight counts
  are always 0 and it picks by measured time + jitter, never repeating the previous chain.
- **Clock**: a simulated clock advances ``seconds_per_microbatch`` (default 1 s, the order of a local swarm on a
  2-core machine) per micro-batch attempt, and ``wait_step_s`` per wait while no chain is usable. Reputation rounds
  run every ``report_period_s`` of that clock; the router's local bans and the probation use it too, so results in
  micro-batches depend on it through them.
- **One aggregate for everyone**: every honest peer and the trainer read the same reports at the same simulated
  time and saw every peer announce at the same time, so their ``aggregate(...)`` results are identical; it is
  computed once per round and used by the router (which then skips blacklisted peers) and by every stage server
  (which refuses a blacklisted sender).
- **Reachability**: every reporter, Sybils included, is taken as reachable (``reachable=set(reports)``): a Sybil
  that runs a libp2p host can answer ``rpc_info`` with its own key. This is the worst case for slander.
- **Audits** (``swarm/audit.py``): the trainer draws auditors with the same function and probability; an auditor's
  gradient is computed with the shared last-stage weights from the activations the route's last peer got, and goes
  through the auditor's own outbound hook (a Byzantine auditor tampers with it). The auditor's own checks of the
  activations it is sent are not run (they only add evidence about the penultimate peer).
- **Averaging**: every replica accumulates its own gradients (moved out of the shared module after each backward);
  at a step the stage's weights get the replicas' contributions combined by ``swarm.averaging.SliceJudge``
  per part of each aggregator's slice (``averaging=None``: hivemind's mean weighted by claimed batch sizes), with
  averaging attackers (``avg-*``) tampering through ``AveragingAdversary`` and re-checks of aggregators at
  ``verify_rate``. No signatures, no transport; one weight copy, so a lie caught by any replica is left out for all.
- **Byzantine receivers** run the same checks as honest ones (their verdicts drop micro-batches like anyone's);
  what they publish is their true ledger, or with ``slander`` their ledger plus accusations against honest
  peers (and with ``collude``, fake vouching for each other's work).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from hivemind.utils.crypto import RSAPrivateKey

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from peers.adversary import AVERAGING_ATTACKS, Adversary, AttackConfig, AveragingAdversary  # noqa: E402
from swarm.audit import AUDIT, AuditConfig, pick_auditors  # noqa: E402
from swarm.averaging import (  # noqa: E402
    AGGREGATE,
    AVERAGING,
    AveragingConfig,
    DirectionTest,
    SliceJudge,
    update_reference,
)
from swarm.config import DataConfig, ModelConfig  # noqa: E402
from swarm.data import MicroBatchStream, load_token_blocks  # noqa: E402
from swarm.evidence import (  # noqa: E402
    FALSE_ACCUSATION,
    PROOF,
    TOKENS,
    WITHHELD,
    Accusation,
    ProofBook,
    StageAuditConfig,
    TensorClaim,
    audit_seed,
    check_accusation,
    check_received,
    draw_auditor,
    recompute,
    relative_error,
    reverify,
)
from swarm.gate import Gate  # noqa: E402
from swarm.identity import peer_id_of  # noqa: E402
from swarm.model import StageModule, causal_lm_loss  # noqa: E402
from swarm.optimizer import clip_microbatch  # noqa: E402
from swarm.records import ReputationReport  # noqa: E402
from swarm.reputation import ReputationConfig, ReputationLedger, aggregate  # noqa: E402
from swarm.router import NoRouteError, Router, RouterConfig  # noqa: E402
from swarm.sentinel import BACKWARD, FORWARD, SentinelConfig, SentinelMonitor  # noqa: E402

TRAINER = "trainer"
_PRETRAINED: Dict[
    tuple, list
] = {}  # pretrained (module, optimizer) states per setup, shared by runs in a process


@dataclass
class Byzantine:
    """One Byzantine stage peer: ``attack`` (None: honest traffic) through peers/adversary.py, and optionally slander
    in its published reports."""

    stage: int
    replica: int
    attack: Optional[str] = "scale"
    magnitude: float = float("nan")
    direction: str = "both"
    probability: float = 1.0
    start_step: int = 0
    slander: bool = False  # accuse the slander targets in every report it publishes
    collude: bool = False  # ... and vouch for the other colluding Byzantine peers' (fake) work
    # colluding Byzantine peers also cover each other: as receivers they accept a friend's tensors unchecked and
    # withhold the evidence an audit asks for, as auditors they clear a friend, as verifiers they refute an
    # accusation against one (and, with slander, confirm one against the slander targets)
    # > 0: the attack grows to its magnitude over this many tampered messages (AttackConfig.ramp)
    ramp: int = 0


@dataclass
class Sybils:
    """``count`` extra identities that serve nothing and only publish reports accusing ``target``.

    ``join_s``: simulated time they first appear (first_seen); ``vouch``: they vouch for each other's work. They
    announce a stage next to the target's (the worst case: an accusation from any other stage is ignored)."""

    count: int
    target: str
    join_s: float = 0.0
    vouch: bool = False
    strikes: int = 50


@dataclass(kw_only=True)
class SimConfig:
    stages: int = 2
    replicas: int = 3
    byzantine: List[Byzantine] = field(default_factory=list)
    sybils: Optional[Sybils] = None
    slander_targets: List[str] = field(
        default_factory=list
    )  # peers slandering Byzantines accuse (default: one)
    microbatches: int = 300
    microbatch_size: int = 2
    seq_len: int = 32
    microbatches_per_step: int = 8
    lr: float = 2e-3
    grad_clip: float = 1.0
    hidden_size: int = 192  # the tiny preset's
    num_layers: int = 0  # 0: max(4, stages) (the tiny preset has 4; 8 stages need 8 blocks)
    max_attempts: int = 5
    wait_for_peers_s: float = 120.0  # the trainer's default
    wait_step_s: float = 1.0  # the trainer re-reads the peers every min(1, refresh_peers_s) while it waits
    hop_s: float = 0.25  # the time the router measures per hop (same for every peer: runs are reproducible)
    seconds_per_microbatch: float = (
        1.0  # the simulated clock's advance per attempt (see the module docstring)
    )
    # the defaults of `swarm local` (peers/cli.py): probation 5 s / 10 clean exchanges, reports every 2 s
    reputation: ReputationConfig = field(
        default_factory=lambda: ReputationConfig(
            probation_s=5.0, probation_work=10, report_period_s=2.0, report_ttl_s=60.0
        )
    )
    # the defaults of `swarm serve` (threshold 12, warm-up 12 tensors, 10 optimizer steps of hard checks only)
    sentinel: SentinelConfig = field(
        default_factory=lambda: SentinelConfig(threshold=12.0, warmup=12, warmup_steps=10)
    )
    router_ban_base_s: float = 5.0
    # audits of the last stage's gradients (swarm/audit.py), the trainer's default; None: off
    audit: Optional[AuditConfig] = field(default_factory=AuditConfig)
    # recomputation audits of every stage, both directions, with signed tensors and accusations that carry their
    # evidence (swarm.evidence); None: off
    evidence: Optional[StageAuditConfig] = None
    seed: int = 0
    log_every: int = 0
    # micro-batches the model trains (plain pipeline, no checks, no peers) before the swarm starts: the swarm joins a
    # run past its first, fastest-drifting phase (the activations' RMS grows ~100x in the first few hundred steps)
    pretrain_microbatches: int = 0
    keep_reports: bool = False  # keep every round's published reports (for replaying aggregation offline)
    # how a stage's replicas combine their gradients (swarm.averaging); None: hivemind's plain weighted mean, and no
    # re-checks of aggregators (the "defences off" of averaging)
    averaging: Optional[AveragingConfig] = field(default_factory=AveragingConfig)
    part_floats: int = 1 << 17  # floats per part of a slice (hivemind's 512 KiB parts)

    def __post_init__(self) -> None:
        if self.stages < 1 or self.replicas < 1 or self.microbatches < 1:
            raise ValueError("stages, replicas and microbatches must be >= 1")
        for b in self.byzantine:
            if not (0 <= b.stage < self.stages and 0 <= b.replica < self.replicas):
                raise ValueError(
                    f"Byzantine peer ({b.stage}, {b.replica}) outside {self.stages}x{self.replicas}"
                )

    @property
    def dt(self) -> float:
        return self.seconds_per_microbatch


def peer_name(stage: int, replica: int) -> str:
    return f"s{stage}r{replica}"


@dataclass
class Peer:
    name: str
    stage: int
    sentinel: SentinelMonitor
    ledger: ReputationLedger = field(default_factory=ReputationLedger)
    adversary: Optional[Adversary] = None
    averaging: Optional[AveragingAdversary] = None  # an averaging attack (peers/adversary.py, avg-*)
    spec: Optional[Byzantine] = None
    audit_thresholds: Tuple[float, float] = (0.5, 1.4)  # min cosine, max norm ratio (swarm.audit.AuditConfig)

    @property
    def gate(self) -> Gate:
        """The stage server's gate (swarm.gate) over this peer's current sentinel and ledger (an experiment may swap
        the sentinel, e.g. for one that accepts everything)."""
        return Gate(self.sentinel, self.ledger, *self.audit_thresholds)


@dataclass
class Tensors:
    """Counts of checked tensors."""

    tampered: int = 0
    tampered_caught: int = 0
    honest: int = 0
    honest_rejected: int = 0
    caught_by: Counter = field(default_factory=Counter)
    fp_by: Counter = field(default_factory=Counter)


class SwarmSim:
    def __init__(self, cfg: SimConfig):
        self.cfg = cfg
        # one compute thread: on a shared 2-core machine, torch's thread pool makes these tiny ops 10x slower
        torch.set_num_threads(1)
        torch.manual_seed(cfg.seed)
        num_layers = cfg.num_layers or max(4, cfg.stages)
        self.model_cfg = ModelConfig(hidden_size=cfg.hidden_size, num_layers=num_layers, seed=cfg.seed)
        blocks = load_token_blocks(
            DataConfig(seq_len=cfg.seq_len, microbatch_size=cfg.microbatch_size, seed=cfg.seed)
        )
        self.stream = MicroBatchStream(blocks, cfg.microbatch_size, seed=cfg.seed)
        self.modules = [StageModule(self.model_cfg, s, cfg.stages) for s in range(cfg.stages)]
        for m in self.modules:
            m.train()
        self.optimizers = [
            torch.optim.AdamW(m.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
            for m in self.modules
        ]
        self.accumulated = [0] * cfg.stages
        self.epoch = 0
        self.clock = 0.0
        byz = {(b.stage, b.replica): b for b in cfg.byzantine}
        self.peers: Dict[str, Peer] = {}
        for s in range(cfg.stages):
            for r in range(cfg.replicas):
                name = peer_name(s, r)
                sent_cfg = SentinelConfig(**{**cfg.sentinel.__dict__, "seed": cfg.seed * 1000 + s * 100 + r})
                peer = Peer(name, s, SentinelMonitor(sent_cfg))
                audit_cfg = cfg.audit or AuditConfig()
                peer.audit_thresholds = (audit_cfg.min_cosine, audit_cfg.max_norm_ratio)
                spec = byz.get((s, r))
                if spec is not None:
                    peer.spec = spec
                    if spec.attack in AVERAGING_ATTACKS:
                        peer.averaging = AveragingAdversary(
                            AttackConfig(
                                name=spec.attack,
                                magnitude=spec.magnitude,
                                probability=spec.probability,
                                start_step=spec.start_step,
                                seed=cfg.seed * 7919 + s * 131 + r,
                            )
                        )
                    elif spec.attack is not None:
                        peer.adversary = Adversary(
                            AttackConfig(
                                name=spec.attack,
                                direction=spec.direction,
                                magnitude=spec.magnitude,
                                probability=spec.probability,
                                start_step=spec.start_step,
                                seed=cfg.seed * 7919 + s * 131 + r,
                                ramp=spec.ramp,
                            )
                        )
                self.peers[name] = peer
        self.byzantine = {p.name for p in self.peers.values() if p.spec is not None}
        self.attackers = {
            p.name for p in self.peers.values() if p.adversary is not None or p.averaging is not None
        }
        # per replica: its accumulated flat gradient and micro-batch count since the last step (the replicas share one
        # weight copy, but each contributes its own gradients to its stage's averaging)
        self.replica_grads: Dict[str, torch.Tensor] = {}
        self.replica_counts: Counter = Counter()
        self.caught_aggregators: set = set()  # aggregators whose lie a re-check proved (not used again)
        self.caught_by: set = set()  # (checker, aggregator): that checker has its proof and stops checking it
        self.averaging_stats: Counter = Counter()
        self.averaging_rng = random.Random(cfg.seed * 31 + 17)
        self.direction_tests: Dict[str, DirectionTest] = {}  # each aggregator's, as in its averager process
        # each aggregator's direction reference: its own recent contributions (swarm.averaging.update_reference)
        self.references: Dict[str, Optional[List[torch.Tensor]]] = {}
        self.honest = [p for p in self.peers if p not in self.byzantine]
        targets = cfg.slander_targets or ([self.honest[0]] if self.honest else [])
        self.slander_targets = list(targets)
        self.blacklist: Dict[str, dict] = {}
        self.router = Router(
            cfg.stages,
            RouterConfig(seed=cfg.seed, ban_base_s=cfg.router_ban_base_s),
            is_blacklisted=lambda p: p in self.blacklist,
            clock=lambda: self.clock,
        )
        self.router.microbatch_size = cfg.microbatch_size
        self.router.update(
            {s: [_Info(peer_name(s, r)) for r in range(cfg.replicas)] for s in range(cfg.stages)}
        )
        # reputation state, as ReputationService keeps it
        self.reports: Dict[str, dict] = {}  # reporter -> published value (the DHT's {run}.reports)
        self.first_seen: Dict[str, float] = {}
        self.last_round = -math.inf
        self.rounds = 0
        self.aggregate = aggregate({}, {}, 0.0, cfg.reputation)
        # measurements
        self.tensors = Tensors()  # checked after the sentinel's warm-up steps (statistical verdicts on)
        self.tensors_warmup = Tensors()  # during them (hard checks and replay only)
        self.in_warmup = True
        self.first_tampered: Dict[str, Tuple[int, float]] = {}  # attacker -> (micro-batch index, clock)
        self.blacklisted_at: Dict[str, Tuple[int, float]] = {}  # peer -> first (micro-batch index, clock)
        self.ever_blacklisted: set = set()
        self.outcome: Dict[int, str] = {}
        self.retried = 0
        self.retry_reasons: Counter = Counter()
        self.drop_reasons: Counter = Counter()
        self.losses: List[float] = []
        self.agg_seconds: List[float] = []  # aggregate(...) alone
        self.round_seconds: List[float] = []  # validate every report (DHT read) + aggregate
        self.score_trace: List[Tuple[float, Dict[str, float]]] = []
        self.index = 0
        self.rejections: List[tuple] = []  # (micro-batch, receiver, sender, direction, tampered, reason)
        self.report_history: List[tuple] = []  # (now, {reporter: value}, first_seen) per round, if kept
        self.byzantine_receiver_rejections = 0
        self.audit_rng = random.Random(cfg.seed * 31 + 7)
        self.audits: Counter = Counter()  # "run", and outcomes "route", "audit", "inconclusive"
        self.waited_s = 0.0  # simulated seconds the trainer spent with no usable chain
        # recomputation audits (swarm.evidence): every peer's identity key, the proofs every peer has seen
        self.keys: Dict[str, RSAPrivateKey] = {}
        self.pid: Dict[str, str] = {}
        self.name_of: Dict[str, str] = {}
        if cfg.evidence is not None:
            for name in [TRAINER, *self.peers]:
                self.keys[name] = _identity(name)
                self.pid[name] = peer_id_of(self.keys[name].get_public_key().to_bytes())
                self.name_of[self.pid[name]] = name
        self.proofs = ProofBook()
        # with audits, a peer of a stage with 3+ replicas is blacklisted by proof (or by strikes no audit settles)
        self.reputation_cfg = (
            dataclasses.replace(cfg.reputation, proof_replicas=3)
            if cfg.evidence is not None
            else cfg.reputation
        )
        self.evidence_rng = random.Random(cfg.seed * 31 + 11)
        self.evidence_stats: Counter = Counter()
        # seconds to check + re-verify one accusation (signatures, recomputation)
        self.proof_s: List[float] = []
        # attacker -> micro-batch of the first accusation of a tampered tensor
        self.first_proof: Dict[str, int] = {}
        self._salt = b""  # the trainer's per attempt, revealed after the hops
        self.audited: Counter = Counter()  # sender -> hops audited (newcomers are audited on every hop)

    # ---- one micro-batch -------------------------------------------------------------------------------------
    def _outbound(
        self, peer: Peer, tensor: torch.Tensor, direction: str, meta: dict
    ) -> Tuple[torch.Tensor, bool]:
        """What the stage server's ``_outbound`` does: the hook (if any) on the detached tensor, sent as float32."""
        tensor = tensor.detach()
        tampered = False
        if peer.adversary is not None:
            before = peer.adversary.tampered
            tensor = peer.adversary(tensor, direction, meta)
            tampered = peer.adversary.tampered > before
            if tampered and peer.name not in self.first_tampered:
                self.first_tampered[peer.name] = (self.index, self.clock)
        return tensor.to(torch.float32), tampered

    def _count(self, verdict, tampered: bool, receiver: str = "") -> None:
        """Rates count the verdicts of honest receivers only (a Byzantine receiver's checks still drop micro-batches
        and feed its ledger, but it is no evidence of what the checks do)."""
        if not verdict.accepted:
            self.rejections.append(
                (self.index, receiver, verdict.sender, verdict.direction, tampered, verdict.reason)
            )
        if receiver in self.byzantine:
            self.byzantine_receiver_rejections += int(not verdict.accepted)
            return
        t = self.tensors_warmup if self.in_warmup else self.tensors
        if tampered:
            t.tampered += 1
            if not verdict.accepted:
                t.tampered_caught += 1
                t.caught_by[verdict.statistic or verdict.baseline] += 1
        else:
            t.honest += 1
            if not verdict.accepted:
                t.honest_rejected += 1
                t.fp_by[verdict.statistic or verdict.baseline] += 1

    def _chain(
        self,
        index: int,
        chain: List[str],
        ids: torch.Tensor,
        auditors: Sequence[str] = (),
        attempt: int = 0,
    ) -> Tuple[bool, float, str, Optional[Tuple[str, str]]]:
        """One attempt, as ``StageServer._chain`` runs it hop by hop: (ok, loss, reason, (blamed sender, judge)).
        ``auditors``: the last-stage replicas the trainer drew to audit this attempt (``swarm.audit``)."""
        cfg = self.cfg
        ev = cfg.evidence
        mbid = f"{index}.{attempt}"  # claims are per attempt
        # signed tensors (swarm.evidence): hop k's (claim, tensor) per direction; the trainer signs the token ids
        fwd: Dict[int, Tuple[TensorClaim, torch.Tensor]] = {}
        bwd: Dict[int, Tuple[TensorClaim, torch.Tensor]] = {}
        tokens = (self._sign(TRAINER, -1, TOKENS, mbid, ids, ()), ids) if ev is not None else None
        self._salt = self.evidence_rng.randbytes(16) if ev is not None else b""
        step = index // cfg.microbatches_per_step
        self.in_warmup = step < cfg.sentinel.warmup_steps
        data_key = f"{TRAINER}:{index}"  # retries of the same data share it, as the stage server's data key
        meta = {"mb": f"{index}", "step": step, "trainer": TRAINER, "sender_epoch": self.epoch}
        saved: List[Tuple[torch.Tensor, torch.Tensor]] = []  # (input, output) per stage
        x: torch.Tensor = ids
        tampered = False
        loss_t = None
        for k, name in enumerate(chain):
            peer = self.peers[name]
            if k > 0:
                sender = chain[k - 1]
                if sender in self.blacklist:
                    return False, math.nan, f"refused: sender {sender} is blacklisted", None
                covering = self._covers(name, sender)
                verdict = (
                    None
                    if covering
                    else peer.gate.activations(
                        x,
                        sender,
                        microbatch=data_key,
                        step=step,
                        epoch=self.epoch,
                        last_stage=k == len(chain) - 1,
                        defer_rejection=ev is not None and ev.on_suspicion,
                    )
                )
                if verdict is not None:
                    self._count(verdict, tampered, name)
                if ev is not None:
                    claim, sent = fwd[k - 1]
                    check_received(
                        claim, sent, sender=self.pid[sender], stage=k - 1, direction=FORWARD, microbatch=mbid
                    )
                    inputs = [fwd[k - 2] if k >= 2 else tokens]
                    refused = self._hop_audit(chain, k - 1, FORWARD, claim, sent, inputs, verdict, tampered)
                    if refused is not None:
                        return False, math.nan, refused, (sender, name)
                elif verdict is not None and not verdict.accepted:
                    refused = f"stage {k} rejected forward tensor: {verdict.statistic}"
                    return False, math.nan, refused, (sender, name)
                x_in = x.detach().float().requires_grad_(True)
            else:
                x_in = x
            with torch.enable_grad():
                out = self.modules[k](x_in)
            saved.append((x_in, out))
            if k == len(chain) - 1:
                with torch.enable_grad():
                    loss_t = causal_lm_loss(out, ids)
                if k > 0:
                    verdict = peer.gate.loss(
                        float(loss_t.detach()),
                        chain[k - 1],
                        microbatch=data_key,
                        step=step,
                        epoch=self.epoch,
                        activations=x,
                        tokens=ids,
                        attributable=k == 1,
                    )
                    if not verdict.accepted:
                        # the activation passed the statistics but its loss did not: count it once, as rejected
                        if name not in self.byzantine:
                            self._recount_rejection(tampered, "loss")
                        self.rejections.append((index, name, chain[k - 1], "loss", tampered, verdict.reason))
                        return (
                            False,
                            math.nan,
                            f"stage {k} rejected forward tensor: loss",
                            (chain[k - 1], name),
                        )
            else:
                x, tampered = self._outbound(peer, out, FORWARD, meta)
                if ev is not None:
                    source = fwd[k - 1] if k >= 1 else tokens
                    fwd[k] = (self._sign(name, k, FORWARD, mbid, x, [source[0].digest]), x)
        # backward: the last stage first, then each receiver checks the gradient against what it sent
        loss_t.backward()
        self.accumulated[len(chain) - 1] += 1
        self._collect(len(chain) - 1, chain[-1])
        if len(chain) == 1:
            return True, float(loss_t.detach()), "", None
        last = len(chain) - 1
        grad, tampered = self._outbound(self.peers[chain[-1]], saved[-1][0].grad, BACKWARD, meta)
        if ev is not None:
            bwd[last] = (
                self._sign(
                    chain[-1], last, BACKWARD, mbid, grad, [fwd[last - 1][0].digest, tokens[0].digest]
                ),
                grad,
            )
        for k in range(len(chain) - 2, -1, -1):
            peer = self.peers[chain[k]]
            sender = chain[k + 1]
            out = saved[k][1]
            audited = bool(auditors) and k == len(chain) - 2
            covering = self._covers(peer.name, sender)
            verdict = (
                None
                if covering
                else peer.gate.gradient(
                    grad,
                    sender,
                    sent=out.detach(),
                    microbatch=data_key,
                    step=step,
                    epoch=self.epoch,
                    audited=audited,
                    defer_rejection=ev is not None and ev.on_suspicion,
                )
            )
            if verdict is not None:
                self._count(verdict, tampered, peer.name)
            if ev is not None:
                claim, sent = bwd[k + 1]
                check_received(
                    claim,
                    sent,
                    sender=self.pid[sender],
                    stage=k + 1,
                    direction=BACKWARD,
                    microbatch=mbid,
                    sent_inputs={0: fwd[k][0].digest},
                )
                inputs = [fwd[k], bwd[k + 2] if k + 2 <= last else tokens]
                refused = self._hop_audit(chain, k + 1, BACKWARD, claim, sent, inputs, verdict, tampered)
                if refused is not None:
                    return False, math.nan, refused, (sender, peer.name)
            elif verdict is not None and not verdict.accepted:
                refused = f"stage {k} rejected backward tensor: {verdict.statistic}"
                return False, math.nan, refused, (sender, peer.name)
            if audited:
                failure = self._audit(peer, sender, grad, tampered, auditors, saved[-1][0], ids, meta)
                if failure is not None:
                    return (False, math.nan, *failure)
            out.backward(grad)
            self.accumulated[k] += 1
            self._collect(k, peer.name)
            if k > 0:
                grad, tampered = self._outbound(peer, saved[k][0].grad, BACKWARD, meta)
                if ev is not None:
                    source = fwd[k - 1]
                    bwd[k] = (
                        self._sign(
                            peer.name, k, BACKWARD, mbid, grad, [source[0].digest, bwd[k + 1][0].digest]
                        ),
                        grad,
                    )
        return True, float(loss_t.detach()), "", None

    def _audit(
        self,
        peer: Peer,
        sender: str,
        grad: torch.Tensor,
        tampered: bool,
        auditors: Sequence[str],
        x_last: torch.Tensor,
        ids: torch.Tensor,
        meta: dict,
    ) -> Optional[Tuple[str, Optional[Tuple[str, str]]]]:
        """``StageServer._audit``: the auditors recompute the last stage's input gradient from the same activations
        (the shared weights: replicas hold the same ones) and send it through their own outbound hook; the
        penultimate peer judges. None if the route's gradient stands, else (reason, blame) for the attempt.
        Simplified: an auditor's own checks of the activations it is sent (forward and loss) are not run."""
        answers: List[Tuple[str, torch.Tensor]] = []
        outcome = None
        for auditor in auditors:
            x_in = x_last.detach().requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(causal_lm_loss(self.modules[-1](x_in), ids), x_in)
            g, _ = self._outbound(self.peers[auditor], g, BACKWARD, dict(meta, audit_only=True))
            answers.append((auditor, g))
            outcome = peer.gate.judge_audit(grad, answers)
            if not outcome.needs_tiebreak:
                break
        verdict = peer.gate.audit(sender, outcome, [auditor for auditor, _ in answers])
        self.audits["run"] += 1
        if not verdict.refused and verdict.kind != AUDIT:
            return None
        self.audits[verdict.kind] += 1
        if verdict.kind == AUDIT:
            return None
        if verdict.blame is not None:
            if peer.name not in self.byzantine:
                self._recount_rejection(tampered, "audit")
            self.rejections.append((self.index, peer.name, sender, BACKWARD, tampered, outcome.reason()))
            return f"stage {peer.stage} rejected backward tensor: audit", (sender, peer.name)
        return f"stage {peer.stage}: {outcome.reason()}", None

    # ---- recomputation audits (swarm.evidence) -------------------------------------------------------------------
    def _sign(
        self, name: str, stage: int, direction: str, mbid: str, tensor: torch.Tensor, inputs
    ) -> TensorClaim:
        return TensorClaim.create(
            self.keys[name],
            stage=stage,
            direction=direction,
            microbatch=mbid,
            epoch=self.epoch,
            tensor=tensor,
            inputs=inputs,
        )

    def _covers(self, peer: str, friend: str) -> bool:
        """Colluding Byzantine peers cover each other: as a receiver (unchecked, evidence withheld), an auditor
        (cleared) or a verifier (refuted)."""
        spec, other = self.peers[peer].spec, self.peers[friend].spec
        return spec is not None and spec.collude and other is not None and other.collude

    def _hop_audit(
        self,
        chain: List[str],
        k: int,
        direction: str,
        claim: TensorClaim,
        sent: torch.Tensor,
        inputs: List[Tuple[TensorClaim, torch.Tensor]],
        verdict,
        tampered: bool,
    ) -> Optional[str]:
        """A recomputation audit of hop (stage ``k``, ``direction``), as the receiver and the trainer run it: drawn at
        ``rate`` (``suspect_rate`` for a suspect sender; always when SENTINEL rejected the tensor and ``on_suspicion``).
        The auditor, drawn verifiably among stage ``k``'s other replicas, recomputes the hop at the claim's epoch;
        a mismatch becomes an :class:`~swarm.evidence.Accusation` that every other replica of stage ``k``
        re-checks. Returns why the attempt is refused, or None (it goes on)."""
        ev = self.cfg.evidence
        sender = chain[k]
        receiver_k = k + 1 if direction == FORWARD else k - 1
        receiver = chain[receiver_k]
        gate = self.peers[receiver].gate
        suspicious = verdict is not None and not verdict.accepted
        suspect = self.router.is_suspect(sender)
        on_path = suspicious or suspect
        rate = ev.rate_for(suspicious=suspicious, suspect=suspect, audited_before=self.audited[sender])
        if not (rate >= 1.0 or self.evidence_rng.random() < rate):
            if suspicious:  # no audit (on_suspicion off): SENTINEL's verdict, as without audits
                gate.settle(verdict, None)
                return f"stage {receiver_k} rejected {direction} tensor: {verdict.statistic}"
            return None
        self.evidence_stats["audits"] += 1
        self.audited[sender] += 1
        neighbours = {chain[j] for j in (k - 1, k + 1) if 0 <= j < len(chain)}
        auditor = draw_auditor(self.router.usable(k), {sender} | neighbours, audit_seed(self._salt, claim))
        refusal = f"stage {receiver_k} rejected {direction} tensor"
        if self._covers(
            receiver, sender
        ):  # the receiver withholds the signed tensor: the auditor has nothing
            self.evidence_stats["withheld"] += 1
            if auditor is not None:
                self.peers[auditor].ledger.record(receiver, False, direction, WITHHELD)
            self.router.report_failure(receiver, "withheld evidence for an audit")
            return None
        if auditor is None:
            self.evidence_stats["no_auditor"] += 1
            if suspicious:
                gate.settle(verdict, None)
                return f"{refusal}: {verdict.statistic}"
            return None
        acc = Accusation(accuser=self.pid[auditor], claim=claim, sent=sent, inputs=list(inputs))
        x_in, grad_out, toks = acc.tensors()
        out, grad = recompute(self.modules[k], direction, x_in, grad_out, toks)
        err = relative_error(sent, out if direction == FORWARD else grad)
        mismatch = err > ev.tolerance.of(direction)
        if self._covers(auditor, sender):
            mismatch = False  # a colluding auditor clears its friend
        elif self._slanders(auditor, sender):
            mismatch = True  # ... and accuses its slander targets
        if not mismatch:
            self.evidence_stats["cleared"] += 1
            if suspicious:
                self.evidence_stats["false_alarms"] += 1
                gate.settle(verdict, False)
            return None
        acc.error = err
        started = time.perf_counter()
        check_accusation(acc, self.cfg.stages)  # every claim here is real: it passes, and costs what it costs
        self.proofs.accuse(acc)
        self.evidence_stats["accusations"] += 1
        finding = None
        for v in self.router.usable(k):
            if v in (sender, auditor):
                continue
            if self._covers(v, sender):
                confirmed = False
            elif self._slanders(v, sender):
                confirmed = True
            else:
                finding = finding or reverify(acc, self.modules[k], ev.tolerance)
                confirmed = finding.confirmed
            self.proofs.find(acc.key, self.pid[v], confirmed)
            if not confirmed:
                self.peers[v].ledger.record(auditor, False, "audit", FALSE_ACCUSATION)
        self.proof_s.append(time.perf_counter() - started)
        proven = self.pid[sender] in self.proofs.proven()
        self.evidence_stats["proven" if proven else "unproven"] += 1
        if tampered:
            self.first_proof.setdefault(sender, self.index)
        if not on_path:
            return None
        if proven:
            if suspicious:
                gate.settle(verdict, True, PROOF)
            else:
                gate.ledger.record(sender, False, direction, PROOF)
            if receiver not in self.byzantine and not suspicious:
                self._recount_rejection(tampered, PROOF)
            return f"{refusal}: {PROOF}"
        if suspicious:
            # refuted: a false alarm after all; undecided (nobody independent): SENTINEL's verdict stands
            refuted = finding is not None and not finding.confirmed
            gate.settle(verdict, False if refuted else None)
            return None if refuted else f"{refusal}: {verdict.statistic}"
        return None

    def _slanders(self, peer: str, target: str) -> bool:
        spec = self.peers[peer].spec
        return spec is not None and spec.slander and target in self.slander_targets

    def _proven(self) -> Dict[str, dict]:
        """The proofs as the aggregate takes them: findings of weighted replicas only, by peer name."""
        weighted = {self.pid[n] for n, w in self.aggregate.weights.items() if w > 0 and n in self.pid}
        return {self.name_of[p]: e for p, e in self.proofs.proven(weighted).items()}

    def _recount_rejection(self, tampered: bool, statistic: str) -> None:
        """The statistics counted this tensor as accepted; a later check (``loss``, ``audit``) rejected it after all."""
        t = self.tensors_warmup if self.in_warmup else self.tensors
        if tampered:
            t.tampered_caught += 1
            t.caught_by[statistic] += 1
        else:
            t.honest_rejected += 1
            t.fp_by[statistic] += 1

    def _collect(self, stage: int, name: str) -> None:
        """Move the shared module's fresh gradients into replica ``name``'s own accumulator."""
        params = list(self.modules[stage].parameters())
        clip_microbatch(params, self.cfg.grad_clip)  # as StageOptimizer.step: each micro-batch on its own
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
        )
        if name in self.replica_grads:
            self.replica_grads[name] += flat
        else:
            self.replica_grads[name] = flat.clone()
        self.replica_counts[name] += 1
        for p in params:
            p.grad = None

    def _average(self, stage: int) -> Optional[torch.Tensor]:
        """The stage's averaging round (swarm.averaging's code on the replicas' contributions): each replica's mean
        gradient, tampered by averaging attackers, combined per part of each aggregator's slice; outliers and
        re-checks become ledger entries of the aggregator / re-checker, as the stage server records them."""
        names = [peer_name(stage, r) for r in range(self.cfg.replicas)]
        names = [n for n in names if self.replica_counts[n] > 0 and n not in self.blacklist]
        if not names:
            return None
        contributions, weights = [], []
        for n in names:
            g = self.replica_grads[n] / self.replica_counts[n]
            weight = float(self.replica_counts[n])
            attacker = self.peers[n].averaging
            if attacker is not None:  # it sees its gradient as the averager does: one tensor per parameter
                self.first_tampered.setdefault(n, (self.index, self.clock))
                sizes = [p.numel() for p in self.modules[stage].parameters()]
                g = torch.cat([t.reshape(-1) for t in attacker.contribution(list(g.split(sizes)))])
                weight = attacker.weight(weight)
            contributions.append(g)
            weights.append(weight)
        cfg = self.cfg.averaging
        size = contributions[0].numel()
        bounds = [round(i * size / len(names)) for i in range(len(names) + 1)]
        if (
            cfg is None
        ):  # hivemind: a mean weighted by the claimed batch sizes; each aggregator returns its slice's
            w = torch.tensor(weights)
            out = (torch.stack(contributions) * (w / w.sum())[:, None]).sum(0)
            for a, aggregator in enumerate(names):
                liar = self.peers[aggregator].averaging
                if liar is not None:
                    out[bounds[a] : bounds[a + 1]] = liar.aggregate(out[bounds[a] : bounds[a + 1]].clone())
            return out
        out = torch.empty(size)
        # an honest replica's claim is at most the micro-batches of one step (the simulator's unit of weight)
        max_weight = 2.0 * (self.cfg.microbatches_per_step + 1)
        for a, aggregator in enumerate(
            names
        ):  # aggregator a combines slice a, part by part (swarm.averaging)
            lo, hi = bounds[a], bounds[a + 1]
            sent = []  # what each sender sends this aggregator (an equivocating attacker: its own choice per aggregator)
            for n, c in zip(names, contributions):
                liar = self.peers[n].averaging
                sent.append(
                    liar.part(aggregator, c[lo:hi].clone())
                    if liar is not None and n != aggregator
                    else c[lo:hi]
                )
            judge = SliceJudge(len(names), cfg, own_index=a, max_weight=max_weight)
            for i, weight in enumerate(weights):
                judge.claim(i, weight)
            honest_result = torch.empty(hi - lo)
            ref = self.references[aggregator] = update_reference(
                self.references.get(aggregator), [contributions[a]], cfg.direction_momentum
            )
            for start in range(0, hi - lo, self.cfg.part_floats):
                end = min(hi - lo, start + self.cfg.part_floats)
                reference = None if ref is None else ref[0][lo + start : lo + end]
                outcome = judge.combine(range(len(names)), [c[start:end] for c in sent], reference=reference)
                honest_result[start:end] = outcome.result
            far = judge.outliers()
            test = self.direction_tests.setdefault(aggregator, DirectionTest(cfg))
            for i, (cosine, ref_cosine) in enumerate(zip(judge.cosines(), judge.reference_cosines())):
                if names[i] != aggregator and test.observe(names[i], cosine, ref_cosine):
                    far[i] = True
            result = honest_result
            liar = self.peers[aggregator].averaging
            if liar is not None:
                result = liar.aggregate(honest_result.clone())
            lied = not torch.equal(result, honest_result)
            # one weight copy per stage: once any honest replica caught the liar, its slice is aggregated honestly
            # (the real replicas leave it out of their groups)
            out[lo:hi] = result if aggregator not in self.caught_aggregators else honest_result
            if aggregator not in self.byzantine:  # an honest aggregator's ledger: outliers are strikes
                for i, n in enumerate(names):
                    if n != aggregator:
                        self.peers[aggregator].ledger.record(n, not far[i], AVERAGING, AVERAGING)
                        if far[i]:
                            self.averaging_stats[
                                "flagged_byzantine" if n in self.byzantine else "flagged_honest"
                            ] += 1
            for (
                checker
            ) in names:  # re-checks: each other replica checks this aggregator with verify_rate/(R-1)
                if (
                    checker == aggregator
                    or checker in self.byzantine
                    or (checker, aggregator) in self.caught_by
                ):
                    continue
                if self.averaging_rng.random() < cfg.verify_rate / max(1, len(names) - 1):
                    self.averaging_stats["rechecks"] += 1
                    for _ in range(
                        self.cfg.reputation.min_strikes if lied else 1
                    ):  # a proof weighs min_strikes
                        self.peers[checker].ledger.record(aggregator, not lied, AVERAGING, AGGREGATE)
                    if lied:
                        self.averaging_stats["caught"] += 1
                        self.caught_aggregators.add(aggregator)
                        self.caught_by.add((checker, aggregator))
        return out

    def _optimizer_step(self) -> None:
        for k, (module, opt) in enumerate(zip(self.modules, self.optimizers)):
            n = self.accumulated[k]
            if n:
                averaged = self._average(k)
                if averaged is not None:
                    offset = 0
                    for p in module.parameters():
                        p.grad = averaged[offset : offset + p.numel()].reshape(p.shape).clone()
                        offset += p.numel()
                opt.step()
            opt.zero_grad(set_to_none=True)
            self.accumulated[k] = 0
        self.replica_grads.clear()
        self.replica_counts.clear()
        self.epoch += 1

    def _pick_chain(self) -> List[str]:
        """Like ``Trainer._pick_chain``: while no chain is usable (every peer of a stage banned locally or
        blacklisted), wait (the simulated clock runs) up to ``wait_for_peers_s``, then give up."""
        waited = 0.0
        while True:
            self._maybe_reputation_round()
            try:
                return self.router.pick_chain()
            except NoRouteError:
                if waited >= self.cfg.wait_for_peers_s:
                    raise
                self.clock += self.cfg.wait_step_s
                waited += self.cfg.wait_step_s
                self.waited_s += self.cfg.wait_step_s

    def run_microbatch(self, index: int) -> None:
        """Like ``Trainer.run_microbatch``: retry on another chain after a failure, up to ``max_attempts``."""
        self.index = index
        ids = self.stream.microbatch(index)
        reason = ""
        for attempt in range(self.cfg.max_attempts):
            try:
                chain = self._pick_chain()
            except NoRouteError as e:
                self._end(index, "dropped", str(e))
                return
            auditors = (
                []
                if self.cfg.audit is None or self.cfg.stages < 2
                else pick_auditors(
                    self.router.usable(self.cfg.stages - 1),
                    chain[-1],
                    self.router.is_suspect(chain[-1]),
                    self.cfg.audit,
                    self.audit_rng,
                )
            )
            try:
                ok, loss, reason, blame = self._chain(index, chain, ids, auditors, attempt)
            finally:
                self.router.release(chain)
            self.clock += self.cfg.dt
            if ok:
                # every peer takes the same simulated hop time (no wall-clock noise: runs are reproducible)
                self.router.report_success(chain, {p: self.cfg.hop_s for p in chain})
                self.losses.append(loss)
                self._end(index, "completed")
                return
            if (
                blame is not None
            ):  # every blame here is a SENTINEL verdict (the stage server's ChainError.judge)
                self.router.report_failure(blame[0], reason, judge=blame[1])
            if attempt + 1 < self.cfg.max_attempts:
                self.retried += 1
                self.retry_reasons[reason.split(":")[0]] += 1
        self._end(index, "dropped", f"gave up after {self.cfg.max_attempts} attempts; last error: {reason}")

    def _end(self, index: int, outcome: str, reason: str = "") -> None:
        if index in self.outcome:
            raise RuntimeError(f"micro-batch {index} already ended as {self.outcome[index]}")
        self.outcome[index] = outcome
        if outcome == "dropped":
            self.drop_reasons[reason.split(";")[0][:80]] += 1

    # ---- reputation ------------------------------------------------------------------------------------------
    def _report_of(self, peer: Peer) -> ReputationReport:
        report = peer.ledger.to_report(peer.name, self.clock)
        spec = peer.spec
        if spec is not None and spec.slander:
            for target in self.slander_targets:
                report.entries[target] = {"clean": 0, "strikes": 50, "reasons": {"log_rms": 50}}
            if spec.collude:
                for other in self.byzantine:
                    if other != peer.name:
                        report.entries[other] = {"clean": 1000, "strikes": 0, "reasons": {}}
        return report

    def stages_of(self) -> Dict[str, tuple]:
        """What ``ReputationService`` reads from stage records: the stage each peer announced (Sybils: one next to
        their target's)."""
        stages = {name: (peer.stage,) for name, peer in self.peers.items()}
        sy = self.cfg.sybils
        if sy is not None and sy.target in self.peers:
            target = self.peers[sy.target].stage
            stages.update({f"sybil{i}": (target - 1 if target > 0 else target + 1,) for i in range(sy.count)})
        return stages

    def _maybe_reputation_round(self) -> None:
        if self.clock - self.last_round < self.cfg.reputation.report_period_s:
            return
        self.last_round = self.clock
        self.rounds += 1
        now = self.clock
        # every stage peer publishes (ReputationService.publish_report), honest or not
        for peer in self.peers.values():
            self.reports[peer.name] = self._report_of(peer).to_value()
        sy = self.cfg.sybils
        if sy is not None and now >= sy.join_s:
            names = [f"sybil{i}" for i in range(sy.count)]
            for name in names:
                entries = {sy.target: {"clean": 0, "strikes": sy.strikes, "reasons": {"log_rms": sy.strikes}}}
                if sy.vouch:
                    entries.update(
                        {o: {"clean": 1000, "strikes": 0, "reasons": {}} for o in names if o != name}
                    )
                self.reports[name] = ReputationReport(
                    reporter=name, issued_at=now, entries=entries
                ).to_value()
        # ReputationService.refresh: first_seen from stage records, then from reports; read and validate every
        # report; aggregate
        started = time.perf_counter()
        for name in self.peers:  # every stage peer announces itself (blacklisted ones too)
            self.first_seen.setdefault(name, now)
        reports: Dict[str, ReputationReport] = {}
        ttl = self.cfg.reputation.report_ttl_s
        for value in self.reports.values():
            report = ReputationReport.from_value(value)
            if now - report.issued_at > ttl:
                continue  # expired on the DHT
            self.first_seen.setdefault(report.reporter, now)
            if report.reporter in reports and reports[report.reporter].issued_at >= report.issued_at:
                continue
            reports[report.reporter] = report
        agg_started = time.perf_counter()
        self.aggregate = aggregate(
            reports,
            self.first_seen,
            now,
            self.reputation_cfg,
            reachable=set(reports),
            stages=self.stages_of(),
            proven=self._proven() if self.cfg.evidence is not None else None,
        )
        done = time.perf_counter()
        self.agg_seconds.append(done - agg_started)
        self.round_seconds.append(done - started)
        if self.cfg.keep_reports:
            self.report_history.append((now, dict(self.reports), dict(self.first_seen)))
        for peer in set(self.aggregate.blacklist) - set(self.blacklist):
            for other in self.peers.values():  # as the stage server's ReputationService.on_blacklisted does
                other.sentinel.forget(peer)
        self.blacklist = dict(self.aggregate.blacklist)
        for peer in self.blacklist:
            self.ever_blacklisted.add(peer)
            self.blacklisted_at.setdefault(peer, (self.index, now))
        watched = set(self.byzantine) | set(self.slander_targets) | ({sy.target} if sy else set())
        self.score_trace.append((now, {p: self.aggregate.score(p) for p in watched}))

    # ---- the run -----------------------------------------------------------------------------------------------
    def pretrain(self) -> None:
        """Train the stages for ``pretrain_microbatches`` before the swarm starts (cached per process and setup)."""
        if not self.cfg.pretrain_microbatches:
            return
        c = self.cfg
        key = (
            c.stages,
            self.model_cfg.num_layers,
            c.hidden_size,
            c.seed,
            c.pretrain_microbatches,
            c.microbatch_size,
            c.seq_len,
            c.lr,
            c.microbatches_per_step,
        )
        cached = _PRETRAINED.get(key)
        if cached is not None:
            for module, opt, (module_state, opt_state) in zip(self.modules, self.optimizers, cached):
                module.load_state_dict(module_state)
                # a private copy: the optimizer keeps the state tensors it is given (same device and dtype), and
                # its steps would otherwise update the cache in place for the next run in this process
                opt.load_state_dict(copy.deepcopy(opt_state))
            self.epoch = c.pretrain_microbatches // c.microbatches_per_step
            return
        for index in range(self.cfg.pretrain_microbatches):
            ids = self.stream.microbatch(index)
            x = ids
            for module in self.modules:
                x = module(x)
            causal_lm_loss(x, ids).backward()
            self.accumulated = [1] * self.cfg.stages
            if (index + 1) % self.cfg.microbatches_per_step == 0:
                self._optimizer_step()
        self.accumulated = [0] * self.cfg.stages
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        _PRETRAINED[key] = [
            (copy.deepcopy(m.state_dict()), copy.deepcopy(o.state_dict()))
            for m, o in zip(self.modules, self.optimizers)
        ]

    def run(self) -> dict:
        started = time.perf_counter()
        self.pretrain()
        offset = self.cfg.pretrain_microbatches
        for index in range(offset, offset + self.cfg.microbatches):
            self.run_microbatch(index)
            if (index + 1) % self.cfg.microbatches_per_step == 0:
                self._optimizer_step()
            if self.cfg.log_every and (index + 1 - offset) % self.cfg.log_every == 0:
                recent = self.losses[-self.cfg.log_every :]
                print(
                    f"  mb {index + 1}: loss {sum(recent) / max(len(recent), 1):.3f} blacklist "
                    f"{sorted(self.blacklist)} clock {self.clock:.1f}s",
                    flush=True,
                )
        self.last_round = -math.inf
        self._maybe_reputation_round()  # a last round, so the final verdicts reflect all the evidence
        return self.summary(time.perf_counter() - started)

    def summary(self, wall_s: float) -> dict:
        counts = Counter(self.outcome.values())
        assert counts["completed"] + counts["dropped"] == self.cfg.microbatches == len(self.outcome), (
            "exactly once"
        )
        t = self.tensors
        attackers = {}
        for name in sorted(self.attackers):
            first = self.first_tampered.get(name)
            caught = self.blacklisted_at.get(name)
            offset = self.cfg.pretrain_microbatches  # micro-batch numbers count from the swarm's start
            peer = self.peers[name]
            entry = dict(
                tampered=peer.adversary.tampered if peer.adversary else peer.averaging.rounds,
                first_tampered_mb=first[0] - offset if first else None,
                blacklisted_mb=caught[0] - offset if caught else None,
            )
            if first and caught:
                entry.update(
                    mb_to_blacklist=caught[0] - first[0], s_to_blacklist=round(caught[1] - first[1], 3)
                )
            else:
                entry.update(mb_to_blacklist=None, s_to_blacklist=None)
            entry["reason"] = self.aggregate.blacklist.get(name, {}).get("reason")
            proof = self.first_proof.get(name)
            entry["first_proof_mb"] = proof - offset if proof is not None else None
            attackers[name] = entry
        honest_blacklisted = sorted(p for p in self.ever_blacklisted if p not in self.byzantine)
        return dict(
            stages=self.cfg.stages,
            replicas=self.cfg.replicas,
            peers=len(self.peers),
            byzantine=len(self.byzantine),
            attackers=attackers,
            microbatches=dict(
                total=self.cfg.microbatches,
                completed=counts["completed"],
                dropped=counts["dropped"],
                retried=self.retried,
            ),
            drop_reasons=dict(self.drop_reasons.most_common(5)),
            retry_reasons=dict(self.retry_reasons.most_common(8)),
            tensors=dict(
                tampered=t.tampered,
                tampered_caught=t.tampered_caught,
                honest=t.honest,
                honest_rejected=t.honest_rejected,
                caught_by=dict(t.caught_by),
                fp_by=dict(t.fp_by),
            ),
            tensors_warmup=dict(
                tampered=self.tensors_warmup.tampered,
                tampered_caught=self.tensors_warmup.tampered_caught,
                honest=self.tensors_warmup.honest,
                honest_rejected=self.tensors_warmup.honest_rejected,
            ),
            byzantine_receiver_rejections=self.byzantine_receiver_rejections,
            audits=dict(self.audits),
            averaging=dict(self.averaging_stats, caught_aggregators=sorted(self.caught_aggregators)),
            evidence=dict(
                self.evidence_stats,
                proof_ms_mean=round(1000 * sum(self.proof_s) / max(len(self.proof_s), 1), 2),
            ),
            detection_rate=t.tampered_caught / t.tampered if t.tampered else None,
            false_positive_rate=t.honest_rejected / t.honest if t.honest else None,
            honest_blacklisted=honest_blacklisted,
            attackers_blacklisted=sum(1 for a in attackers.values() if a["blacklisted_mb"] is not None),
            final_blacklist=sorted(self.blacklist),
            scores={p: round(self.aggregate.score(p), 4) for p in sorted(self.peers)},
            rounds=self.rounds,
            aggregate_s_mean=sum(self.agg_seconds) / max(len(self.agg_seconds), 1),
            aggregate_s_max=max(self.agg_seconds, default=0.0),
            round_s_mean=sum(self.round_seconds) / max(len(self.round_seconds), 1),
            loss_first=sum(self.losses[:8]) / max(len(self.losses[:8]), 1),
            loss_last=sum(self.losses[-8:]) / max(len(self.losses[-8:]), 1),
            waited_s=round(self.waited_s, 3),
            clock_s=round(self.clock, 3),
            wall_s=round(wall_s, 2),
            seconds_per_microbatch=self.cfg.dt,
        )


@dataclass
class _Record:
    peer_id: str
    state: str = "online"
    throughput: float = 0.0


class _Info:
    """What ``Router.update`` reads from a DHT stage announcement."""

    def __init__(self, peer_id: str):
        self.peer_id = peer_id
        self.record = _Record(peer_id)


_KEYS: Dict[str, RSAPrivateKey] = {}


def _identity(name: str) -> RSAPrivateKey:
    """A peer's RSA identity key (hivemind's kind), one per name per process: generating 2048-bit keys for 176
    workers in every run would cost more than the run."""
    if name not in _KEYS:
        _KEYS[name] = RSAPrivateKey()
    return _KEYS[name]


def run_sim(cfg: SimConfig) -> dict:
    return SwarmSim(cfg).run()


def mixed_byzantine(
    stages: int, replicas: int, fraction: float, attacks: List[str], seed: int = 0, **kwargs
) -> List[Byzantine]:
    """``round(fraction x peers)`` Byzantine peers spread evenly over stages, attacks assigned round robin."""
    total = round(fraction * stages * replicas)
    rng = random.Random(seed)
    per_stage = [total // stages + (1 if s < total % stages else 0) for s in range(stages)]
    out = []
    i = 0
    for s in range(stages):
        for r in rng.sample(range(replicas), min(per_stage[s], replicas)):
            out.append(Byzantine(stage=s, replica=r, attack=attacks[i % len(attacks)], **kwargs))
            i += 1
    return out
