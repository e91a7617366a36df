"""Tests for swarm.trainer.MicroBatchLedger: every micro-batch ends exactly once; retries are only counted."""

from __future__ import annotations

import pytest

from swarm.trainer import MicroBatchLedger


def test_counts_add_up():
    ledger = MicroBatchLedger()
    assert ledger.counts() == dict(completed=0, retried=0, dropped=0)
    ledger.retry(0, "chain timed out after 60s")
    ledger.complete(0, 2.5)
    ledger.complete(1, 2.25)
    ledger.retry(2, "first peer unreachable: ConnectionError: refused")
    ledger.retry(2, "first peer unreachable: ConnectionError: reset")
    ledger.drop(2, "no route")
    ledger.drop(3, "no usable peer for stage 1: no peer announced")
    assert ledger.counts() == dict(completed=2, retried=3, dropped=2)
    assert ledger.loss == {0: 2.5, 1: 2.25}
    assert ledger.drop_reason == {2: "no route", 3: "no usable peer for stage 1: no peer announced"}
    assert ledger.outcome == {0: "completed", 1: "completed", 2: "dropped", 3: "dropped"}
    counts = ledger.counts()
    assert counts["completed"] + counts["dropped"] == len(ledger.outcome)


def test_complete_twice_raises():
    ledger = MicroBatchLedger()
    ledger.complete(5, 1.0)
    with pytest.raises(RuntimeError, match="micro-batch 5 already ended as completed, not completed"):
        ledger.complete(5, 0.5)
    assert ledger.loss[5] == 1.0  # the first outcome stands
    assert ledger.counts()["completed"] == 1


def test_drop_twice_raises():
    ledger = MicroBatchLedger()
    ledger.drop(1, "first")
    with pytest.raises(RuntimeError, match="micro-batch 1 already ended as dropped, not dropped"):
        ledger.drop(1, "second")
    assert ledger.drop_reason[1] == "first"
    assert ledger.counts()["dropped"] == 1


def test_complete_after_drop_and_drop_after_complete_raise():
    ledger = MicroBatchLedger()
    ledger.drop(1, "gave up")
    with pytest.raises(RuntimeError, match="already ended as dropped, not completed"):
        ledger.complete(1, 3.0)
    ledger.complete(2, 3.0)
    with pytest.raises(RuntimeError, match="already ended as completed, not dropped"):
        ledger.drop(2, "late failure")
    assert 1 not in ledger.loss and 2 not in ledger.drop_reason
    assert ledger.counts() == dict(completed=1, retried=0, dropped=1)


def test_retry_after_end_raises():
    ledger = MicroBatchLedger()
    ledger.complete(0, 1.0)
    ledger.drop(1, "x")
    with pytest.raises(RuntimeError, match="micro-batch 0 already ended as completed"):
        ledger.retry(0, "timeout")
    with pytest.raises(RuntimeError, match="micro-batch 1 already ended as dropped"):
        ledger.retry(1, "timeout")
    assert ledger.retried == 0 and not ledger.retry_reasons


def test_retry_reasons_are_tallied_by_prefix():
    ledger = MicroBatchLedger()
    ledger.retry(0, "chain timed out after 60s")
    ledger.retry(0, "chain timed out after 60s")
    ledger.retry(1, "malformed reply: tensor rank 5 exceeds 4")
    ledger.retry(2, "malformed reply: metadata must be a map")
    ledger.retry(3, "labels not delivered: TimeoutError: ")
    ledger.retry(4, "x" * 200)
    assert ledger.retried == 6
    assert ledger.retry_reasons == {
        "chain timed out after 60s": 2,
        "malformed reply": 2,
        "labels not delivered": 1,
        "x" * 80: 1,
    }
    assert sum(ledger.retry_reasons.values()) == ledger.counts()["retried"]
