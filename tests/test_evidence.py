"""Signed tensors, recomputation audits and accusations that carry their evidence (swarm/evidence.py): pure logic,
real RSA keys, a real (tiny) model."""

from __future__ import annotations

import contextvars
import hashlib
import math

import pytest
import torch
from hivemind.utils.crypto import RSAPrivateKey

from peers.adversary import Adversary, AttackConfig
from swarm.config import ModelConfig
from swarm.evidence import (
    TOKENS,
    Accusation,
    AuditTolerance,
    EvidenceError,
    ProofBook,
    StageAuditConfig,
    TensorClaim,
    audit_seed,
    check_accusation,
    check_received,
    draw_auditor,
    recompute,
    relative_error,
    reverify,
)
from swarm.gate import Gate
from swarm.identity import peer_id_of
from swarm.model import StageModule, causal_lm_loss
from swarm.records import ReputationReport
from swarm.reputation import ReputationConfig, ReputationLedger, aggregate
from swarm.sentinel import BACKWARD, FORWARD, SentinelConfig, SentinelMonitor

TINY = ModelConfig(
    vocab_size=64, hidden_size=16, num_layers=3, num_heads=2, num_kv_heads=2, intermediate_size=32
)
# trainer, stage 0, stage 1 (the accused), stage 1's auditor, stage 1's other replica, stage 2
KEYS = [RSAPrivateKey() for _ in range(6)]
TRAINER, S0, S1, AUDITOR, VERIFIER, S2 = KEYS
PID = {id(k): peer_id_of(k.get_public_key().to_bytes()) for k in KEYS}


def pid(key: RSAPrivateKey) -> str:
    return PID[id(key)]


@pytest.fixture(scope="module")
def stages():
    torch.manual_seed(0)
    return [StageModule(TINY, s, 3) for s in range(3)]


def chain(stages, tamper=None, mb="7.0"):
    """One micro-batch through 3 stages with every hop signed; ``tamper(direction, tensor)`` is stage 1's outbound
    hook. Returns the hops: {(stage, direction): (claim, tensor)} and the tokens' claim."""
    ids = torch.randint(0, 64, (2, 8))
    tok = TensorClaim.create(TRAINER, stage=-1, direction=TOKENS, microbatch=mb, epoch=3, tensor=ids)
    h0 = stages[0](ids).detach()
    c0 = TensorClaim.create(
        S0, stage=0, direction=FORWARD, microbatch=mb, epoch=3, tensor=h0, inputs=[tok.digest]
    )
    h1, _ = recompute(stages[1], FORWARD, h0, None, ids)
    if tamper:
        h1 = tamper(FORWARD, h1)
    c1 = TensorClaim.create(
        S1, stage=1, direction=FORWARD, microbatch=mb, epoch=3, tensor=h1, inputs=[c0.digest]
    )
    _, g2 = recompute(stages[2], BACKWARD, h1, None, ids)
    c2 = TensorClaim.create(
        S2, stage=2, direction=BACKWARD, microbatch=mb, epoch=3, tensor=g2, inputs=[c1.digest, tok.digest]
    )
    _, g1 = recompute(stages[1], BACKWARD, h0, g2, ids)
    if tamper:
        g1 = tamper(BACKWARD, g1)
    cb1 = TensorClaim.create(
        S1, stage=1, direction=BACKWARD, microbatch=mb, epoch=3, tensor=g1, inputs=[c0.digest, c2.digest]
    )
    hops = {(-1, TOKENS): (tok, ids), (0, FORWARD): (c0, h0), (1, FORWARD): (c1, h1)}
    hops.update({(2, BACKWARD): (c2, g2), (1, BACKWARD): (cb1, g1)})
    return hops


def accusation(hops, direction, accuser=AUDITOR) -> Accusation:
    claim, sent = hops[(1, direction)]
    inputs = [hops[(0, FORWARD)]] + ([hops[(2, BACKWARD)]] if direction == BACKWARD else [])
    return Accusation(accuser=pid(accuser), claim=claim, sent=sent, inputs=inputs)


def test_a_claim_binds_its_sender_tensor_and_context():
    t = torch.randn(2, 3)
    claim = TensorClaim.create(
        S0, stage=0, direction=FORWARD, microbatch="1.0", epoch=2, tensor=t, inputs=[b"i" * 32]
    )
    claim.verify()
    assert claim.sender == pid(S0) and claim.covers(t) and not claim.covers(t + 1e-7)
    again = TensorClaim.from_wire(claim.to_wire())
    again.verify()
    assert again == claim
    for change in (dict(stage=1), dict(epoch=3), dict(microbatch="2.0"), dict(digest=b"x" * 32)):
        with pytest.raises(EvidenceError, match="signature"):
            TensorClaim(**{**claim.__dict__, **change}).verify()
    # someone else's key cannot sign in S0's name, and a claim with the wrong count of inputs is malformed
    forged = TensorClaim.create(
        S1, stage=0, direction=FORWARD, microbatch="1.0", epoch=2, tensor=t, inputs=[b"i" * 32]
    )
    with pytest.raises(EvidenceError, match="derive"):
        TensorClaim(**{**forged.__dict__, "sender": pid(S0)}).verify()
    with pytest.raises(EvidenceError, match="names 1 inputs"):
        TensorClaim.create(S0, stage=0, direction=FORWARD, microbatch="1", epoch=0, tensor=t).verify()


