"""SENTINEL monitors on real activations and gradients of the project's model (a small config), while it trains."""

from __future__ import annotations

import pytest
import torch

from peers.adversary import Adversary, AttackConfig, tamper
from swarm.config import DataConfig, ModelConfig
from swarm.data import MicroBatchStream, load_token_blocks
from swarm.model import StageModule, causal_lm_loss
from swarm.reputation import ReputationLedger
from swarm.sentinel import BACKWARD, FORWARD, SentinelConfig, SentinelMonitor

CFG = ModelConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=128)


def traffic(num: int, seed: int = 0, pretrain: int = 40):
    """Yield (index, activation, gradient) of a 2-stage pipeline training on the shipped corpus."""
    torch.manual_seed(seed)
    stages = [StageModule(CFG, s, 2) for s in range(2)]
    opts = [torch.optim.AdamW(s.parameters(), lr=2e-3) for s in stages]
    stream = MicroBatchStream(load_token_blocks(DataConfig(seq_len=32, microbatch_size=4)), 4, seed=seed)
    for i in range(pretrain + num):
        ids = stream.microbatch(i)
        act = stages[0](ids)
        x = act.detach().requires_grad_(True)
        causal_lm_loss(stages[1](x), ids).backward()
        act.backward(x.grad)
        for opt in opts:
            opt.step()
            opt.zero_grad()
        if i >= pretrain:
            yield i - pretrain, act.detach(), x.grad.detach()


@pytest.fixture(scope="module")
def honest():
    return list(traffic(240))


def run(honest, attack=None, direction=FORWARD, start=0, cfg=None):
    """Three senders per direction, round robin; sender 2 is Byzantine from micro-batch ``start``.
    Returns the list of (index, sender, direction, tampered, verdict)."""
    monitor = SentinelMonitor(cfg or SentinelConfig())
    adversary = Adversary(AttackConfig(name=attack, direction=direction)) if attack else None
    out = []
    for i, act, grad in honest:
        for d, tensor in ((FORWARD, act), (BACKWARD, grad)):
            sender = f"p{i % 3}"
            sent = tensor
            if adversary is not None and sender == "p2" and i >= start:
                sent = adversary(tensor, d, {"step": i})
            tampered = not torch.equal(sent, tensor)
            verdict = monitor.check(
                sent, sender, d, microbatch=str(i), context=act if d == BACKWARD else None
            )
            out.append((i, sender, d, tampered, verdict))
    return out


def test_hard_checks_need_no_history():
    monitor = SentinelMonitor()
    x = torch.randn(2, 8, 16)
    bad = x.clone()
    bad[0, 0, 0] = float("nan")
    assert "non-finite" in monitor.check(bad, "p", FORWARD).reason
    assert "zero" in monitor.check(torch.zeros_like(x), "p", FORWARD).reason
    assert "absurd" in monitor.check(x * 1e6, "p", FORWARD).reason
    verdict = monitor.check(x, "p", FORWARD)
    assert verdict.accepted and verdict.baseline == "warmup"


def test_long_honest_run_raises_no_false_alarm(honest):
    results = run(honest)
    assert len(results) == 480
    rejected = [v.reason for *_, v in results if not v.accepted]
    assert rejected == []


@pytest.mark.parametrize(
    "attack,direction",
    [
        ("zero", FORWARD),
        ("zero", BACKWARD),
        ("constant", FORWARD),
        ("constant", BACKWARD),
        ("scale", FORWARD),
        ("scale", BACKWARD),
        ("signflip", FORWARD),
        ("alie", FORWARD),
        ("alie", BACKWARD),
        ("random", FORWARD),
        ("random", BACKWARD),
        ("replay", FORWARD),
        ("replay", BACKWARD),
        ("noise", FORWARD),
        ("noise", BACKWARD),
        pytest.param(
            "signflip",
            BACKWARD,
            marks=pytest.mark.xfail(
                strict=True,
                reason="known limit: a sign-flipped gradient has the honest distribution (see sentinel.py)",
            ),
        ),
    ],
)
def test_sleeper_attack_caught_quickly(honest, attack, direction):
    """Honest for 60 micro-batches (baselines warm), then Byzantine: caught within 20 micro-batches."""
    start = 60
    results = run(honest, attack, direction, start=start)
    tampered = [(i, v) for i, _, _, t, v in results if t]
    assert tampered, "the attack never fired"
    caught = [i for i, v in tampered if not v.accepted]
    assert caught and caught[0] - start <= 20, f"{attack}: first caught at {caught[:1]}"
    honest_rejected = [v.reason for i, s, d, t, v in results if not t and not v.accepted]
    assert len(honest_rejected) <= 2, honest_rejected


