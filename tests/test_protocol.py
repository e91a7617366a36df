"""The chain protocol (swarm.protocol) as pure logic: signed headers, signed hop reports, who is blamed."""

import time

import pytest
import torch
from hivemind.utils.crypto import RSAPrivateKey

from swarm.identity import peer_id_of
from swarm.protocol import (
    DOWNSTREAM,
    UPSTREAM,
    ChainHeader,
    HopReport,
    ProtocolError,
    audit_reveal,
    check_reports,
    resolve,
)

KEYS = [RSAPrivateKey() for _ in range(5)]  # trainer, stage 0, stage 1, stage 2, an outsider
IDS = [peer_id_of(k.get_public_key().to_bytes()) for k in KEYS]
TRAINER, ROUTE, OUTSIDER = IDS[0], IDS[1:4], IDS[4]
TOKENS = torch.arange(24).reshape(2, 12)


def header(**overrides):
    fields = dict(
        run_id="run", trainer=TRAINER, mb="7.0", step=1, route=ROUTE, tokens=TOKENS, now=time.time()
    )
    fields.update(overrides)
    key = fields.pop("key", KEYS[0])
    return ChainHeader.create(key, **fields)


def test_peer_id_of_matches_libp2p(tmp_path):
    from hivemind.p2p import P2P, PeerID

    from swarm.identity import load_identity_key

    path = str(tmp_path / "id.key")
    P2P.generate_identity(path)
    with open(path, "rb") as f:
        expected = PeerID.from_identity(f.read()).to_base58()
    assert peer_id_of(load_identity_key(path).get_public_key().to_bytes()) == expected


def test_a_header_verifies_where_the_route_puts_each_hop():
    h, _ = header()
    wire = ChainHeader.from_wire(h.to_wire())
    now = time.time()
    wire.check(run_id="run", stage=0, me=ROUTE[0], sender=TRAINER, now=now)
    wire.check(run_id="run", stage=2, me=ROUTE[2], sender=ROUTE[1], now=now)
    wire.check(run_id="run", stage=2, me=OUTSIDER, sender=ROUTE[1], now=now, audit_only=True)
    # a forward audit: another replica of stage 0 is asked by the route's stage-1 peer
    wire.check(run_id="run", stage=0, me=OUTSIDER, sender=ROUTE[1], now=now, forward_audit=True)


@pytest.mark.parametrize(
    "stage, me, sender",
    [
        (0, ROUTE[0], ROUTE[1]),  # the audited peer itself
        (0, OUTSIDER, ROUTE[2]),  # asked by someone who did not receive stage 0's output
        (0, OUTSIDER, TRAINER),
        (2, OUTSIDER, ROUTE[1]),  # the last stage sends no activations
    ],
)
def test_a_forward_audit_is_asked_of_another_replica_by_the_receiver_only(stage, me, sender):
    """A forward audit costs its auditor a forward pass: only the peer that received the audited activations (the
    route's next hop) may ask it, of a replica other than the route's, and never of the last stage."""
    h, _ = header()
    with pytest.raises(ProtocolError):
        h.check(run_id="run", stage=stage, me=me, sender=sender, now=time.time(), forward_audit=True)


def test_the_activations_a_hop_sent_are_fetched_by_the_hop_two_stages_on_only():
    """A middle stage's forward audit needs its input: the route's peer two stages on fetches it from the hop that
    sent it; nobody else may make a route peer send its activations again (traffic a header could buy)."""
    h, _ = header()
    now = time.time()
    h.check(run_id="run", stage=0, me=ROUTE[0], sender=ROUTE[2], now=now, fetch=True)
    for stage, me, sender in (
        (0, ROUTE[0], ROUTE[1]),  # the next hop got them already
        (0, ROUTE[0], OUTSIDER),
        (0, OUTSIDER, ROUTE[2]),  # not the route's peer: it sent nothing
        (1, ROUTE[1], ROUTE[2]),  # stage 1's activations go to the last stage, which has no stage after it
    ):
        with pytest.raises(ProtocolError):
            h.check(run_id="run", stage=stage, me=me, sender=sender, now=now, fetch=True)


