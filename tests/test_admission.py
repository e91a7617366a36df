"""Admission controls: proof of work and allowlist tokens (pure), their enforcement on real DHT records, and a
live swarm that admits only allowlisted, working identities."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from hivemind.utils import get_dht_time

from swarm.admission import (
    AdmissionCache,
    AdmissionError,
    AdmissionPolicy,
    issue_token,
    load_or_create_authority_key,
    public_key_hex,
    solve_pow,
    verify_pow,
    verify_token,
)
from swarm.records import RecordError, ReputationReport, StageRecord, stage_key

RUN = "adm"
PEER = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
OTHER = "QmcgpsyWgH8Y8ajJz1Cu72KnS5uo2Aa2LpzU7kinSupNKC"


@pytest.fixture(scope="module")
def authority(tmp_path_factory):
    return load_or_create_authority_key(str(tmp_path_factory.mktemp("auth") / "authority.pem"))


def test_pow_solved_and_verified():
    nonce = solve_pow(RUN, PEER, 12)
    assert verify_pow(RUN, PEER, 12, nonce)
    assert not verify_pow(RUN, OTHER, 12, nonce)  # bound to the identity (deterministic for these ids)
    assert not verify_pow("other-run", PEER, 12, nonce)  # and to the swarm
    assert verify_pow(RUN, PEER, 0, None)  # off
    for bad in (None, "12", -1, 2**63, True, 1.5):
        assert not verify_pow(RUN, PEER, 12, bad)


def test_pow_wrong_nonce_rejected():
    nonce = solve_pow(RUN, PEER, 16)
    wrong = [n for n in range(nonce) if not verify_pow(RUN, PEER, 16, n)]
    assert len(wrong) == nonce  # every smaller nonce fails: solve_pow returned the first valid one
    with pytest.raises(ValueError):
        solve_pow(RUN, PEER, 99)


def test_token_round_trip_and_rejections(authority, tmp_path):
    key_hex = public_key_hex(authority)
    token = issue_token(authority, RUN, PEER, ttl_s=60)
    verify_token(key_hex, RUN, PEER, token)
    with pytest.raises(AdmissionError, match="another swarm or identity"):
        verify_token(key_hex, RUN, OTHER, token)
    with pytest.raises(AdmissionError, match="another swarm or identity"):
        verify_token(key_hex, "other-run", PEER, token)
    with pytest.raises(AdmissionError, match="expired"):
        verify_token(key_hex, RUN, PEER, issue_token(authority, RUN, PEER, ttl_s=60, now=time.time() - 3600))
    rogue = load_or_create_authority_key(str(tmp_path / "rogue.pem"))
    with pytest.raises(AdmissionError, match="not signed"):
        verify_token(key_hex, RUN, PEER, issue_token(rogue, RUN, PEER))
    body, signature = token.split(".")
    forged_body = issue_token(rogue, RUN, OTHER).split(".")[0]
    with pytest.raises(AdmissionError, match="not signed"):
        verify_token(key_hex, RUN, OTHER, f"{forged_body}.{signature}")  # someone else's signature
    for bad in (None, "", "no-dot", "a.b.c", "x" * 600, 5):
        with pytest.raises(AdmissionError):
            verify_token(key_hex, RUN, PEER, bad)


def test_authority_key_file_is_kept(tmp_path):
    path = str(tmp_path / "k.pem")
    first = public_key_hex(load_or_create_authority_key(path))
    assert public_key_hex(load_or_create_authority_key(path)) == first
    (tmp_path / "bad.pem").write_text("not a key")
    with pytest.raises(ValueError):
        load_or_create_authority_key(str(tmp_path / "bad.pem"))


def test_policy(authority):
    off = AdmissionPolicy(run_id=RUN)
    assert not off.enabled and off.prove(PEER) is None and off.admits(PEER, None)
    both = AdmissionPolicy(run_id=RUN, pow_bits=10, authority=public_key_hex(authority))
    assert AdmissionPolicy.from_extra(RUN, {"admission": both.to_extra()}) == both
    assert AdmissionPolicy.from_extra(RUN, {}) == off
    with pytest.raises(AdmissionError):
        both.prove(PEER)  # no token
    proof = both.prove(PEER, issue_token(authority, RUN, PEER))
    assert both.admits(PEER, proof)
    assert not both.admits(OTHER, proof)
    assert not both.admits(PEER, {"pow": proof["pow"]})  # token missing
    assert not both.admits(PEER, None)
    work_only = AdmissionPolicy(run_id=RUN, pow_bits=10)
    assert work_only.admits(PEER, {"pow": proof["pow"]})
    with pytest.raises(ValueError):
        AdmissionPolicy(run_id=RUN, pow_bits=-1)
    with pytest.raises(ValueError):
        AdmissionPolicy(run_id=RUN, authority="zz")
    with pytest.raises(ValueError):
        AdmissionPolicy.from_extra(RUN, {"admission": "on"})


def test_cache_remembers_and_explains():
    policy = AdmissionPolicy(run_id=RUN, pow_bits=8)
    cache = AdmissionCache(policy)
    proof = policy.prove(PEER)
    assert cache.reason(PEER, proof) is None
    assert "proof of work" in cache.reason(PEER, {"pow": proof["pow"] + 1})
    assert "no admission proof" in cache.reason(OTHER, None)
    assert AdmissionCache(AdmissionPolicy(run_id=RUN)).reason(PEER, None) is None


def test_records_carry_proofs():
    rec = StageRecord(peer_id=PEER, stage=0, admission={"pow": 5, "token": "a.b"})
    assert StageRecord.from_value(rec.to_value()) == rec
    assert "admission" not in StageRecord(peer_id=PEER, stage=0).to_value()  # readable by older readers
    report = ReputationReport(reporter=PEER, issued_at=1.0, admission={"pow": 7})
    assert ReputationReport.from_value(report.to_value()) == report
    for bad in ({"pow": -1}, {"pow": "7"}, {"token": 5}, {"token": "x" * 600}, {"extra": 1}, [1]):
        with pytest.raises(RecordError):
            StageRecord.from_value(dict(StageRecord(peer_id=PEER, stage=0).to_value(), admission=bad))


def test_unadmitted_stage_records_are_ignored_on_a_real_dht():
    """Records in the real DHT: the router's view (fetch_stage_peers with the policy) keeps only admitted peers."""
    from hivemind.dht.crypto import RSASignatureValidator

    from swarm.network import create_dht, fetch_stage_peers, owner_subkey
    from swarm.records import owner_peer_id

    policy = AdmissionPolicy(run_id=RUN, pow_bits=8)
    dht = create_dht(RUN)
    try:
        # a record speaks for its signer: two signers, the node's identity and this process's key (which the node
        # also signs with, for hivemind's own records)
        me, process_key = owner_subkey(dht), RSASignatureValidator().local_public_key
        peer, other = owner_peer_id(me), owner_peer_id(process_key)
        good = StageRecord(peer_id=peer, stage=0, updated_at=get_dht_time(), admission=policy.prove(peer))
        bad = StageRecord(peer_id=other, stage=1, updated_at=get_dht_time(), admission={"pow": 0})
        for rec, subkey in ((good, me), (bad, process_key)):
            assert dht.store(stage_key(RUN, rec.stage), rec.to_value(), get_dht_time() + 30, subkey=subkey)
        everyone = fetch_stage_peers(dht, RUN, 2)
        assert [p.peer_id for p in everyone[0]] == [peer] and [p.peer_id for p in everyone[1]] == [other]
        admitted = fetch_stage_peers(dht, RUN, 2, policy)
        assert [p.peer_id for p in admitted[0]] == [peer]
        assert admitted[1] == []
    finally:
        dht.shutdown()


