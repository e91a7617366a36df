"""The two baselines of the throughput benchmark, each as its own process(es); run.py starts and measures them.

    python experiments/throughput/baselines.py single --rows rows.jsonl
    python experiments/throughput/baselines.py gloo --rank 0 --port 29500 --rows rows.jsonl &
    python experiments/throughput/baselines.py gloo --rank 1 --port 29500

``single``: the whole model in one process. ``gloo``: the same model cut into the swarm's 2 stages
(:class:`swarm.model.StageModule`), one process per stage on 127.0.0.1, torch.distributed with the gloo backend:
stage 0 sends each micro-batch's activations to stage 1, which computes the loss and sends the activations'
gradient back (GPipe: all micro-batches of a step forward, then backward, then each stage's optimizer step).
Both train the swarm's model, data, micro-batch size and optimizer (AdamW, betas 0.9/0.95, gradients clipped to
norm 1.0 per stage as a stage peer does), and write one JSON row per optimizer step (tokens, elapsed_s, loss) to
``--rows`` (stage 0's process writes them for the pipeline).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from swarm.config import DataConfig, ModelConfig  # noqa: E402
from swarm.data import MicroBatchStream, load_token_blocks  # noqa: E402
from swarm.model import StageModule, build_model, causal_lm_loss, hidden_spec  # noqa: E402


def make_optimizer(module: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(module.parameters(), lr=lr, betas=(0.9, 0.95))


def optimizer_step(module: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
    opt.step()
    opt.zero_grad()


class Rows:
    """One JSON line per optimizer step, flushed at once (the parent watches the file to time its window)."""

    def __init__(self, path: str):
        self.file = open(path, "w")
        self.started = time.perf_counter()

    def write(self, step: int, tokens: int, loss: float) -> None:
        row = dict(step=step, tokens=tokens, loss=loss, elapsed_s=time.perf_counter() - self.started)
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()


def single(args, stream: MicroBatchStream, per_step: int) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig())
    model.train()
    opt = make_optimizer(model, args.lr)
    rows, tokens = Rows(args.rows), 0
    for step in range(args.steps):
        losses = []
        for i in range(per_step):
            ids = stream.microbatch(step * per_step + i)
            loss = causal_lm_loss(model(input_ids=ids).logits, ids)
            (loss / per_step).backward()
            losses.append(float(loss))
            tokens += ids.numel()
        optimizer_step(model, opt)
        rows.write(step, tokens, sum(losses) / len(losses))


def gloo(args, stream: MicroBatchStream, per_step: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank, world_size=2)
    cfg = ModelConfig()
    stage = StageModule(cfg, args.rank, 2)
    stage.train()
    opt = make_optimizer(stage, args.lr)
    shape, dtype = hidden_spec(cfg, args.microbatch_size, args.seq_len)
    rows, tokens = (Rows(args.rows) if args.rank == 0 else None), 0
    for step in range(args.steps):
        indices = [step * per_step + i for i in range(per_step)]
        if args.rank == 0:
            outputs, sends = [], []
            for index in indices:
                hidden = stage(stream.microbatch(index))
                sends.append(dist.isend(hidden.detach(), dst=1))
                outputs.append(hidden)
            for hidden in outputs:
                grad = torch.empty(shape, dtype=dtype)
                dist.recv(grad, src=1)
                hidden.backward(grad)
            for work in sends:
                work.wait()
            losses = torch.empty(per_step)
            dist.recv(losses, src=1)
            tokens += per_step * args.microbatch_size * args.seq_len
        else:
            losses, sends = torch.empty(per_step), []
            for k, index in enumerate(indices):
                hidden = torch.empty(shape, dtype=dtype)
                dist.recv(hidden, src=0)
                hidden.requires_grad_()
                loss = causal_lm_loss(stage(hidden), stream.microbatch(index))
                (loss / per_step).backward()
                losses[k] = float(loss)
                sends.append(dist.isend(hidden.grad, dst=0))
            for work in sends:
                work.wait()
            dist.send(losses, dst=0)
        optimizer_step(stage, opt)
        if rows is not None:
            rows.write(step, tokens, float(losses.mean()))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("kind", choices=["single", "gloo"])
    parser.add_argument("--rank", type=int, default=0, help="gloo: 0 (stage 0) or 1 (stage 1)")
    parser.add_argument("--port", type=int, default=29500, help="gloo: rank 0's rendezvous port")
    parser.add_argument("--rows", default=os.devnull, help="where the per-step rows go")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--microbatch-size", type=int, default=8)
    parser.add_argument("--target-batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in this process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = DataConfig(seq_len=args.seq_len, microbatch_size=args.microbatch_size)
    stream = MicroBatchStream(load_token_blocks(data), args.microbatch_size)
    per_step = args.target_batch_size // args.microbatch_size
    (single if args.kind == "single" else gloo)(args, stream, per_step)


if __name__ == "__main__":
    main()
