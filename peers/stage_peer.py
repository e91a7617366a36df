"""`swarm serve`: one stage peer. Reads the swarm config from the DHT, loads the stage's state, serves.

:func:`serve_stage` is the part `swarm serve` and `swarm join` share: build the stage server, load the stage's
state from its replicas (with a progress bar on stderr), announce, serve until SIGINT/SIGTERM, then leave
cleanly (announce offline, let in-flight micro-batches finish for ``--grace`` seconds, stop).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from typing import Awaitable, Callable, List, Optional

import torch

from peers.common import UserError, emit, fail, join_swarm, prove_admission, wait_for_shutdown
from swarm import aio
from swarm.averaging import AveragingConfig
from swarm.checkpoint import parse_every
from swarm.config import ModelConfig
from swarm.evidence import StageAuditConfig
from swarm.optimizer import OptimizerConfig, StageOptimizer
from swarm.reputation import ReputationConfig
from swarm.sentinel import SentinelConfig, SentinelMonitor
from swarm.stage_server import StageServer, StageServerConfig
from swarm.transport import limits_for

logger = logging.getLogger("swarm.stage_peer")

DEFAULT_GRACE_S = 10.0


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch sees no CUDA device")
    return name


def autocast_dtype(device: str):
    if device != "cuda":
        return None
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def describe_device(device: str) -> str:
    """One line saying where the stage computes and in which precision."""
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return (
            f"cuda ({props.name}, {props.total_memory / 2**30:.0f} GiB), autocast {autocast_dtype(device)} "
            f"(weights and optimizer state in float32)"
        )
    return f"{device} (float32, no autocast)"


def reputation_config(swarm) -> ReputationConfig:
    """The swarm's reputation settings (published by its creator), or the defaults."""
    settings = swarm.extra.get("reputation") if isinstance(swarm.extra.get("reputation"), dict) else {}
    try:
        return ReputationConfig(**settings)
    except (TypeError, ValueError):
        return ReputationConfig()


def _attack_config(args):
    from peers.adversary import AttackConfig

    return AttackConfig(
        name=args.attack,
        direction=args.attack_direction,
        magnitude=args.attack_magnitude,
        probability=args.attack_probability,
        start_step=args.attack_start_step,
    )


def make_adversary(args):
    """The outbound hook of a chain attack (``--attack`` naming one), else None."""
    from peers.adversary import CHAIN_ATTACKS, Adversary

    return Adversary(_attack_config(args)) if getattr(args, "attack", None) in CHAIN_ATTACKS else None


def make_averaging_hooks(args):
    """The averaging hooks of an averaging attack (``--attack avg-...``), else None."""
    from peers.adversary import AVERAGING_ATTACKS, AveragingAdversary

    return (
        AveragingAdversary(_attack_config(args)).hooks()
        if getattr(args, "attack", None) in AVERAGING_ATTACKS
        else None
    )


# ---- state download progress ---------------------------------------------------------------------------------
def state_nbytes(optimizer: StageOptimizer) -> Optional[int]:
    """Bytes of the state a replica sends to a newcomer: parameters, optimizer statistics, gradient buffers."""
    if not optimizer.hivemind:
        return None
    opt = optimizer.opt

    def size(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))

    sa = opt.state_averager
    total = size(p for group in sa.optimizer.param_groups for p in group["params"]) + size(sa.extra_tensors)
    total += size(v for state in sa.optimizer.state.values() for v in state.values())
    if getattr(opt, "grad_averager", None) is not None:
        with opt.grad_averager.get_tensors() as buffers:
            total += size(buffers)
    return total


def download_pids(optimizer: StageOptimizer) -> List[int]:
    """The processes that download the state (hivemind runs its averagers as child processes)."""
    if not optimizer.hivemind:
        return []
    averagers = [optimizer.opt.state_averager, getattr(optimizer.opt, "grad_averager", None)]
    return [a.pid for a in averagers if a is not None and getattr(a, "pid", None)]


