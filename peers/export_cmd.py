"""`swarm export`: gather a running swarm's weights (verified per stage, ``swarm.export``) into one ``transformers``
model directory, with the tokenizer, a model card and the swarm's own evaluation loss."""

from __future__ import annotations

import logging
import sys
from typing import Dict, Optional

import torch

from peers.common import UserError, emit, join_swarm
from peers.trainer_peer import tokenizer_mismatch
from swarm import aio
from swarm.averaging import AveragingConfig
from swarm.config import DataConfig, ModelConfig

logger = logging.getLogger("swarm.export")


def latest_train_loss(dht, run_id: str) -> Optional[float]:
    """The newest loss a trainer of the swarm published (None if none did)."""
    from swarm.records import TrainerProgressRecord, parse_subkeyed, progress_key

    try:
        parsed, _ = parse_subkeyed(
            dht.get(progress_key(run_id), latest=True), TrainerProgressRecord.from_value, "progress"
        )
    except Exception:
        return None
    records = [r for r, _ in parsed.values() if r.loss is not None]
    return max(records, key=lambda r: r.updated_at).loss if records else None


def eval_blocks(args, swarm, tokenizer) -> Optional[torch.Tensor]:
    """The last ``--eval-blocks`` blocks of ``--eval-data`` (default: the shipped corpus), or None for none."""
    from swarm.data import load_token_blocks

    if args.eval_blocks <= 0:
        return None
    cfg = DataConfig(paths=list(args.eval_data), seq_len=swarm.seq_len, microbatch_size=1)
    blocks = load_token_blocks(cfg, tokenizer)
    return blocks[-args.eval_blocks :]


def run(args) -> int:
    from tqdm import tqdm

    from peers.common import check_readable
    from swarm.data import load_tokenizer
    from swarm.export import (
        ExportError,
        export_summary,
        gather_stage,
        pipeline_loss,
        stage_modules,
        stub_factory,
        write_export,
    )
    from swarm.model import StageModule
    from swarm.network import fetch_stage_peers

    if args.eval_data:
        check_readable(args.eval_data, "--eval-data")
    if args.tokenizer:
        check_readable([args.tokenizer], "--tokenizer")
    dht, swarm = join_swarm(args)
    try:
        if swarm is None:
            return 2
        try:
            tokenizer = load_tokenizer(args.tokenizer)
        except ValueError as e:
            raise UserError(str(e)) from None
        mismatch = tokenizer_mismatch(swarm, tokenizer, args.tokenizer)
        if mismatch:
            raise UserError(mismatch)
        model_cfg = ModelConfig(**swarm.model)
        robust = AveragingConfig.from_dict(swarm.extra.get("averaging"))
        peers = fetch_stage_peers(dht, args.run_id, swarm.num_stages)
        online = {
            s: [p.peer_id for p in peers.get(s, []) if p.record.state == "online"]
            for s in range(swarm.num_stages)
        }
        empty = [s for s, ps in online.items() if not ps]
        if empty:
            raise UserError(
                f"no replica of stage(s) {', '.join(map(str, empty))} is online in swarm {args.run_id!r}: nothing to "
                f"export them from (`swarm status` shows who is there)"
            )

        async def gather():
            p2p = await dht.replicate_p2p()
            stub_of = stub_factory(p2p, args.run_id)
            downloads = []
            with tqdm(total=swarm.num_stages, unit="stage", desc="swarm: export", file=sys.stderr) as bar:
                for stage in range(swarm.num_stages):
                    bar.set_postfix_str(f"stage {stage} from {len(online[stage])} replica(s)")
                    module = StageModule(model_cfg, stage, swarm.num_stages)
                    downloads.append(
                        await gather_stage(
                            stub_of,
                            stage,
                            module,
                            online[stage],
                            sketch_dims=robust.state_sketch_dims,
                            tolerance=robust.state_tolerance,
                            timeout=args.timeout,
                        )
                    )
                    bar.update(1)
            return downloads

        try:
            downloads = aio.run(gather())
        except ExportError as e:
            raise UserError(str(e)) from None
        params: Dict[str, torch.Tensor] = {}
        for d in downloads:
            params.update(d.params)
            if d.verified_by == 0:
                print(
                    f"swarm: warning: stage {d.stage}: no other replica vouched for its weights ({d.verdict})",
                    file=sys.stderr,
                )
        try:
            blocks = eval_blocks(args, swarm, tokenizer)
        except ValueError as e:  # the data's own error (file and row or byte), as `swarm train` gives it
            raise UserError(str(e)) from None
        eval_loss = None
        if blocks is not None:
            modules = stage_modules(model_cfg, swarm.num_stages, {d.stage: d.params for d in downloads})
            eval_loss = pipeline_loss(modules, blocks)
        summary = export_summary(
            args.run_id,
            model_cfg,
            swarm.num_stages,
            swarm.seq_len,
            downloads,
            latest_train_loss(dht, args.run_id),
            eval_loss,
            0 if blocks is None else int(blocks.shape[0]),
        )
        try:
            out = write_export(args.out, model_cfg, params, tokenizer, summary, overwrite=args.overwrite)
        except ExportError as e:
            raise UserError(str(e)) from None
        emit(
            "exported",
            out=str(out),
            step=summary["step"],
            eval_loss=eval_loss,
            stages=[
                {k: s[k] for k in ("stage", "epoch", "source", "verified_by")} for s in summary["stages"]
            ],
            refused=sum(len(s["refused"]) for s in summary["stages"]),
        )
        loss = (
            ""
            if eval_loss is None
            else f", evaluation loss {eval_loss:.4f} on {summary['eval_blocks']} blocks"
        )
        print(f"swarm: exported step {summary['step']} to {out}{loss}", file=sys.stderr, flush=True)
        return 0
    finally:
        dht.shutdown()