def test_bad_from_first_message_caught_by_population(honest):
    """A peer that is Byzantine from its very first tensor: its own baseline learns the attack, the population
    baseline (robust to the minority) still rejects it once warm."""
    results = run(honest, "scale", FORWARD, start=0)
    late = [v for i, s, d, t, v in results if t and i >= 40]
    assert late and all(not v.accepted for v in late)


def test_causal_tail_of_gradients(honest):
    """Honest gradients are exactly zero at the last position; even noise at 1% of the RMS there is rejected by
    the hard check, with no history; the check can be turned off."""
    monitor = SentinelMonitor()
    for *_, grad in honest[:50]:
        assert float(grad[:, -1].abs().max()) == 0.0
        assert monitor.hard_check(grad, "p", BACKWARD) is None
    _, act, grad = honest[0]
    noisy = grad + 0.05 * grad.pow(2).mean().sqrt() * torch.randn_like(grad)
    verdict = SentinelMonitor().check(noisy, "p", BACKWARD, context=act)
    assert not verdict.accepted and verdict.statistic == "causal_tail" and "last position" in verdict.reason
    assert SentinelMonitor().hard_check(noisy, "p", FORWARD) is None  # activations have no such structure
    assert (
        SentinelMonitor(SentinelConfig(causal_tail_tolerance=None)).hard_check(noisy, "p", BACKWARD) is None
    )


def test_verdict_names_sender_direction_and_reason(honest):
    results = run(honest, "scale", BACKWARD, start=60)
    verdict = next(v for *_, t, v in results if t and not v.accepted)
    assert verdict.sender == "p2" and verdict.direction == BACKWARD
    assert verdict.score > verdict.threshold and "spreads" in verdict.reason
    ledger = ReputationLedger()
    ledger.record_verdict(verdict)
    assert ledger.flagged("p2") == 1


def test_tamper_functions_change_tensors():
    x = torch.randn(4, 8, 16)
    gen = torch.Generator().manual_seed(0)
    for name in ("noise", "signflip", "scale", "zero", "constant", "random", "alie"):
        assert not torch.equal(tamper(x, name, 2.0, gen), x), name
    with pytest.raises(ValueError):
        AttackConfig(name="nope")


def _shifted(honest, start: int, senders, shift: float = 2.0):
    """Activations of ``senders`` from micro-batch ``start`` on, shifted by ``shift`` x their RMS on every feature."""
    out = []
    for i, act, grad in honest:
        if i >= start and f"p{i % 3}" in senders:
            act = act + shift * act.pow(2).mean().sqrt()
        out.append((i, act, grad))
    return out


def test_drift_shared_by_most_senders_is_followed_not_rejected(honest):
    """Training can move every honest sender at once (an optimizer step): a shift that most senders share is the
    new normal once a majority of the *other* senders show it: with three senders, the first two to show each
    statistic's move are rejected, then everything is accepted again (without the rule: 20 rejections in a row,
    and counting); the same shift from one sender alone is rejected (the sleeper case)."""
    shared = [r for r in run(_shifted(honest, 150, {"p0", "p1", "p2"})) if r[2] == FORWARD and r[0] >= 150]
    rejected = [(i, s, v.reason) for i, s, _, _, v in shared if not v.accepted]
    assert len(rejected) <= 8 and all(i < 170 for i, *_ in rejected), rejected
    assert any(v.baseline == "drift" for *_, v in shared)
    # rejected, but not evidence against the sender (reputation ignores them) once another sender moved alike
    evidence = [(i, s, v.reason) for i, s, _, _, v in shared if not v.accepted and v.evidence]
    assert len(evidence) <= 2, evidence
    alone = [r for r in run(_shifted(honest, 150, {"p2"})) if r[2] == FORWARD and r[0] >= 150]
    caught = [v for i, s, _, _, v in alone if s == "p2" and not v.accepted]
    assert len(caught) >= 0.9 * sum(1 for r in alone if r[1] == "p2"), [
        v.reason for *_, v in alone if v.sender == "p2"
    ]
    assert all(v.evidence for v in caught)  # a sender that moved alone: every rejection is a strike
    assert all(v.accepted for i, s, _, _, v in alone if s != "p2")


