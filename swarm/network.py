"""Joining the DHT, the swarm's identity record, and stage announcements (publish with heartbeat, read back).

**Identity.** A DHT node's records are signed with its libp2p identity key (an RSA key, the one its peer id is
derived from): :func:`create_dht` loads the ``identity_path`` file (creating it if missing), or generates a fresh
identity in a private temporary file that is deleted once the node runs, and gives that key to the node's
signature validator. Records are stored under :func:`owner_subkey` (the key's ``[owner:...]`` marker), so every
reader can check that a record about peer X was written by X (:func:`swarm.records.check_signer`).

**The swarm config is owned.** A swarm is named by its run id. Its creator (the ``swarm dht`` bootstrap) publishes
a :class:`SwarmConfigRecord` under ``{run}.config``; everyone else reads it, so joining needs nothing but an
initial peer address, and that address pins the config's owner: a reader accepts only a config signed by a peer
named in the ``/p2p/<peer id>`` part of its initial peers, or by itself (the creator reads its own)
(:func:`config_owners`). Anyone may write a config under their own subkey; such configs are never read. Among
owned configs the oldest wins. If configs exist but none is owned (a reader that joined through some other peer's
address), :func:`fetch_swarm_config` fails with a clear error naming the cause rather than fall back to an
unowned one: falling back would let any latecomer's config (``created_at=0``) replace the swarm's for that reader.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Collection, Dict, FrozenSet, List, Optional, Sequence

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from swarm.identity import load_identity_key
from swarm.inprocess import InProcessDHT
from swarm.records import (
    MAX_ADDRS,
    MAX_TTL_S,
    StageRecord,
    SwarmConfigRecord,
    config_key,
    make_validators,
    owner_peer_id,
    parse_subkeyed,
    stage_key,
)

logger = logging.getLogger(__name__)

LOOPBACK_MADDR = "/ip4/127.0.0.1/tcp/0"


def check_peer_addrs(addrs: Sequence[str]) -> None:
    """Raise ValueError unless every address is a peer multiaddr (``/ip4/HOST/tcp/PORT/p2p/PEER_ID``): checked
    before any identity, DHT process or daemon is created, so a typo costs nothing."""
    from hivemind.utils.multiaddr import Multiaddr

    for addr in addrs:
        try:
            Multiaddr(addr).value_for_protocol("p2p")
        except Exception:
            raise ValueError(
                f"{addr!r} is not a peer multiaddr like /ip4/HOST/tcp/PORT/p2p/PEER_ID (as printed by "
                f"`swarm dht` or `swarm local`)"
            ) from None


def explain_start_failure(initial_peers: Sequence[str], error: BaseException) -> str:
    """One line saying why a DHT node did not start, and what to do (hivemind raises P2PDaemonError with the
    daemon's own log line, or TimeoutError)."""
    text = " ".join(str(error).split())
    where = " ".join(initial_peers)
    if "failed to connect to bootstrap peers" in text or isinstance(error, TimeoutError):
        return (
            f"no peer answered at {where}: is the swarm's peer running there, and is this the address "
            f"`swarm dht` printed (with its /p2p/ peer id)?"
        )
    if "address already in use" in text.lower():
        return f"the listening port is in use ({text}): pick another --port, or 0 for a free one"
    return (
        f"could not start the DHT node{' through ' + where if where else ''}: {type(error).__name__}: {text}"
    )


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
    in_process: bool = True,
) -> hivemind.DHT:
    """Start a DHT node with this swarm's record validators, signing with its identity key: in a thread of this
    process (``swarm.inprocess``), or with ``in_process=False`` in a forked process as hivemind does.

    ``identity_path``: the libp2p identity file (created if missing); None: a fresh identity, kept only in memory
    (its file lives in a private temporary directory until the node has started). ``use_relay`` lets libp2p reach
    peers through relays; ``use_auto_relay`` (default: only in client mode) makes this peer find relays among its
    peers and advertise ``/p2p-circuit`` addresses through them, so that it can be reached behind a NAT."""
    if use_auto_relay is None:
        use_auto_relay = use_relay and client_mode
    kwargs = dict(
        initial_peers=list(initial_peers),
        host_maddrs=list(host_maddrs),
        client_mode=client_mode,
        start=True,
        await_ready=True,
        startup_timeout=wait_timeout_s,
        use_relay=use_relay,
        use_auto_relay=use_auto_relay,
    )
    if announce_maddrs:
        kwargs["announce_maddrs"] = list(announce_maddrs)
    temporary_dir = None
    if identity_path is None:
        temporary_dir = tempfile.mkdtemp(prefix="swarm-identity-")  # mode 0o700: private to this user
        identity_path = os.path.join(temporary_dir, "identity.key")
    else:
        os.makedirs(os.path.dirname(os.path.abspath(identity_path)), exist_ok=True)
    if not os.path.isfile(identity_path):
        P2P.generate_identity(
            identity_path
        )  # as hivemind would (mode 0o400), but now, so that we hold the key
        kwargs["check_if_identity_free"] = False  # a key made this instant is nobody else's
    try:
        key = load_identity_key(identity_path)
        dht_cls = InProcessDHT if in_process else hivemind.DHT
        dht = dht_cls(identity_path=identity_path, record_validators=make_validators(run_id, key), **kwargs)
    finally:
        if (
            temporary_dir is not None
        ):  # the daemon has read it (await_ready): the key now lives only in memory
            shutil.rmtree(temporary_dir, ignore_errors=True)
    dht.swarm_owner_subkey = RSASignatureValidator(key).local_public_key
    dht.swarm_identity_key = key
    return dht


