"""Throughput benchmark that survives a shared machine: CPU-seconds per token of a 2-stage swarm, of one process
and of a torch.distributed (gloo) 2-stage pipeline; P2P transfer against raw TCP.

    python experiments/throughput/run.py            # 3 interleaved repeats (~5 min on 2 cores), writes results.json
    python experiments/throughput/run.py --quick    # a tiny run, for the test that keeps this script working

Three variants train the same model, data, micro-batch size and optimizer, interleaved (A B C A B C ...):
  swarm   real processes as `swarm local` starts them: bootstrap DHT peer, 2 stage peers (1 replica each), trainer;
  single  the whole model in one process (baselines.py single);
  gloo    the swarm's 2-stage cut, one process per stage, torch.distributed gloo on 127.0.0.1 (baselines.py gloo).
Every process gets 1 torch thread (OMP_NUM_THREADS=1, torch.set_num_threads(1)). Over a steady-state window (after
the warm-up steps) the benchmark reads, from /proc, the CPU time of every process it started and of their children
(forked DHT and averager processes, p2p daemons): tokens per CPU-second is the figure that a shared machine cannot
distort much; wall tokens/s is reported beside it. The 1-minute load average is read before and after each run, and
the CPU that other processes took while it ran (the machine's busy time in /proc/stat less ours): a run where they
took more than a tenth of the cores is flagged (the load average cannot tell, our own processes keep it high).
Before the swarm's trainer starts, its CPU with nobody training is measured too (its fixed cost). The PSS of each
stage peer (all its processes) is read at the end of its window. Last, an activation-sized tensor goes through our transport (hivemind P2P streams) and over raw TCP.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import AsyncIterator, Callable, Dict, List, Optional, Sequence

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from hivemind.p2p import P2P, P2PContext, ServicerBase  # noqa: E402
from hivemind.proto import runtime_pb2  # noqa: E402

from experiments.throughput import procfs  # noqa: E402
from peers.local import LocalSwarm  # noqa: E402
from swarm.config import ModelConfig  # noqa: E402
from swarm.transport import TensorLimits, pack, receive  # noqa: E402

VARIANTS = ("swarm", "single", "gloo")
CORES = os.cpu_count() or 1
CONTENDED_CORES = 0.1 * CORES  # a run during which other processes took more CPU than this is flagged


class Shape:
    """What every variant trains, and the window measured."""

    def __init__(self, quick: bool):
        self.seq_len, self.microbatch_size, self.target_batch_size, self.lr = 128, 8, 64, 2e-3
        # warm-up steps, then the measured steps; one more step keeps every process alive past the window's end
        self.warmup, self.window = (1, 1) if quick else (3, 8)
        self.steps = self.warmup + self.window + 1
        self.idle_s = 2.0 if quick else 10.0  # the swarm's CPU with its peers up and nobody training

    def train_args(self) -> List[str]:
        return [
            "--seq-len",
            str(self.seq_len),
            "--microbatch-size",
            str(self.microbatch_size),
            "--target-batch-size",
            str(self.target_batch_size),
            "--lr",
            str(self.lr),
        ]


def _rows(path: str) -> List[dict]:
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return []


class Snapshot:
    """CPU time of every process below this one, and the machine's busy time, at one instant."""

    def __init__(self):
        self.t = time.monotonic()
        self.busy_s = procfs.machine_busy_s()
        self.table = procfs.descendants(os.getpid())

    def cpu_since(self, earlier: "Snapshot") -> Dict[int, float]:
        """CPU seconds each process spent between ``earlier`` and this snapshot (a process that exited in
        between is lost; one that started in between counts from its start)."""
        out = {}
        for pid, info in self.table.items():
            before = earlier.table.get(pid)
            same = before is not None and before.start_ticks == info.start_ticks  # not a reused pid
            out[pid] = info.cpu_s - (before.cpu_s if same else 0.0)
        return out