def read_rchar(pid: int) -> Optional[int]:
    """Bytes process ``pid`` has read through system calls so far (Linux /proc), or None where unavailable."""
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class StateLoadProgress:
    """A tqdm bar on stderr while a stage's state downloads.

    hivemind's ``load_state_from_peers`` reports no progress, and the download runs in its averager processes.
    Where Linux's /proc is readable, the bar counts the bytes those processes read while the download runs
    (the state stream plus a little control traffic) against the state's size, which is known locally (the
    same shapes); elsewhere it shows elapsed time only. The closing line gives the measured size and time.
    """

    def __init__(
        self, optimizer: StageOptimizer, replicas: int, stage: int, interval_s: float = 0.25, stream=None
    ):
        self.optimizer, self.replicas, self.stage, self.interval_s = optimizer, replicas, stage, interval_s
        self.stream = stream if stream is not None else sys.stderr
        self.expected: Optional[int] = None
        self.received = 0
        self.seconds = 0.0
        self._base: dict = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.bar = None

    def _read(self) -> Optional[int]:
        now = {pid: read_rchar(pid) for pid in self._base}
        if not now or any(v is None for v in now.values()):
            return None
        return sum(now[pid] - self._base[pid] for pid in now)

    def __enter__(self) -> "StateLoadProgress":
        from tqdm import tqdm

        self._started = time.monotonic()
        try:
            self.expected = state_nbytes(self.optimizer)
        except Exception as e:  # a progress bar must never stop a join
            logger.debug(f"state size unknown: {e}")
        self._base = {pid: read_rchar(pid) for pid in download_pids(self.optimizer)}
        counting = (
            bool(self._base) and all(v is not None for v in self._base.values()) and bool(self.expected)
        )
        if not counting:
            self._base = {}
        desc = f"stage {self.stage}: state from {self.replicas} replica(s)"
        if counting:
            self.bar = tqdm(
                total=self.expected,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=desc,
                file=self.stream,
                mininterval=self.interval_s,
                leave=True,
            )
        else:
            self.bar = tqdm(
                total=None,
                desc=desc,
                file=self.stream,
                mininterval=self.interval_s,
                leave=True,
                bar_format="{desc}: downloading, {elapsed} elapsed",
            )
        self._thread = threading.Thread(target=self._loop, daemon=True, name="state-progress")
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._update()

    def _update(self) -> None:
        received = self._read()
        if received is not None and self.bar.total:
            self.received = max(self.received, received)
            shown = min(self.received, self.bar.total)
            if shown > self.bar.n:
                self.bar.update(shown - self.bar.n)
        else:
            self.bar.refresh()

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self.seconds = time.monotonic() - self._started
        self._update()
        ok = exc_type is None
        if ok and self.bar.total and self.bar.n < self.bar.total:
            self.bar.update(
                self.bar.total - self.bar.n
            )  # done: whatever was not counted (e.g. cached) arrived
        self.bar.close()
        size = f"{self.expected / 2**20:.1f} MiB of state" if self.expected else "state"
        seen = f" ({self.received / 2**20:.1f} MiB read by the download processes)" if self._base else ""
        epoch = self.optimizer.epoch
        verdict = (
            f"loaded {size} in {self.seconds:.1f}s{seen}, epoch {epoch}"
            if ok
            else f"state download failed after {self.seconds:.1f}s: {exc_type.__name__}"
        )
        print(f"swarm: stage {self.stage}: {verdict}", file=self.stream, flush=True)


# ---- serving ---------------------------------------------------------------------------------------------------
def server_configs(args, swarm, stage: int, device: str):
    every_steps, every_s = parse_every(getattr(args, "checkpoint_every", "10"))
    recompute_rate = float(getattr(args, "recompute_rate", 0.1))
    if not 0 <= recompute_rate <= 1:
        raise ValueError(f"--recompute-rate must be in [0, 1], got {recompute_rate}")
    server_cfg = StageServerConfig(
        run_id=args.run_id,
        stage=stage,
        num_stages=swarm.num_stages,
        max_inflight=args.max_inflight,
        compression=args.compression,
        dataplane=not getattr(args, "no_dataplane", False),
        device=device,
        autocast_dtype=autocast_dtype(device),
        # a micro-batch of the swarm's shape and nothing larger (the server's own limits allow far more)
        max_batch=swarm.microbatch_size,
        max_seq_len=swarm.seq_len,
        limits=limits_for(swarm.microbatch_size, swarm.seq_len, ModelConfig(**swarm.model).hidden_size),
        checkpoint_dir=getattr(args, "checkpoint_dir", None),
        checkpoint_every_steps=every_steps,
        checkpoint_every_s=every_s,
        stage_audit=StageAuditConfig(rate=recompute_rate) if recompute_rate > 0 else None,
    )
    opt_cfg = OptimizerConfig(
        lr=swarm.lr,
        target_batch_size=swarm.target_batch_size,
        microbatch_size=swarm.microbatch_size,
        matchmaking_time_s=args.matchmaking_time,
        averaging=not args.no_averaging,
        robust=AveragingConfig.from_dict(swarm.extra.get("averaging")),
    )
    return server_cfg, opt_cfg


OnOnline = Callable[[StageServer], Awaitable[int]]


def check_checkpoint_args(args) -> None:
    """Checkpoint flags that cannot work, as a UserError before any DHT or identity is made."""
    try:
        parse_every(getattr(args, "checkpoint_every", "10"))
    except ValueError as e:
        raise UserError(str(e)) from None
    directory = getattr(args, "checkpoint_dir", None)
    if directory:
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise UserError(f"--checkpoint-dir {directory}: cannot create it ({e.strerror})") from None
        if not os.access(directory, os.W_OK):
            raise UserError(f"--checkpoint-dir {directory} is not writable")
    resume = getattr(args, "resume_from", None)
    if resume and not os.path.isdir(resume):
        raise UserError(
            f"--resume-from {resume}: no such directory (give a model exported by `swarm export`)"
        )


