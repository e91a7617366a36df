"""`swarm join`: a volunteer's machine joins a swarm where it is needed most and serves.

Reads the swarm's config from the DHT, picks the stage with the least capacity (lowest total announced
throughput over its online peers; ties: fewest peers, then lowest index; ``--stage N`` overrides), loads that
stage's current state from its replicas (progress bar on stderr), announces itself online and serves, with the
same code as `swarm serve` (:func:`peers.stage_peer.serve_stage`). The libp2p identity lives in a file
(``--identity``, default ``~/.swarm/identity.key``), so a restarted peer keeps its peer id and the reputation
others keep under it. Once online, it asks peers of the swarm to dial it back and says what to open if they
cannot.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import random
import socket
import sys
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

from peers.common import check_initial_peers, emit, fail, host_maddrs, open_dht
from peers.stage_peer import check_checkpoint_args, pick_device, serve_stage
from swarm.reachability import DIALBACK_MAX_ADDRS

logger = logging.getLogger("swarm.join")

DEFAULT_IDENTITY = os.path.join("~", ".swarm", "identity.key")
DIALBACK_PEERS = 2  # how many swarm peers are asked to dial a joiner back


@dataclass(frozen=True)
class StageLoad:
    """A stage's capacity as announced on the DHT: its online peers and their summed throughput."""

    stage: int
    peers: int
    throughput: float  # samples/s, summed over online peers


def stage_loads(
    records_by_stage: Mapping[int, Sequence], num_stages: int, exclude: Sequence[str] = ()
) -> List[StageLoad]:
    """Capacity per stage from StageRecords (or anything with ``peer_id``, ``state``, ``throughput``), one per stage.

    Only ``online`` peers count; ``exclude`` drops peer ids (a restarting peer's own earlier record)."""
    loads = []
    for stage in range(num_stages):
        online = [
            r for r in records_by_stage.get(stage, ()) if r.state == "online" and r.peer_id not in exclude
        ]
        loads.append(StageLoad(stage, len(online), float(sum(max(0.0, r.throughput) for r in online))))
    return loads


def choose_stage(
    records_by_stage: Mapping[int, Sequence], num_stages: int, exclude: Sequence[str] = ()
) -> int:
    """The stage that needs capacity most: lowest total throughput, then fewest peers, then lowest index."""
    if num_stages < 1:
        raise ValueError("a swarm has at least one stage")
    loads = stage_loads(records_by_stage, num_stages, exclude)
    return min(loads, key=lambda load: (load.throughput, load.peers, load.stage)).stage


def announce_maddrs(announce_addrs: Sequence[str], public_ip: Optional[str], port: int) -> List[str]:
    """Multiaddrs to announce: ``--announce-addr`` as given, plus ``/ip4|ip6/PUBLIC_IP/tcp/PORT``. Raises ValueError."""
    from hivemind.utils.multiaddr import Multiaddr

    out = []
    for addr in announce_addrs:
        try:
            Multiaddr(addr)
        except Exception:
            raise ValueError(
                f"--announce-addr {addr!r} is not a multiaddr (e.g. /ip4/203.0.113.7/tcp/31338)"
            ) from None
        if "/p2p/" in addr and "/p2p-circuit" not in addr:
            raise ValueError(
                f"--announce-addr {addr!r}: leave out the /p2p/PEER_ID part, it is added for you"
            )
        out.append(addr)
    if public_ip is not None:
        try:
            ip = ipaddress.ip_address(public_ip)
        except ValueError:
            raise ValueError(f"--public-ip {public_ip!r} is not an IP address") from None
        out.append(f"/ip{ip.version}/{ip}/tcp/{port}")
    return out


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def check_identity_file(path: str) -> None:
    """A missing file is created by libp2p on start; an existing one must hold a libp2p private key."""
    if not os.path.exists(path):
        return
    from hivemind.p2p import PeerID

    try:
        with open(path, "rb") as f:
            PeerID.from_identity(f.read())
    except Exception as e:
        raise ValueError(
            f"--identity {path}: not a libp2p private key file ({type(e).__name__}); "
            f"move it away to create a new identity (a new peer id)"
        ) from None