def measure(
    rows_path: str,
    shape: Shape,
    alive: Callable[[], bool],
    roots: Dict[int, str],
    pss_roots: List[int],
    timeout_s: float,
) -> dict:
    """Watch ``rows_path`` (one row per optimizer step) and measure the steady-state window between the end of
    step ``warmup - 1`` and the end of step ``warmup + window - 1``.

    ``roots`` names the processes this run started (each one's children are charged to it), ``pss_roots`` are the
    ones whose process trees' PSS is read at the window's end.
    """
    first, last = shape.warmup - 1, shape.warmup - 1 + shape.window
    deadline = time.monotonic() + timeout_s
    start = end = None
    while end is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no row {last} in {rows_path} within {timeout_s:.0f}s")
        if not alive():
            raise RuntimeError(f"a process of this run exited before row {last} of {rows_path}")
        rows = _rows(rows_path)
        if start is None and len(rows) > first:
            start = (Snapshot(), rows[first])
        elif start is not None and len(rows) > last:
            end = (Snapshot(), rows[last])
            pss = {roots[pid]: _tree_pss(pid, end[0].table, roots) for pid in pss_roots}
            break
        time.sleep(0.05)
    (s0, r0), (s1, r1) = start, end
    wall_s = s1.t - s0.t
    per_process = [
        dict(pid=pid, role=_role(pid, s1.table, roots), kind=_kind(pid, s1.table, roots), cpu_s=cpu)
        for pid, cpu in s1.cpu_since(s0).items()
    ]
    gone = [pid for pid in s0.table if pid not in s1.table]
    cpu_s = sum(p["cpu_s"] for p in per_process)
    tokens = r1["tokens"] - r0["tokens"]
    own_cores = cpu_s / wall_s
    others_cores = max((s1.busy_s - s0.busy_s) / wall_s - own_cores, 0.0)
    return dict(
        tokens=tokens,
        wall_s=wall_s,
        cpu_s=cpu_s,
        tokens_per_cpu_s=tokens / cpu_s,
        cpu_us_per_token=cpu_s / tokens * 1e6,
        tokens_per_s=tokens / wall_s,
        loss_window=[r0["loss"], r1["loss"]],
        own_cores=own_cores,
        others_cores=others_cores,
        # the load average cannot tell: our own processes keep it above the core count (the swarm's at 4-5 on
        # 2 cores); the CPU that the rest of the machine took while this ran can
        contended=others_cores > CONTENDED_CORES,
        processes=len(per_process),
        processes_gone=len(gone),
        per_process=sorted(per_process, key=lambda p: (p["role"], p["kind"])),
        pss_bytes=pss,
    )


def _root_of(pid: int, table: Dict[int, procfs.ProcInfo], roots: Dict[int, str]) -> Optional[int]:
    while pid in table and pid not in roots:
        pid = table[pid].ppid
    return pid if pid in roots else None


def _role(pid: int, table, roots) -> str:
    root = _root_of(pid, table, roots)
    return roots[root] if root is not None else "other"


def _kind(pid: int, table, roots) -> str:
    """main (the process we started), p2pd, torch_shm_manager, or the main process's forked children in creation
    order: a peer forks its DHT process first (whose child is p2pd), then (stage peers) hivemind's optimizer forks
    its state averager and its gradient averager."""
    if pid in roots:
        return "main"
    info = table[pid]
    if info.comm == "p2pd" or info.comm.startswith("torch_shm"):
        return "torch_shm_manager" if info.comm.startswith("torch_shm") else "p2pd"
    root = _root_of(pid, table, roots)
    forks = sorted(
        (p for p in table.values() if p.ppid == root and p.comm == table[root].comm),
        key=lambda p: (p.start_ticks, p.pid),
    )
    names = ["dht", "state-averager", "grad-averager"]
    order = [p.pid for p in forks]
    if pid in order and order.index(pid) < len(names):
        return names[order.index(pid)]
    return f"child:{info.comm}"


