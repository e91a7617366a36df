"""The trainer's retries (swarm.trainer), in-process: attempts replaced by scripted outcomes, the real router."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import torch

from swarm.records import StageRecord
from swarm.router import Router, RouterConfig
from swarm.trainer import Attempt, Trainer, TrainerConfig, repeated_hop


def trainer_over(layout, outcome):
    """A trainer whose router knows ``layout`` ({stage: [peers]}) and whose attempts end as ``outcome(chain)``."""
    router = Router(len(layout), RouterConfig(seed=0, verdict_ban_s=0.0))
    router.update(
        {
            stage: [
                SimpleNamespace(record=StageRecord(peer_id=p, stage=stage, state="online")) for p in peers
            ]
            for stage, peers in layout.items()
        }
    )
    stream = SimpleNamespace(microbatch_size=2, microbatch=lambda index: torch.zeros(2, 4, dtype=torch.long))
    trainer = Trainer(
        TrainerConfig(run_id="t", num_stages=len(layout), steps=1, microbatches_per_step=4),
        None,
        stream,
        router=router,
    )
    chains = []

    async def attempt(index, attempt, chain, ids):
        chains.append(list(chain))
        return outcome(chain)

    trainer._attempt = attempt
    return trainer, chains


def rejected_at_stage_1(chain):
    """stage 1's check rejects what a0 sends it (a SENTINEL verdict: blame a0, judged by the receiver)."""
    if chain[0] == "a0":
        return Attempt(False, reason="stage 1: skew_align 20 > 12", blame="a0", judge=chain[1])
    return Attempt(True, loss=5.0)


def test_a_rejected_tensor_is_not_resent_to_the_same_check():
    """With one replica per stage, a micro-batch whose tensor a check rejected is dropped with the reason at once,
    not re-sent identically until its attempts run out (each a strike on the sender); the ledger ends it once."""
    trainer, chains = trainer_over({0: ["a0"], 1: ["b0"]}, rejected_at_stage_1)
    asyncio.run(trainer.run_microbatch(0))
    assert chains == [["a0", "b0"]]
    assert trainer.ledger.counts() == dict(completed=0, retried=0, dropped=1)
    assert "not re-sent" in trainer.ledger.drop_reason[0] and "skew_align" in trainer.ledger.drop_reason[0]


def test_a_rejected_tensor_is_retried_where_another_check_or_sender_exists():
    """A second receiver is another check; a second sender another tensor: the micro-batch is retried there."""
    trainer, chains = trainer_over(
        {0: ["a0"], 1: ["b0", "b1"]},
        lambda c: rejected_at_stage_1(c) if c[1] == "b0" else Attempt(True, loss=5.0),
    )
    for index in range(4):
        asyncio.run(trainer.run_microbatch(index))
    assert trainer.ledger.counts()["completed"] == 4 and trainer.ledger.counts()["dropped"] == 0
    trainer, chains = trainer_over({0: ["a0", "a1"], 1: ["b0"]}, rejected_at_stage_1)
    for index in range(4):
        asyncio.run(trainer.run_microbatch(index))
    assert trainer.ledger.counts()["completed"] == 4 and ["a1", "b0"] in chains


def test_repeated_hop_looks_both_ways():
    rejected = {("b", "a")}  # b's gradient rejected by a
    assert repeated_hop(["a", "b", "c"], rejected) == ("b", "a")
    assert repeated_hop(["b", "a"], rejected) == ("b", "a")
    assert repeated_hop(["a", "c", "b"], rejected) is None
    assert repeated_hop(["a", "b"], set()) is None


def test_a_retry_avoids_every_hop_that_rejected_the_micro_batch():
    """After several rejections the retry's chain is searched for (leaving out judges or senders) until it repeats
    none of them; only when every chain would repeat one is there none."""
    layout = {0: ["a0"], 1: ["b0", "b1", "b2"], 2: ["c0", "c1"]}
    rejected = {("b0", "c0"), ("b0", "c1"), ("b1", "c0"), ("b2", "c1")}
    trainer, _ = trainer_over(layout, rejected_at_stage_1)
    for _ in range(10):
        chain = trainer.router.pick_chain()
        found = trainer._chain_avoiding(chain, rejected)
        assert found is not None and repeated_hop(found, rejected) is None, found
        trainer.router.release(found)
    everything = {(b, c) for b in layout[1] for c in layout[2]}
    assert trainer._chain_avoiding(trainer.router.pick_chain(), everything) is None
    assert all(state.inflight == 0 for state in trainer.router.peers.values())  # every pick released
