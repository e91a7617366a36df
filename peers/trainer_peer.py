"""`swarm train`: the trainer role. Reads the swarm config, loads the data, trains, writes the summary."""

from __future__ import annotations

import json
import logging

from peers.common import UserError, check_readable, emit, fail, join_swarm, prove_admission
from peers.stage_peer import reputation_config
from swarm import aio
from swarm.audit import AuditConfig
from swarm.config import DataConfig
from swarm.data import MicroBatchStream, load_token_blocks, load_tokenizer
from swarm.trainer import Trainer, TrainerConfig

logger = logging.getLogger("swarm.train")


def tokenizer_mismatch(swarm, tokenizer, given) -> str:
    """Why ``tokenizer`` is not the one the swarm's config pins (empty if it is, or the config pins none)."""
    from swarm.tokenizer import tokenizer_digest

    pin = swarm.extra.get("tokenizer")
    if not (isinstance(pin, dict) and isinstance(pin.get("sha256"), str)):
        return ""
    digest = tokenizer_digest(tokenizer)
    if digest == pin["sha256"]:
        return ""
    return (
        f"this swarm trains with a tokenizer of {pin.get('size')} tokens, sha256 {pin['sha256'][:16]}... (its "
        f"creator's `swarm dht --tokenizer`), and {given or 'the shipped tokenizer'} is another ({len(tokenizer)} "
        f"tokens, sha256 {digest[:16]}...): pass the swarm's tokenizer with --tokenizer"
    )


def progress_bar(done: int, total: int, elapsed_s: float, width: int = 20) -> str:
    """``[#######.............]  35% 1m02s, ETA 1m55s``: the steps done of ``total``, and the time left at the
    mean pace so far."""
    share = min(1.0, done / total) if total > 0 else 1.0
    filled = int(round(share * width))
    left = elapsed_s / done * (total - done) if done > 0 else float("nan")
    return (
        f"[{'#' * filled}{'.' * (width - filled)}] {share:4.0%} {_duration(elapsed_s)}, ETA {_duration(left)}"
    )


def _duration(seconds: float) -> str:
    if not seconds == seconds or seconds < 0:
        return "?"
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s" if minutes else f"{sec}s"


def check_data_args(args) -> None:
    """Raise :class:`UserError` for data files or a tokenizer that cannot be read, or a ``--tensorboard`` that
    cannot be written: before the DHT is joined."""
    check_readable(args.data, "--data")
    check_readable([args.tokenizer] if args.tokenizer else [], "--tokenizer")
    if getattr(args, "tensorboard", None):
        from swarm.tensorboard import check_available

        try:
            check_available(args.tensorboard)
        except ValueError as e:
            raise UserError(str(e)) from None


def run(args) -> int:
    check_data_args(args)
    if not 0 <= args.audit_rate <= 1:
        return fail(f"--audit-rate must be in [0, 1], got {args.audit_rate}")
    dht, swarm = join_swarm(args)
    try:
        if swarm is None:
            return 2
        seed = int(swarm.extra.get("seed", 0)) if isinstance(swarm.extra.get("seed", 0), int) else 0
        data_cfg = DataConfig(
            paths=list(args.data),
            text_field=args.text_field,
            tokenizer=args.tokenizer,
            seq_len=swarm.seq_len,
            microbatch_size=swarm.microbatch_size,
            seed=seed,
        )
        try:
            tokenizer = load_tokenizer(data_cfg.tokenizer)
            if len(tokenizer) > swarm.model["vocab_size"]:
                return fail(
                    f"tokenizer has {len(tokenizer)} tokens but the swarm's model only {swarm.model['vocab_size']}"
                )
            mismatch = tokenizer_mismatch(swarm, tokenizer, args.tokenizer)
            if mismatch:
                return fail(mismatch)
            blocks = load_token_blocks(data_cfg, tokenizer)
        except ValueError as e:
            return fail(str(e))
        stream = MicroBatchStream(blocks, swarm.microbatch_size, seed=seed)
        resumed = swarm.extra.get("resumed_from")
        first_step = resumed.get("step") if isinstance(resumed, dict) else 0
        first_step = first_step if type(first_step) is int and 0 <= first_step < 2**31 else 0
        if first_step:
            logger.info(
                f"the swarm resumed from step {first_step} ({resumed.get('source')}): training from there"
            )
        cfg = TrainerConfig(
            run_id=args.run_id,
            num_stages=swarm.num_stages,
            steps=args.steps,
            microbatches_per_step=swarm.target_batch_size // swarm.microbatch_size,
            max_inflight=args.max_inflight,
            max_attempts=args.max_attempts,
            compression=args.compression,
            dataplane=not args.no_dataplane,
            metrics_path=args.metrics_out,
            first_step=first_step,
        )

        reporter = None
        if args.tensorboard:
            from swarm.tensorboard import TensorBoardReporter

            try:
                reporter = TensorBoardReporter(args.tensorboard)
            except ValueError as e:
                return fail(str(e))

        def on_step(row) -> None:
            if reporter is not None:
                reporter.on_step(row)
            loss = "n/a" if row["loss"] is None else f"{row['loss']:.4f}"
            done = row["step"] - first_step + 1
            logger.info(
                f"step {done}/{args.steps} {progress_bar(done, args.steps, row['elapsed_s'])} loss {loss} "
                f"tokens {row['tokens']} retried {row['retried']} dropped {row['dropped']}"
            )

        try:
            policy, token, proof = prove_admission(args, swarm, dht)
        except ValueError as e:
            return fail(str(e))
        audit = AuditConfig(rate=args.audit_rate) if args.audit_rate > 0 else None
        trainer = Trainer(
            cfg,
            dht,
            stream,
            on_step=on_step,
            reputation=reputation_config(swarm),
            admission=policy,
            admission_token=token,
            audit=audit,
        )
        trainer.admission_proof = proof
        summary = None
        try:
            summary = aio.run(trainer.run())
        finally:
            if reporter is not None:
                reporter.close(summary)
        if args.summary_json:
            with open(args.summary_json, "w") as f:
                json.dump(summary, f, indent=2)
        emit("summary", **summary)
    finally:
        dht.shutdown()
    return 0
