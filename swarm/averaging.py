"""Byzantine-tolerant averaging of a stage's replicas, honest progress and verified state downloads (BTARD-style).

Built on hivemind's averaging machinery, not beside it: the replicas still meet through hivemind's matchmaking and
run its butterfly all-reduce (each peer aggregates one slice of the gradient vector for everyone), but

- :class:`RobustPartReducer` replaces hivemind's weighted mean inside the all-reduce: every part (a chunk of the
  slice this peer aggregates) is combined by :func:`robust_aggregate` once all senders' copies have arrived:
  **equal weights** (a claimed batch size is never taken on faith; only a claim of weight 0, "nothing to add",
  is honoured, since it can only lower the claimer's influence), each contribution's **norm bounded** by
  ``norm_bound`` x the lower median of the contributions' norms, then **CenteredClip** (start from the
  coordinate-wise median, clip every contribution's pull to radius ``tau``, iterate) with ``tau`` =
  ``clip_radius`` x the lower median distance of the contributions from that median. Both scales are taken
  from the contributions themselves, so they follow the honest majority, whatever the units of the gradients.
- A contribution that lies far outside the honest spread (``outlier_factor`` x ``tau`` from the aggregate, or
  ``outlier_factor`` x the norm bound) in at least ``outlier_share`` of the parts of a round is reported to the
  stage server as an ``averaging`` strike against its sender; every other sender of the round gets a clean
  exchange (so replicas vouch for each other's work, and a strike ratio means something).
- :class:`QuorumProgressTracker` reads hivemind's progress records with suspicion: the stage is "ahead" of this
  replica only when a strict majority of the other replicas say so (a lone peer's far-ahead epoch changes
  nothing), and no peer's claimed sample count counts for more than twice the median claim.
- :class:`VerifiedStateAverager` downloads parameters and optimizer state from a source picked **at random**
  among the stage's averagers (hivemind picks the one that declares the highest priority, which a liar sets
  to anything), and hands what it got to a ``state_check`` callback before applying it: the stage server
  compares a random sketch of the parameters (:func:`param_sketch`, with a seed the downloader picks, so it
  cannot be precomputed) with the same sketch computed by the other online replicas. Refused state is never
  applied; the source gets a ``state`` strike and the download is retried from another one.

What it tolerates (n replicas in an averaging group): up to floor((n-1)/2) Byzantine contributions per part;
their pull on the result is bounded by about ``tau`` each, whatever they send. With **2 replicas** no rule can
tell which of two contributions is the honest one: the coordinate-wise median of two is their mean, so
CenteredClip gives the mean of the two norm-bounded contributions. What remains is the norm bound: a contribution
scaled up (the x20 attack) counts as at most ``norm_bound`` times the other's norm, so one attacker can slow its
stage (a flipped contribution of equal norm cancels the honest one) but not blow it up; its partner reports it,
but one reporter is not enough for a swarm-wide verdict (``min_reporters``). A part's aggregator is trusted for
its part (see the README: verifying aggregators is not built yet).
"""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing as mp
import queue
import random
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import hivemind
import torch
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.averager import DecentralizedAverager
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer
from hivemind.compression import deserialize_torch_tensor
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.progress_tracker import GlobalTrainingProgress, LocalTrainingProgress, ProgressTracker
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.asyncio import aiter_with_timeout
from hivemind.utils.mpfuture import MPFuture
from hivemind.utils.streaming import combine_from_streaming
from hivemind.utils.timed_storage import ValueWithExpiration

logger = logging.getLogger(__name__)

AGGREGATORS = ("centered_clip", "mean")
AVERAGING, STATE = "averaging", "state"  # strike reasons


