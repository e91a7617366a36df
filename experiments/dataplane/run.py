"""Activation-sized messages over three transports, side by side: a raw TCP socket, the data plane (swarm.dataplane:
TLS, identity proof, checked framing) and the hivemind P2P stream as the chain used it before (swarm.transport).

    python experiments/dataplane/run.py            # about 2 minutes on 2 cores; writes results.json beside this file
    python experiments/dataplane/run.py --quick    # a few seconds, for the test suite

The receiver lives in another process (as a neighbour peer would), one per transport family all in the same child:
a raw TCP server (reads the bytes into a preallocated buffer), a DataPlaneServer and a hivemind P2P peer. One message
= the tensor sent, read whole by the receiver, and a small reply; wall time per message is measured one message at a
time. Rounds interleave the transports (their order rotates each round) so a load change hits all of them alike;
each figure is the min and median over all messages. CPU seconds per message are summed over every process
involved: this one, the receiver, and the p2pd daemons both spawn. The load average is recorded before and after, and
the run is flagged when it exceeds the core count (figures of a shared machine then say little about the wire).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import threading
import time
from typing import AsyncIterator, Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase  # noqa: E402
from hivemind.proto import runtime_pb2  # noqa: E402
from hivemind.utils.crypto import RSAPrivateKey  # noqa: E402

from swarm.dataplane import DataPlaneClient, DataPlaneServer, Endpoint  # noqa: E402
from swarm.identity import peer_id_of  # noqa: E402
from swarm.transport import TensorLimits, call, pack, receive  # noqa: E402

SIZES = {
    "0.79MB": (8, 24, 1024),
    "16MiB": (16, 256, 1024),
}  # float32 activations: 786,432 and 16,777,216 bytes
LIMITS = TensorLimits(max_elements=1 << 23, max_total_bytes=(32 << 20))
HERE = os.path.dirname(os.path.abspath(__file__))


# ---- the receiving process ---------------------------------------------------------------------------------------
class Sink(ServicerBase):
    """The P2P receiver: reads the whole message within limits (as StageServer.rpc_chain does), replies small."""

    async def rpc_push(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        received = await receive(requests, LIMITS)
        for message in pack(
            {"ok": True, "bytes": received.num_bytes}, message_type=runtime_pb2.ExpertResponse
        ):
            yield message


def tcp_server(listener: socket.socket) -> None:
    buffer = bytearray(32 << 20)
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=tcp_serve, args=(conn, buffer), daemon=True).start()


def tcp_serve(conn: socket.socket, buffer: bytearray) -> None:
    view = memoryview(buffer)
    size = bytearray(8)
    try:
        while True:
            if not recv_into(conn, memoryview(size)):
                return
            n = int.from_bytes(size, "little")
            recv_into(conn, view[:n])
            conn.sendall(b"k")
    finally:
        conn.close()


def recv_into(conn: socket.socket, view: memoryview) -> bool:
    while len(view):
        n = conn.recv_into(view)
        if not n:
            return False
        view = view[n:]
    return True


def receiver(pipe) -> None:
    async def main():
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        threading.Thread(target=tcp_server, args=(listener,), daemon=True).start()

        async def handler(sender, read):
            received = await read()
            return {"ok": True, "bytes": received.num_bytes}, []

        key = RSAPrivateKey()
        peer = peer_id_of(key.get_public_key().to_bytes())
        dataplane = DataPlaneServer(peer, handler, LIMITS, asyncio.get_running_loop())
        endpoint = dataplane.start("127.0.0.1")
        p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        await Sink().add_p2p_handlers(p2p)
        maddrs = [str(a) for a in await p2p.get_visible_maddrs()]
        pipe.send(
            dict(
                tcp_port=listener.getsockname()[1],
                endpoint=endpoint.to_value(),
                dataplane_peer=peer,
                p2p_peer=p2p.peer_id.to_base58(),
                maddrs=maddrs,
            )
        )
        await asyncio.get_running_loop().run_in_executor(None, pipe.recv)  # until told to stop
        await p2p.shutdown()
        dataplane.close()

    asyncio.run(main())


# ---- CPU over a process tree (/proc, clock ticks) ----------------------------------------------------------------
TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu_s(root: int) -> float:
    """utime + stime of ``root`` and all its descendants (threads included, exited threads too)."""
    children: Dict[int, List[int]] = {}
    stats: Dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(entry), int(fields[1])
        children.setdefault(ppid, []).append(pid)
        stats[pid] = (int(fields[11]) + int(fields[12])) / TICK
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        total += stats.get(pid, 0.0)
        stack.extend(children.get(pid, []))
    return total


# ---- the sending side --------------------------------------------------------------------------------------------
async def bench(rounds: int, per_round: Dict[str, int]) -> dict:
    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(target=receiver, args=(child,), daemon=True)
    proc.start()
    info = parent.recv()
    me = os.getpid()

    sock = socket.create_connection(("127.0.0.1", info["tcp_port"]))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    key = RSAPrivateKey()
    client = DataPlaneClient(peer_id_of(key.get_public_key().to_bytes()), key)
    endpoint = Endpoint(**info["endpoint"])
    p2p = await P2P.create(initial_peers=[f"{a}/p2p/{info['p2p_peer']}" for a in info["maddrs"]])
    stub = Sink.get_stub(p2p, PeerID.from_base58(info["p2p_peer"]))
    ack = bytearray(1)

    def tcp_once(tensor: torch.Tensor) -> None:
        view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        sock.sendall(len(view).to_bytes(8, "little"))
        sock.sendall(view)
        recv_into(sock, memoryview(ack))

    async def send(transport: str, tensor: torch.Tensor) -> None:
        if transport == "raw_tcp":  # the leanest sender: blocking calls on this thread, no executor hop
            tcp_once(tensor)
        elif transport == "dataplane":
            reply = await client.call(info["dataplane_peer"], endpoint, {"mb": "bench"}, [tensor], LIMITS, 30)
            assert reply is not None and reply.metadata["ok"], "the data plane fell back"
        else:  # each call packs the tensor afresh, as a stage does for every micro-batch
            reply = await call(stub.rpc_push, pack({"mb": "bench"}, [tensor]), LIMITS, timeout=30)
            assert reply.metadata["ok"]

    transports = ["raw_tcp", "dataplane", "hivemind_p2p"]
    tensors = {name: torch.randn(*shape) for name, shape in SIZES.items()}
    wall: Dict[str, List[float]] = {f"{t}/{s}": [] for t in transports for s in SIZES}
    cpu: Dict[str, float] = {key: 0.0 for key in wall}
    for transport in transports:  # warm-up: connections, daemons, allocators
        for tensor in tensors.values():
            for _ in range(2):
                await send(transport, tensor)
    load_before = os.getloadavg()
    for r in range(rounds):
        order = transports[r % 3 :] + transports[: r % 3]
        for size, tensor in tensors.items():
            for transport in order:
                key = f"{transport}/{size}"
                cpu_before = tree_cpu_s(me)
                for _ in range(per_round[size]):
                    started = time.perf_counter()
                    await send(transport, tensor)
                    wall[key].append(time.perf_counter() - started)
                cpu[key] += tree_cpu_s(me) - cpu_before
    load_after = os.getloadavg()

    parent.send("stop")
    proc.join(10)
    await p2p.shutdown()
    client.close()
    sock.close()

    results = {}
    for key, times in wall.items():
        transport, size = key.split("/")
        results.setdefault(size, {})[transport] = dict(
            messages=len(times),
            wall_ms_min=round(min(times) * 1e3, 3),
            wall_ms_median=round(statistics.median(times) * 1e3, 3),
            cpu_ms_per_message=round(cpu[key] / len(times) * 1e3, 3),
        )
    for row in results.values():
        raw = row["raw_tcp"]
        for figures in row.values():
            # speed relative to raw TCP: raw's time over this transport's (>= 0.5 is the data plane's goal)
            figures["speed_vs_raw_tcp_min"] = round(raw["wall_ms_min"] / figures["wall_ms_min"], 3)
            figures["speed_vs_raw_tcp_median"] = round(raw["wall_ms_median"] / figures["wall_ms_median"], 3)
    cores = os.cpu_count()
    return dict(
        sizes_bytes={name: int(torch.Size(shape).numel() * 4) for name, shape in SIZES.items()},
        rounds=rounds,
        per_round=per_round,
        results=results,
        load_before=[round(x, 2) for x in load_before],
        load_after=[round(x, 2) for x in load_after],
        cores=cores,
        loaded=max(load_before[0], load_after[0]) > cores,
        python=sys.version.split()[0],
        torch=torch.__version__,
    )


def table(out: dict) -> str:
    lines = [
        "| message | transport | wall ms min | wall ms median | CPU ms / message | speed vs raw TCP (min / median) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for size, row in out["results"].items():
        for transport, f in row.items():
            lines.append(
                f"| {size} | {transport} | {f['wall_ms_min']} | {f['wall_ms_median']} | {f['cpu_ms_per_message']} "
                f"| {f['speed_vs_raw_tcp_min']} / {f['speed_vs_raw_tcp_median']} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 2 messages; nothing written")
    parser.add_argument("--out", default=os.path.join(HERE, "results.json"))
    args = parser.parse_args()
    rounds = 2 if args.quick else args.rounds
    per_round = {"0.79MB": 2, "16MiB": 1} if args.quick else {"0.79MB": 20, "16MiB": 3}
    out = asyncio.run(bench(rounds, per_round))
    print(table(out))
    print(
        f"load average {out['load_before']} -> {out['load_after']} on {out['cores']} cores"
        + (
            " (LOADED: more runnable work than cores; compare ratios, not absolute times)"
            if out["loaded"]
            else ""
        )
    )
    if not args.quick:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
