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


def admission_of(args, swarm):
    """``(policy, token)``: the swarm's admission rule from its config, and this peer's --admission-token (the
    text, or read from @FILE). Raises ValueError with a clear message."""
    import os

    from swarm.admission import AdmissionPolicy

    policy = AdmissionPolicy.from_extra(args.run_id, swarm.extra)
    token = getattr(args, "admission_token", None)
    if token and token.startswith("@"):
        path = os.path.expanduser(token[1:])
        try:
            with open(path) as f:
                token = f.read().strip()
        except OSError as e:
            raise ValueError(f"cannot read the admission token file {path}: {e.strerror}") from None
    if policy.authority is not None and not token:
        raise ValueError("this swarm admits only allowlisted identities: ask its operator for a token "
                         "(`swarm admit --peer-id YOUR_PEER_ID`) and pass --admission-token")
    return policy, token


def prove_admission(args, swarm, dht):
    """``(policy, token, proof)`` for this peer's identity, the work solved and the token checked (None proof when
    the swarm has no admission rule). Raises ValueError with the reason."""
    from swarm.admission import AdmissionError

    policy, token = admission_of(args, swarm)
    if not policy.enabled:
        return policy, token, None
    if policy.pow_bits:
        print(f"swarm: solving the swarm's proof of work ({policy.pow_bits} bits) for this identity...",
              file=sys.stderr, flush=True)
    try:
        return policy, token, policy.prove(str(dht.peer_id), token)
    except AdmissionError as e:
        raise ValueError(f"this identity ({dht.peer_id}) is not admitted to swarm {args.run_id!r}: {e}") from None


def fail(message: str) -> int:
    print(f"swarm: error: {message}", file=sys.stderr, flush=True)
    return 2