@dataclass(kw_only=True)
class AveragingConfig:
    """How a stage's replicas combine their gradients and check the state they download (see the module doc)."""

    aggregator: str = "centered_clip"  # "mean": hivemind's weighted mean (no defence; for comparison only)
    clip_radius: float = 1.0  # tau = clip_radius x lower median distance of the contributions from their median
    clip_iters: int = 20  # CenteredClip iterations per part (stops early once the aggregate moves < 1e-6 rel.)
    norm_bound: float = 2.0  # a contribution's norm is clipped to this x the lower median norm
    outlier_factor: float = 4.0  # a contribution this far outside the spread (x tau, or x the norm bound) is reported
    outlier_share: float = 0.25  # ... in at least this share of the round's parts
    state_tolerance: float = 0.25  # relative L2 distance (estimated by the sketch) a downloaded state may be off
    state_sketch_dims: int = 16
    state_sources: int = 3  # replicas a joiner tries before it gives up on a round of downloads

    def __post_init__(self) -> None:
        if self.aggregator not in AGGREGATORS:
            raise ValueError(f"averaging: aggregator must be one of {AGGREGATORS}")
        if not (self.clip_radius > 0 and 1 <= self.clip_iters <= 1000 and self.norm_bound >= 1
                and self.outlier_factor >= 1 and 0 < self.outlier_share <= 1):
            raise ValueError("averaging: need clip_radius > 0, 1 <= clip_iters <= 1000, norm_bound >= 1, "
                             "outlier_factor >= 1, outlier_share in (0, 1]")
        if not (self.state_tolerance > 0 and 1 <= self.state_sketch_dims <= 256 and self.state_sources >= 1):
            raise ValueError("averaging: need state_tolerance > 0, 1 <= state_sketch_dims <= 256, state_sources >= 1")

    @classmethod
    def from_dict(cls, settings: Any) -> "AveragingConfig":
        """From the swarm config record's ``extra["averaging"]`` (a peer's record is a claim: bad values -> defaults)."""
        if not isinstance(settings, dict):
            return cls()
        try:
            return cls(**settings)
        except (TypeError, ValueError):
            return cls()


# ---- aggregation (pure) ------------------------------------------------------------------------------------------
@dataclass
class PartOutcome:
    """One part's robust aggregate and, per sender, whether its contribution lay far outside the honest spread."""

    result: torch.Tensor
    outliers: List[bool]
    tau: float