@pytest.mark.slow
def test_allowlisted_swarm_trains_and_refuses_strangers(tmp_path):
    """`swarm local` with proof of work and an allowlist: its own peers (identities + tokens) train; a stage peer
    without a token, and one with a token for another identity, are refused with a clear message."""
    from peers.local import LocalSwarm

    key = str(tmp_path / "authority.pem")
    load_or_create_authority_key(key)
    swarm = LocalSwarm(str(tmp_path / "swarm"), run_id="admtest")
    swarm.authority_key = key
    try:
        swarm.start_dht(
            [
                "--stages",
                "2",
                "--seq-len",
                "32",
                "--microbatch-size",
                "4",
                "--target-batch-size",
                "8",
                "--pow-bits",
                "12",
                "--authority-key",
                key,
            ]
        )
        stages = [swarm.start_stage(s, wait=False) for s in (0, 1)]
        for child in stages:
            child.wait_event("serve", 120)
        summary = str(tmp_path / "summary.json")
        trainer = swarm.start_trainer(["--steps", "2", "--summary-json", summary])
        assert trainer.proc.wait(timeout=240) == 0
        with open(summary) as f:
            assert json.load(f)["microbatches"]["completed"] == 4

        base = [
            sys.executable,
            "-m",
            "peers.cli",
            "serve",
            "--run-id",
            "admtest",
            "--initial-peers",
            *swarm.initial_peers,
            "--stage",
            "0",
        ]
        stranger = subprocess.run(base, capture_output=True, text=True, timeout=120)
        assert stranger.returncode == 2 and "allowlisted" in stranger.stderr
        borrowed = swarm.admission_args("someone")[-1]  # a valid token, but for another identity
        thief = subprocess.run(
            base + ["--admission-token", borrowed], capture_output=True, text=True, timeout=120
        )
        assert (
            thief.returncode == 2
            and "not admitted" in thief.stderr
            and "another swarm or identity" in thief.stderr
        )
    finally:
        swarm.stop()