@pytest.mark.parametrize(
    "wire",
    [
        None,
        {"sender": "x"},
        "field",
        "digest",
        "inputs",
        "stage",
    ],
)
def test_malformed_claims_on_the_wire_are_refused(wire):
    good = TensorClaim.create(
        S0, stage=0, direction=FORWARD, microbatch="1", epoch=0, tensor=torch.ones(2), inputs=[b"i" * 32]
    )
    value = good.to_wire()
    if wire == "field":
        value["extra"] = 1
    elif wire == "digest":
        value["digest"] = b"d" * 10_000
    elif wire == "inputs":
        value["inputs"] = [b"i" * 32] * 1000
    elif wire == "stage":
        value["stage"] = True
    else:
        value = wire
    with pytest.raises(EvidenceError):
        TensorClaim.from_wire(value)


def test_the_receiver_checks_who_signed_what(stages):
    hops = chain(stages)
    claim, sent = hops[(1, BACKWARD)]
    check_received(
        claim,
        sent,
        sender=pid(S1),
        stage=1,
        direction=BACKWARD,
        microbatch="7.0",
        sent_inputs={0: hops[(0, FORWARD)][0].digest},
    )
    with pytest.raises(EvidenceError, match="sent the tensor"):
        check_received(claim, sent, sender=pid(S2), stage=1, direction=BACKWARD, microbatch="7.0")
    with pytest.raises(EvidenceError, match="digest"):
        check_received(claim, sent * 2, sender=pid(S1), stage=1, direction=BACKWARD, microbatch="7.0")
    with pytest.raises(EvidenceError, match="expected"):
        check_received(claim, sent, sender=pid(S1), stage=1, direction=BACKWARD, microbatch="8.0")
    with pytest.raises(EvidenceError, match="not the one this peer sent"):
        check_received(
            claim,
            sent,
            sender=pid(S1),
            stage=1,
            direction=BACKWARD,
            microbatch="7.0",
            sent_inputs={0: b"z" * 32},
        )


def test_recompute_is_what_the_stage_computes(stages):
    ids = torch.randint(0, 64, (2, 8))
    x = stages[0](ids).detach().requires_grad_(True)
    out = stages[1](x)
    g_out = torch.randn_like(out)
    out.backward(g_out)
    f, g = recompute(stages[1], BACKWARD, x.detach(), g_out, ids)
    assert relative_error(f, out.detach()) == 0.0 and relative_error(g, x.grad) < 1e-6
    assert all(p.grad is None or p.grad.abs().sum() > 0 for p in stages[1].parameters())
    before = [p.grad.clone() for p in stages[1].parameters() if p.grad is not None]
    recompute(stages[1], BACKWARD, x.detach(), g_out, ids)
    after = [p.grad for p in stages[1].parameters() if p.grad is not None]
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # an audit never trains
    xl = x.detach().requires_grad_(True)
    loss = causal_lm_loss(stages[2](xl), ids)
    loss.backward()
    lf, lg = recompute(stages[2], BACKWARD, x.detach(), None, ids)
    assert float(lf) == pytest.approx(float(loss.detach())) and relative_error(lg, xl.grad) < 1e-6
    assert relative_error(torch.ones(3), torch.ones(3)) == 0.0
    assert relative_error(torch.ones(3), torch.ones(4)) == math.inf
    assert relative_error(torch.tensor([float("nan")]), torch.ones(1)) == math.inf
    assert relative_error(-torch.ones(3), torch.ones(3)) == pytest.approx(2.0)


def test_the_auditor_draw_is_verifiable_and_excludes_the_audited_and_its_neighbours():
    claim = TensorClaim.create(
        S1, stage=1, direction=FORWARD, microbatch="3", epoch=0, tensor=torch.ones(2), inputs=[b"i" * 32]
    )
    peers = [f"p{i}" for i in range(10)]
    seed = audit_seed(b"salt", claim)
    a = draw_auditor(peers, {"p0", "p1"}, seed)
    assert a == draw_auditor(reversed(peers), ["p1", "p0"], seed) and a not in ("p0", "p1")
    drawn = {draw_auditor(peers, {"p0"}, audit_seed(bytes([i]) * 16, claim)) for i in range(60)}
    assert len(drawn) >= 6 and "p0" not in drawn  # the salt spreads the draws
    assert draw_auditor(["p0"], {"p0"}, seed) is None