def _lower_median(values: torch.Tensor) -> float:
    return float(values.sort().values[(values.numel() - 1) // 2]) if values.numel() else 0.0


def robust_aggregate(parts: Sequence[torch.Tensor], cfg: AveragingConfig) -> PartOutcome:
    """Equal-weight, norm-bounded CenteredClip of ``parts`` (one tensor per sender, same shape)."""
    x = torch.stack([p.detach().float().reshape(-1) for p in parts])
    n = x.shape[0]
    if cfg.aggregator == "mean" or n == 1:
        return PartOutcome(x.mean(0).reshape(parts[0].shape), [False] * n, 0.0)
    norms = x.norm(dim=1)
    bound = cfg.norm_bound * _lower_median(norms)
    too_big = norms > cfg.outlier_factor * bound
    scale = torch.where(norms > bound, bound / norms.clamp_min(1e-30), torch.ones_like(norms))
    x = x * scale[:, None]
    v = x.median(dim=0).values if n > 2 else x.mean(0)
    tau = cfg.clip_radius * _lower_median((x - v).norm(dim=1))
    if tau > 0:
        for _ in range(cfg.clip_iters):
            diff = x - v
            dist = diff.norm(dim=1)
            weights = torch.clamp(tau / dist.clamp_min(1e-30), max=1.0)
            step = (diff * weights[:, None]).mean(0)
            v = v + step
            if float(step.norm()) <= 1e-6 * max(float(v.norm()), 1e-30):
                break
    far = (x - v).norm(dim=1) > cfg.outlier_factor * tau if tau > 0 else torch.zeros(n, dtype=torch.bool)
    return PartOutcome(v.reshape(parts[0].shape), [bool(a or b) for a, b in zip(too_big, far)], tau)


# ---- inside hivemind's all-reduce --------------------------------------------------------------------------------
class RobustPartReducer(TensorPartReducer):
    """hivemind's part reducer, with every part combined by :func:`robust_aggregate` instead of a weighted mean.

    Keeps every sender's copy of the current part (hivemind keeps a running sum) and combines them once the last
    one has arrived; a sender that failed is left out of the parts it did not send, as in hivemind. The protocol
    on the wire is hivemind's, unchanged."""

    def __init__(self, part_shapes, num_senders: int, cfg: AveragingConfig,
                 aggregate_hook: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, excluded: Sequence[int] = ()):
        self.cfg, self.aggregate_hook, self.excluded = cfg, aggregate_hook, set(excluded)
        self.outlier_parts = [0] * num_senders  # parts in which each sender's contribution was an outlier
        self.parts_seen = [0] * num_senders
        self._contributions: Dict[int, torch.Tensor] = {}
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self):
        self._contributions = {}
        super().reset_accumulators()

    async def accumulate_part(self, sender_index: int, part_index: int, tensor_part: torch.Tensor,
                              weight: float = 1.0) -> torch.Tensor:
        """As hivemind's, but the part is kept (not summed) and the claimed weight is not believed: every sender
        weighs 1, except one that claims 0 (nothing to contribute), which can only lower its own pull."""
        assert 0 <= sender_index < self.num_senders, "invalid sender index"
        assert 0 <= part_index < self.num_parts, "invalid part index"
        self.num_parts_received[sender_index] += 1
        while part_index > self.current_part_index:
            await asyncio.wait({self.current_part_future, asyncio.create_task(self.finished.wait())},
                               return_when=asyncio.FIRST_COMPLETED)
            if self.finished.is_set():
                raise AllreduceException(f"attempted to aggregate part in a finalized {self.__class__.__name__}")
        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        current_part_future = self.current_part_future
        if part_index < self.sender_failed_after[sender_index]:
            if weight > 0 and sender_index not in self.excluded:
                self._contributions[sender_index] = tensor_part
            self.current_part_accumulated_from += 1
            self.check_current_part_finished()
        return await current_part_future

    def check_current_part_finished(self):
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from != self.num_current_senders:
            return
        senders = sorted(self._contributions)
        if senders:
            outcome = robust_aggregate([self._contributions[i] for i in senders], self.cfg)
            result = outcome.result
            for i, far in zip(senders, outcome.outliers):
                self.parts_seen[i] += 1
                self.outlier_parts[i] += int(far)
        else:
            result = torch.zeros(self.part_shapes[self.current_part_index])
        if self.aggregate_hook is not None:
            result = self.aggregate_hook(result)
        self.current_part_future.set_result(result)
        self.reset_accumulators()

    def outliers(self) -> List[bool]:
        """Per sender: whether it was an outlier in at least ``outlier_share`` of the parts it sent this round."""
        return [seen > 0 and far >= self.cfg.outlier_share * seen
                for far, seen in zip(self.outlier_parts, self.parts_seen)]


@dataclass
class AveragingHooks:
    """Where experiments plug averaging adversaries in (the library has no attack branches). Each is optional.

    ``contribution(tensors) -> tensors``: what this peer sends into its stage's gradient all-reduce;
    ``weight(claimed) -> claimed``: the weight it claims there; ``aggregate(part) -> part``: the result of each part
    it aggregates for the others; ``state(tensors) -> tensors``: the parameters and optimizer state it serves to
    joiners; ``progress(epoch) -> epoch``: the epoch it claims in its progress records. Contribution, weight and
    aggregate run in the averager's own process."""

    contribution: Optional[Callable[[Sequence[torch.Tensor]], Sequence[torch.Tensor]]] = None
    weight: Optional[Callable[[float], float]] = None
    aggregate: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    state: Optional[Callable[[Sequence[torch.Tensor]], Sequence[torch.Tensor]]] = None
    progress: Optional[Callable[[int], int]] = None


class RobustAllReduceRunner(AllReduceRunner):
    """hivemind's butterfly all-reduce with :class:`RobustPartReducer` for the parts this peer aggregates."""

    def __init__(self, *, averaging: AveragingConfig, aggregate_hook=None, excluded: Sequence[str] = (), **kwargs):
        super().__init__(**kwargs)
        self.tensor_part_reducer.finished.set()  # hivemind's own reducer, replaced before any use (no finalize noise)
        self.tensor_part_reducer = RobustPartReducer(
            tuple(part.shape for part in self.parts_for_local_averaging), len(self.sender_peer_ids), averaging,
            aggregate_hook=aggregate_hook,
            excluded=[i for i, peer in enumerate(self.sender_peer_ids) if str(peer) in set(excluded)])

    def sender_outcomes(self) -> List[Tuple[str, bool]]:
        """(sender, outlier?) for every sender whose contribution this peer aggregated this round (not itself)."""
        outliers = self.tensor_part_reducer.outliers()
        return [(str(peer), far) for peer, far, seen in zip(self.sender_peer_ids, outliers,
                                                             self.tensor_part_reducer.parts_seen)
                if seen > 0 and peer != self.peer_id]


class RobustGradientAverager(GradientAverager):
    """hivemind's gradient averager, all-reducing with :class:`RobustAllReduceRunner`.

    Runs in its own process (as every hivemind averager); what it learns about the other senders (outlier or
    clean, per round) goes to the stage server through :meth:`drain_outcomes`."""

    def __init__(self, *args, averaging: AveragingConfig, hooks: Optional[AveragingHooks] = None, **kwargs):
        self.averaging, self.hooks = averaging, hooks or AveragingHooks()
        self._outcomes: "mp.Queue" = mp.Queue()  # created before the averager forks, read by the host process
        self._excluded_updates: "mp.Queue" = mp.Queue()  # written by the host process (blacklisted peers)
        self._excluded: frozenset = frozenset()  # the averager process's copy; the host's last one sent
        super().__init__(*args, **kwargs)

    def set_excluded(self, peers) -> None:
        """Leave these peers' contributions out of every part this replica aggregates (host process)."""
        peers = frozenset(peers)
        if peers != self._excluded:
            self._excluded = peers
            self._excluded_updates.put(peers)

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id: Optional[bytes] = None, **kwargs):
        group_id = group_info.group_id if group_id is None else group_id
        while not self._excluded_updates.empty():
            try:
                self._excluded = self._excluded_updates.get_nowait()
            except queue.Empty:
                break
        if self.hooks.contribution is not None:
            for tensor, sent in zip(tensors, self.hooks.contribution(tensors)):
                tensor.copy_(sent)
        if self.hooks.weight is not None and kwargs.get("weight") is not None:
            kwargs["weight"] = float(self.hooks.weight(kwargs["weight"]))
        runner = RobustAllReduceRunner(
            averaging=self.averaging, aggregate_hook=self.hooks.aggregate, excluded=self._excluded, p2p=self._p2p, servicer_type=type(self),
            prefix=self.prefix, tensors=tensors, group_id=group_id, ordered_peer_ids=group_info.peer_ids, **kwargs)
        assert group_id in self._running_groups, f"Group id {group_id} was not registered in _register_allreduce_group"
        self._running_groups[group_id].set_result(runner)
        async for tensor, update in _azip(tensors, runner):
            tensor.add_(update, alpha=self._averaging_alpha)
            self.last_updated = get_dht_time()
            self._state_updated.set()
        for peer, far in runner.sender_outcomes():
            self._outcomes.put((peer, not far))

    def drain_outcomes(self) -> List[Tuple[str, bool]]:
        """(peer, clean?) for each sender aggregated since the last call (host process)."""
        out = []
        while True:
            try:
                out.append(self._outcomes.get_nowait())
            except queue.Empty:
                return out

    def load_state_from_peers(self, wait: bool = True, timeout: Optional[float] = None):
        """Nothing to download: accumulated gradients are reset after a replica loads the stage's state."""
        return None


