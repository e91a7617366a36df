"""Joining the DHT, the swarm's identity record, and stage announcements (publish with heartbeat, read back).

A swarm is named by its run id. Its creator publishes a :class:`SwarmConfigRecord` under ``{run}.config``;
everyone else reads it, so joining needs nothing but an initial peer address. If several signed configs
exist under the key (anyone may write their own subkey), the oldest one wins: the creator came first, and
a latecomer cannot take over an existing swarm by publishing another config.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time

from swarm.records import (
    MAX_ADDRS,
    MAX_TTL_S,
    StageRecord,
    SwarmConfigRecord,
    config_key,
    make_validators,
    parse_subkeyed,
    stage_key,
)

logger = logging.getLogger(__name__)

LOOPBACK_MADDR = "/ip4/127.0.0.1/tcp/0"


def create_dht(
    run_id: str,
    initial_peers: Sequence[str] = (),
    *,
    host_maddrs: Sequence[str] = (LOOPBACK_MADDR,),
    announce_maddrs: Sequence[str] = (),
    identity_path: Optional[str] = None,
    client_mode: bool = False,
    use_relay: bool = True,
    use_auto_relay: Optional[bool] = None,
    wait_timeout_s: float = 30.0,
) -> hivemind.DHT:
    """Start a DHT node in a background process with this swarm's record validators.

    ``use_relay`` lets libp2p reach peers through relays; ``use_auto_relay`` (default: only in client mode) makes
    this peer find relays among its peers and advertise ``/p2p-circuit`` addresses through them, so that it can
    be reached behind a NAT."""
    if use_auto_relay is None:
        use_auto_relay = use_relay and client_mode
    kwargs = dict(
        initial_peers=list(initial_peers),
        host_maddrs=list(host_maddrs),
        record_validators=make_validators(run_id),
        client_mode=client_mode,
        start=True,
        await_ready=True,
        startup_timeout=wait_timeout_s,
        use_relay=use_relay,
        use_auto_relay=use_auto_relay,
    )
    if announce_maddrs:
        kwargs["announce_maddrs"] = list(announce_maddrs)
    if identity_path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(identity_path)), exist_ok=True)
        kwargs["identity_path"] = identity_path
    return hivemind.DHT(**kwargs)


def visible_addresses(dht: hivemind.DHT) -> List[str]:
    return [str(addr) for addr in dht.get_visible_maddrs()]


def record_addresses(dht: hivemind.DHT) -> List[str]:
    """This peer's visible multiaddrs as a stage record lists them (at most MAX_ADDRS of <= 256 characters)."""
    try:
        addrs = visible_addresses(dht)
    except Exception as e:  # an address is a nicety for `swarm status`; never fail an announcement for it
        logger.debug(f"no visible addresses: {e}")
        return []
    return [addr for addr in addrs if 0 < len(addr) <= 256][:MAX_ADDRS]


def publish_swarm_config(dht: hivemind.DHT, record: SwarmConfigRecord, ttl_s: float = MAX_TTL_S) -> bool:
    """Store (or refresh) the swarm config, signed by this node. Returns whether the DHT accepted it."""
    return bool(dht.store(config_key(record.run_id), record.to_value(), get_dht_time() + ttl_s, subkey=_public_key()))


def _public_key() -> bytes:
    """This process's RSA public key marker: records under it are signed by the DHT's RSASignatureValidator."""
    return RSASignatureValidator().local_public_key


def fetch_swarm_config(dht: hivemind.DHT, run_id: str, timeout_s: float = 30.0) -> SwarmConfigRecord:
    """Read the swarm's config from the DHT, waiting up to ``timeout_s`` for it to appear."""
    deadline = get_dht_time() + timeout_s
    while True:
        records, rejected = parse_subkeyed(
            dht.get(config_key(run_id), latest=True), SwarmConfigRecord.from_value, "swarm config"
        )
        for note in rejected:
            logger.warning(f"ignored a swarm config record: {note}")
        valid = [rec for rec, _ in records.values() if rec.run_id == run_id]
        if valid:
            return min(valid, key=lambda rec: rec.created_at)
        if get_dht_time() > deadline:
            raise TimeoutError(
                f"no config for swarm {run_id!r} found on the DHT within {timeout_s:.0f}s: is the run id right, "
                f"and is the swarm's creator (swarm dht / swarm local) running?"
            )
        time.sleep(0.5)


@dataclass
class PeerInfo:
    """A live stage peer as read from the DHT."""

    record: StageRecord
    expiration_time: float

    @property
    def peer_id(self) -> str:
        return self.record.peer_id


def fetch_stage_peers(dht: hivemind.DHT, run_id: str, num_stages: int, policy=None) -> Dict[int, List[PeerInfo]]:
    """All unexpired, well-formed announcements per stage (offline ones included; callers filter by state).
    With an :class:`~swarm.admission.AdmissionPolicy`, announcements of identities it does not admit are left out."""
    keys = [stage_key(run_id, stage) for stage in range(num_stages)]
    found = {key: dht.get(key, latest=True) for key in keys}
    result: Dict[int, List[PeerInfo]] = {}
    for stage, key in enumerate(keys):
        records, rejected = parse_subkeyed(found.get(key), StageRecord.from_value, f"stage {stage} record")
        for note in rejected:
            logger.debug(note)
        by_peer: Dict[str, PeerInfo] = {}
        for rec, expiration in records.values():
            if rec.stage != stage:
                continue
            if policy is not None and not policy.admits(rec.peer_id, rec.admission):
                logger.debug(f"ignored stage {stage} record of {rec.peer_id[-8:]}: not admitted")
                continue
            known = by_peer.get(rec.peer_id)
            if known is None or rec.updated_at > known.record.updated_at:
                by_peer[rec.peer_id] = PeerInfo(rec, expiration)
        result[stage] = sorted(by_peer.values(), key=lambda info: info.peer_id)
    return result


async def cancel_task(task: Optional[asyncio.Task]) -> None:
    """Cancel a background loop and wait until it has stopped."""
    if task is not None:
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass


class Announcer:
    """Keeps one stage record alive: publishes it every ``period_s`` with a ttl of ``ttl_s``; offline on stop."""

    def __init__(self, dht: hivemind.DHT, run_id: str, record: StageRecord, period_s: float = 5.0, ttl_s: float = 15.0):
        if not 0 < period_s < ttl_s <= MAX_TTL_S:
            raise ValueError("announce period must be positive and shorter than the ttl (itself <= MAX_TTL_S)")
        self.dht, self.run_id, self.record = dht, run_id, record
        self.period_s, self.ttl_s = period_s, ttl_s
        self._task: Optional[asyncio.Task] = None

    async def publish(self) -> bool:
        self.record.updated_at = get_dht_time()
        future = self.dht.store(
            stage_key(self.run_id, self.record.stage),
            self.record.to_value(),
            get_dht_time() + self.ttl_s,
            subkey=_public_key(),
            return_future=True,
        )
        try:
            return bool(await future)
        except Exception as e:
            logger.warning(f"failed to announce stage {self.record.stage}: {e}")
            return False

    async def _loop(self) -> None:
        while True:
            await self.publish()
            await asyncio.sleep(self.period_s)

    def start(self) -> None:
        self._task = asyncio.get_event_loop().create_task(self._loop())

    async def stop(self, offline: bool = True) -> None:
        await cancel_task(self._task)
        if offline:
            self.record.state = "offline"
            await self.publish()