@pytest.mark.parametrize("direction", [FORWARD, BACKWARD])
def test_a_tampered_hop_is_proven_and_an_honest_one_is_not(stages, direction):
    tol = AuditTolerance()
    honest = accusation(chain(stages), direction)
    check_accusation(honest, 3)
    assert not reverify(honest, stages[1], tol).confirmed
    lie = accusation(chain(stages, tamper=lambda d, t: t * 1.01 if d == direction else t), direction)
    check_accusation(lie, 3)
    finding = reverify(lie, stages[1], tol)
    assert finding.confirmed and finding.error == pytest.approx(0.01, rel=1e-3)


def test_an_accusation_must_rest_on_what_its_senders_signed(stages):
    hops = chain(stages, tamper=lambda d, t: -t)
    acc = accusation(hops, BACKWARD)
    check_accusation(acc, 3)
    # another input than the one the accused's claim names
    other = chain(stages, mb="7.0")
    bad = Accusation(acc.accuser, acc.claim, acc.sent, [other[(0, FORWARD)], acc.inputs[1]])
    with pytest.raises(EvidenceError, match="names"):
        check_accusation(bad, 3)
    # the right claim, another tensor
    bad = Accusation(
        acc.accuser, acc.claim, acc.sent, [(acc.inputs[0][0], acc.inputs[0][1] + 1), acc.inputs[1]]
    )
    with pytest.raises(EvidenceError, match="sender signed"):
        check_accusation(bad, 3)
    # a tensor the accused never signed
    with pytest.raises(EvidenceError, match="accused signed"):
        check_accusation(Accusation(acc.accuser, acc.claim, acc.sent * 3, acc.inputs), 3)
    # an input signed for another micro-batch (a real claim, replayed)
    later = chain(stages, mb="8.0")
    c1 = TensorClaim.create(
        S1,
        stage=1,
        direction=FORWARD,
        microbatch="7.0",
        epoch=3,
        tensor=later[(1, FORWARD)][1],
        inputs=[later[(0, FORWARD)][0].digest],
    )
    with pytest.raises(EvidenceError, match="expected stage 0 forward for '7.0'"):
        check_accusation(Accusation(acc.accuser, c1, later[(1, FORWARD)][1], [later[(0, FORWARD)]]), 3)
    # stage 0 sends no gradient, the last stage no activations
    g = torch.ones(2)
    c = TensorClaim.create(
        S0, stage=0, direction=BACKWARD, microbatch="1", epoch=0, tensor=g, inputs=[b"a" * 32, b"b" * 32]
    )
    with pytest.raises(EvidenceError, match="no gradient"):
        check_accusation(Accusation("x", c, g, []), 3)


def test_a_proof_needs_an_independent_replica_and_a_false_accuser_is_refuted(stages):
    tol = AuditTolerance()
    book = ProofBook()
    lie = accusation(chain(stages, tamper=lambda d, t: -t), FORWARD)
    assert book.accuse(lie) and not book.accuse(lie)
    assert book.proven() == {}  # the accuser alone (two replicas) proves nothing
    book.find(lie.key, pid(S1), False)  # the accused's own word does not count
    assert book.proven() == {}
    book.find(lie.key, pid(VERIFIER), reverify(lie, stages[1], tol).confirmed)
    proven = book.proven()
    assert list(proven) == [pid(S1)] and proven[pid(S1)]["reason"] == "proof: stage 1 forward"
    assert book.proven(weighted={pid(S1)}) == {}  # findings of unweighted replicas do not count
    # a liar accuses an honest hop: the other replica refutes it, and the liar is the one struck
    frame = accusation(chain(stages, mb="9.0"), BACKWARD, accuser=VERIFIER)
    book.accuse(frame)
    book.find(frame.key, pid(AUDITOR), reverify(frame, stages[1], tol).confirmed)
    assert (pid(AUDITOR), pid(VERIFIER)) in book.refuted()
    assert list(book.proven()) == [pid(S1)]
    small = ProofBook(max_cases=1)
    small.accuse(lie), small.accuse(frame)
    assert len(small) == 1