def identity_key(dht: hivemind.DHT) -> Optional[RSAPrivateKey]:
    """The private key of a node made by :func:`create_dht` (its libp2p identity; it signs chain headers and hop
    reports), or None."""
    return getattr(dht, "swarm_identity_key", None)


def owner_subkey(dht: hivemind.DHT) -> bytes:
    """The subkey a DHT node stores its records under: the ``[owner:...]`` marker of its identity key, which its
    validator signs with. A node not made by :func:`create_dht` signs with the process-wide key (hivemind's default).
    """
    marker = getattr(dht, "swarm_owner_subkey", None)
    return marker if marker is not None else RSASignatureValidator().local_public_key


def peer_ids_in(maddrs: Sequence) -> FrozenSet[str]:
    """The peer ids in the ``/p2p/<id>`` (or ``/ipfs/<id>``) parts of multiaddrs; of a relay address
    (``.../p2p/RELAY/p2p-circuit/p2p/TARGET``) only the target's."""
    ids = set()
    for maddr in maddrs:
        parts = str(maddr).split("/")
        found = [parts[i + 1] for i in range(len(parts) - 1) if parts[i] in ("p2p", "ipfs") and parts[i + 1]]
        if found:
            ids.add(found[-1])
    return frozenset(ids)


def config_owners(dht: hivemind.DHT) -> FrozenSet[str]:
    """Whose swarm config this node reads: the peers named by the initial peers it joined through, and itself."""
    return peer_ids_in(dht.initial_peers or ()) | {str(dht.peer_id)}


def visible_addresses(dht: hivemind.DHT) -> List[str]:
    return [str(addr) for addr in dht.get_visible_maddrs()]


def record_addresses(dht: hivemind.DHT) -> List[str]:
    """This peer's visible multiaddrs as a stage record lists them (at most MAX_ADDRS of <= 256 characters)."""
    try:
        addrs = visible_addresses(dht)
    except Exception as e:  # an address is a nicety for `swarm status`; never fail an announcement for it
        logger.debug(f"no visible addresses: {e}")
        return []
    addrs = [addr for addr in addrs if 0 < len(addr) <= 256]
    # reachable addresses first: a peer listening on 0.0.0.0 (a container) lists loopback too, which only its own
    # host can dial; the first address is the one `swarm status` shows
    addrs.sort(key=lambda addr: addr.startswith(("/ip4/127.", "/ip6/::1/")))
    return addrs[:MAX_ADDRS]


