"""How a stage replica keeps in step with the others without believing any one of them: the stage's progress by
quorum, and state downloads from a random replica checked against the others (see ``swarm.averaging`` for the
gradient all-reduce).

- :class:`QuorumProgressTracker` reads hivemind's progress records with suspicion: the stage is "ahead" of this
  replica only when a strict majority of the other replicas say so (a lone peer's far-ahead epoch changes
  nothing), and no peer's claimed sample count counts for more than twice the median claim.
- :class:`VerifiedStateAverager` downloads parameters and optimizer state from a source picked **at random**
  among the stage's averagers (hivemind picks the one that declares the highest priority, which a liar sets
  to anything), and hands what it got to a ``state_check`` callback before applying it: the stage server
  compares a random sketch of the parameters (:func:`param_sketch`, with a seed the downloader picks, so it
  cannot be precomputed) with the same sketch computed by the other online replicas (:func:`state_verdict`).
  Refused state is never applied; the source gets a ``state`` strike and the download is retried from another.
  What a sketch cannot see: a change smaller than ``state_tolerance`` (relative L2 distance), and the optimizer
  statistics, which are only checked to be finite.
"""

from __future__ import annotations

import logging
import math
import random
import time
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from hivemind.averaging.averager import DecentralizedAverager
from hivemind.compression import deserialize_torch_tensor
from hivemind.optim.progress_tracker import GlobalTrainingProgress, LocalTrainingProgress, ProgressTracker
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import aiter_with_timeout
from hivemind.utils.mpfuture import MPFuture
from hivemind.utils.streaming import combine_from_streaming
from hivemind.utils.timed_storage import ValueWithExpiration

from swarm.averaging import AveragingConfig, AveragingHooks, RobustAveraging

logger = logging.getLogger(__name__)

MAX_CONCURRENT_DOWNLOADS = 2  # state downloads a replica serves at once
DOWNLOAD_COOLDOWN_S = 10.0  # and how often one caller may have one


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
            chunk = flat[start : start + (1 << 20)]
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
    return (
        False,
        f"differs from {disagree} of {len(distances)} other replicas (relative distance "
        f"{min(distances):.3g} > {tolerance})",
    )


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
            self._outer_pipe.send(
                (
                    "_load_state_from_random_peer",
                    [],
                    dict(timeout=timeout, exclude=list(excluded), future=future),
                )
            )
            loaded = future.result(timeout=None if timeout is None else 2 * timeout + 5)
            if loaded is None:
                return None
            metadata, tensors, source = loaded
            epoch = metadata.get("epoch") if isinstance(metadata, dict) else None
            if not isinstance(epoch, int):
                reason = "its state carries no epoch"
            elif any(
                not torch.isfinite(t).all() for t in tensors if torch.is_tensor(t) and t.is_floating_point()
            ):
                reason = "its state holds NaN or inf"
            else:
                reason = (
                    self.state_check(source, epoch, tensors[: self.num_checked_tensors])
                    if self.state_check is not None
                    else None
                )
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
            for peer_id, info in found.items() if isinstance(found, dict) else ():
                try:
                    peer = PeerID(peer_id) if isinstance(peer_id, bytes) else PeerID.from_base58(str(peer_id))
                except Exception:
                    continue
                if (
                    isinstance(info, ValueWithExpiration)
                    and peer != self.peer_id
                    and str(peer) not in exclude
                ):
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


class VerifiedStateAverager(RobustAveraging, TrainingStateAverager, _VerifiedDownload):
    """hivemind's training-state averager whose downloads come from a random replica and pass ``state_check``, and
    whose parameter averaging rounds are robust (``swarm.averaging.RobustAveraging``: CenteredClip per part, signed
    and re-checked aggregators, and a result applied only from 3 senders up and only if it moves this replica's
    parameters by at most ``state_tolerance``)."""

    state_round = True

    def __init__(self, *args, averaging: AveragingConfig, hooks: Optional[AveragingHooks] = None, **kwargs):
        self.refused_sources: List[Tuple[str, str]] = []
        self.max_sources = averaging.state_sources
        self._served_at: Dict[PeerID, float] = {}  # (averager process) when each caller last got a state
        self._serving = 0
        super().__init__(*args, averaging=averaging, hooks=hooks, **kwargs)
        self.num_checked_tensors = sum(len(g["params"]) for g in self.optimizer.param_groups)

    async def rpc_download_state(
        self, request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        """hivemind's state download, rationed: a whole copy of the stage's parameters and optimizer state costs the
        server a trip through its host process and the full upload, and anyone may ask. At most
        ``MAX_CONCURRENT_DOWNLOADS`` at once and one per caller every ``DOWNLOAD_COOLDOWN_S`` (a refused caller gets
        an empty stream, which hivemind's downloader takes as "try the next replica")."""
        now, caller = time.monotonic(), context.remote_id
        if (
            self._serving >= MAX_CONCURRENT_DOWNLOADS
            or now - self._served_at.get(caller, -math.inf) < DOWNLOAD_COOLDOWN_S
        ):
            logger.info(
                f"state download by {caller} refused: {self._serving} in progress, or asked again too soon"
            )
            return
        self._served_at[caller] = now
        while len(self._served_at) > 1024:
            self._served_at.pop(next(iter(self._served_at)))
        self._serving += 1
        try:
            async for message in super().rpc_download_state(request, context):
                yield message
        finally:
            self._serving -= 1

    def get_current_state(self):
        metadata, tensors, infos = super().get_current_state()
        if self.hooks.state is not None:
            tensors = tuple(self.hooks.state(tensors))
        return metadata, tensors, infos

    def drain_refused(self) -> List[Tuple[str, str]]:
        out, self.refused_sources = self.refused_sources, []
        return out