def test_a_proof_blacklists_without_a_quorum_of_strikes():
    cfg = ReputationConfig(probation_s=0, probation_work=0)
    reports = {
        "a": ReputationReport(reporter="a", entries={"x": {"clean": 50, "strikes": 0, "reasons": {}}}),
        "x": ReputationReport(
            reporter="x", entries={"a": {"clean": 0, "strikes": 50, "reasons": {"zeros": 50}}}
        ),
    }
    plain = aggregate(reports, {}, 0.0, cfg)
    assert plain.blacklist == {}
    proof = {"x": {"reason": "proof: stage 1 forward", "reporters": 2, "strikes": 1}}
    agg = aggregate(reports, {}, 0.0, cfg, proven=proof)
    assert agg.blacklist == proof and agg.score("x") == 0.0 and agg.weights["x"] == 0.0
    # a peer no report mentions is still convicted by its proof
    assert "y" in aggregate(reports, {}, 0.0, cfg, proven={"y": proof["x"]}).blacklist


def test_an_audit_settles_a_deferred_rejection():
    ledger = ReputationLedger()
    gate = Gate(SentinelMonitor(SentinelConfig(warmup=3, warmup_steps=0)), ledger)
    for i in range(4):
        gate.activations(torch.randn(2, 8, 16), "s", microbatch=str(i), step=1, epoch=1, last_stage=False)
    assert ledger.flagged("s") == 0 and ledger.tallies["s"].clean == 4
    v = gate.activations(
        torch.zeros(2, 8, 16), "s", microbatch="z", step=1, epoch=1, last_stage=False, defer_rejection=True
    )
    assert not v.accepted and ledger.flagged("s") == 0  # not recorded yet
    gate.settle(v, False)  # the audit cleared it: a false alarm, a clean exchange
    assert ledger.flagged("s") == 0 and ledger.tallies["s"].clean == 5
    gate.settle(v, True, "proof")
    gate.settle(v, None)
    assert ledger.tallies["s"].reasons == {"proof": 1, v.statistic: 1}


def test_audit_rates():
    cfg = StageAuditConfig(rate=0.1, newcomer_audits=2)
    assert cfg.rate_for(suspicious=True, suspect=False, audited_before=99) == 1.0
    assert cfg.rate_for(suspicious=False, suspect=True, audited_before=99) == 1.0
    assert cfg.rate_for(suspicious=False, suspect=False, audited_before=1) == 1.0
    assert cfg.rate_for(suspicious=False, suspect=False, audited_before=2) == 0.1
    with pytest.raises(ValueError):
        StageAuditConfig(rate=2)


def test_a_slow_ramp_grows_to_its_magnitude():
    adv = Adversary(AttackConfig(name="scale", magnitude=3.0, ramp=4))
    x = torch.ones(3)
    outs = [float(adv(x, FORWARD, {"step": 0})[0]) for _ in range(6)]
    assert outs == pytest.approx([1.5, 2.0, 2.5, 3.0, 3.0, 3.0])
    noise = Adversary(AttackConfig(name="noise", magnitude=1.0, ramp=100, seed=1))
    assert relative_error(noise(torch.ones(1000), FORWARD, {"step": 0}), torch.ones(1000)) < 0.05


def test_with_proofs_statistics_alone_cannot_ban_a_peer_that_audits_can_clear():
    """Where a stage has an accused, an auditor and an independent checker (3 replicas), made-up statistical strikes
    from trusted insiders only lower a score: a ban needs a proof or strikes no audit can settle."""
    cfg = ReputationConfig(probation_s=0, probation_work=0, proof_replicas=3)
    stages = {"t": [1], "r1": [1], "r2": [1], "a": [0], "b": [0], "c": [2], "d": [2]}
    made_up = {"clean": 0, "strikes": 50, "reasons": {"log_rms": 50}}
    reports = {r: ReputationReport(reporter=r, entries={"t": dict(made_up)}) for r in ("a", "b", "c")}
    agg = aggregate(reports, {}, 0.0, cfg, stages=stages)
    assert "t" not in agg.blacklist and agg.score("t") < 0.5
    # the same strikes ban where the stage is too small for proofs (2 replicas), as before
    two = {p: s for p, s in stages.items() if p != "r2"}
    assert "t" in aggregate(reports, {}, 0.0, cfg, stages=two).blacklist
    # strikes no audit settles keep their quorum rules
    withheld = {"clean": 0, "strikes": 50, "reasons": {"withheld": 50}}
    reports = {r: ReputationReport(reporter=r, entries={"t": dict(withheld)}) for r in ("a", "b", "c")}
    assert "t" in aggregate(reports, {}, 0.0, cfg, stages=stages).blacklist


def test_the_unauditable_reasons_are_the_checks_own_names():
    from swarm import averaging, evidence
    from swarm.reputation import UNAUDITABLE

    assert {averaging.AVERAGING, averaging.AGGREGATE, averaging.EVIDENCE, averaging.STATE} < UNAUDITABLE
    assert {evidence.FALSE_ACCUSATION, "withheld"} < UNAUDITABLE