def test_a_last_stage_auditor_may_ask_a_forward_audit_of_the_stage_before():
    """In a two-stage route the penultimate stage is stage 0, and the trainer's auditors of the last stage get its
    activations (and tokens) in audit-only requests: a revealed auditor may have them recomputed; a peer the reveal
    does not name may not, and neither may an auditor when the stage after the audited one is not the last."""
    route = ROUTE[:2]
    h, reveal = header(route=route, auditors=[OUTSIDER])
    auditors = audit_reveal(h, reveal)
    now = time.time()
    h.check(run_id="run", stage=0, me=IDS[3], sender=OUTSIDER, now=now, forward_audit=True, auditors=auditors)
    with pytest.raises(ProtocolError, match="must come from"):
        h.check(run_id="run", stage=0, me=IDS[3], sender=OUTSIDER, now=now, forward_audit=True)
    h3, reveal3 = header(auditors=[OUTSIDER])  # three stages: stage 1 is the penultimate, not the last
    with pytest.raises(ProtocolError, match="must come from"):
        h3.check(
            run_id="run",
            stage=0,
            me=TRAINER,
            sender=OUTSIDER,
            now=now,
            forward_audit=True,
            auditors=[OUTSIDER],
        )
    assert audit_reveal(h3, reveal3) == [OUTSIDER]


@pytest.mark.parametrize(
    "what", ["trainer", "mb", "step", "route", "labels", "key", "stale", "run", "sender", "me"]
)
def test_a_rewritten_or_misused_header_is_refused(what):
    """Every field a hop used to forward on faith is signed: rewriting any of them (the trainer, to get another
    trainer's labels used; the micro-batch id, to slip a replay by; the route) breaks the signature, and a header
    signed by a key that is not the named trainer's is refused even if the signature itself is valid."""
    h, _ = header(now=time.time() - 3600 if what == "stale" else time.time())
    wire = h.to_wire()
    if what == "trainer":
        wire["trainer"] = OUTSIDER
    elif what == "mb":
        wire["mb"] = "8.0"
    elif what == "step":
        wire["step"] = 99
    elif what == "route":
        wire["route"] = [ROUTE[0], OUTSIDER, ROUTE[2]]
    elif what == "labels":
        wire["labels"] = bytes(32)
    elif what == "key":  # an outsider signs a header naming the trainer with its own key
        forged, _ = header(key=KEYS[4])
        wire = forged.to_wire()
    parsed = ChainHeader.from_wire(wire)
    kwargs = dict(run_id="run", stage=1, me=ROUTE[1], sender=ROUTE[0], now=time.time())
    if what == "run":
        kwargs["run_id"] = "other"
    elif what == "sender":
        kwargs["sender"] = OUTSIDER  # not the route's stage-0 peer
    elif what == "me":
        kwargs["me"] = OUTSIDER
    with pytest.raises(ProtocolError):
        parsed.check(**kwargs)


@pytest.mark.parametrize(
    "bad", [None, [], {"route": "x"}, {"route": ["a"] * 100}, {"route": ["a"], "run": 5}]
)
def test_malformed_headers_are_refused_with_a_reason(bad):
    with pytest.raises(ProtocolError):
        ChainHeader.from_wire(bad)


def test_audit_reveal_must_match_the_commitment():
    h, reveal = header(auditors=[OUTSIDER])
    assert audit_reveal(h, reveal) == [OUTSIDER]
    with pytest.raises(ProtocolError):
        audit_reveal(h, dict(reveal, auditors=[ROUTE[0]]))  # swapped for a friend
    with pytest.raises(ProtocolError):
        audit_reveal(h, dict(reveal, auditors=[]))  # stripped
    with pytest.raises(ProtocolError):
        audit_reveal(h, None)
    plain, plain_reveal = header()
    assert audit_reveal(plain, plain_reveal) == []
    assert (
        plain.audit_commitment != header()[0].audit_commitment
    )  # salted: no audit looks like any other header


def report(h, stage, key=None, **fields):
    return HopReport.create(
        key or KEYS[stage + 1], header_digest=h.digest, stage=stage, peer=ROUTE[stage], **fields
    ).to_wire()