# ---- reachability ----------------------------------------------------------------------------------------------
def own_dial_addrs(maddrs: Sequence[str], peer_id: str) -> List[str]:
    """This peer's addresses as a dial-back request names them (without the /p2p/ID suffix)."""
    out = []
    for addr in maddrs:
        addr = str(addr)
        suffix = f"/p2p/{peer_id}"
        if addr.endswith(suffix):
            addr = addr[: -len(suffix)]
        if addr and addr not in out:
            out.append(addr)
    return out[:DIALBACK_MAX_ADDRS]


def reachability_verdict(answers: Mapping[str, Dict]) -> str:
    """``reachable``, ``relay-only``, ``unreachable`` or ``unchecked`` from the peers' dial-back answers."""
    results = [a["results"] for a in answers.values() if a.get("ok") and isinstance(a.get("results"), dict)]
    if not results:
        return "unchecked"
    ok = [addr for r in results for addr, outcome in r.items() if outcome == "ok"]
    if any("/p2p-circuit" not in addr for addr in ok):
        return "reachable"
    return "relay-only" if ok else "unreachable"


def guidance(args, port: int, addrs: Sequence[str]) -> str:
    lines = [
        f"swarm join: other peers could not connect to this peer at {', '.join(addrs) or '(no address)'}.",
        "  Stage peers must accept connections from the swarm. Do one of:",
        f"  - open TCP port {port} in the firewall (and forward it on the router if this machine is behind NAT),",
        "    listen on all interfaces with --host 0.0.0.0, fix the port with --port, and announce the address",
        "    others can reach: --public-ip YOUR_PUBLIC_IP  or  --announce-addr /ip4/IP/tcp/PORT;",
        "  - or, if you cannot open a port, add --auto-relay: the peer is then reached through a relay",
        "    (another swarm peer), which is slower.",
    ]
    if args.host in ("127.0.0.1", "::1", "localhost"):
        lines.append(f"  Note: --host {args.host} only accepts connections from this machine.")
    return "\n".join(lines)


async def check_reachability(server, args, port: int) -> Dict:
    """Ask up to DIALBACK_PEERS online peers of the swarm to dial this peer back; report and return the outcome."""
    from swarm.network import fetch_stage_peers, visible_addresses
    from swarm.stage_client import request_dialback

    loop = asyncio.get_event_loop()
    addrs = own_dial_addrs(await loop.run_in_executor(None, visible_addresses, server.dht), server.peer_id)
    stages = await loop.run_in_executor(
        None, fetch_stage_peers, server.dht, args.run_id, server.cfg.num_stages
    )
    others = sorted(
        {
            info.peer_id
            for infos in stages.values()
            for info in infos
            if info.record.state == "online" and info.peer_id != server.peer_id
        }
    )
    random.shuffle(others)
    answers: Dict[str, Dict] = {}
    for peer in others:
        if len([a for a in answers.values() if a.get("ok")]) >= DIALBACK_PEERS:
            break
        try:
            answers[peer] = await request_dialback(server.p2p, args.run_id, peer, addrs)
        except Exception as e:
            answers[peer] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    verdict = reachability_verdict(answers)
    emit("reachability", peer_id=server.peer_id, verdict=verdict, addrs=addrs, answers=answers)
    if verdict == "reachable":
        ok = sorted(
            {addr for a in answers.values() if a.get("ok") for addr, r in a["results"].items() if r == "ok"}
        )
        print(
            f"swarm join: reachable: {len([a for a in answers.values() if a.get('ok')])} peer(s) of the swarm "
            f"connected back to {', '.join(ok)}",
            file=sys.stderr,
            flush=True,
        )
    elif verdict == "relay-only":
        print(
            "swarm join: reachable through a relay only (slower); open the TCP port for direct connections",
            file=sys.stderr,
            flush=True,
        )
    elif verdict == "unreachable":
        failures = {addr: r for a in answers.values() if a.get("ok") for addr, r in a["results"].items()}
        detail = "; ".join(f"{addr}: {why}" for addr, why in failures.items())
        print(guidance(args, port, addrs) + f"\n  (dial-back results: {detail})", file=sys.stderr, flush=True)
    else:
        why = (
            "no other peer is online"
            if not answers
            else "; ".join(f"{p[-8:]}: {a.get('error')}" for p, a in answers.items())
        )
        print(f"swarm join: could not check reachability ({why})", file=sys.stderr, flush=True)
    return {"verdict": verdict, "answers": answers}