def _tree_pss(root: int, table: Dict[int, procfs.ProcInfo], roots: Dict[int, str]) -> dict:
    """PSS of ``root`` and all its descendants: the total, and per process kind (main, dht, p2pd...)."""
    pids = [root, *procfs.descendants(root, table)]
    by_kind: Dict[str, int] = {}
    for pid in pids:
        kind = _kind(pid, table, roots)
        by_kind[kind] = by_kind.get(kind, 0) + procfs.pss_bytes([pid])
    return dict(total=sum(by_kind.values()), processes=len(pids), by_kind=by_kind)


def run_swarm(
    shape: Shape,
    workdir: str,
    repeat: int,
    max_inflight: int,
    timeout_s: float,
    replicas: int = 1,
    stage_extra: Sequence[str] = (),
    trainer_extra: Sequence[str] = (),
) -> dict:
    """One swarm of 2 stages x ``replicas`` measured over the window (``stage_extra``, ``trainer_extra``: flags
    of its stage peers and trainer); with it, what its peers did (``peers``: ``swarm local``'s peers summary)."""
    metrics, summary_path = os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "summary.json")
    for path in (metrics, summary_path):
        if os.path.exists(path):
            os.remove(path)
    with LocalSwarm(workdir, run_id=f"bench{repeat}") as swarm:
        swarm.start_dht(["--stages", "2", *shape.train_args()])
        stages = [
            swarm.start_stage(stage, wait=False, extra=stage_extra)
            for stage in (0, 1)
            for _ in range(replicas)
        ]
        for child in stages:
            child.wait_event("serve", timeout_s)
        idle = idle_cpu(shape.idle_s, {c.proc.pid: c.name.split(".")[0] for c in swarm.children})
        trainer = swarm.start_trainer(
            [
                "--steps",
                str(shape.steps),
                "--metrics-out",
                metrics,
                "--summary-json",
                summary_path,
                "--max-inflight",
                str(max_inflight),
                *trainer_extra,
            ]
        )
        roots = {c.proc.pid: c.name.split(".")[0] for c in swarm.children}
        result = measure(
            metrics,
            shape,
            alive=lambda: all(c.proc.poll() is None for c in swarm.children),
            roots=roots,
            pss_roots=[c.proc.pid for c in stages],
            timeout_s=timeout_s,
        )
        try:
            trainer.proc.wait(timeout=60)  # the tail step; then its summary holds the per-stage timings
        except subprocess.TimeoutExpired:
            pass
    if os.path.exists(summary_path):
        summary = json.load(open(summary_path))
        result["timing"] = summary.get("timing")
        result["microbatches"] = summary.get("microbatches")
        result["trainer_audits"] = summary.get("audits")
    result["peers"] = swarm.peers_summary()
    result.update(idle)
    return result


def idle_cpu(seconds: float, roots: Dict[int, str]) -> dict:
    """CPU the swarm burns with nobody training (bootstrap and stage peers up, no trainer yet): its fixed cost."""
    time.sleep(2.0)  # the stage peers' first announcements
    s0 = Snapshot()
    time.sleep(seconds)
    s1 = Snapshot()
    wall_s, by_part = s1.t - s0.t, {}
    for pid, cpu in s1.cpu_since(s0).items():
        key = f"{_role(pid, s1.table, roots)}/{_kind(pid, s1.table, roots)}"
        by_part[key] = by_part.get(key, 0.0) + cpu / wall_s
    return dict(idle_s=wall_s, idle_cores=sum(by_part.values()), idle_cores_by_process=by_part)