def test_forget_drops_a_sender_as_reference(honest):
    """A blacklisted sender's frozen momentum and stale values must not serve as references for the others."""
    monitor = SentinelMonitor(SentinelConfig())
    for i, act, _grad in honest[:90]:
        monitor.check(act, f"p{i % 3}", FORWARD, microbatch=str(i))
    assert "p2" in monitor.latest[FORWARD] and ("p2", FORWARD) in monitor.momentum
    monitor.forget("p2")
    assert "p2" not in monitor.latest[FORWARD] and "p2" not in monitor.last_seen[FORWARD]
    assert ("p2", FORWARD) not in monitor.momentum and (
        "p2",
        FORWARD,
    ) in monitor.senders  # its own baseline stays
    verdict = monitor.check(honest[90][1], "p0", FORWARD, microbatch="90")
    assert verdict.accepted, verdict.reason


def _last_stage_traffic(num: int, pretrain: int = 40):
    """(activations, tokens, loss) arriving at the last stage of a 2-stage pipeline training on the shipped corpus."""
    torch.manual_seed(1)
    stages = [StageModule(CFG, s, 2) for s in range(2)]
    opt = torch.optim.AdamW([p for s in stages for p in s.parameters()], lr=2e-3)
    stream = MicroBatchStream(load_token_blocks(DataConfig(seq_len=32, microbatch_size=4)), 4, seed=1)
    out = []
    for i in range(pretrain + num):
        ids = stream.microbatch(i)
        act = stages[0](ids)
        loss = causal_lm_loss(stages[1](act), ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= pretrain:
            out.append((act.detach(), ids, float(loss.detach())))
    return out


def test_activations_of_other_tokens_do_not_fit_and_are_rejected():
    """The last stage knows the micro-batch's tokens (its labels). Honest activations fit them; a sender that
    replays activations of other data (here: the activations of the micro-batch 5 before) does not, however normal
    its statistics and loss look, and is rejected for token_mismatch while the honest senders are not."""
    data = _last_stage_traffic(150)
    monitor = SentinelMonitor(SentinelConfig())
    verdicts = []
    for i, (act, ids, loss) in enumerate(data):
        sender = f"p{i % 3}"
        replay = sender == "p2" and i >= 90
        sent = data[i - 5][0] if replay else act
        if i == 60:
            assert monitor.token_fit(act, ids) > 0.15
            assert abs(monitor.token_fit(data[i - 5][0], ids)) < 0.1
        verdicts.append(
            (sender, replay, monitor.check_loss(loss, sender, str(i), activations=sent, tokens=ids))
        )
    caught = [v for s, r, v in verdicts if r and not v.accepted]
    assert len(caught) >= 0.5 * sum(r for _, r, _ in verdicts), [v.reason for _, r, v in verdicts if r]
    assert any(v.statistic == "token_mismatch" for v in caught)
    assert not [v.reason for s, r, v in verdicts if not r and not v.accepted]
    # without the tokens there is nothing to compare with, and the check is silent
    assert monitor.token_fit(data[0][0], None) is None
    assert monitor.token_fit(data[0][0], data[0][1][:, :5]) is None


# ------------------------------------------------------------------------------------------------ bounded state


def test_small_tables_change_no_verdict_below_their_size(honest):
    """The per-sender tables bound memory only: with three senders, the smallest allowed size (``window`` keys)
    gives exactly the verdicts of the default size, for an attack as for honest traffic."""
    with pytest.raises(ValueError):
        SentinelConfig(max_senders=SentinelConfig().window - 1)
    small = SentinelConfig(max_senders=SentinelConfig().window)
    for attack, direction in ((None, FORWARD), ("scale", BACKWARD)):
        default = run(honest, attack, direction, start=60)
        bounded = run(honest, attack, direction, start=60, cfg=small)
        assert [(v.accepted, v.reason) for *_, v in default] == [(v.accepted, v.reason) for *_, v in bounded]


def test_a_flood_of_fresh_senders_is_bounded_and_evicts_newcomers_first(honest):
    """More fresh senders than the tables hold (each with one honest-looking tensor): the tables stay at their size,
    the warm baselines of the established senders are kept (and they are still judged as before), while a sender
    with too few tensors for a baseline is evicted and judged as a newcomer when it comes back."""
    cfg = SentinelConfig(max_senders=64)
    monitor = SentinelMonitor(cfg)
    for i, act, _grad in honest[:90]:
        assert monitor.check(act, f"p{i % 3}", FORWARD, microbatch=str(i)).accepted
    assert all(monitor.senders[(f"p{k}", FORWARD)].ready for k in range(3))
    monitor.check(honest[90][1], "newcomer", FORWARD, microbatch="90")
    monitor.check(honest[91][1], "newcomer", FORWARD, microbatch="91")
    for i, act, _grad in honest[92:200]:  # 108 fresh ids
        monitor.check(act, f"sybil{i}", FORWARD, microbatch=str(i))
    tables = [
        monitor.senders,
        monitor.momentum,
        monitor.momentum_count,
        monitor.relative,
        monitor.latest[FORWARD],
        monitor.last_seen[FORWARD],
    ]
    assert all(len(table) <= 64 for table in tables) and monitor.senders.evicted > 0
    assert all(monitor.senders[(f"p{k}", FORWARD)].ready for k in range(3))  # established baselines are kept
    assert ("newcomer", FORWARD) not in monitor.senders
    for k, (i, act, _grad) in enumerate(honest[200:215]):
        assert monitor.check(act, f"p{k % 3}", FORWARD, microbatch=str(i)).accepted
    assert monitor.check(honest[215][1], "newcomer", FORWARD, microbatch="215").accepted
    assert monitor.senders[("newcomer", FORWARD)].count == 1  # a newcomer again: its baseline starts over
    # odd shapes pick their own projection: only max_shapes of them are cached
    for hidden in range(8, 40):
        monitor.check(torch.randn(1, 4, hidden), f"odd{hidden}", FORWARD, microbatch=f"odd{hidden}")
    assert len(monitor._projections) <= cfg.max_shapes


# ---- cost that does not grow with the tensor: one full pass, statistics on a random sample of tokens ----------------


def test_sampled_statistics_agree_with_every_token():
    """On a tensor of 4096 tokens, statistics of a 1024-token sample are within a few percent of those of every token
    (log_rms is of the whole tensor in both); the per-feature means within a small fraction of the per-feature spread."""
    gen = torch.Generator().manual_seed(0)
    scale = torch.rand(64, generator=gen) * 3 + 0.5  # features of different sizes, as in a residual stream
    act = (torch.randn(16, 256, 64, generator=gen) + 0.3) * scale
    grad = torch.randn(16, 256, 64, generator=gen) / (1 + act.norm(dim=-1, keepdim=True)) + 0.1 * act
    full = SentinelMonitor(SentinelConfig(sample_tokens=0))
    sampled = SentinelMonitor(SentinelConfig(sample_tokens=1024, sample_seed=1))
    for x, ctx in ((act, None), (grad, act)):
        s_full, v_full, sketch_full = full.statistics(x, ctx)
        s_sampled, v_sampled, sketch_sampled = sampled.statistics(x, ctx)
        assert s_full.keys() == s_sampled.keys()
        assert s_sampled["log_rms"] == pytest.approx(s_full["log_rms"], abs=1e-6)
        for name, value in s_full.items():
            assert s_sampled[name] == pytest.approx(value, abs=0.05, rel=0.05), name
        spread = v_full["feat_std"]
        assert float(((v_sampled["feat_mean"] - v_full["feat_mean"]) / spread).abs().max()) < 0.2
        assert torch.allclose(v_sampled["feat_rms"], v_full["feat_rms"], rtol=0.1)
        assert torch.allclose(sketch_sampled, sketch_full)  # replay sketch: fixed positions, not sampled
    # a tensor no larger than the sample: every token, bit for bit the full statistics, and no randomness drawn
    small = act[:2]
    state = sampled._sampler.get_state()
    assert sampled.statistics(small)[0] == full.statistics(small)[0]
    assert torch.equal(sampled._sampler.get_state(), state)


def test_sample_changes_from_check_to_check_and_between_monitors():
    monitor = SentinelMonitor(SentinelConfig(sample_tokens=64))
    first, second = (
        monitor.sample_rows(4096, torch.device("cpu")),
        monitor.sample_rows(4096, torch.device("cpu")),
    )
    assert first.shape == (64,) and len(set(first.tolist())) == 64 and torch.equal(first, first.sort().values)
    assert not torch.equal(first, second)
    other = SentinelMonitor(SentinelConfig(sample_tokens=64))  # seeded from the OS: another sample
    assert not torch.equal(other.sample_rows(4096, torch.device("cpu")), first)
    # a fixed seed is reproducible (experiments only)
    a, b = (SentinelMonitor(SentinelConfig(sample_tokens=64, sample_seed=3)) for _ in range(2))
    assert torch.equal(a.sample_rows(4096, torch.device("cpu")), b.sample_rows(4096, torch.device("cpu")))
    assert monitor.sample_rows(64, torch.device("cpu")) is None  # no more tokens than the sample: all of them


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 3e6, 1e30])
@pytest.mark.parametrize("direction", [FORWARD, BACKWARD])
def test_one_bad_element_anywhere_is_caught_by_the_full_pass(value, direction):
    """The hard checks see every element, however small the sample: one non-finite or absurd value in one token of
    4096, wherever it is, is rejected (and the reason names what it is)."""
    monitor = SentinelMonitor(SentinelConfig(sample_tokens=16))
    gen = torch.Generator().manual_seed(2)
    for trial in range(8):
        x = torch.randn(16, 256, 32, generator=gen)
        if direction == BACKWARD:
            x[:, -1] = 0
        b, t, h = (int(torch.randint(n, (1,), generator=gen)) for n in (16, 255, 32))
        x[b, t, h] = value
        verdict = monitor.check(x, "p", direction, microbatch=str(trial), context=torch.randn_like(x))
        assert not verdict.accepted and verdict.baseline == "hard", verdict.reason
        expected = "finite" if not torch.isfinite(torch.tensor(value)) else "peak"
        assert verdict.statistic == expected, verdict.reason
    # finite values whose squares overflow float32 are named for their magnitude, not as non-finite
    assert "absurd" in monitor.check(torch.full((4, 8, 16), 3e19), "p", FORWARD).reason
    assert "zero" in monitor.check(torch.zeros(16, 256, 32), "p", FORWARD).reason