async def _azip(tensors: Sequence[torch.Tensor], updates):
    it = iter(tensors)
    async for update in updates:
        yield next(it), update


# ---- honest progress -------------------------------------------------------------------------------------------
def quorum_epoch(local_epoch: int, others: Sequence[int]) -> int:
    """The stage's epoch as this replica may believe it: the highest epoch that a strict majority of the *other*
    replicas claim to have reached (never below its own). One liar among three cannot make the others skip."""
    if not others:
        return local_epoch
    ranked = sorted(others, reverse=True)
    return max(local_epoch, ranked[len(ranked) // 2])


class QuorumProgressTracker(ProgressTracker):
    """hivemind's progress tracker, believing a stage epoch only on a quorum and capping claimed sample counts."""

    def __init__(self, *args, progress_hook: Optional[Callable[[int], int]] = None, **kwargs):
        self.progress_hook = progress_hook
        super().__init__(*args, **kwargs)

    def _get_local_progress(self, local_epoch: int, samples_accumulated: int):
        if self.progress_hook is not None:
            local_epoch = self.progress_hook(local_epoch)
        return super()._get_local_progress(local_epoch, samples_accumulated)

    def _parse_swarm_progress_data(self, metadata) -> GlobalTrainingProgress:
        if not isinstance(metadata, dict) or not metadata:
            return super()._parse_swarm_progress_data(metadata)
        me = self.local_progress.peer_id
        entries: Dict[Any, LocalTrainingProgress] = {}
        for subkey, item in metadata.items():
            try:
                if item.value is not None:
                    entries[subkey] = LocalTrainingProgress.parse_obj(item.value)
            except Exception:  # a malformed record is no claim at all
                continue
        others = [e.epoch for e in entries.values() if e.peer_id != me and not e.client_mode]
        epoch = quorum_epoch(self.local_progress.epoch, others)
        at_epoch = sorted(e.samples_accumulated for e in entries.values() if e.epoch == epoch)
        cap = max(1, 2 * at_epoch[(len(at_epoch) - 1) // 2]) if at_epoch else 1
        kept = {}
        for subkey, item in metadata.items():
            entry = entries.get(subkey)
            if entry is None or entry.epoch > epoch:  # a claim to be ahead that no quorum backs: ignored
                continue
            if entry.peer_id != me and entry.samples_accumulated > cap:
                entry = entry.copy(update=dict(samples_accumulated=cap))
            kept[subkey] = ValueWithExpiration(entry.dict(), item.expiration_time)
        return super()._parse_swarm_progress_data(kept)


# ---- verified state downloads ------------------------------------------------------------------------------------
def param_sketch(tensors: Sequence[torch.Tensor], seed: int, dims: int) -> List[float]:
    """A random linear sketch of the concatenated tensors: ``dims`` projections on Gaussian vectors drawn from
    ``seed`` (scaled by 1/sqrt(dims)), so that ||sketch(a) - sketch(b)|| estimates ||a - b||. The seed is the
    asker's: a replica cannot answer for a state it does not hold."""
    gen = torch.Generator().manual_seed(int(seed) & (2**63 - 1))
    out = torch.zeros(dims, dtype=torch.float64)
    for tensor in tensors:
        flat = tensor.detach().reshape(-1).to("cpu", torch.float32)
        for start in range(0, flat.numel(), 1 << 20):
            chunk = flat[start:start + (1 << 20)]
            out += (torch.randn(dims, chunk.numel(), generator=gen) @ chunk).double()
    return (out / math.sqrt(dims)).tolist()


def sketch_distance(a: Sequence[float], b: Sequence[float]) -> float:
    """Relative distance ||a - b|| / ||b|| of two sketches (inf if they do not match in length or are not finite)."""
    ta, tb = torch.tensor(list(a), dtype=torch.float64), torch.tensor(list(b), dtype=torch.float64)
    if ta.shape != tb.shape or not (torch.isfinite(ta).all() and torch.isfinite(tb).all()):
        return float("inf")
    return float((ta - tb).norm() / tb.norm().clamp_min(1e-12))


def state_verdict(distances: Sequence[float], tolerance: float) -> Tuple[bool, str]:
    """Accept a downloaded state when at least one other replica matches it and no more disagree than agree.

    ``distances``: the sketch distance to each other replica that answered (at a comparable epoch). No answer at
    all: accepted, and said so (no quorum to check against)."""
    agree = sum(d <= tolerance for d in distances)
    disagree = len(distances) - agree
    if not distances:
        return True, "no other replica to check against (no quorum): accepted unverified"
    if agree >= 1 and agree >= disagree:
        return True, f"matches {agree} of {len(distances)} other replicas"
    return False, f"differs from {disagree} of {len(distances)} other replicas (relative distance " \
                  f"{min(distances):.3g} > {tolerance})"


# state_check(source, epoch, parameters) -> None to accept, or the reason to refuse
StateCheck = Callable[[str, int, Sequence[torch.Tensor]], Optional[str]]


class _VerifiedDownload(DecentralizedAverager):
    """The download half of :class:`VerifiedStateAverager` (sits below TrainingStateAverager in the MRO, so that
    hivemind's own code applies the state only once it passed)."""

    state_check: Optional[StateCheck] = None
    excluded_sources: Sequence[str] = ()  # blacklisted peers: never a source
    num_checked_tensors: int = 0
    max_sources: int = 3

    def load_state_from_peers(self, wait: bool = True, timeout: Optional[float] = None):
        excluded: List[str] = list(self.excluded_sources)
        for _ in range(self.max_sources):
            future = MPFuture()
            self._outer_pipe.send(("_load_state_from_random_peer", [],
                                   dict(timeout=timeout, exclude=list(excluded), future=future)))
            loaded = future.result(timeout=None if timeout is None else 2 * timeout + 5)
            if loaded is None:
                return None
            metadata, tensors, source = loaded
            epoch = metadata.get("epoch") if isinstance(metadata, dict) else None
            if not isinstance(epoch, int):
                reason = "its state carries no epoch"
            elif any(not torch.isfinite(t).all() for t in tensors if torch.is_tensor(t) and t.is_floating_point()):
                reason = "its state holds NaN or inf"
            else:
                reason = self.state_check(source, epoch, tensors[:self.num_checked_tensors]) \
                    if self.state_check is not None else None
            if reason is None:
                return metadata, tensors
            logger.warning(f"refused the state served by {source}: {reason}")
            self.refused_sources.append((source, reason))
            excluded.append(source)
        logger.warning(f"no acceptable state after {self.max_sources} sources; keeping this replica's own")
        return None

    async def _load_state_from_random_peer(self, future, timeout: Optional[float] = None, exclude=()):
        """Like hivemind's ``_load_state_from_peers``, but the source is drawn at random among the stage's
        averagers (their declared priority is a claim, so it is not used) and its peer id comes back too."""
        if timeout is None:
            timeout = self.next_chunk_timeout if self.next_chunk_timeout is not None else self.request_timeout
        try:
            key_manager = self._matchmaking.group_key_manager
            found, _ = self.dht.get(f"{key_manager.prefix}.all_averagers", latest=True) or ({}, None)
            candidates: List[PeerID] = []
            for peer_id, info in (found.items() if isinstance(found, dict) else ()):
                try:
                    peer = PeerID(peer_id) if isinstance(peer_id, bytes) else PeerID.from_base58(str(peer_id))
                except Exception:
                    continue
                if isinstance(info, ValueWithExpiration) and peer != self.peer_id and str(peer) not in exclude:
                    candidates.append(peer)
            random.shuffle(candidates)
            for peer in candidates:
                try:
                    stub = self.get_stub(self._p2p, peer, namespace=self.prefix)
                    stream = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
                    metadata, parts, tensors = None, [], []
                    async for message in aiter_with_timeout(stream, timeout=timeout):
                        if message.metadata:
                            metadata = self.serializer.loads(message.metadata)
                        if message.tensor_part.dtype and parts:
                            tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
                            parts = []
                        parts.append(message.tensor_part)
                    if parts:
                        tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
                    if metadata:
                        future.set_result((metadata, tensors, str(peer)))
                        return
                except Exception as e:
                    logger.info(f"state download from {peer} failed: {e!r}")
        finally:
            if not future.done():
                future.set_result(None)


class VerifiedStateAverager(TrainingStateAverager, _VerifiedDownload):
    """hivemind's training-state averager whose downloads come from a random replica and pass ``state_check``."""

    def __init__(self, *args, averaging: AveragingConfig, hooks: Optional[AveragingHooks] = None, **kwargs):
        self.hooks = hooks or AveragingHooks()
        self.refused_sources: List[Tuple[str, str]] = []
        self.max_sources = averaging.state_sources
        super().__init__(*args, **kwargs)
        self.num_checked_tensors = sum(len(g["params"]) for g in self.optimizer.param_groups)

    def get_current_state(self):
        metadata, tensors, infos = super().get_current_state()
        if self.hooks.state is not None:
            tensors = tuple(self.hooks.state(tensors))
        return metadata, tensors, infos

    def drain_refused(self) -> List[Tuple[str, str]]:
        out, self.refused_sources = self.refused_sources, []
        return out


class RobustOptimizer(hivemind.Optimizer):
    """``hivemind.Optimizer`` whose three parts are the ones above: robust gradient all-reduce, quorum progress and
    verified state downloads (``averaging.aggregator == "mean"`` keeps hivemind's weighted mean, for comparison)."""

    def __init__(self, *, averaging: AveragingConfig, hooks: Optional[AveragingHooks] = None, **kwargs):
        self.averaging, self.hooks = averaging, hooks or AveragingHooks()
        if averaging.aggregator != "mean":
            kwargs.setdefault("grad_averager_factory", partial(RobustGradientAverager, averaging=averaging,
                                                               hooks=self.hooks))
        super().__init__(**kwargs)

    def _make_state_averager(self, **kwargs) -> TrainingStateAverager:
        return VerifiedStateAverager(
            averaging=self.averaging, hooks=self.hooks, dht=self.dht, prefix=f"{self.run_id}_state_averager",
            min_matchmaking_time=self.matchmaking_time, allreduce_timeout=self.allreduce_timeout,
            shutdown_timeout=self.shutdown_timeout, offload_optimizer=self.offload_optimizer,
            custom_gradients=self.offload_optimizer, status_loglevel=self.status_loglevel,
            next_chunk_timeout=self.next_chunk_timeout, client_mode=self.client_mode, auxiliary=self.auxiliary,
            start=True, **kwargs)

    def _make_progress_tracker(self, target_batch_size: int, **kwargs) -> ProgressTracker:
        return QuorumProgressTracker(dht=self.dht, prefix=self.run_id, target_batch_size=target_batch_size,
                                     client_mode=self.client_mode, status_loglevel=self.status_loglevel,
                                     progress_hook=self.hooks.progress, start=True, **kwargs)
