"""Benchmark: one averaging round of a stage's replicas, robust (swarm.averaging) against plain hivemind.

    python experiments/averaging/run.py            # 2, 4 and 8 replicas, 3 interleaved repeats (about 3 minutes)
    python experiments/averaging/run.py --quick    # a tiny run (used by the test suite so that the script cannot rot)

Every replica is a real hivemind averager with its own DHT node and p2pd on 127.0.0.1, averaging a gradient of
``--floats`` float32 values. Each averager is a forked process of its own (``swarm.inprocess.Forked``), as replicas on
different machines are: a stage peer runs its averagers as threads of itself, but one process holding every replica
would have them take turns on one GIL. Plain: ``hivemind.optim.GradientAverager`` (butterfly all-reduce, weighted
mean). Robust:
``swarm.averaging.RobustGradientAverager`` with the swarm's defaults (signed parts, CenteredClip per part, random
re-checks of aggregators: ``verify_rate`` 1, ``verify_parts`` 1). Rounds of the two kinds alternate.

Figures per round (median over repeats):
- all-reduce seconds: the slowest replica's time inside the all-reduce (group formed -> its averaged gradient is in
  place), measured in the averager processes; matchmaking is the same code for both and left out;
- bytes: loopback bytes sent during the round and its re-checks (``/proc/net/dev``, interface ``lo``; every byte any
  process on the machine sent on loopback, so run nothing else next to it), per replica;
- CPU seconds: user + system time of the averager processes during the round and re-checks, per replica.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing as mp
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import hivemind  # noqa: E402
from hivemind.optim.grad_averager import GradientAverager  # noqa: E402

from swarm.averaging import AveragingConfig, RobustGradientAverager  # noqa: E402
from swarm.inprocess import Forked  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


class _Timed:
    """Times ``_run_allreduce_inplace_`` in the averager process (reported through a queue made before the fork)."""

    def _init_timer(self):
        self.timings = mp.Queue()

    async def _run_allreduce_inplace_(self, *args, **kwargs):
        start = time.perf_counter()
        await super()._run_allreduce_inplace_(*args, **kwargs)
        self.timings.put(time.perf_counter() - start)


class TimedPlain(_Timed, GradientAverager):
    def __init__(self, *args, **kwargs):
        self._init_timer()
        super().__init__(*args, **kwargs)


class TimedRobust(Forked, _Timed, RobustGradientAverager):
    def __init__(self, *args, **kwargs):
        self._init_timer()
        super().__init__(*args, **kwargs)


def lo_tx_bytes() -> int:
    with open("/proc/net/dev") as f:
        for line in f:
            if line.strip().startswith("lo:"):
                return int(line.split(":", 1)[1].split()[8])
    return 0


def cpu_seconds(pids) -> float:
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            pass
    return total


def make_group(kind: str, n: int, floats: int, prefix: str):
    dht0 = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    dhts = [dht0] + [
        hivemind.DHT(
            start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=dht0.get_visible_maddrs()
        )
        for _ in range(n - 1)
    ]
    gen = torch.Generator().manual_seed(0)
    averagers = []
    for dht in dhts:
        params = [torch.nn.Parameter(torch.zeros(floats // 4)) for _ in range(4)]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        common = dict(
            dht=dht,
            prefix=prefix,
            start=True,
            min_matchmaking_time=2.0,
            request_timeout=1.0,
            target_group_size=n,
            min_group_size=n,
            allreduce_timeout=60.0,
        )
        if kind == "robust":
            averager = TimedRobust(params, averaging=AveragingConfig(), **common)
        else:
            averager = TimedPlain(params, **common)
        averagers.append(averager)
    return dhts, averagers


def one_round(averagers, recheck_wait_s: float):
    """(all-reduce s, bytes per replica, CPU s per replica) of one round and its re-checks, or None if it failed."""
    for averager in averagers:
        averager.reset_accumulated_grads_()
        averager.accumulate_grads_(batch_size=8)
    pids = [a.pid for a in averagers]
    bytes0, cpu0 = lo_tx_bytes(), cpu_seconds(pids)
    with concurrent.futures.ThreadPoolExecutor(len(averagers)) as pool:
        results = list(pool.map(lambda a: a.step(timeout=120, allow_retries=False), averagers))
    if any(r is None for r in results):
        return None
    time.sleep(recheck_wait_s)  # re-checks run after the round (robust only)
    allreduce = max(a.timings.get(timeout=10) for a in averagers)
    for a in averagers:
        for _, clean, reason in a.drain_outcomes() if hasattr(a, "drain_outcomes") else []:
            assert clean, f"an honest round failed a check: {reason}"
    n = len(averagers)
    return allreduce, (lo_tx_bytes() - bytes0) / n, (cpu_seconds(pids) - cpu0) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--floats", type=int, default=2_000_000, help="gradient size (float32 values)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=os.path.join(HERE, "results.json"))
    args = parser.parse_args()
    if args.quick:
        args.replicas, args.floats, args.repeats = [2], 200_000, 1
    torch.set_num_threads(1)
    rows = []
    for n in args.replicas:
        groups = {kind: make_group(kind, n, args.floats, f"bench_{kind}_{n}") for kind in ("plain", "robust")}
        figures = {kind: [] for kind in groups}
        try:
            for _ in range(args.repeats):
                for kind, (_, averagers) in groups.items():  # interleaved: plain, robust, plain, robust, ...
                    result = one_round(averagers, recheck_wait_s=3.0)
                    if result is not None:
                        figures[kind].append(result)
        finally:
            for dhts, averagers in groups.values():
                for a in averagers:
                    a.shutdown()
                for d in dhts:
                    d.shutdown()
        row = dict(replicas=n, floats=args.floats)
        for kind, values in figures.items():
            if values:
                row[kind] = dict(
                    rounds=len(values),
                    allreduce_s=statistics.median(v[0] for v in values),
                    bytes_per_replica=statistics.median(v[1] for v in values),
                    cpu_s_per_replica=statistics.median(v[2] for v in values),
                )
        if "plain" in row and "robust" in row:
            row["time_ratio"] = row["robust"]["allreduce_s"] / row["plain"]["allreduce_s"]
            row["bytes_ratio"] = row["robust"]["bytes_per_replica"] / row["plain"]["bytes_per_replica"]
            row["cpu_ratio"] = row["robust"]["cpu_s_per_replica"] / max(
                row["plain"]["cpu_s_per_replica"], 1e-9
            )
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = dict(
        machine=f"{os.cpu_count()} cores, torch {torch.__version__}", load=os.getloadavg(), rows=rows
    )
    if not args.quick:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(
        f"{'replicas':>8} {'plain s':>8} {'robust s':>9} {'x':>5} {'plain MB':>9} {'robust MB':>10} {'x':>5} "
        f"{'plain cpu':>9} {'robust cpu':>10}"
    )
    for r in rows:
        if "time_ratio" in r:
            p, q = r["plain"], r["robust"]
            print(
                f"{r['replicas']:>8} {p['allreduce_s']:>8.3f} {q['allreduce_s']:>9.3f} {r['time_ratio']:>5.2f} "
                f"{p['bytes_per_replica'] / 1e6:>9.1f} {q['bytes_per_replica'] / 1e6:>10.1f} {r['bytes_ratio']:>5.2f} "
                f"{p['cpu_s_per_replica']:>9.2f} {q['cpu_s_per_replica']:>10.2f}"
            )


if __name__ == "__main__":
    main()