def publish_swarm_config(dht: hivemind.DHT, record: SwarmConfigRecord, ttl_s: float = MAX_TTL_S) -> bool:
    """Store (or refresh) the swarm config, signed by this node. Returns whether the DHT accepted it."""
    return bool(
        dht.store(
            config_key(record.run_id), record.to_value(), get_dht_time() + ttl_s, subkey=owner_subkey(dht)
        )
    )


def fetch_swarm_config(
    dht: hivemind.DHT, run_id: str, timeout_s: float = 30.0, owners: Optional[Collection[str]] = None
) -> SwarmConfigRecord:
    """Read the swarm's config from the DHT, waiting up to ``timeout_s`` for it to appear. Only a config signed by
    one of ``owners`` (peer ids; default :func:`config_owners`) is read; the oldest of those wins."""
    owners = config_owners(dht) if owners is None else frozenset(owners)
    deadline = get_dht_time() + timeout_s
    ignored: set = set()
    while True:
        records, rejected = parse_subkeyed(
            dht.get(config_key(run_id), latest=True), SwarmConfigRecord.from_value, "swarm config"
        )
        for note in rejected:
            logger.warning(f"ignored a swarm config record: {note}")
        owned, foreign = [], set()
        for subkey, (rec, _) in records.items():
            if rec.run_id != run_id:
                continue
            owner = owner_peer_id(subkey)
            if owner in owners:
                owned.append(rec)
            else:
                foreign.add(owner)
        for owner in foreign - ignored:
            logger.warning(
                f"ignored a swarm config record signed by {owner}: not a peer this node joined through"
            )
        ignored |= foreign
        if owned:
            return min(owned, key=lambda rec: rec.created_at)
        if get_dht_time() > deadline:
            if ignored:
                raise TimeoutError(
                    f"swarm {run_id!r} has config records on the DHT, but none signed by a peer this node joined "
                    f"through ({', '.join(sorted(owners))}): join through the address of the swarm's creator (the "
                    f"`--initial-peers` address that `swarm dht` / `swarm local` prints)"
                )
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


def fetch_stage_peers(
    dht: hivemind.DHT,
    run_id: str,
    num_stages: int,
    policy=None,
    stages: Optional[Sequence[int]] = None,
) -> Dict[int, List[PeerInfo]]:
    """All unexpired, well-formed announcements per stage (offline ones included; callers filter by state), of
    every stage or only of ``stages``. With an :class:`~swarm.admission.AdmissionPolicy`, announcements of
    identities it does not admit are left out."""
    stages = list(range(num_stages)) if stages is None else list(stages)
    keys = {stage: stage_key(run_id, stage) for stage in stages}
    found = {key: dht.get(key, latest=True) for key in keys.values()}
    result: Dict[int, List[PeerInfo]] = {}
    for stage, key in keys.items():
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

    def __init__(
        self, dht: hivemind.DHT, run_id: str, record: StageRecord, period_s: float = 5.0, ttl_s: float = 15.0
    ):
        if not 0 < period_s < ttl_s <= MAX_TTL_S:
            raise ValueError(
                "announce period must be positive and shorter than the ttl (itself <= MAX_TTL_S)"
            )
        self.dht, self.run_id, self.record = dht, run_id, record
        self.period_s, self.ttl_s = period_s, ttl_s
        self._task: Optional[asyncio.Task] = None

    async def publish(self) -> bool:
        self.record.updated_at = get_dht_time()
        future = self.dht.store(
            stage_key(self.run_id, self.record.stage),
            self.record.to_value(),
            get_dht_time() + self.ttl_s,
            subkey=owner_subkey(self.dht),
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