def restore_stage(server: StageServer, args) -> None:
    """Start ``server`` from its checkpoint (``--checkpoint-dir`` holding one for this stage) or from an export
    (``--resume-from``); the checkpoint wins when both are given, being this peer's own and holding optimizer state.
    Raises UserError for a checkpoint or export that does not fit (another model, another cut, damaged)."""
    from swarm.checkpoint import CheckpointError, checkpoint_path, load_stage_state
    from swarm.export import load_export_stage

    cfg = server.cfg
    try:
        if cfg.checkpoint_dir:
            path = checkpoint_path(cfg.checkpoint_dir, cfg.stage, cfg.num_stages)
            if path.exists():
                server.restore(load_stage_state(path, progress=sys.stderr), str(path))
                return
        if getattr(args, "resume_from", None):
            server.restore(load_export_stage(args.resume_from, cfg.stage, cfg.num_stages), args.resume_from)
    except CheckpointError as e:
        raise UserError(f"cannot resume stage {cfg.stage}: {e}") from None


def serve_stage(
    args, dht, swarm, stage: int, device: str, *, role: str = "serve", on_online: Optional[OnOnline] = None
) -> int:
    """Serve ``stage`` of ``swarm`` until SIGINT/SIGTERM; the caller owns (and shuts down) ``dht``.

    ``on_online(server)`` runs once the peer is online (``swarm join``'s reachability check); a non-zero
    result makes the peer leave at once with that exit code."""
    try:
        server_cfg, opt_cfg = server_configs(args, swarm, stage, device)
    except ValueError as e:
        return fail(str(e))
    try:
        policy, token, proof = prove_admission(args, swarm, dht)
    except ValueError as e:
        return fail(str(e))
    grace_s = float(getattr(args, "grace", DEFAULT_GRACE_S))
    logger.info(f"device: {describe_device(device)}")

    async def serve() -> int:
        sentinel = (
            None
            if args.no_sentinel
            else SentinelMonitor(
                SentinelConfig(
                    threshold=args.sentinel_threshold,
                    warmup=args.sentinel_warmup,
                    warmup_steps=args.sentinel_warmup_steps,
                )
            )
        )
        adversary, averaging_hooks = make_adversary(args), make_averaging_hooks(args)
        server = StageServer(
            server_cfg,
            ModelConfig(**swarm.model),
            dht,
            opt_cfg,
            sentinel=sentinel,
            outbound_hook=adversary,
            reputation=reputation_config(swarm),
            admission=policy,
            admission_token=token,
            averaging_hooks=averaging_hooks,
        )
        server.admission_proof = proof
        restore_stage(server, args)
        stop = asyncio.ensure_future(wait_for_shutdown())  # from here on, SIGINT/SIGTERM mean "leave cleanly"
        starting = asyncio.ensure_future(
            server.start(
                load_progress=lambda optimizer, replicas: StateLoadProgress(optimizer, replicas, stage)
            )
        )
        await asyncio.wait({stop, starting}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # interrupted while loading the state: nobody routes to us yet
            logger.info(f"stage {stage}: interrupted while joining; leaving")
            starting.cancel()
            if server.announcer is not None:
                await server.announcer.stop(offline=True)
            emit("left", peer_id=server.peer_id, stage=stage, inflight_left=0, during="join")
            return 0
        starting.result()  # a failure to start raises here
        emit(
            role,
            peer_id=server.peer_id,
            stage=stage,
            device=device,
            autocast=server_cfg.autocast_dtype,
            byzantine=adversary is not None or averaging_hooks is not None,
            epoch=server.optimizer.epoch,
            restored_from=server.restored_from,
            event_loop=aio.loop_name(),  # uvloop's wherever it is installed
        )
        code = 0
        if on_online is not None:
            check = asyncio.ensure_future(on_online(server))
            await asyncio.wait({stop, check}, return_when=asyncio.FIRST_COMPLETED)
            if check.done():
                code = check.result() or 0
            else:
                check.cancel()
        if code == 0 and not stop.done():
            await stop
        left = await server.drain(grace_s)
        # what this peer saw and did, for launchers' summaries
        emit(
            "ledger",
            peer_id=server.peer_id,
            served=server.stats.served,
            tallies=server.ledger.as_dict(),
            rejected=dict(server.stats.flagged),
            tampered=adversary.tampered if adversary else 0,
            audits=server.stats.audits(),
            dataplane=dict(
                server=server.dataplane.stats.to_dict() if server.dataplane else None,
                client=server.dataplane_client.stats.to_dict() if server.dataplane_client else None,
            ),
        )
        await server.shutdown()
        extra = {}
        if device == "cuda":
            extra["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        emit(
            "left",
            peer_id=server.peer_id,
            stage=stage,
            inflight_left=left,
            served=server.stats.served,
            **extra,
        )
        return code

    return aio.run(serve())


def run(args) -> int:
    try:
        device = pick_device(args.device)
    except ValueError as e:
        return fail(str(e))
    if args.stage < 0:
        return fail("--stage must be >= 0")
    if args.grace < 0:
        return fail("--grace must be >= 0")
    check_checkpoint_args(args)
    dht, swarm = join_swarm(args)
    try:
        if swarm is None:
            return 2
        if not 0 <= args.stage < swarm.num_stages:
            return fail(f"--stage must be in [0, {swarm.num_stages}) for swarm {args.run_id!r}")
        return serve_stage(args, dht, swarm, args.stage, device)
    finally:
        dht.shutdown()
