"""`swarm train`: the trainer role. Reads the swarm config, loads the data, trains, writes the summary."""

from __future__ import annotations

import asyncio
import json
import logging

from peers.common import emit, fail, join_swarm, prove_admission
from peers.stage_peer import reputation_config
from swarm.audit import AuditConfig
from swarm.config import DataConfig
from swarm.data import MicroBatchStream, load_token_blocks, load_tokenizer
from swarm.trainer import Trainer, TrainerConfig

logger = logging.getLogger("swarm.train")


def run(args) -> int:
    dht, swarm = join_swarm(args)
    try:
        if swarm is None:
            return 2
        seed = int(swarm.extra.get("seed", 0)) if isinstance(swarm.extra.get("seed", 0), int) else 0
        data_cfg = DataConfig(paths=list(args.data), text_field=args.text_field, tokenizer=args.tokenizer,
                              seq_len=swarm.seq_len, microbatch_size=swarm.microbatch_size, seed=seed)
        try:
            tokenizer = load_tokenizer(data_cfg.tokenizer)
            if len(tokenizer) > swarm.model["vocab_size"]:
                return fail(f"tokenizer has {len(tokenizer)} tokens but the swarm's model only {swarm.model['vocab_size']}")
            blocks = load_token_blocks(data_cfg, tokenizer)
        except ValueError as e:
            return fail(str(e))
        stream = MicroBatchStream(blocks, swarm.microbatch_size, seed=seed)
        cfg = TrainerConfig(
            run_id=args.run_id, num_stages=swarm.num_stages, steps=args.steps,
            microbatches_per_step=swarm.target_batch_size // swarm.microbatch_size,
            max_inflight=args.max_inflight, max_attempts=args.max_attempts, compression=args.compression,
            metrics_path=args.metrics_out,
        )

        def on_step(row) -> None:
            loss = "n/a" if row["loss"] is None else f"{row['loss']:.4f}"
            logger.info(f"step {row['step'] + 1}/{args.steps} loss {loss} tokens {row['tokens']} "
                        f"elapsed {row['elapsed_s']:.1f}s retried {row['retried']} dropped {row['dropped']}")

        try:
            policy, token, proof = prove_admission(args, swarm, dht)
        except ValueError as e:
            return fail(str(e))
        if not 0 <= args.audit_rate <= 1:
            return fail(f"--audit-rate must be in [0, 1], got {args.audit_rate}")
        audit = AuditConfig(rate=args.audit_rate) if args.audit_rate > 0 else None
        trainer = Trainer(cfg, dht, stream, on_step=on_step, reputation=reputation_config(swarm),
                          admission=policy, admission_token=token, audit=audit)
        trainer.admission_proof = proof
        summary = asyncio.run(trainer.run())
        if args.summary_json:
            with open(args.summary_json, "w") as f:
                json.dump(summary, f, indent=2)
        emit("summary", **summary)
    finally:
        dht.shutdown()
    return 0