def test_log_rms_sees_a_few_loud_tokens_outside_the_sample():
    """log_rms is of the whole tensor: a few tokens scaled up move it whether or not the sample holds them."""
    monitor = SentinelMonitor(SentinelConfig(sample_tokens=16, sample_seed=0))
    x = torch.randn(16, 256, 32)
    loud = x.clone()
    loud[3, 100:104] *= 100  # 4 tokens of 4096
    base = monitor.statistics(x)[0]["log_rms"]
    assert monitor.statistics(loud)[0]["log_rms"] - base > 0.5  # x 1.0e4 energy in 1/1024 of the tokens


def test_sampled_monitor_catches_sleepers_without_false_alarms(honest):
    """Half of each tensor's tokens sampled (64 of 128): the honest run stays clean and sleepers are still caught."""
    cfg = SentinelConfig(sample_tokens=64, sample_seed=0)
    rejected = [v.reason for *_, v in run(honest, cfg=cfg) if not v.accepted]
    assert rejected == []
    for attack, direction in (("alie", FORWARD), ("noise", FORWARD), ("replay", BACKWARD)):
        results = run(honest, attack, direction, start=60, cfg=cfg)
        caught = [i for i, _, _, t, v in results if t and not v.accepted]
        assert caught and caught[0] - 60 <= 20, f"{attack}: first caught at {caught[:1]}"


