"""The gate of a hop (swarm.gate): which verdicts become ledger entries, once per exchange. Pure logic, no network;
the stage server and the simulator both run this code."""

import torch

from swarm.audit import AUDIT, ROUTE, judge
from swarm.gate import AUDIT_REASON, Gate
from swarm.reputation import ReputationLedger
from swarm.sentinel import FORWARD, SentinelConfig, SentinelMonitor


def _gate(warmup: int = 3):
    ledger = ReputationLedger()
    return Gate(SentinelMonitor(SentinelConfig(warmup=warmup, seed=0)), ledger), ledger


def _tally(ledger, peer):
    t = ledger.tallies.get(peer)
    return (t.clean, t.strikes) if t else (0, 0)


def test_activations_at_a_middle_stage_are_one_entry_each_and_nan_is_a_strike():
    gate, ledger = _gate()
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16)
    for i in range(3):
        verdict = gate.activations(
            torch.randn(2, 8, 16), "a", microbatch=f"t:{i}", step=20, epoch=0, last_stage=False
        )
        assert verdict.accepted, verdict
    assert _tally(ledger, "a") == (3, 0)
    bad = x.clone()
    bad[0, 0, 0] = float("nan")
    assert not gate.activations(bad, "a", microbatch="t:9", step=20, epoch=0, last_stage=False).accepted
    assert _tally(ledger, "a") == (3, 1)


def test_at_the_last_stage_the_loss_verdict_is_the_one_entry_for_accepted_activations():
    gate, ledger = _gate()
    x, tokens = torch.randn(2, 8, 16), torch.randint(0, 100, (2, 8))
    assert gate.activations(x, "a", microbatch="t:0", step=20, epoch=0, last_stage=True).accepted
    assert _tally(ledger, "a") == (0, 0)  # not yet: the loss is judged next
    assert gate.loss(
        4.0, "a", microbatch="t:0", step=20, epoch=0, activations=x, tokens=tokens, attributable=True
    ).accepted
    assert _tally(ledger, "a") == (1, 0)
    bad = x.clone()
    bad[1, 1, 1] = float("inf")  # rejected at once: an entry, and no loss check follows
    assert not gate.activations(bad, "a", microbatch="t:1", step=20, epoch=0, last_stage=True).accepted
    assert _tally(ledger, "a") == (1, 1)


def test_an_audited_gradient_is_entered_by_its_audit_and_a_flip_is_refused_and_blamed():
    gate, ledger = _gate()
    torch.manual_seed(0)
    sent = torch.randn(2, 8, 16)
    grad = torch.randn(2, 8, 16)
    grad[:, -1] = 0  # a causal LM's output at the last position gets no gradient
    assert gate.gradient(grad, "r", sent=sent, microbatch="t:0", step=20, epoch=0, audited=True).accepted
    assert _tally(ledger, "r") == (0, 0)
    honest = grad + 0.01 * torch.randn_like(grad)
    honest[:, -1] = 0
    outcome = gate.judge_audit(-grad, [("a1", honest)])  # the route's gradient flipped
    assert outcome.needs_tiebreak
    outcome = gate.judge_audit(-grad, [("a1", honest), ("a2", grad)])
    verdict = gate.audit("r", outcome, ["a1", "a2"])
    assert verdict.kind == ROUTE and verdict.refused and verdict.blame == "r"
    assert _tally(ledger, "r") == (0, 1) and _tally(ledger, "a1") == (1, 0) and _tally(ledger, "a2") == (1, 0)
    # a lying auditor: the route's gradient stands, the auditor gets the strike
    outcome = judge(grad, -grad, honest)
    verdict = gate.audit("r", outcome, ["a1", "a2"])
    assert verdict.kind == AUDIT and not verdict.refused and verdict.blame is None
    assert _tally(ledger, "a1") == (1, 1) and _tally(ledger, "r") == (1, 1)
    # nobody answered: the gradient stands on SENTINEL's verdict, one clean entry
    assert gate.audit("r", None, []).kind == "none" and _tally(ledger, "r") == (2, 1)
    # not audited: SENTINEL's verdict is the entry
    other = torch.randn(2, 8, 16)
    other[:, -1] = 0
    assert gate.gradient(other, "r", sent=sent, microbatch="t:1", step=20, epoch=0, audited=False).accepted
    assert _tally(ledger, "r") == (3, 1)


