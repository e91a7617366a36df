"""Helpers shared by the roles: listen addresses, shutdown signals, machine-readable lines for launchers."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from typing import Any, List


def host_maddrs(host: str, port: int) -> List[str]:
    proto = "ip6" if ":" in host else "ip4"
    return [f"/{proto}/{host}/tcp/{port}"]


def emit(kind: str, **fields: Any) -> None:
    """One machine-readable line on stdout (``SWARM <kind> {json}``); launchers and tests parse these."""
    print(f"SWARM {kind} {json.dumps(fields, sort_keys=True)}", flush=True)


async def wait_for_shutdown() -> str:
    """Wait for SIGINT/SIGTERM; returns the signal's name."""
    loop = asyncio.get_event_loop()
    stopped: asyncio.Future = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda s=sig: stopped.done() or stopped.set_result(s.name))
    return await stopped


def join_swarm(args):
    """Join the DHT and read the swarm's config: ``(dht, config)``, config None (the reason printed) if absent.
    The caller shuts the DHT down."""
    from swarm.network import create_dht, fetch_swarm_config

    dht = create_dht(args.run_id, args.initial_peers, host_maddrs=host_maddrs(args.host, args.port),
                     identity_path=args.identity)
    try:
        return dht, fetch_swarm_config(dht, args.run_id)
    except TimeoutError as e:
        fail(str(e))
        return dht, None


def fail(message: str) -> int:
    print(f"swarm: error: {message}", file=sys.stderr, flush=True)
    return 2
