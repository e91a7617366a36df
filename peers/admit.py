"""`swarm admit`: the swarm's authority signs an allowlist token for one identity (see swarm/admission.py)."""

from __future__ import annotations

import os

from peers.common import fail
from swarm.admission import issue_token, load_or_create_authority_key


def run(args) -> int:
    if not os.path.exists(args.authority_key):
        return fail(
            f"no authority key at {args.authority_key}: it is created by `swarm dht --authority-key FILE`"
        )
    try:
        key = load_or_create_authority_key(args.authority_key)
    except (ValueError, OSError) as e:
        return fail(f"cannot read the authority key {args.authority_key}: {e}")
    peer_id = args.peer_id
    if args.identity is not None:
        from hivemind.p2p import PeerID

        try:
            with open(os.path.expanduser(args.identity), "rb") as f:
                peer_id = PeerID.from_identity(f.read()).to_base58()
        except Exception as e:
            return fail(f"cannot read a libp2p identity from {args.identity}: {e}")
    if not args.ttl_days > 0:
        return fail("--ttl-days must be positive")
    print(issue_token(key, args.run_id, peer_id, ttl_s=args.ttl_days * 86400.0), flush=True)
    return 0