def test_without_sentinel_nothing_is_checked_or_recorded():
    ledger = ReputationLedger()
    gate = Gate(None, ledger)
    x = torch.randn(2, 4, 8)
    assert gate.activations(x, "a", microbatch="t:0", step=0, epoch=0, last_stage=False) is None
    assert gate.gradient(x, "a", sent=x, microbatch="t:0", step=0, epoch=0, audited=False) is None
    assert not ledger.tallies


def test_a_forward_audit_settles_the_entry_of_activations_it_decides():
    """Activations whose entry an audit decides (a deferred rejection, or an audited tensor) get exactly one entry:
    a rejection cleared by a recomputation is a clean exchange (a false alarm), a tensor two other replicas agree
    against is a strike for ``audit`` and refused, and a rejection nobody could decide keeps SENTINEL's strike."""
    gate, ledger = _gate()
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16)
    bad = x.clone()
    bad[0, 0, 0] = float("nan")
    rejected = gate.activations(
        bad, "r", microbatch="t:0", step=20, epoch=0, last_stage=False, defer_rejection=True
    )
    assert not rejected.accepted and _tally(ledger, "r") == (0, 0)  # deferred: no entry yet
    recomputed = x + 0.01 * torch.randn_like(x)
    outcome = gate.judge_audit(x, [("a1", recomputed)], FORWARD)
    assert outcome.agree
    verdict = gate.forward_audit("r", outcome, ["a1"], rejected, last_stage=False)
    assert not verdict.refused and _tally(ledger, "r") == (1, 0) and _tally(ledger, "a1") == (1, 0)
    # at the last stage the loss is the entry of accepted activations: a cleared rejection adds none
    verdict = gate.forward_audit("r", outcome, ["a1"], rejected, last_stage=True)
    assert not verdict.refused and _tally(ledger, "r") == (1, 0)
    # noise at 1x RMS: cosine 0.7 against an honest recomputation, which a second replica confirms
    noisy = x + torch.randn_like(x)
    accepted = gate.activations(
        noisy, "r", microbatch="t:1", step=20, epoch=0, last_stage=False, audited=True
    )
    assert _tally(ledger, "r") == (1, 0)  # audited: its audit records it
    outcome = gate.judge_audit(noisy, [("a1", recomputed)], FORWARD)
    assert outcome.needs_tiebreak
    outcome = gate.judge_audit(noisy, [("a1", recomputed), ("a2", x)], FORWARD)
    verdict = gate.forward_audit("r", outcome, ["a1", "a2"], accepted, last_stage=False)
    assert verdict.refused and verdict.blame == "r" and _tally(ledger, "r") == (1, 1)
    assert ledger.tallies["r"].reasons.get(AUDIT_REASON) == 1
    # between agreement and blame (cosine about 0.96, as far as a replica that stepped alone might drift): nobody
    drifted = x + 0.3 * torch.randn_like(x)
    outcome = gate.judge_audit(drifted, [("a1", recomputed)], FORWARD)
    assert not outcome.agree and not outcome.needs_tiebreak
    outcome = gate.judge_audit(drifted, [("a1", recomputed), ("a2", x)], FORWARD)
    assert outcome.odd is None and not gate.forward_audit("r", outcome, ["a1", "a2"], accepted, False).refused
    assert _tally(ledger, "r") == (2, 1)
    # one auditor that disagrees: nobody can be told apart; SENTINEL's rejection and strike stand
    verdict = gate.forward_audit("r", gate.judge_audit(noisy, [("a1", x)], FORWARD), ["a1"], rejected, False)
    assert verdict.refused and verdict.blame == "r" and _tally(ledger, "r") == (2, 2)
    # ... and a tensor SENTINEL accepted stands, one clean entry
    verdict = gate.forward_audit("r", gate.judge_audit(noisy, [("a1", x)], FORWARD), ["a1"], accepted, False)
    assert not verdict.refused and _tally(ledger, "r") == (3, 2)
    # no auditor answered: the same
    assert gate.forward_audit("r", None, [], rejected, False).refused and _tally(ledger, "r") == (3, 3)
