"""The optimizer of one stage peer: replicas of a stage average gradients and share state through hivemind.

All replicas of stage k run :class:`RobustOptimizer` (``hivemind.Optimizer`` with Byzantine-tolerant parts) with run
id ``{run}_stage{k}``: they accumulate a global batch of ``target_batch_size`` samples between them, average their
gradients (``swarm.averaging``: equal weights, CenteredClip inside hivemind's all-reduce, signed parts and
re-checks of aggregators) and step in lockstep; the stage's progress is believed on a quorum, and a peer that joins
late (or falls behind) downloads the parameters and optimizer state from a random replica and checks them against
the others before applying them (``swarm.replica_sync``).

Why the parameters are wrapped: a pipeline stage keeps the autograd graphs of its in-flight micro-batches
while their gradients travel back from later stages. An optimizer step that updates parameters in place
would bump their autograd version counters and make those pending backwards fail. The optimizer therefore
works on ``param.data`` aliases (same storage, separate version counter): an in-flight micro-batch whose
forward ran before a step has its gradient computed with the new weights, the usual one-step staleness of
asynchronous pipelines (PipeDream without weight stashing), and never an error.

The weights of the previous epoch are held (one copy, taken just before each update: :meth:`StageOptimizer.weights_at`)
so that an auditor can recompute what another replica sent with the weights that replica used, one step behind.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import hivemind
import torch
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.optim.state_averager import TrainingStateAverager

from swarm.averaging import (
    AveragingConfig,
    AveragingHooks,
    RobustAveraging,
    RobustGradientAverager,
    restore_sigint,
)
from swarm.inprocess import InProcessGradientAverager
from swarm.replica_sync import QuorumProgressTracker, StateCheck, VerifiedStateAverager

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class OptimizerConfig:
    """Hyper-parameters of a stage's optimizer and of the averaging between its replicas."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0  # max global grad norm of this stage's gradients, 0 disables
    target_batch_size: int = 64  # samples per optimizer step, summed over the stage's replicas
    microbatch_size: int = (
        0  # the swarm's samples per micro-batch (0: unknown; bounds a replica's claimed count)
    )
    matchmaking_time_s: float = 1.0  # how long replicas wait to form an averaging group
    averaging_timeout_s: float = 15.0
    load_state_timeout_s: float = 60.0
    averaging: bool = True  # False: a plain local optimizer (a single peer, or tests)
    robust: AveragingConfig = field(default_factory=AveragingConfig)  # how replicas combine (swarm.averaging)

    def __post_init__(self) -> None:
        if not (
            self.lr > 0
            and self.target_batch_size >= 1
            and self.matchmaking_time_s > 0
            and self.microbatch_size >= 0
        ):
            raise ValueError(
                "lr and target_batch_size must be positive, matchmaking_time_s > 0, microbatch_size >= 0"
            )


def clip_microbatch(params, max_norm: float) -> None:
    """Clip one micro-batch's gradients (in ``.grad``) to global norm ``max_norm`` (0: off) before they are
    accumulated: a bound on how far any single, possibly tampered, micro-batch can move the weights. The stage
    server and the simulator (``experiments/sim``) both clip here."""
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(list(params), max_norm)