# ---- the command -----------------------------------------------------------------------------------------------
def run(args) -> int:
    from swarm.network import fetch_stage_peers, fetch_swarm_config

    try:
        device = pick_device(args.device)
    except ValueError as e:
        return fail(str(e))
    if args.stage is not None and args.stage < 0:
        return fail("--stage must be >= 0")
    if args.grace < 0:
        return fail("--grace must be >= 0")
    check_checkpoint_args(args)
    check_initial_peers(args)  # before the identity file is created
    identity = os.path.abspath(os.path.expanduser(args.identity)) if args.identity else None
    port = args.port
    try:
        if identity:
            check_identity_file(identity)
        if port == 0:  # fixed before start: an announced address and the reachability advice need it
            port = free_port(args.host)
        announce = announce_maddrs(args.announce_addr or [], args.public_ip, port)
    except (ValueError, OSError) as e:
        return fail(str(e))
    dht = open_dht(
        args.run_id,
        args.initial_peers,
        host_maddrs=host_maddrs(args.host, port),
        announce_maddrs=announce,
        identity_path=identity,
        use_relay=not args.no_relay,
        use_auto_relay=args.auto_relay and not args.no_relay,
    )
    try:
        print(
            f"swarm join: peer id {dht.peer_id}" + (f" (identity {identity})" if identity else ""),
            file=sys.stderr,
            flush=True,
        )
        try:
            swarm = fetch_swarm_config(dht, args.run_id)
        except TimeoutError as e:
            return fail(str(e))
        if args.stage is not None:
            if args.stage >= swarm.num_stages:
                return fail(f"--stage must be in [0, {swarm.num_stages}) for swarm {args.run_id!r}")
            stage, reason = args.stage, "--stage"
            loads = None
        else:
            records = {
                k: [info.record for info in infos]
                for k, infos in fetch_stage_peers(dht, args.run_id, swarm.num_stages).items()
            }
            loads = stage_loads(records, swarm.num_stages, exclude=[str(dht.peer_id)])
            stage = choose_stage(records, swarm.num_stages, exclude=[str(dht.peer_id)])
            reason = "least capacity"
            table = "; ".join(
                f"stage {load.stage}: {load.peers} peer(s), {load.throughput:.1f} samples/s" for load in loads
            )
            print(f"swarm join: {table} -> stage {stage} ({reason})", file=sys.stderr, flush=True)
        emit(
            "join",
            peer_id=str(dht.peer_id),
            stage=stage,
            reason=reason,
            num_stages=swarm.num_stages,
            loads=[vars(load) for load in loads] if loads else None,
        )

        async def on_online(server) -> int:
            if args.no_reachability_check:
                return 0
            outcome = await check_reachability(server, args, port)
            if args.require_reachable and outcome["verdict"] in ("unreachable", "relay-only"):
                return fail("--require-reachable: the swarm cannot connect to this peer directly; leaving")
            return 0

        return serve_stage(args, dht, swarm, stage, device, role="serve", on_online=on_online)
    finally:
        dht.shutdown()
