"""Calling a stage peer's small RPCs from anywhere (``swarm status``, ``swarm join``, tests)."""

from __future__ import annotations

from typing import Any, Dict, List

import hivemind
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from swarm.reachability import DIALBACK_TIMEOUT_S
from swarm.stage_server import StageServer, namespace
from swarm.transport import TensorLimits, pack, receive, single


async def fetch_peer_info(p2p: hivemind.P2P, run_id: str, peer: str, timeout: float = 10.0) -> Dict[str, Any]:
    """Ask a stage peer about itself (its ``rpc_info``)."""
    stub = StageServer.get_stub(p2p, PeerID.from_base58(peer), namespace=namespace(run_id))
    reply = await stub.rpc_info(runtime_pb2.ExpertRequest(), timeout=timeout)
    return (await receive(single(reply), TensorLimits())).metadata


async def request_dialback(
    p2p: hivemind.P2P, run_id: str, peer: str, maddrs: List[str], timeout: float = 2 * DIALBACK_TIMEOUT_S + 10
) -> Dict[str, Any]:
    """Ask stage peer ``peer`` to dial this peer back at ``maddrs`` (see ``StageServer.rpc_dialback``)."""
    stub = StageServer.get_stub(p2p, PeerID.from_base58(peer), namespace=namespace(run_id))
    request = pack({"maddrs": list(maddrs)})[0]
    reply = await stub.rpc_dialback(request, timeout=timeout)
    return (await receive(single(reply), TensorLimits())).metadata