class StageOptimizer:
    """Accumulates a stage's gradients micro-batch by micro-batch and steps with the stage's replicas."""

    def __init__(
        self,
        module: torch.nn.Module,
        cfg: OptimizerConfig,
        dht: Optional[hivemind.DHT],
        run_id: str,
        hooks: Optional[AveragingHooks] = None,
    ):
        self.module, self.cfg = module, cfg
        self.params: List[torch.nn.Parameter] = [p for p in module.parameters() if p.requires_grad]
        # aliases with their own version counters (see the module docstring)
        self.aliases: List[torch.Tensor] = [p.data.requires_grad_(True) for p in self.params]
        make_opt = partial(torch.optim.AdamW, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.samples_since_step = 0
        self.local_steps = 0
        self.last_step_at = (
            time.monotonic()
        )  # when step() last ran (a replica that gets no work cannot catch up in it)
        self._accumulators: Optional[List[torch.Tensor]] = None
        self.names: List[str] = [n for n, p in module.named_parameters() if p.requires_grad]
        self._held: Optional[Tuple[int, List[torch.Tensor]]] = (
            None  # (epoch, its weights) before the last update
        )
        if cfg.averaging and dht is not None:
            sigint = signal.getsignal(signal.SIGINT)
            self.opt = RobustOptimizer(
                averaging=cfg.robust,
                hooks=hooks,
                dht=dht,
                run_id=run_id,
                params=self.aliases,
                optimizer=make_opt,
                target_batch_size=cfg.target_batch_size,
                microbatch_size=cfg.microbatch_size,
                matchmaking_time=cfg.matchmaking_time_s,
                averaging_timeout=cfg.averaging_timeout_s,
                load_state_timeout=cfg.load_state_timeout_s,
                # matchmaking requests must time out before a round's matchmaking window closes
                averager_opts=dict(request_timeout=cfg.matchmaking_time_s / 2),
                tracker_opts=dict(min_refresh_period=0.2, max_refresh_period=1.0, default_refresh_period=0.5),
                verbose=False,
            )
            self.opt.before_update = self._hold
            # hivemind's averagers set SIGINT to "ignore" in the *calling* process before they fork (and leave it so):
            # Ctrl-C would no longer reach this program, nor any process it starts afterwards, which inherits the
            # setting (seen in the test suite: a `swarm status --watch` started after an optimizer ignored SIGINT)
            restore_sigint(sigint)
        else:
            self.opt = make_opt(self.aliases)

    @property
    def hivemind(self) -> bool:
        return isinstance(self.opt, hivemind.Optimizer)

    @property
    def epoch(self) -> int:
        """Optimizer steps taken (the stage's global epoch when averaging)."""
        return self.opt.local_epoch if self.hivemind else self.local_steps

    def _hold(self) -> None:
        """Keep a copy of the weights as they are, before an update (a step or a state download) replaces them."""
        epoch = self.epoch
        if (
            self._held is not None and self._held[0] == epoch
        ):  # a second update within one epoch: keep the first
            return
        with torch.no_grad():
            copies = [p.detach().clone() for p in self.params] if self._held is None else self._held[1]
            if self._held is not None:
                for copy, param in zip(copies, self.params):
                    copy.copy_(param.detach())
        self._held = (epoch, copies)

    def weights_at(self, epoch: int) -> Optional[Dict[str, torch.Tensor]]:
        """This replica's weights of ``epoch`` by parameter name: {} for the current epoch (the module's own), a held
        copy for the one before the last update, None for any other (call on the thread that steps)."""
        if epoch == self.epoch:
            return {}
        if self._held is not None and self._held[0] == epoch:
            return dict(zip(self.names, self._held[1]))
        return None

    @property
    def epochs_behind(self) -> int:
        """How many optimizer steps the stage's replicas have taken that this one has not (0 without averaging)."""
        return max(0, self.opt.tracker.global_epoch - self.opt.local_epoch) if self.hivemind else 0

    def should_catch_up(self, now: Optional[float] = None) -> bool:
        """Whether this replica missed its stage's steps and must download the state now, rather than at its next
        ``step`` (hivemind's own rule, which a replica the routers do not pick never reaches, and which otherwise
        comes after it has served forwards with stale weights).

        Two epochs behind: always (hivemind would discard this replica's gradients at its next step anyway). One
        behind: only after a whole averaging round's time without a step of its own, since one epoch is the normal
        lag of a replica whose partners just stepped and which joins them at its next micro-batch."""
        behind = self.epochs_behind
        idle_s = (time.monotonic() if now is None else now) - self.last_step_at
        return behind >= 2 or (
            behind == 1 and idle_s > self.cfg.matchmaking_time_s + self.cfg.averaging_timeout_s
        )

    def set_state_check(self, check: Optional[StateCheck]) -> None:
        """Who vouches for a downloaded state before it is applied (the stage server's quorum check)."""
        if self.hivemind:
            self.opt.state_averager.state_check = check

    def set_excluded(self, peers) -> None:
        """Blacklisted peers: their gradient contributions are left out, and they are never a state source."""
        if self.hivemind:
            peers = frozenset(peers)
            self.opt.state_averager.excluded_sources = tuple(peers)
            for averager in self._robust_averagers():
                averager.set_excluded(peers)

    def _robust_averagers(self) -> List[RobustAveraging]:
        if not self.hivemind:
            return []
        return [
            a for a in (self.opt.grad_averager, self.opt.state_averager) if isinstance(a, RobustAveraging)
        ]

    def drain_averaging_outcomes(self) -> List[Tuple[str, bool, str]]:
        """(peer, clean?, reason) for each contribution this replica aggregated and each aggregator it re-checked
        since the last call, in both rounds (reasons: ``averaging``, ``aggregate``, ``evidence``, ``state``)."""
        return [outcome for averager in self._robust_averagers() for outcome in averager.drain_outcomes()]

    def drain_refused_states(self) -> List[Tuple[str, str]]:
        """(source, reason) for each downloaded state this replica refused since the last call."""
        return self.opt.state_averager.drain_refused() if self.hivemind else []

    def load_state_from_peers(self) -> bool:
        """Download parameters and optimizer state from the stage's replicas; False if nobody answered."""
        if not self.hivemind:
            return False
        before = self.opt.local_epoch
        self.opt.load_state_from_peers()
        self.last_step_at = time.monotonic()
        logger.info(f"loaded stage state from peers: epoch {before} -> {self.opt.local_epoch}")
        return True

    def state_dict(self) -> Dict[str, Any]:
        """The torch optimizer's state (AdamW's moments and step counts), for a checkpoint."""
        opt = self.opt.state_averager.optimizer if self.hivemind else self.opt
        return opt.state_dict()

    def restore(
        self, params: Sequence[torch.Tensor], optimizer_state: Optional[Dict[str, Any]], epoch: int
    ) -> None:
        """Put a checkpoint's parameters (in ``self.params`` order), optimizer state and epoch in place. Call before
        the stage serves (no step may run meanwhile)."""
        self._held = None
        with torch.no_grad():
            for param, value in zip(self.params, params):
                param.copy_(value.to(device=param.device, dtype=param.dtype))
        opt = self.opt.state_averager.optimizer if self.hivemind else self.opt
        if optimizer_state is not None:
            opt.load_state_dict(optimizer_state)
        if self.hivemind:
            self.opt.state_averager.local_epoch = int(epoch)
            self.opt.tracker.report_local_progress(local_epoch=int(epoch), samples_accumulated=0)
            self.opt.state_averager.state_sharing_priority = int(epoch)
            if getattr(self.opt, "grad_averager", None) is not None:
                self.opt.grad_averager.reset_accumulated_grads_()
                self.opt.grad_averager.state_sharing_priority = int(epoch)
        else:
            self.local_steps = int(epoch)
            self._accumulators, self.samples_since_step = None, 0

    def step(self, batch_size: int) -> None:
        """Account one micro-batch whose gradients are in ``.grad``; steps when the global batch is complete.

        Each micro-batch's gradient is clipped on its own before it is accumulated, which also bounds how
        far any single (possibly tampered) micro-batch can move the weights.
        """
        self.last_step_at = time.monotonic()
        clip_microbatch(self.params, self.cfg.grad_clip)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if self.hivemind:
            for alias, grad in zip(self.aliases, grads):
                alias.grad = grad
            self.opt.step(batch_size=batch_size)
            for alias in self.aliases:
                alias.grad = None
        else:
            if self._accumulators is None:
                self._accumulators = [torch.zeros_like(g) for g in grads]
            for acc, grad in zip(self._accumulators, grads):
                acc.add_(grad, alpha=batch_size)
            self.samples_since_step += batch_size
            if self.samples_since_step >= self.cfg.target_batch_size:
                self._hold()
                for alias, acc in zip(self.aliases, self._accumulators):
                    alias.grad = acc.div_(self.samples_since_step)
                self.opt.step()
                for alias in self.aliases:
                    alias.grad = None
                self._accumulators = None
                self.local_steps += 1
                self.samples_since_step = 0
        for param in self.params:
            param.grad = None

    def shutdown(self) -> None:
        if self.hivemind:
            self.opt.shutdown()


class RobustOptimizer(hivemind.Optimizer):
    """``hivemind.Optimizer`` whose three parts are the ones above: robust gradient all-reduce, quorum progress and
    verified state downloads (``averaging.aggregator == "mean"`` keeps hivemind's weighted mean, for comparison)."""

    def __init__(
        self,
        *,
        averaging: AveragingConfig,
        hooks: Optional[AveragingHooks] = None,
        microbatch_size: int = 0,
        **kwargs,
    ):
        self.averaging, self.hooks = averaging, hooks or AveragingHooks()
        if averaging.aggregator != "mean":
            # an honest replica accumulates at most the stage's target batch (plus the micro-batch that crossed it)
            # between two steps; twice that is a claim no honest replica makes
            max_weight = 2.0 * (
                kwargs["target_batch_size"] + (microbatch_size or kwargs["target_batch_size"])
            )
            kwargs.setdefault(
                "grad_averager_factory",
                partial(RobustGradientAverager, averaging=averaging, hooks=self.hooks, max_weight=max_weight),
            )
        else:
            kwargs.setdefault("grad_averager_factory", InProcessGradientAverager)
        super().__init__(**kwargs)

    before_update: Optional[Callable[[], None]] = (
        None  # called before the weights change (StageOptimizer._hold)
    )

    def _update_global_epoch(self, grad_scaler) -> None:
        if self.before_update is not None:
            self.before_update()
        super()._update_global_epoch(grad_scaler)

    def load_state_from_peers(self, **kwargs):
        if self.before_update is not None:
            self.before_update()
        return super().load_state_from_peers(**kwargs)

    def _should_load_state_from_peers(self) -> bool:
        """Load the stage's state whenever the stage (its quorum epoch) is ahead of this replica.

        hivemind lets a replica whose partners have just stepped take "the same" step alone, with only the gradients
        it accumulated itself: the replicas then hold different parameters until a later state-averaging round
        levels them, and after a run's last step nothing does (measured in CI: stage replicas 2.6% apart by parameter
        checksum at the same epoch). The partners' step is the stage's step; this replica's few unaveraged
        micro-batches are dropped from the stage's gradient (their micro-batches still completed), as hivemind does
        for a replica two epochs behind."""
        self._should_check_synchronization_on_update = False
        return self.local_epoch < self.tracker.global_epoch

    def _maybe_schedule_gradient_averaging(self) -> None:
        """Pre-schedule a gradient round only when the stage has another replica to average with: hivemind schedules
        one before every step and, alone, cancels it at the step, after its matchmaking has polled the DHT for a
        group the whole time (with one replica per stage, the averagers' DHT lookups were the largest CPU cost of a
        stage's DHT process). A replica that appears is counted from its first progress record on."""
        if self.tracker.global_progress.num_peers > 1:
            super()._maybe_schedule_gradient_averaging()

    def _maybe_schedule_state_averaging(self) -> None:
        """As above, for the state rounds (hivemind only runs them when another replica is there)."""
        if self.tracker.global_progress.num_peers > 1:
            super()._maybe_schedule_state_averaging()

    def _make_state_averager(self, **kwargs) -> TrainingStateAverager:
        return VerifiedStateAverager(
            averaging=self.averaging,
            hooks=self.hooks,
            dht=self.dht,
            prefix=f"{self.run_id}_state_averager",
            min_matchmaking_time=self.matchmaking_time,
            allreduce_timeout=self.allreduce_timeout,
            shutdown_timeout=self.shutdown_timeout,
            offload_optimizer=self.offload_optimizer,
            custom_gradients=self.offload_optimizer,
            status_loglevel=self.status_loglevel,
            next_chunk_timeout=self.next_chunk_timeout,
            client_mode=self.client_mode,
            auxiliary=self.auxiliary,
            start=True,
            **kwargs,
        )

    def _make_progress_tracker(self, target_batch_size: int, **kwargs) -> ProgressTracker:
        return QuorumProgressTracker(
            dht=self.dht,
            prefix=self.run_id,
            target_batch_size=target_batch_size,
            client_mode=self.client_mode,
            status_loglevel=self.status_loglevel,
            progress_hook=self.hooks.progress,
            start=True,
            **kwargs,
        )
