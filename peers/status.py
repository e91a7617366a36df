"""`swarm status`: every peer of a swarm, its reputation and blacklisting, and the trainer's progress.

Joins the DHT in client mode (it needs no part in the swarm, and writes nothing), reads the records with
:class:`swarm.status.StatusReader` and prints text tables, or JSON (``--json``; the schema is in
:mod:`swarm.status`). ``--watch [SECONDS]`` refreshes in place (with ``--json``: one JSON document per line).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys

from peers.common import fail

CLEAR = "\x1b[H\x1b[2J"


def run(args) -> int:
    from swarm import aio
    from swarm.status import StatusError, connect

    if args.watch is not None and not (math.isfinite(args.watch) and args.watch > 0):
        return fail("--watch takes a positive number of seconds")
    if not (math.isfinite(args.timeout) and 0 < args.timeout <= 600):
        return fail("--timeout must be in (0, 600] seconds")
    server = None
    if args.serve:  # the port is taken before the DHT is joined: a port in use is a mistake found at once
        from swarm.dashboard import Dashboard, serve

        if not 0 <= args.port < 65536:
            return fail("--port must be in [0, 65535]")
        try:
            args.dashboard = Dashboard(refresh_s=args.watch or 5.0)
            server = serve(args.dashboard, args.host, args.port)
        except OSError as e:
            return fail(
                f"the dashboard cannot listen on {args.host}:{args.port}: {e.strerror or e}; pick another "
                f"--port"
            )
        host, port = server.server_address[:2]
        print(
            f"swarm status: dashboard at http://{host}:{port}/ (Prometheus metrics at /metrics); Ctrl-C stops",
            flush=True,
        )
    try:
        dht = connect(args.run_id, args.initial_peers, timeout_s=args.timeout)
    except StatusError as e:
        return fail(str(e))
    # not asyncio.run: on Ctrl-C it would wait for the DHT reads still running in executor threads (tens of
    # seconds against a slow DHT); close() leaves them behind, and the process exits without waiting for them
    loop = aio.new_event_loop()
    try:
        return loop.run_until_complete(_serve(dht, args) if args.serve else _show(dht, args))
    except KeyboardInterrupt:
        pass
    finally:
        loop.close()
        _shutdown(dht)
    # Ctrl-C: a DHT read may still block an executor thread (its DHT is gone now, so it may never return), and the
    # interpreter joins executor threads at exit: seen in CI as a --watch that ignored Ctrl-C for 90 s. Leave now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _shutdown(dht, grace_s: float = 10.0) -> None:
    """Stop the DHT process, but never let a slow goodbye keep a Ctrl-C waiting: kill it after ``grace_s``."""
    import threading

    stopper = threading.Thread(target=dht.shutdown, daemon=True)
    stopper.start()
    stopper.join(grace_s)
    if dht.is_alive():
        dht.kill()


async def _serve(dht, args) -> int:
    """Re-read the swarm every ``args.dashboard.refresh_s`` seconds into the dashboard the HTTP server shows."""
    from swarm.status import StatusError, StatusReader

    reader = StatusReader(dht, args.run_id, timeout_s=max(30.0, 2 * args.timeout))
    while True:
        try:
            args.dashboard.update((await reader.read()).to_json())
        except StatusError as e:
            args.dashboard.failed(str(e))
        await asyncio.sleep(args.dashboard.refresh_s)


async def _show(dht, args) -> int:
    from swarm.status import StatusError, StatusReader, render_text

    # reading every record can take longer than joining: a DHT node that just left (a finished trainer) costs
    # lookups their own timeouts until the routing tables forget it
    reader = StatusReader(dht, args.run_id, timeout_s=max(30.0, 2 * args.timeout))
    tty = sys.stdout.isatty()
    while True:
        try:
            status = await reader.read()
        except StatusError as e:
            if args.watch is None or reader.config is None:
                return fail(str(e))
            print(f"swarm status: {e}; retrying in {args.watch:g}s", file=sys.stderr, flush=True)
        else:
            if args.json:
                indent = None if args.watch is not None else 2
                print(json.dumps(status.to_json(), indent=indent, sort_keys=False), flush=True)
            else:
                text = render_text(status)
                if args.watch is not None:
                    text = (
                        (CLEAR if tty else "\n")
                        + text
                        + f"\n\n(refreshing every {args.watch:g}s; Ctrl-C to stop)"
                    )
                print(text, flush=True)
        if args.watch is None:
            return 0
        await asyncio.sleep(args.watch)
