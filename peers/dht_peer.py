"""`swarm dht`: the bootstrap peer. Creates the swarm (publishes and refreshes its config) and prints its address."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time

from hivemind.utils import get_dht_time

from peers.common import check_initial_peers, emit, fail, host_maddrs, open_dht, wait_for_shutdown
from swarm import aio
from swarm.admission import AdmissionPolicy, load_or_create_authority_key, public_key_hex
from swarm.averaging import AveragingConfig
from swarm.config import ModelConfig, model_preset, stage_layer_ranges, to_dict
from swarm.network import publish_swarm_config, visible_addresses
from swarm.records import SwarmConfigRecord
from swarm.reputation import ReputationConfig

REFRESH_S = 60.0


def tokenizer_pin(path, model_vocab: int) -> dict:
    """What the swarm's config says of its tokenizer (``{"sha256", "size"}``): every trainer's must match. Raises
    ValueError if it cannot be loaded or has more tokens than the model's vocabulary."""
    from swarm.data import load_tokenizer
    from swarm.tokenizer import tokenizer_digest

    tokenizer = load_tokenizer(path)
    if len(tokenizer) > model_vocab:
        raise ValueError(
            f"--tokenizer has {len(tokenizer)} tokens but the model's vocabulary only {model_vocab}"
        )
    return {"sha256": tokenizer_digest(tokenizer), "size": len(tokenizer)}


def resume_point(path: str) -> dict:
    """``{"model", "num_stages" (None for an export: any cut of a whole model), "step", "source"}`` of a checkpoint
    directory or an export that a new swarm continues. Raises ValueError (CheckpointError) saying what is wrong."""
    from swarm.checkpoint import describe_checkpoints
    from swarm.export import SUMMARY_FILE, read_summary

    if not os.path.isdir(path):
        raise ValueError(f"--resume-from {path}: no such directory")
    if os.path.exists(os.path.join(path, SUMMARY_FILE)):
        summary = read_summary(path)
        return dict(
            model=summary["model"], num_stages=None, step=int(summary.get("step") or 0), source="export"
        )
    found = describe_checkpoints(path)
    return dict(
        model=found["model"], num_stages=found["num_stages"], step=found["step"], source="checkpoints"
    )


def swarm_record(args) -> SwarmConfigRecord:
    model = model_preset(args.model, seed=args.seed)
    resumed = None
    if getattr(args, "resume_from", None):
        resumed = resume_point(args.resume_from)
        model = ModelConfig(**resumed["model"])  # the checkpoint's model, whatever --model says
        if resumed["num_stages"] is not None:
            args.stages = resumed["num_stages"]
    ReputationConfig(
        probation_s=args.probation_s,
        probation_work=args.probation_work,
        min_reporters=args.min_reporters,
        report_period_s=args.report_period,
        report_ttl_s=max(60.0, 4 * args.report_period),
    )
    averaging = AveragingConfig(
        aggregator=args.aggregator, clip_radius=args.clip_radius, clip_iters=args.clip_iters
    )
    stage_layer_ranges(model.num_layers, args.stages)  # raises a clear error for an impossible cut
    if args.target_batch_size % args.microbatch_size:
        raise ValueError("--target-batch-size must be a multiple of --microbatch-size")
    authority = None
    if getattr(args, "authority_key", None):
        try:
            authority = public_key_hex(load_or_create_authority_key(os.path.expanduser(args.authority_key)))
        except OSError as e:
            raise ValueError(
                f"cannot read or create the authority key {args.authority_key}: {e.strerror}"
            ) from None
    admission = AdmissionPolicy(
        run_id=args.run_id, pow_bits=getattr(args, "pow_bits", 0), authority=authority
    )
    tokenizer = tokenizer_pin(getattr(args, "tokenizer", None), model.vocab_size)
    return SwarmConfigRecord(
        run_id=args.run_id,
        model=to_dict(model),
        num_stages=args.stages,
        seq_len=args.seq_len,
        microbatch_size=args.microbatch_size,
        target_batch_size=args.target_batch_size,
        lr=args.lr,
        created_at=get_dht_time(),
        extra={
            "seed": args.seed,
            "reputation": dict(
                probation_s=args.probation_s,
                probation_work=args.probation_work,
                min_reporters=args.min_reporters,
                report_period_s=args.report_period,
                report_ttl_s=max(60.0, 4 * args.report_period),
            ),
            "admission": admission.to_extra(),
            "averaging": dataclasses.asdict(averaging),
            "tokenizer": tokenizer,
            **(
                {"resumed_from": {"step": resumed["step"], "source": resumed["source"]}}
                if resumed is not None
                else {}
            ),
        },
    )


def run(args) -> int:
    try:
        record = None if args.no_config else swarm_record(args)
    except ValueError as e:
        return fail(str(e))
    check_initial_peers(args)
    dht = open_dht(
        args.run_id,
        args.initial_peers,
        host_maddrs=host_maddrs(args.host, args.port),
        identity_path=args.identity,
    )
    try:
        addrs = visible_addresses(dht)
        emit("dht", initial_peers=addrs, peer_id=str(dht.peer_id), run_id=args.run_id)
        print(f"swarm dht: join with  --initial-peers {addrs[0]}", flush=True)
        if record is not None and not publish_swarm_config(dht, record):
            return fail("the DHT refused the swarm config record")

        async def serve() -> None:
            stop = asyncio.ensure_future(wait_for_shutdown())
            while not stop.done():
                await asyncio.wait([stop], timeout=REFRESH_S)
                if record is not None and not stop.done():
                    publish_swarm_config(dht, record)  # heartbeat: the record expires unless refreshed

        aio.run(serve())
    finally:
        dht.shutdown()
    time.sleep(0.1)
    return 0
