"""Throughput benchmark: a 2-stage swarm against the same model in one process; P2P transfer against raw TCP.

    python experiments/throughput/run.py            # full run (~4 min on 2 cores), writes results.json / results.md
    python experiments/throughput/run.py --quick    # a tiny run, for the test that keeps this script working

Everything is measured in the same run on the same machine, and reported as ratios (machines are noisy):
1. tokens/s of `swarm local`-style processes (bootstrap, 2 stage peers with 1 torch thread each, trainer) against
   the same model, micro-batch size and optimizer trained in one process with all cores (torch threads = cores);
   the swarm's per-stage timings say where its time goes;
2. stage-to-stage transfer of an activation tensor through our transport (hivemind P2P streams) against the
   same bytes over a raw TCP socket on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import threading
import time
from typing import AsyncIterator

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from hivemind.p2p import P2P, P2PContext, ServicerBase  # noqa: E402
from hivemind.proto import runtime_pb2  # noqa: E402

from peers.local import LocalSwarm  # noqa: E402
from swarm.config import DataConfig, ModelConfig  # noqa: E402
from swarm.data import MicroBatchStream, load_token_blocks  # noqa: E402
from swarm.model import build_model  # noqa: E402
from swarm.transport import TensorLimits, pack, receive  # noqa: E402


def steady_rate(rows, skip: int) -> float:
    """tokens/s between the end of step ``skip`` and the last step (excludes warm-up)."""
    first, last = rows[skip], rows[-1]
    return (last["tokens"] - first["tokens"]) / max(last["elapsed_s"] - first["elapsed_s"], 1e-9)


def single_process(steps: int, seq_len: int, mb_size: int, target: int, lr: float, skip: int) -> dict:
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = build_model(ModelConfig())
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95))
    stream = MicroBatchStream(
        load_token_blocks(DataConfig(seq_len=seq_len, microbatch_size=mb_size)), mb_size
    )
    per_step = target // mb_size
    rows, tokens, started = [], 0, time.perf_counter()
    for step in range(steps):
        losses = []
        for i in range(per_step):
            ids = stream.microbatch(step * per_step + i)
            loss = model(input_ids=ids, labels=ids).loss
            (loss / per_step).backward()
            losses.append(float(loss))
            tokens += ids.numel()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        rows.append(
            dict(
                step=step,
                loss=sum(losses) / len(losses),
                tokens=tokens,
                elapsed_s=time.perf_counter() - started,
            )
        )
    return dict(
        tokens_per_s=steady_rate(rows, skip),
        loss_first=rows[0]["loss"],
        loss_last=rows[-1]["loss"],
        threads=torch.get_num_threads(),
    )


def swarm_run(
    steps: int, seq_len: int, mb_size: int, target: int, lr: float, skip: int, workdir: str, max_inflight: int
) -> dict:
    shape = [
        "--stages",
        "2",
        "--seq-len",
        str(seq_len),
        "--microbatch-size",
        str(mb_size),
        "--target-batch-size",
        str(target),
        "--lr",
        str(lr),
    ]
    metrics, summary_path = os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "summary.json")
    with LocalSwarm(workdir, run_id="bench") as swarm:
        swarm.start_dht(shape)
        for child in [swarm.start_stage(stage, wait=False) for stage in (0, 1)]:
            child.wait_event("serve", 120)
        trainer = swarm.start_trainer(
            [
                "--steps",
                str(steps),
                "--metrics-out",
                metrics,
                "--summary-json",
                summary_path,
                "--max-inflight",
                str(max_inflight),
            ]
        )
        if trainer.proc.wait(timeout=1800) != 0:
            raise RuntimeError(f"trainer failed, see {trainer.log_path}")
    rows = [json.loads(line) for line in open(metrics)]
    summary = json.load(open(summary_path))
    return dict(
        tokens_per_s=steady_rate(rows, skip),
        loss_first=summary["loss_first"],
        loss_last=summary["loss_last"],
        microbatches=summary["microbatches"],
        timing=summary["timing"],
    )


class Echo(ServicerBase):
    async def rpc_push(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        received = await receive(requests, TensorLimits(max_total_bytes=1 << 31))
        yield runtime_pb2.ExpertResponse(metadata=json.dumps({"bytes": received.num_bytes}).encode())


async def p2p_rate(tensor: torch.Tensor, repeats: int) -> float:
    server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    client = await P2P.create(initial_peers=await server.get_visible_maddrs())
    try:
        await Echo().add_p2p_handlers(server)
        stub = Echo.get_stub(client, server.peer_id)
        messages = pack({"mb": "bench"}, [tensor])
        await stub.rpc_push(_aiter(messages))  # warm-up: connection set-up
        started = time.perf_counter()
        for _ in range(repeats):
            # each push serializes the tensor afresh, as a stage does for every micro-batch
            reply = await stub.rpc_push(_aiter(pack({"mb": "bench"}, [tensor])))
            async for _ in reply:
                pass
        elapsed = time.perf_counter() - started
    finally:
        await client.shutdown()
        await server.shutdown()
    return tensor.numel() * tensor.element_size() * repeats / elapsed


async def _aiter(items):
    for item in items:
        yield item


def tcp_rate(tensor: torch.Tensor, repeats: int) -> float:
    payload_size = tensor.numel() * tensor.element_size()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]

    def serve():
        conn, _ = server.accept()
        with conn:
            for _ in range(repeats):
                remaining = payload_size
                while remaining:
                    remaining -= len(conn.recv(min(remaining, 1 << 20)))
                conn.sendall(b"k")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = socket.create_connection(("127.0.0.1", port))
    started = time.perf_counter()
    for _ in range(repeats):
        client.sendall(tensor.numpy().tobytes())  # the same serialization cost a raw sender would pay
        client.recv(1)
    elapsed = time.perf_counter() - started
    client.close()
    thread.join()
    server.close()
    return payload_size * repeats / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument(
        "--max-inflight", type=int, default=8, help="micro-batches the trainer keeps in flight"
    )
    parser.add_argument("--out", default=HERE, help="where results.json / results.md go")
    args = parser.parse_args()
    seq_len, mb_size, target, lr = 128, 8, 64, 2e-3
    steps, skip, repeats = (3, 1, 3) if args.quick else (16, 3, 30)
    workdir = os.path.join(args.out, "run") if not args.quick else os.path.join(args.out, "quick-run")

    swarm = swarm_run(steps, seq_len, mb_size, target, lr, skip, workdir, max_inflight=args.max_inflight)
    single = single_process(steps, seq_len, mb_size, target, lr, skip)
    activation = torch.randn(mb_size, seq_len, ModelConfig().hidden_size)
    large = torch.randn(4 * 1024 * 1024)  # 16 MiB
    transfer = {}
    for name, tensor in (("activation", activation), ("16MiB", large)):
        p2p = asyncio.run(p2p_rate(tensor, repeats))
        tcp = tcp_rate(tensor, repeats)
        transfer[name] = dict(
            bytes=tensor.numel() * 4, p2p_MBps=p2p / 1e6, tcp_MBps=tcp / 1e6, ratio=p2p / tcp
        )

    results = dict(
        machine=dict(cpus=os.cpu_count(), torch=torch.__version__),
        config=dict(
            model="tiny",
            seq_len=seq_len,
            microbatch_size=mb_size,
            target_batch_size=target,
            steps=steps,
            warmup_steps_skipped=skip,
        ),
        swarm_2_stages=swarm,
        single_process=single,
        throughput_ratio=swarm["tokens_per_s"] / single["tokens_per_s"],
        transfer=transfer,
    )
    print(
        f"tokens/s: swarm (2 stages x 1 replica) {swarm['tokens_per_s']:.0f} vs single process "
        f"{single['tokens_per_s']:.0f} ({single['threads']} threads): ratio {results['throughput_ratio']:.2f}"
    )
    for stage, parts in swarm["timing"].items():
        print(f"  {stage}: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in parts.items()))
    for name, t in transfer.items():
        print(
            f"transfer {name} ({t['bytes'] / 1e6:.2f} MB): p2p {t['p2p_MBps']:.0f} MB/s vs raw TCP "
            f"{t['tcp_MBps']:.0f} MB/s: ratio {t['ratio']:.2f}"
        )
    if not args.quick:
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
    print(json.dumps(results) if args.quick else f"wrote {os.path.join(args.out, 'results.json')}")


if __name__ == "__main__":
    main()
