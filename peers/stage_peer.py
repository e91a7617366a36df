"""`swarm serve`: one stage peer. Reads the swarm config from the DHT, loads the stage's state, serves."""

from __future__ import annotations

import asyncio

import torch

from peers.common import emit, fail, join_swarm, wait_for_shutdown
from swarm.config import ModelConfig
from swarm.optimizer import OptimizerConfig
from swarm.reputation import ReputationConfig
from swarm.sentinel import SentinelConfig, SentinelMonitor
from swarm.stage_server import StageServer, StageServerConfig


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


def reputation_config(swarm) -> ReputationConfig:
    """The swarm's reputation settings (published by its creator), or the defaults."""
    settings = swarm.extra.get("reputation") if isinstance(swarm.extra.get("reputation"), dict) else {}
    try:
        return ReputationConfig(**settings)
    except (TypeError, ValueError):
        return ReputationConfig()


def make_adversary(args):
    if not args.attack:
        return None
    from peers.adversary import Adversary, AttackConfig

    return Adversary(AttackConfig(name=args.attack, direction=args.attack_direction, magnitude=args.attack_magnitude,
                                  probability=args.attack_probability, start_step=args.attack_start_step))


def run(args) -> int:
    try:
        device = pick_device(args.device)
    except ValueError as e:
        return fail(str(e))
    dht, swarm = join_swarm(args)
    try:
        if swarm is None:
            return 2
        if not 0 <= args.stage < swarm.num_stages:
            return fail(f"--stage must be in [0, {swarm.num_stages}) for swarm {args.run_id!r}")
        server_cfg = StageServerConfig(
            run_id=args.run_id, stage=args.stage, num_stages=swarm.num_stages, max_inflight=args.max_inflight,
            compression=args.compression, device=device, autocast_dtype=autocast_dtype(device),
        )
        opt_cfg = OptimizerConfig(lr=swarm.lr, target_batch_size=swarm.target_batch_size,
                                  matchmaking_time_s=args.matchmaking_time, averaging=not args.no_averaging)

        async def serve() -> None:
            sentinel = None if args.no_sentinel else SentinelMonitor(
                SentinelConfig(threshold=args.sentinel_threshold, warmup=args.sentinel_warmup,
                               warmup_steps=args.sentinel_warmup_steps))
            adversary = make_adversary(args)
            server = StageServer(server_cfg, ModelConfig(**swarm.model), dht, opt_cfg,
                                 sentinel=sentinel, outbound_hook=adversary, reputation=reputation_config(swarm))
            await server.start()
            emit("serve", peer_id=server.peer_id, stage=args.stage, device=device, byzantine=adversary is not None)
            await wait_for_shutdown()
            # what this peer saw and did, for launchers' summaries
            emit("ledger", peer_id=server.peer_id, served=server.stats.served, tallies=server.ledger.as_dict(),
                 tampered=adversary.tampered if adversary else 0)
            await server.shutdown()

        asyncio.run(serve())
    finally:
        dht.shutdown()
    return 0