def _header(mb: str, route, ids: torch.Tensor, step: int = 0):
    """A chain header the trainer signs for micro-batch ``mb`` along ``route`` (keys) with tokens ``ids``."""
    import time

    from swarm.protocol import ChainHeader

    return ChainHeader.create(
        TRAINER,
        run_id="ev",
        trainer=pid(TRAINER),
        mb=mb,
        step=step,
        route=[pid(k) for k in route],
        tokens=ids,
        now=time.time(),
    )[0]


ASKER: "contextvars.ContextVar[str]" = contextvars.ContextVar("asker")


def _replicas_and_receivers(monkeypatch, receiver_keys, stage: int = 0, num_stages: int = 2):
    """Three replicas of ``stage`` ("route": the route's peer, S0 or S1; "a1": AUDITOR, "a2": VERIFIER; same
    weights), for a middle stage also the route's stage-0 peer ("before": S0), and servers of the stage after with
    ``receiver_keys``, in-process: the wire is replaced by direct calls into the servers' request handlers (header
    checks, signed reports and all), the asker being the receiver whose ``peer_id`` ``ASKER`` holds (each receiver's
    calls set it: see :func:`_asking`)."""
    import asyncio

    import swarm.stage_server as stage_server
    from swarm.optimizer import OptimizerConfig
    from swarm.stage_server import StageServer, StageServerConfig
    from swarm.transport import Received, limits_for

    def server(at: int, key) -> StageServer:
        cfg = StageServerConfig(
            run_id="ev", stage=at, num_stages=num_stages, limits=limits_for(2, 8, TINY.hidden_size)
        )
        torch.manual_seed(at)  # replicas of a stage hold the same weights
        s = StageServer(cfg, TINY, None, OptimizerConfig(averaging=False), identity_key=key)
        s.peer_id, s._slots = pid(key), asyncio.Semaphore(2)
        return s

    route = S0 if stage == 0 else S1
    servers = {
        name: server(stage, key) for name, key in {"route": route, "a1": AUDITOR, "a2": VERIFIER}.items()
    }
    if stage > 0:
        servers["before"] = server(stage - 1, S0)
    receivers = [server(stage + 1, key) for key in receiver_keys]
    by_pid = {s.peer_id: s for s in servers.values()}

    async def wire(client, peer, endpoint, stub, meta, tensors, limits, timeout, compression):
        async def read():
            return Received(metadata=meta, tensors=list(tensors))

        reply, out = await by_pid[peer]._serve_chain(ASKER.get(receivers[0].peer_id), read)
        return Received(metadata=reply, tensors=out)

    async def replicas(at):
        assert at == stage
        return [pid(route), pid(AUDITOR), pid(VERIFIER)]

    monkeypatch.setattr(stage_server, "call_chain", wire)
    for receiver in receivers:
        monkeypatch.setattr(receiver, "_stage_replicas", replicas)
    return servers, receivers


async def _asking(receiver, coroutine):
    ASKER.set(receiver.peer_id)
    return await coroutine


def test_a_middle_stage_replica_serves_one_recomputation_per_request():
    """The auditor side, in-process: a middle-stage replica asked (``recompute``) by the route's previous peer returns
    the gradient of its input for the given activations and output-gradient, trains nothing, and serves a request
    once (a header cannot buy more compute); a malformed pair is refused, blaming the sender."""
    import asyncio

    from swarm.optimizer import OptimizerConfig
    from swarm.protocol import ChainHeader
    from swarm.stage_server import ChainError, StageServer, StageServerConfig
    from swarm.transport import Received, limits_for

    cfg = StageServerConfig(run_id="ev", stage=1, num_stages=3, limits=limits_for(2, 8, TINY.hidden_size))
    torch.manual_seed(0)
    server = StageServer(cfg, TINY, None, OptimizerConfig(averaging=False), identity_key=AUDITOR)
    server.peer_id = pid(AUDITOR)

    async def ask(x, g, header):
        server._slots = asyncio.Semaphore(2)
        received = Received(metadata=dict(header=header.to_wire(), recompute=True), tensors=[x, g])
        return await server._chain(received, header, pid(S0))

    ids = torch.randint(0, 64, (2, 8))

    def header_of(mb: str) -> ChainHeader:
        return _header(mb, [S0, S1, S2], ids)

    header = header_of("1.0")
    x, g = torch.randn(2, 8, TINY.hidden_size), torch.randn(2, 8, TINY.hidden_size)
    tensors, report = asyncio.run(ask(x, g, header))
    _, expected = recompute(server.module, BACKWARD, x, g, ids)
    assert report["ok"] and len(tensors) == 1 and relative_error(tensors[0], expected) < 1e-6
    assert all(p.grad is None for p in server.module.parameters()) and server.stats.audits_served == 1
    with pytest.raises(ChainError, match="already"):
        asyncio.run(ask(x, g, header))
    header2 = header_of("2.0")
    with pytest.raises(ChainError, match="finite and shaped") as e:
        asyncio.run(ask(x, g[:, :4], header2))
    assert e.value.blame == pid(S0)


