"""Pure logic of audits (swarm/audit.py): how gradients are judged and how the trainer draws auditors."""

from __future__ import annotations

import random

import pytest
import torch

from swarm.audit import AUDIT, ROUTE, AuditConfig, cosine, judge, norm_ratio, pick_auditors


@pytest.fixture
def grad():
    torch.manual_seed(0)
    return torch.randn(2, 16, 8)


def near(g: torch.Tensor, noise: float = 0.05) -> torch.Tensor:
    """An honest replica's gradient: the same up to small differences of weights."""
    return g + noise * g.std() * torch.randn_like(g)


def test_norms_a_few_percent_apart_agree_and_scaled_ones_do_not(grad):
    assert judge(grad, 1.2 * near(grad)).agree and judge(1.2 * grad, near(grad)).agree
    assert not judge(grad, 1.45 * grad).agree
    assert norm_ratio(grad, 2 * grad) == pytest.approx(2.0) and norm_ratio(2 * grad, grad) == pytest.approx(
        2.0
    )
    assert norm_ratio(grad, torch.zeros_like(grad)) == float("inf")
    assert norm_ratio(torch.zeros_like(grad), torch.zeros_like(grad)) == 1.0


def test_cosine_edges(grad):
    assert cosine(grad, grad) == pytest.approx(1.0)
    assert cosine(grad, -grad) == pytest.approx(-1.0)
    assert cosine(grad, torch.zeros_like(grad)) == 0.0
    assert cosine(grad, grad[:1]) == 0.0  # shapes differ: no agreement


def test_honest_replicas_agree_without_a_tiebreak(grad):
    outcome = judge(grad, near(grad))
    assert outcome.agree and outcome.odd is None and not outcome.needs_tiebreak
    assert "agrees" in outcome.reason()


@pytest.mark.parametrize(
    "tamper",
    [lambda g: -g, lambda g: torch.randn_like(g), lambda g: 0 * g, lambda g: 1.5 * g, lambda g: g / 1.5],
)
def test_tampered_route_gradient_is_the_odd_one(grad, tamper):
    bad = tamper(grad)
    first = judge(bad, near(grad))
    assert not first.agree and first.needs_tiebreak  # two apart: nobody can be blamed yet
    outcome = judge(bad, near(grad), near(grad))
    assert outcome.odd == ROUTE and not outcome.agree
    assert "route gradient disagrees" in outcome.reason()


def test_lying_auditor_is_the_odd_one_and_the_route_stands(grad):
    outcome = judge(grad, -grad, near(grad))
    assert outcome.agree and outcome.odd == AUDIT


def test_no_majority_blames_nobody(grad):
    outcome = judge(grad, -grad, torch.randn_like(grad))
    assert not outcome.agree and outcome.odd is None and not outcome.needs_tiebreak
    assert "inconclusive" in outcome.reason()


def test_non_finite_auditor_gradient_disagrees(grad):
    broken = grad.clone()
    broken[0, 0, 0] = float("nan")
    assert judge(grad, broken, near(grad)).odd == AUDIT


def test_pick_auditors_rates_and_exclusions():
    cfg = AuditConfig(rate=0.25, suspect_rate=1.0)
    rng = random.Random(0)
    draws = [pick_auditors(["a", "b", "c", "d"], "a", False, cfg, rng) for _ in range(2000)]
    audited = [d for d in draws if d]
    assert 0.2 < len(audited) / len(draws) < 0.3
    assert all(len(d) == 2 and "a" not in d and len(set(d)) == 2 for d in audited)
    assert all(pick_auditors(["a", "b", "c"], "a", True, cfg, rng) for _ in range(100))  # a suspect: always
    assert pick_auditors(["a"], "a", True, cfg, rng) == []  # nobody else to ask
    assert pick_auditors(["a", "b"], "a", True, cfg, rng) == ["b"]


@pytest.mark.parametrize(
    "bad",
    [
        dict(rate=1.5),
        dict(suspect_rate=-0.1),
        dict(min_cosine=1.0),
        dict(auditors=3),
        dict(max_norm_ratio=1.0),
    ],
)
def test_config_is_checked(bad):
    with pytest.raises(ValueError):
        AuditConfig(**bad)