def test_half_precision_tensors_are_checked_with_float32_accumulation():
    """Statistics of a bfloat16 or float16 tensor (as a GPU peer may receive) match its float32 copy's closely: the
    full pass accumulates in float32, the sample is converted before any arithmetic."""
    x = torch.randn(8, 512, 64) * 2 + 0.5
    reference = SentinelMonitor(SentinelConfig(sample_seed=0)).statistics(x)[0]
    for dtype in (torch.bfloat16, torch.float16):
        low = x.to(dtype)
        scalars = SentinelMonitor(SentinelConfig(sample_seed=0)).statistics(low)[0]
        for name, value in reference.items():
            assert scalars[name] == pytest.approx(value, rel=0.01, abs=0.01), (dtype, name)
        bad = low.clone()
        bad[5, 300, 7] = float("nan")
        assert SentinelMonitor().check(bad, "p", FORWARD).statistic == "finite"


def test_loss_momentum_reads_only_recent_senders_under_a_sybil_flood():
    """The loss momentum compares a sender with the senders seen in the last window of checks. It once read every
    sender that ever had a momentum (up to the table's 4,096) on every loss check, so a flood of one-message Sybils
    made each honest loss check cost thousands of reads. After such a flood a loss check reads no whole table, and a
    sender whose loss is persistently 20% high (each one below the population threshold) is still caught by its
    momentum."""
    import random

    monitor = SentinelMonitor(SentinelConfig())
    table = monitor.momentum_count

    class CountingTable(type(table)):
        reads = 0

        def __iter__(self):
            CountingTable.reads += 1
            return super().__iter__()

    table.__class__ = CountingTable
    rng = random.Random(0)
    honest = ["h0", "h1", "h2"]
    for i in range(60):
        monitor.check_loss(3.0 * (1 + rng.gauss(0, 0.01)), honest[i % 3], microbatch=f"w{i}")
    for i in range(2000):
        monitor.check_loss(3.0 * (1 + rng.gauss(0, 0.01)), f"sybil{i}", microbatch=f"s{i}")
    verdicts = []
    for i in range(80):
        sender = (honest + ["drifter"])[i % 4]
        loss = 3.0 * (1.2 if sender == "drifter" else 1.0) * (1 + rng.gauss(0, 0.01))
        verdicts.append(monitor.check_loss(loss, sender, microbatch=f"m{i}"))
    assert CountingTable.reads == 0
    assert any(not v.accepted and v.sender == "drifter" for v in verdicts), [v.reason for v in verdicts[-8:]]
    assert all(v.accepted for v in verdicts if v.sender != "drifter"), [
        v.reason for v in verdicts if not v.accepted
    ]