def test_a_hop_refuses_a_reply_its_signed_report_does_not_cover():
    """The receiving side, in-process: the next hop's signed report must name the gradient it sent, the activations
    this hop sent, and the gradient it relayed as the one the hop after it signed; each lie is refused, blaming it."""
    import time

    from swarm.optimizer import OptimizerConfig
    from swarm.protocol import ChainHeader, HopReport, tensor_digest
    from swarm.stage_server import ChainError, StageServer, StageServerConfig
    from swarm.transport import limits_for

    cfg = StageServerConfig(run_id="ev", stage=0, num_stages=3, limits=limits_for(2, 8, TINY.hidden_size))
    server = StageServer(cfg, TINY, None, OptimizerConfig(averaging=False), identity_key=S0)
    ids = torch.randint(0, 64, (2, 8))
    route = [pid(S0), pid(S1), pid(S2)]
    header = ChainHeader.create(
        TRAINER, run_id="ev", trainer=pid(TRAINER), mb="1.0", step=0, route=route, tokens=ids, now=time.time()
    )[0]
    sent, grad, relayed = (torch.randn(2, 8, TINY.hidden_size) for _ in range(3))

    def report(key, stage, digests, loss=None):
        return HopReport.create(
            key,
            header_digest=header.digest,
            stage=stage,
            peer=route[stage],
            ok=True,
            loss=loss,
            digests=digests,
        )

    below = report(S2, 2, (tensor_digest(relayed), tensor_digest(grad), header.labels_digest), loss=1.0)
    honest = report(S1, 1, (tensor_digest(grad), tensor_digest(sent), tensor_digest(relayed)))
    server._check_signed_tensors(route[1], [honest, below], sent, [grad, relayed], header)
    lies = {
        "is not the one its report signs": ([honest, below], sent, [grad * 2, relayed]),
        "other activations": ([honest, below], sent * 2, [grad, relayed]),
        "did not sign": ([honest, below], sent, [grad, relayed * 2]),
        "does not sign the tensors": ([report(S1, 1, ()), below], sent, [grad, relayed]),
    }
    for reason, (reports, activations, tensors) in lies.items():
        with pytest.raises(ChainError, match=reason) as e:
            server._check_signed_tensors(route[1], reports, activations, tensors, header)
        assert e.value.blame == route[1]


def test_a_forward_audit_clears_a_false_alarm_and_convicts_tampered_activations(monkeypatch):
    """Both sides in-process, the wire replaced by direct calls into the auditors' request handlers (header checks,
    signed reports and all): a stage-1 receiver asks other stage-0 replicas to recompute stage 0's activations from
    the trainer's tokens. An honest tensor that SENTINEL rejected is cleared (a false alarm, no strike); a x3 one is
    refused and blamed once a second replica breaks the tie; an auditor serves one audit per request; tokens that
    are not the header's are refused, blaming their sender."""
    import asyncio

    import swarm.stage_server as stage_server
    from swarm.protocol import ChainHeader
    from swarm.sentinel import Verdict
    from swarm.stage_server import ChainError

    zero, (receiver,) = _replicas_and_receivers(monkeypatch, [S1])
    ids = torch.randint(0, 64, (2, 8))

    def header_of(mb: str) -> ChainHeader:
        return _header(mb, [S0, S1], ids, step=20)

    honest, _ = recompute(zero["route"].module, FORWARD, ids, None)
    alarm = Verdict(False, pid(S0), FORWARD, 20.0, 12.0, "skew_align 20 > 12", "skew_align", "population")
    asyncio.run(receiver._forward_audit(honest, pid(S0), header_of("1.0"), ids, alarm))
    assert receiver.stats.false_alarms == 1 and receiver.stats.audits_run == 1
    assert pid(S0) not in receiver.ledger.tallies  # the last stage: its loss check is the entry
    header = header_of("2.0")
    with pytest.raises(ChainError, match="the route activations disagree") as e:
        asyncio.run(receiver._forward_audit(honest * 3, pid(S0), header, ids, None))
    assert e.value.blame == pid(S0) and receiver.ledger.tallies[pid(S0)].reasons["audit"] == 1
    assert sum(zero[name].stats.audits_served for name in ("a1", "a2")) == 3
    # an auditor computes once per request: asked again with the same header, it refuses and the alarm stands
    with pytest.raises(ChainError, match="skew_align"):
        asyncio.run(receiver._forward_audit(honest, pid(S0), header, ids, alarm))
    # a sender that claims an epoch no auditor holds weights of gets no audit: SENTINEL's verdict stands
    with pytest.raises(ChainError, match="skew_align"):
        asyncio.run(receiver._forward_audit(honest, pid(S0), header_of("4.0"), ids, alarm, epoch=7))
    assert receiver.stats.false_alarms == 1
    with pytest.raises(ChainError, match="not the header's") as e:
        receiver._split_tokens(header_of("3.0"), [honest, ids.flip(0)], pid(S0))
    assert e.value.blame == pid(S0)
    # an auditor that lies (its answers x3), drawn first: the other replica breaks the tie against it; the honest
    # sender's tensor stands and the liar gets the strike
    zero["a1"].outbound_hook = lambda tensor, direction, meta: tensor * 3
    others = {pid(S0), pid(S1)}
    for n in range(64):
        header = header_of(f"5.{n}")
        seed = hashlib.sha256(header.digest + b"forward").digest()
        if draw_auditor([pid(S0), pid(AUDITOR), pid(VERIFIER)], others, seed) == pid(AUDITOR):
            break
    asyncio.run(receiver._forward_audit(honest, pid(S0), header, ids, None))
    assert receiver.ledger.tallies[pid(AUDITOR)].reasons["audit"] == 1
    assert receiver.ledger.tallies[pid(S0)].reasons["audit"] == 1  # still only the x3 tensor's strike
    # sampled audits beside the micro-batch are bounded: with MAX_BACKGROUND_AUDITS in flight none more is drawn
    receiver._background_audits = {object() for _ in range(stage_server.MAX_BACKGROUND_AUDITS)}
    assert not any(receiver._draw_forward_audit(pid(VERIFIER), suspect=False) for _ in range(20))
    assert receiver._draw_forward_audit(
        pid(VERIFIER), suspect=True
    )  # a suspect's audits wait in line instead


