"""Choosing a chain of peers (one per stage) for each micro-batch.

Per stage the router picks the peer with the least expected busy time, as SWARM parallelism does:
``(micro-batches it has in flight from us + 1) x its expected time per micro-batch``. The expected time is an
EMA of what the peer actually took (forward + backward, from the timings each chain returns); a peer never
measured starts at the stage's current best estimate, so new peers get tried. A small random jitter spreads
ties, and the router never picks the same chain twice in a row when an alternative exists, so every peer
meets many different neighbours (stochastic wiring: load spreads, and a Byzantine peer faces many judges).

Failing peers are banned locally with exponential backoff (``base_s x 2^k``, capped); a success halves k.
A swarm-wide blacklist (the reputation layer) plugs in as a predicate.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence


class NoRouteError(RuntimeError):
    """No usable peer for some stage right now."""

    def __init__(self, stage: int, reason: str):
        super().__init__(f"no usable peer for stage {stage}: {reason}")
        self.stage = stage


@dataclass
class _Ban:
    until: float
    strikes: int
    reason: str


class LocalBans:
    """Temporary local bans with exponential backoff."""

    def __init__(self, base_s: float = 5.0, max_s: float = 300.0, clock: Callable[[], float] = time.monotonic):
        self.base_s, self.max_s, self.clock = base_s, max_s, clock
        self._bans: Dict[str, _Ban] = {}

    def ban(self, peer: str, reason: str) -> float:
        """Ban ``peer``; returns the ban's duration in seconds."""
        prev = self._bans.get(peer)
        strikes = prev.strikes + 1 if prev else 1
        duration = min(self.base_s * 2 ** (strikes - 1), self.max_s)
        self._bans[peer] = _Ban(self.clock() + duration, strikes, reason)
        return duration

    def success(self, peer: str) -> None:
        ban = self._bans.get(peer)
        if ban is not None:
            ban.strikes //= 2
            if ban.strikes == 0 and ban.until <= self.clock():
                del self._bans[peer]

    def reason(self, peer: str) -> Optional[str]:
        ban = self._bans.get(peer)
        return ban.reason if ban is not None and ban.until > self.clock() else None

    def is_banned(self, peer: str) -> bool:
        return self.reason(peer) is not None


@dataclass
class PeerState:
    """What the router knows of one stage peer."""

    peer_id: str
    stage: int
    announced_throughput: float = 0.0  # samples/s, self-reported
    time_ema_s: Optional[float] = None  # measured seconds per micro-batch at this peer
    inflight: int = 0
    chosen: int = 0
    succeeded: int = 0
    failed: int = 0


@dataclass(kw_only=True)
class RouterConfig:
    ema_alpha: float = 0.2
    jitter: float = 0.1  # relative random noise on expected busy time, spreads ties
    ban_base_s: float = 5.0
    ban_max_s: float = 300.0
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if not (0 < self.ema_alpha <= 1 and 0 <= self.jitter < 1 and self.ban_base_s > 0):
            raise ValueError("router: ema_alpha in (0, 1], jitter in [0, 1), ban_base_s > 0")


class Router:
    """Picks chains; learns peers' speed from completed chains; bans failing peers."""

    def __init__(
        self,
        num_stages: int,
        cfg: Optional[RouterConfig] = None,
        *,
        is_blacklisted: Optional[Callable[[str], bool]] = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.num_stages = num_stages
        self.cfg = cfg or RouterConfig()
        self.rng = random.Random(self.cfg.seed)
        self.bans = LocalBans(self.cfg.ban_base_s, self.cfg.ban_max_s, clock)
        self.is_blacklisted = is_blacklisted or (lambda peer: False)
        self.peers: Dict[str, PeerState] = {}
        self.live: Dict[int, List[str]] = {stage: [] for stage in range(num_stages)}
        self.last_chain: Optional[List[str]] = None
        self.microbatch_size = 1

    def update(self, stage_peers: Dict[int, Iterable]) -> None:
        """Replace the set of live peers from DHT announcements ({stage: [PeerInfo-like with .record]})."""
        live: Dict[int, List[str]] = {stage: [] for stage in range(self.num_stages)}
        for stage, infos in stage_peers.items():
            if not 0 <= stage < self.num_stages:
                continue
            for info in infos:
                rec = info.record
                if rec.state != "online":
                    continue
                state = self.peers.get(rec.peer_id)
                if state is None or state.stage != stage:
                    state = self.peers[rec.peer_id] = PeerState(rec.peer_id, stage)
                state.announced_throughput = rec.throughput
                live[stage].append(rec.peer_id)
        self.live = live

    def usable(self, stage: int) -> List[str]:
        return [p for p in self.live.get(stage, []) if not self.bans.is_banned(p) and not self.is_blacklisted(p)]

    def expected_time_s(self, state: PeerState) -> float:
        if state.time_ema_s is not None:
            return state.time_ema_s
        if state.announced_throughput > 0:
            return self.microbatch_size / state.announced_throughput
        measured = [
            self.peers[p].time_ema_s for p in self.live.get(state.stage, []) if self.peers[p].time_ema_s is not None
        ]
        return min(measured) if measured else 1.0  # enter at the stage's best, so new peers get tried

    def busy_time_s(self, state: PeerState) -> float:
        return (state.inflight + 1) * self.expected_time_s(state)

    def _rank(self, stage: int, exclude: Sequence[str]) -> List[str]:
        candidates = [p for p in self.usable(stage) if p not in exclude]
        if not candidates:
            live = self.live.get(stage, [])
            why = "no peer announced" if not live else f"all {len(live)} peer(s) banned, blacklisted or excluded"
            raise NoRouteError(stage, why)
        noisy = {p: self.busy_time_s(self.peers[p]) * (1 + self.cfg.jitter * self.rng.uniform(-1, 1)) for p in candidates}
        return sorted(candidates, key=noisy.__getitem__)

    def pick_chain(self, exclude: Sequence[str] = ()) -> List[str]:
        """One peer per stage, least expected busy time first, never the previous chain if avoidable."""
        ranked = [self._rank(stage, exclude) for stage in range(self.num_stages)]
        chain = [options[0] for options in ranked]
        if chain == self.last_chain:
            alternatives = [s for s, options in enumerate(ranked) if len(options) > 1]
            if alternatives:
                stage = self.rng.choice(alternatives)
                chain[stage] = ranked[stage][1]
        self.last_chain = list(chain)
        for peer in chain:
            self.peers[peer].inflight += 1
            self.peers[peer].chosen += 1
        return chain

    def release(self, chain: Sequence[str]) -> None:
        """The chain's micro-batch is over (success or failure): it no longer occupies its peers."""
        for peer in chain:
            if peer in self.peers:
                self.peers[peer].inflight = max(0, self.peers[peer].inflight - 1)

    def report_success(self, chain: Sequence[str], hop_times_s: Dict[str, float]) -> None:
        for peer in chain:
            state = self.peers.get(peer)
            if state is None:
                continue
            state.succeeded += 1
            self.bans.success(peer)
            seconds = hop_times_s.get(peer)
            if seconds is not None and math.isfinite(seconds) and seconds >= 0:
                a = self.cfg.ema_alpha
                state.time_ema_s = seconds if state.time_ema_s is None else (1 - a) * state.time_ema_s + a * seconds

    def report_failure(self, peer: str, reason: str) -> float:
        """Ban a peer locally; returns the ban's duration."""
        if peer in self.peers:
            self.peers[peer].failed += 1
        return self.bans.ban(peer, reason)