def test_resolve_an_ok_chain_and_a_failure_deep_in_it():
    h, _ = header()
    ok = [report(h, 0, ok=True), report(h, 1, ok=True), report(h, 2, ok=True, loss=2.5)]
    verdict = resolve(h, check_reports(h, ok, 0, ROUTE[0]))
    assert verdict.ok and verdict.loss == 2.5
    # stage 2 rejects stage 1's activations; stages 1 and 0 relay: stage 1 is blamed, judged by stage 2
    failed = [
        report(h, 0, ok=False, relay=True, error="x"),
        report(h, 1, ok=False, relay=True, error="x"),
        report(h, 2, ok=False, blame=UPSTREAM, judged=True, error="rejected"),
    ]
    verdict = resolve(h, check_reports(h, failed, 0, ROUTE[0]))
    assert (verdict.ok, verdict.blame, verdict.blame_stage, verdict.judge) == (False, ROUTE[1], 1, ROUTE[2])
    # stage 0 blames its upstream, the trainer: nobody is blamed
    verdict = resolve(h, check_reports(h, [report(h, 0, ok=False, blame=UPSTREAM, error="x")], 0, ROUTE[0]))
    assert verdict.blame is None


def test_a_relayed_report_cannot_be_forged_or_altered():
    """Stage 0 used to rewrite ``blame`` to frame any downstream peer. Now each verdict is signed by the hop that
    made it: altering stage 2's report, or writing one in its name, breaks the reply (and the peer that delivered
    it is the one at fault); stage 0 can only blame its own neighbour, in its own name."""
    h, _ = header()
    honest = [
        report(h, 0, ok=False, relay=True),
        report(h, 1, ok=False, relay=True),
        report(h, 2, ok=False, blame=UPSTREAM, judged=True, error="rejected"),
    ]
    altered = [dict(r) for r in honest]
    altered[2]["blame"] = DOWNSTREAM
    forged = honest[:2] + [report(h, 2, key=KEYS[1], ok=False, blame=UPSTREAM)]  # signed by stage 0's key
    loss_forged = [
        report(h, 0, ok=True),
        report(h, 1, ok=True),
        dict(report(h, 2, ok=True, loss=2.5), loss=0.1),
    ]
    other_request = [
        report(header(mb="9.0")[0], 0, ok=True),
        report(h, 1, ok=True),
        report(h, 2, ok=True, loss=1.0),
    ]
    for reports in (altered, forged, loss_forged, other_request):
        with pytest.raises(ProtocolError):
            check_reports(h, reports, 0, ROUTE[0])


@pytest.mark.parametrize(
    "case",
    [
        "ok-without-downstream",
        "ok-over-failure",
        "relay-without-failure",
        "own-failure-then-more",
        "too-many",
    ],
)
def test_inconsistent_report_chains_are_refused(case):
    h, _ = header()
    reports = {
        "ok-without-downstream": [report(h, 0, ok=True)],
        "ok-over-failure": [
            report(h, 0, ok=True),
            report(h, 1, ok=False, error="x"),
        ],
        "relay-without-failure": [report(h, 0, ok=False, relay=True)],
        "own-failure-then-more": [
            report(h, 0, ok=False, blame=DOWNSTREAM),
            report(h, 1, ok=False, error="x"),
        ],
        "too-many": [
            report(h, 0, ok=True),
            report(h, 1, ok=True),
            report(h, 2, ok=True, loss=1.0),
            report(h, 2, ok=True, loss=1.0),
        ],
    }[case]
    with pytest.raises(ProtocolError):
        check_reports(h, reports, 0, ROUTE[0])


def test_a_report_signs_the_tensors_of_its_hop():
    """A hop's report carries the digests of the gradient it sent back and of what it computed it from, under its
    signature: a relay cannot swap them, and a report without them (a hop that sent no gradient) still verifies."""
    h, _ = header()
    digests = [bytes([1]) * 32, bytes([2]) * 32, bytes([3]) * 32]
    wire = report(h, 2, ok=True, loss=2.5, digests=tuple(digests))
    (parsed,) = check_reports(h, [wire], 2, ROUTE[2])
    assert parsed.digests == tuple(digests)
    swapped = dict(wire, d=[digests[0], digests[2], digests[1]])
    with pytest.raises(ProtocolError, match="not signed"):
        check_reports(h, [swapped], 2, ROUTE[2])
    stripped = {k: v for k, v in wire.items() if k != "d"}
    with pytest.raises(ProtocolError, match="not signed"):
        check_reports(h, [stripped], 2, ROUTE[2])
    with pytest.raises(ProtocolError, match="report.d"):
        check_reports(h, [dict(wire, d=digests[:2])], 2, ROUTE[2])
    assert check_reports(h, [report(h, 2, ok=True, loss=1.0)], 2, ROUTE[2])[0].digests == ()
