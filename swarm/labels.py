"""Labels deposited by trainers at a last-stage peer, bounded and single-use (``StageServer.rpc_labels``)."""

from __future__ import annotations

import asyncio
import time
from typing import Dict, Tuple

import torch

from swarm.transport import TransportError


class LabelBox:
    """Labels deposited by trainers, waited for by the last stage. Bounded: at most ``per_trainer`` deposits held
    for one trainer and ``total`` for all, each expiring after ``ttl_s``; a key whose labels were used is
    remembered for ``ttl_s``, so a replayed request is refused at once instead of waiting for labels that never
    come again."""

    def __init__(self, ttl_s: float, per_trainer: int = 64, total: int = 1024):
        self.ttl_s, self.per_trainer, self.total = ttl_s, per_trainer, total
        self._futures: Dict[Tuple[str, str], Tuple[asyncio.Future, float]] = {}
        self._used: Dict[Tuple[str, str], float] = {}

    def _expire(self, now: float) -> None:
        for stale in [k for k, (_, t) in self._futures.items() if now - t > self.ttl_s]:
            self._futures.pop(stale)[0].cancel()
        for stale in [k for k, t in self._used.items() if now - t > self.ttl_s]:
            del self._used[stale]

    def _future(self, key: Tuple[str, str], deposit: bool = False) -> asyncio.Future:
        now = time.monotonic()
        self._expire(now)
        if key not in self._futures:
            if (
                len(self._futures) >= self.total
                or sum(k[0] == key[0] for k in self._futures) >= self.per_trainer
            ):
                # a waiter's key is refused too: it would hold a slot that no deposit may fill
                raise TransportError(
                    f"labels of {'this trainer' if deposit else 'this request'} over the limit "
                    f"({self.per_trainer} per trainer, {self.total} in all); retry later"
                )
            self._futures[key] = (asyncio.get_event_loop().create_future(), now)
        return self._futures[key][0]

    def used(self, key: Tuple[str, str]) -> bool:
        return key in self._used

    def put(self, key: Tuple[str, str], labels: torch.Tensor) -> None:
        if key in self._used:
            raise TransportError(f"labels of micro-batch {key[1]!r} were used already")
        future = self._future(key, deposit=True)
        if future.done():
            raise TransportError(f"labels of micro-batch {key[1]!r} were deposited already")
        future.set_result(labels)

    async def take(self, key: Tuple[str, str], timeout: float) -> torch.Tensor:
        """The labels of ``key``, waiting up to ``timeout`` for them. Taken or not, the key is spent: its slot is
        freed, and a later deposit or request for it is refused (the trainer retries under a new id)."""
        try:
            return await asyncio.wait_for(asyncio.shield(self._future(key)), timeout)
        finally:
            entry = self._futures.pop(key, None)
            if entry is not None:
                entry[0].cancel()
            self._used[key] = time.monotonic()
            while len(self._used) > 8 * self.total:  # bounded even under a flood of distinct (signed) ids
                self._used.pop(next(iter(self._used)))
