"""Reachability: a stage peer dials a joining peer back at the addresses it lists (``StageServer.rpc_dialback``).

The probe connects from a fresh, throw-away libp2p host to the caller's own peer id only, so it proves that others
can reach the caller there; it is not a port scanner: every failure reads the same and takes the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Dict, List

from hivemind.p2p import PeerID

from swarm.transport import TransportError

DIALBACK_MAX_ADDRS = 4
DIALBACK_COOLDOWN_S = 20.0
DIALBACK_TIMEOUT_S = 10.0
UNREACHABLE = "unreachable (timed out, refused, or another peer answered)"


def dialback_addresses(value: Any, caller: str) -> List[str]:
    """The addresses a dial-back request may name: 1..DIALBACK_MAX_ADDRS multiaddrs, none naming another peer as
    its destination (a ``/p2p/ID`` suffix must be the caller's; relay addresses name their relay before
    ``/p2p-circuit``). Returns them without the caller's suffix; raises TransportError otherwise."""
    from hivemind.utils.multiaddr import Multiaddr

    if not isinstance(value, list) or not 0 < len(value) <= DIALBACK_MAX_ADDRS:
        raise TransportError(f"'maddrs' must list 1..{DIALBACK_MAX_ADDRS} multiaddrs")
    out = []
    for addr in value:
        if not isinstance(addr, str) or not 0 < len(addr) <= 256:
            raise TransportError("each multiaddr must be a string of 1..256 characters")
        try:
            Multiaddr(addr)
        except Exception:
            raise TransportError(f"not a multiaddr: {addr[:80]!r}") from None
        parts = addr.rstrip("/").split("/")
        if len(parts) >= 2 and parts[-2] == "p2p":
            if parts[-1] != caller:
                raise TransportError("a dial-back goes to the caller's own peer id only")
            addr = "/".join(parts[:-2])
        if addr and addr not in out:
            out.append(addr)
    if not out:
        raise TransportError("no address to dial")
    return out


async def dial_back(peer: PeerID, maddrs: List[str], timeout_s: float) -> Dict[str, str]:
    """Dial ``peer`` at each address, each from its own new, throw-away libp2p host (a host that reached the peer
    once would reuse that connection, or the address it learnt, for the next address), concurrently; the hosts
    do not listen and may use relays so that ``/p2p-circuit`` addresses can be tried.
    Returns ``{maddr: "ok" | UNREACHABLE}``; TransportError if no probe host can be started here.

    Not a port scanner: every failure reads the same (a closed port, a silent one and another libp2p node alike),
    and an answer with a failure comes only once ``timeout_s`` has passed, so its timing tells nothing either."""
    from hivemind.p2p import P2P
    from hivemind.utils.multiaddr import Multiaddr

    async def probe(addr: str) -> str:
        try:
            host = await asyncio.wait_for(
                P2P.create(no_listen=True, use_relay=True, auto_nat=False, nat_port_map=False), timeout_s
            )
        except Exception as e:
            raise TransportError(f"could not start a probe host: {type(e).__name__}: {e}") from None
        try:
            await asyncio.wait_for(host._client.connect(peer, [Multiaddr(addr)]), timeout_s)
            return "ok"
        except Exception:  # timed out, refused, another peer's handshake: one answer for all
            return UNREACHABLE
        finally:
            with contextlib.suppress(Exception):
                await host.shutdown()

    started = time.monotonic()
    outcomes = await asyncio.gather(*(probe(addr) for addr in maddrs), return_exceptions=True)
    if any(outcome != "ok" for outcome in outcomes):
        await asyncio.sleep(max(0.0, started + timeout_s - time.monotonic()))
    for outcome in outcomes:
        if isinstance(outcome, BaseException):  # this peer's failure, not the caller's: no verdict
            raise outcome if isinstance(outcome, TransportError) else TransportError(repr(outcome))
    return dict(zip(maddrs, outcomes))