def _spawn(args: List[str], log_path: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log = open(log_path, "w")
    return subprocess.Popen(
        [sys.executable, os.path.join(HERE, "baselines.py"), *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )


def _stop(procs: List[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    for proc in procs:
        proc.wait(timeout=30)


def run_baseline(kind: str, shape: Shape, workdir: str, timeout_s: float) -> dict:
    rows = os.path.join(workdir, f"{kind}-rows.jsonl")
    if os.path.exists(rows):
        os.remove(rows)
    common = ["--steps", str(shape.steps), "--threads", "1", *shape.train_args()]
    if kind == "single":
        procs = [_spawn([kind, "--rows", rows, *common], os.path.join(workdir, "single.log"))]
        names = ["single"]
    else:
        with socket.socket() as s:  # a free port for the rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [
            _spawn(
                ["gloo", "--rank", str(rank), "--port", str(port), "--rows", rows, *common],
                os.path.join(workdir, f"gloo{rank}.log"),
            )
            for rank in (0, 1)
        ]
        names = ["gloo-stage0", "gloo-stage1"]
    try:
        return measure(
            rows,
            shape,
            alive=lambda: all(p.poll() is None for p in procs),
            roots={p.pid: name for p, name in zip(procs, names)},
            pss_roots=[],
            timeout_s=timeout_s,
        )
    finally:
        _stop(procs)


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


def summarize(runs: List[dict]) -> dict:
    """min and median per variant; ratios of the medians, and the swarm's ratio paired repeat by repeat."""
    out = {}
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        if not mine:
            continue
        cost = [r["cpu_us_per_token"] for r in mine]
        wall = [r["tokens_per_s"] for r in mine]
        out[variant] = dict(
            cpu_us_per_token_min=min(cost),
            cpu_us_per_token_median=statistics.median(cost),
            tokens_per_cpu_s_max=1e6 / min(cost),
            tokens_per_cpu_s_median=1e6 / statistics.median(cost),
            tokens_per_s_min=min(wall),
            tokens_per_s_median=statistics.median(wall),
            tokens_per_s_max=max(wall),
            own_cores_median=statistics.median(r["own_cores"] for r in mine),
            repeats=len(mine),
            flagged=sum(r["contended"] for r in mine),
        )
    ratios = {}
    for other in ("single", "gloo"):
        if "swarm" in out and other in out:
            paired = []
            for rep in sorted({r["repeat"] for r in runs}):
                a = [r for r in runs if r["repeat"] == rep and r["variant"] == "swarm"]
                b = [r for r in runs if r["repeat"] == rep and r["variant"] == other]
                if a and b:
                    paired.append(a[0]["tokens_per_cpu_s"] / b[0]["tokens_per_cpu_s"])
            ratios[f"swarm/{other}"] = dict(
                tokens_per_cpu_s=out["swarm"]["tokens_per_cpu_s_median"]
                / out[other]["tokens_per_cpu_s_median"],
                tokens_per_cpu_s_paired=paired,
                tokens_per_s=out["swarm"]["tokens_per_s_median"] / out[other]["tokens_per_s_median"],
            )
    return dict(variants=out, ratios=ratios)


def cpu_breakdown(runs: List[dict]) -> Dict[str, dict]:
    """The swarm's CPU per process role and kind: microseconds per token (median over repeats) and share."""
    swarm = [r for r in runs if r["variant"] == "swarm"]
    parts: Dict[str, List[float]] = {}
    for r in swarm:
        sums: Dict[str, float] = {}
        for p in r["per_process"]:
            key = f"{p['role']}/{p['kind']}"
            sums[key] = sums.get(key, 0.0) + p["cpu_s"]
        for key, cpu in sums.items():
            parts.setdefault(key, []).append(cpu / r["tokens"] * 1e6)
    total = sum(statistics.median(v) for v in parts.values()) or 1.0
    return {
        k: dict(cpu_us_per_token=statistics.median(v), share=statistics.median(v) / total)
        for k, v in sorted(parts.items(), key=lambda kv: -statistics.median(kv[1]))
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3, quick 1)")
    parser.add_argument(
        "--max-inflight", type=int, default=8, help="micro-batches the swarm's trainer keeps in flight"
    )
    parser.add_argument("--only", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="variants to run")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds one variant may take to start and run"
    )
    parser.add_argument("--out", default=HERE, help="where results.json goes")
    args = parser.parse_args()
    shape = Shape(args.quick)
    repeats = args.repeats or (1 if args.quick else 3)
    transfer_repeats = 3 if args.quick else 30
    workdir = os.path.join(args.out, "quick-run" if args.quick else "run")
    os.makedirs(workdir, exist_ok=True)

    runs = []
    for repeat in range(repeats):
        for variant in args.only:
            load_before = procfs.loadavg()
            started = time.monotonic()
            if variant == "swarm":
                run = run_swarm(shape, workdir, repeat, args.max_inflight, args.timeout)
            else:
                run = run_baseline(variant, shape, workdir, args.timeout)
            run.update(
                variant=variant,
                repeat=repeat,
                total_s=time.monotonic() - started,
                loadavg_before=load_before,
                loadavg_after=procfs.loadavg(),
            )
            runs.append(run)
            pss = ", ".join(f"{k} PSS {v['total'] / 2**20:.0f} MiB" for k, v in run["pss_bytes"].items())
            print(
                f"repeat {repeat} {variant}: {run['tokens']} tokens in {run['wall_s']:.1f}s wall, "
                f"{run['cpu_s']:.1f} CPU-s over {run['processes']} processes: {run['tokens_per_cpu_s']:.0f} "
                f"tokens/CPU-s, {run['tokens_per_s']:.0f} tokens/s; used {run['own_cores']:.2f} cores, other processes "
                f"{run['others_cores']:.2f}; loadavg {load_before[0]:.2f} -> {run['loadavg_after'][0]:.2f}"
                + (" FLAGGED: other processes took CPU" if run["contended"] else "")
                + (f"; idle swarm {run['idle_cores']:.2f} cores" if "idle_cores" in run else "")
                + (f"; {pss}" if pss else ""),
                flush=True,
            )

    summary = summarize(runs)
    for variant, s in summary["variants"].items():
        print(
            f"{variant}: tokens/CPU-s median {s['tokens_per_cpu_s_median']:.0f} (best {s['tokens_per_cpu_s_max']:.0f}), "
            f"tokens/s median {s['tokens_per_s_median']:.0f} (min {s['tokens_per_s_min']:.0f}), "
            f"{s['flagged']}/{s['repeats']} runs flagged"
        )
    for name, r in summary["ratios"].items():
        print(
            f"{name}: tokens per CPU-second {r['tokens_per_cpu_s']:.2f} (paired "
            + ", ".join(f"{x:.2f}" for x in r["tokens_per_cpu_s_paired"])
            + f"), wall tokens/s {r['tokens_per_s']:.2f}"
        )
    breakdown = cpu_breakdown(runs)
    if breakdown:
        print(
            "swarm CPU by process: "
            + ", ".join(
                f"{k} {v['cpu_us_per_token']:.0f} us/token ({v['share']:.0%})" for k, v in breakdown.items()
            )
        )

    activation = torch.randn(shape.microbatch_size, shape.seq_len, ModelConfig().hidden_size)
    large = torch.randn(4 * 1024 * 1024)  # 16 MiB
    transfer = {}
    for name, tensor in (("activation", activation), ("16MiB", large)):
        p2p = asyncio.run(p2p_rate(tensor, transfer_repeats))
        tcp = tcp_rate(tensor, transfer_repeats)
        transfer[name] = dict(
            bytes=tensor.numel() * 4, p2p_MBps=p2p / 1e6, tcp_MBps=tcp / 1e6, ratio=p2p / tcp
        )
        print(
            f"transfer {name} ({tensor.numel() * 4 / 1e6:.2f} MB): p2p {p2p / 1e6:.0f} MB/s vs raw TCP "
            f"{tcp / 1e6:.0f} MB/s: ratio {p2p / tcp:.2f}"
        )

    results = dict(
        machine=dict(cpus=CORES, torch=torch.__version__, loadavg_at_end=procfs.loadavg()),
        config=dict(
            model="tiny",
            seq_len=shape.seq_len,
            microbatch_size=shape.microbatch_size,
            target_batch_size=shape.target_batch_size,
            lr=shape.lr,
            steps=shape.steps,
            warmup_steps=shape.warmup,
            measured_steps=shape.window,
            repeats=repeats,
            max_inflight=args.max_inflight,
            torch_threads_per_process=1,
        ),
        summary=summary,
        swarm_cpu_by_process=breakdown,
        runs=runs,
        transfer=transfer,
    )
    if not args.quick:
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {os.path.join(args.out, 'results.json')}")


if __name__ == "__main__":
    main()