def test_a_false_alarm_raises_its_statistics_threshold_for_a_while(honest):
    """An audit that clears a rejection (a false alarm) tunes the threshold (issue 14's "SENTINEL steers audits"): the
    statistic that rejected gets its threshold, in that direction only, raised to 1.2x the cleared score, so the
    same drift passes; far beyond, a tensor is still rejected (the raise is capped at 1.5x); a hard check is
    never loosened; the raise relaxes with every check in that direction."""
    import copy

    from swarm.sentinel import Verdict

    monitor = SentinelMonitor(SentinelConfig(sample_seed=0))
    for i, act, _ in honest[:90]:
        monitor.check(act, f"p{i % 3}", FORWARD, microbatch=str(i))
    act = honest[90][1]

    def verdict(tensor):  # on a copy: a check changes the monitor's baselines
        return copy.deepcopy(monitor).check(tensor, "p0", FORWARD, microbatch="x")

    alarm = verdict(act * 0.3)  # measured: log_rms 13.3 spreads from the population's baseline
    assert not alarm.accepted and alarm.baseline == "population" and 12 < alarm.score < 17, alarm
    monitor.cleared(alarm)
    assert monitor.threshold(FORWARD, alarm.statistic) == pytest.approx(1.2 * alarm.score)
    assert monitor.threshold(BACKWARD, alarm.statistic) == 12.0
    assert verdict(act * 0.3).accepted
    assert not verdict(act * 0.1).accepted  # 25 spreads: beyond any raise
    monitor.cleared(Verdict(False, "p0", FORWARD, 3.0, 0.0, "3 non-finite values", "finite", "hard"))
    assert monitor.threshold(FORWARD, "finite") == 12.0 and monitor.false_alarms == 2
    capped = SentinelMonitor()
    capped.cleared(Verdict(False, "p0", FORWARD, 100.0, 12.0, "far", "log_rms", "population"))
    assert capped.threshold(FORWARD, "log_rms") == pytest.approx(18.0)
    for i, act, _ in honest[:30]:
        capped.check(act, f"p{i % 3}", FORWARD, microbatch=str(i))
    assert capped.threshold(FORWARD, "log_rms") == pytest.approx(12.0 * (1 + 0.5 * 0.99**30))
