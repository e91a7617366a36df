"""Helpers shared by the roles: listen addresses, shutdown signals, machine-readable lines for launchers."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import threading
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


class UserError(Exception):
    """A mistake the user can fix (a bad or dead address, a missing file, a bad value): the CLI prints it as one
    ``swarm: error: ...`` line and exits 2, without a traceback."""


def check_readable(paths, flag: str) -> None:
    """Raise :class:`UserError` unless every path (a file or directory) exists and can be read."""
    import os

    for path in paths:
        if not os.path.exists(path):
            raise UserError(f"{flag} {path}: no such file or directory")
        if not os.access(path, os.R_OK):
            raise UserError(f"{flag} {path}: not readable")


def check_initial_peers(args) -> None:
    """Raise :class:`UserError` unless ``--initial-peers`` are peer multiaddrs: before any identity or process."""
    from swarm.network import check_peer_addrs

    try:
        check_peer_addrs(getattr(args, "initial_peers", None) or [])
    except ValueError as e:
        raise UserError(f"--initial-peers: {e}") from None


def open_dht(run_id: str, initial_peers, **kwargs):
    """:func:`swarm.network.create_dht`, with a failure to start (no peer answers, a port in use) raised as a
    :class:`UserError` that says what to do."""
    from swarm.network import create_dht, explain_start_failure

    try:
        return create_dht(run_id, initial_peers, **kwargs)
    except Exception as e:  # hivemind: P2PDaemonError with the daemon's log line, or TimeoutError
        raise UserError(explain_start_failure(initial_peers, e)) from e


def join_swarm(args):
    """Join the DHT and read the swarm's config: ``(dht, config)``, config None (the reason printed) if absent.
    The caller shuts the DHT down. Raises :class:`UserError` if the DHT cannot be joined."""
    from swarm.network import fetch_swarm_config

    check_initial_peers(args)
    dht = open_dht(
        args.run_id,
        args.initial_peers,
        host_maddrs=host_maddrs(args.host, args.port),
        identity_path=args.identity,
    )
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
        raise ValueError(
            "this swarm admits only allowlisted identities: ask its operator for a token "
            "(`swarm admit --peer-id YOUR_PEER_ID`) and pass --admission-token"
        )
    return policy, token


def prove_admission(args, swarm, dht):
    """``(policy, token, proof)`` for this peer's identity, the work solved and the token checked (None proof when
    the swarm has no admission rule). Raises ValueError with the reason."""
    from swarm.admission import AdmissionError

    policy, token = admission_of(args, swarm)
    if not policy.enabled:
        return policy, token, None
    if policy.pow_bits:
        print(
            f"swarm: solving the swarm's proof of work ({policy.pow_bits} bits) for this identity...",
            file=sys.stderr,
            flush=True,
        )
    try:
        return policy, token, policy.prove(str(dht.peer_id), token)
    except AdmissionError as e:
        raise ValueError(
            f"this identity ({dht.peer_id}) is not admitted to swarm {args.run_id!r}: {e}"
        ) from None


PARENT_PID_ENV = "SWARM_PARENT_PID"  # set by `swarm local` (and the tests' launcher) for the roles it starts
ORPHAN_GRACE_S = 30.0
ORPHANED = threading.Event()  # set once the launcher is gone: the role's whole process group ends with it


def die_with_parent(parent_pid: int, grace_s: float = ORPHAN_GRACE_S, poll_s: float = 0.5) -> None:
    """Make this role leave when the process that launched it is gone, however it died (SIGKILL included):
    a watcher thread sends this process SIGTERM (a clean leave: offline announced, in-flight work finished); when
    the role then exits (:func:`end_orphaned_group`), or ``grace_s`` later if it has not, its whole process group is
    killed: its DHT process, averagers and p2p daemon, which a clean leave does not always reap. Polling the
    parent's pid works where Linux's PR_SET_PDEATHSIG does not reach (macOS, and grandchildren)."""
    import os
    import time

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        ORPHANED.set()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        end_orphaned_group()
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def end_orphaned_group() -> None:
    """If the launcher is gone and this role leads its own process group (as `swarm local` starts it), SIGKILL the
    group, this process included: nothing of the role outlives it. Never a group this process does not lead (a
    user's shell)."""
    import os

    if ORPHANED.is_set() and os.getpgid(0) == os.getpid():
        sys.stdout.flush()
        sys.stderr.flush()
        os.killpg(os.getpid(), signal.SIGKILL)


def fail(message: str) -> int:
    """One ``swarm: error:`` line (a message that quotes a multi-line reason, e.g. libp2p's, is joined) and exit 2."""
    print(f"swarm: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    return 2