def test_a_last_stage_auditor_has_stage_0_activations_recomputed_too(monkeypatch):
    """In a two-stage swarm the trainer's auditors of the last stage get stage 0's activations in audit-only
    requests, with its tokens: such an auditor's false alarm is cleared by the same forward audit as the route's next
    hop's, once it shows the trainer's audit reveal (the header check admits the peers the reveal names); without
    it the stage-0 replicas refuse, and the alarm stands. Each replica serves one audit per request and asker."""
    import asyncio
    import time

    from swarm.protocol import ChainHeader
    from swarm.sentinel import Verdict
    from swarm.stage_server import ChainError

    zero, (route_next, audit_peer) = _replicas_and_receivers(monkeypatch, [S1, S2])
    ids = torch.randint(0, 64, (2, 8))
    header, reveal = ChainHeader.create(
        TRAINER,
        run_id="ev",
        trainer=pid(TRAINER),
        mb="1.0",
        step=20,
        route=[pid(S0), pid(S1)],
        tokens=ids,
        auditors=[pid(S2)],
        now=time.time(),
    )
    honest, _ = recompute(zero["route"].module, FORWARD, ids, None)
    alarm = Verdict(False, pid(S0), FORWARD, 20.0, 12.0, "skew_align 20 > 12", "skew_align", "population")

    def audit(receiver, reveal):
        return asyncio.run(
            _asking(receiver, receiver._forward_audit(honest, pid(S0), header, ids, alarm, reveal=reveal))
        )

    with pytest.raises(ChainError, match="skew_align"):  # no reveal: not a peer the header admits
        audit(audit_peer, None)
    assert audit_peer.stats.false_alarms == 0
    audit(audit_peer, reveal)
    audit(route_next, None)  # the route's next hop asks the same replicas about the same request
    assert audit_peer.stats.false_alarms == 1 and route_next.stats.false_alarms == 1
    assert sum(s.stats.audits_served for s in zero.values()) == 2


