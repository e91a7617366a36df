"""Label deposits at a last-stage peer (swarm.labels): bounded per trainer and in all, single-use, expiring."""

import asyncio

import pytest
import torch

from swarm.labels import LabelBox
from swarm.transport import TransportError


def test_labels_are_taken_once_and_a_replay_is_refused_at_once():
    async def go():
        box = LabelBox(ttl_s=60)
        labels = torch.zeros(2, 4, dtype=torch.int64)
        box.put(("T", "1.0"), labels)
        with pytest.raises(TransportError, match="deposited already"):
            box.put(("T", "1.0"), labels)
        assert torch.equal(await box.take(("T", "1.0"), 1.0), labels)
        assert box.used(("T", "1.0"))
        with pytest.raises(TransportError, match="used already"):
            box.put(("T", "1.0"), labels)
        with pytest.raises(
            asyncio.TimeoutError
        ):  # a request nobody deposited for: waits, then the id is spent
            await box.take(("T", "2.0"), 0.05)
        assert box.used(("T", "2.0")) and not box._futures

    asyncio.run(go())


def test_deposits_are_capped_per_trainer_and_in_all():
    async def go():
        box = LabelBox(ttl_s=60, per_trainer=3, total=5)
        for i in range(3):
            box.put(("T", f"{i}"), torch.zeros(1, 2, dtype=torch.int64))
        with pytest.raises(TransportError, match="over the limit"):
            box.put(("T", "3"), torch.zeros(1, 2, dtype=torch.int64))
        box.put(("U", "0"), torch.zeros(1, 2, dtype=torch.int64))
        box.put(("V", "0"), torch.zeros(1, 2, dtype=torch.int64))
        with pytest.raises(TransportError, match="over the limit"):
            box.put(("W", "0"), torch.zeros(1, 2, dtype=torch.int64))
        await box.take(("T", "0"), 1.0)  # taking frees a slot
        box.put(("W", "0"), torch.zeros(1, 2, dtype=torch.int64))

    asyncio.run(go())