def test_a_middle_stage_forward_audit_recomputes_from_the_input_the_hop_before_sent(monkeypatch):
    """A receiver at stage 2 has stage 1's activations recomputed by other stage-1 replicas from stage 1's input,
    which it fetches from the route's stage-0 peer (the hop before the sender, which holds what it sent while the
    micro-batch is in flight) and checks against the digest the sender says it computed from: a false alarm is
    cleared, x3 activations are refused and blamed; an input that is not what the sender claims, or no longer held,
    is no audit (nobody blamed, SENTINEL's verdict stands); the hop before serves one fetch per request."""
    import asyncio

    from swarm.protocol import tensor_digest
    from swarm.sentinel import Verdict
    from swarm.stage_server import ChainError

    servers, (receiver,) = _replicas_and_receivers(monkeypatch, [S2], stage=1, num_stages=3)
    ids = torch.randint(0, 64, (2, 8))
    x1, _ = recompute(servers["before"].module, FORWARD, ids, None)  # stage 1's input: what stage 0 sent
    honest, _ = recompute(servers["route"].module, FORWARD, x1, None)
    alarm = Verdict(False, pid(S1), FORWARD, 20.0, 12.0, "skew_align 20 > 12", "skew_align", "population")

    def audit(mb, y, claimed=tensor_digest(x1), held=x1, verdict=alarm):
        header = _header(mb, [S0, S1, S2], ids, step=20)
        if held is not None:
            servers["before"]._sent[header.digest] = held
        return asyncio.run(receiver._forward_audit(y, pid(S1), header, claimed, verdict))

    audit("1.0", honest)
    assert receiver.stats.false_alarms == 1 and receiver.stats.forward_audits == 1
    with pytest.raises(ChainError, match="the route activations disagree") as e:
        audit("2.0", honest * 3, verdict=None)
    assert e.value.blame == pid(S1) and receiver.ledger.tallies[pid(S1)].reasons["audit"] == 1
    for claimed, held in ((tensor_digest(x1 * 2), x1), (tensor_digest(x1), None)):
        with pytest.raises(ChainError, match="skew_align"):
            audit("3.0" if held is not None else "4.0", honest, claimed=claimed, held=held)
    assert receiver.stats.audit_inputs_missing == 2 and receiver.stats.forward_audits == 2
    assert pid(S1) not in {p for p, t in receiver.ledger.tallies.items() if t.reasons.get("audit", 0) > 1}
    # the hop before serves a request's activations once: a second fetch of the same request is refused
    header = _header("5.0", [S0, S1, S2], ids, step=20)
    servers["before"]._sent[header.digest] = x1
    asyncio.run(receiver._fetch_input(header, tensor_digest(x1), honest))
    with pytest.raises(ChainError, match="fetched already"):
        asyncio.run(receiver._fetch_input(header, tensor_digest(x1), honest))


def test_a_receiver_holds_its_sender_to_its_signed_claim(monkeypatch):
    """Activations travel with their sender's signed claim (their digest, what they were computed from, the epoch):
    a claim that is missing, another peer's, or names other activations is the sender's fault; at stage 1 it must
    name the header's tokens; a middle-stage sender relays the claim of the hop before it, and an input other than
    the one that hop signed to have sent it is the sender's lie (what a forward audit then recomputes from is bound
    to the hop before)."""
    from swarm.evidence import TensorClaim
    from swarm.protocol import tensor_digest
    from swarm.stage_server import ChainError

    servers, (receiver,) = _replicas_and_receivers(monkeypatch, [S2], stage=1, num_stages=3)
    ids = torch.randint(0, 64, (2, 8))
    header = _header("1.0", [S0, S1, S2], ids, step=20)
    x1, y1 = torch.randn(2, 8, TINY.hidden_size), torch.randn(2, 8, TINY.hidden_size)

    def claim(key, stage, sent, source, mb=header.digest.hex()):
        return TensorClaim.create(
            key, stage=stage, direction=FORWARD, microbatch=mb, epoch=2, tensor=sent, inputs=(source,)
        ).to_wire()

    before = claim(S0, 0, x1, header.labels_digest)
    meta = dict(claim=claim(S1, 1, y1, tensor_digest(x1)), input_claim=before)
    got = receiver._check_claim(header, meta, tensor_digest(y1), pid(S1))
    assert got.epoch == 2 and receiver._check_input_claim(header, meta, got, pid(S1)) == tensor_digest(x1)
    lies = {
        "without their sender's valid claim": (dict(meta, claim=None), y1),
        "other activations": (meta, y1 * 2),
        "key does not derive": (dict(meta, claim={**meta["claim"], "key": before["key"]}), y1),
        "not stage 1's claim": (dict(meta, claim=claim(S1, 1, y1, tensor_digest(x1), mb="another")), y1),
    }
    for reason, (lie, received) in lies.items():
        with pytest.raises(ChainError, match=reason) as e:
            receiver._check_claim(header, lie, tensor_digest(received), pid(S1))
        assert e.value.blame == pid(S1)
    for reason, lie in {
        "other activations than stage 0 signed": dict(meta, claim=claim(S1, 1, y1, tensor_digest(x1 * 2))),
        "no valid claim of stage 0": dict(meta, input_claim=None),
    }.items():
        with pytest.raises(ChainError, match=reason) as e:
            receiver._check_input_claim(
                header, lie, receiver._check_claim(header, lie, tensor_digest(y1), pid(S1)), pid(S1)
            )
        assert e.value.blame == pid(S1)
    stage1 = servers["route"]  # at stage 1, the claim must name the header's tokens
    with pytest.raises(ChainError, match="other token ids"):
        stage1._check_claim(header, dict(claim=claim(S0, 0, x1, b"t" * 32)), tensor_digest(x1), pid(S0))
    stage1._check_claim(header, dict(claim=before), tensor_digest(x1), pid(S0))
