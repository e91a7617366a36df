"""Tests for swarm.records: record schemas, and the DHT validators exercised on hand-built records (no network).

Records are built the way hivemind's DHT builds them before validating (``hivemind/dht/protocol.py``
``_validate_record`` / ``_validate_dictionary`` and ``hivemind/dht/node.py`` ``store_many``): the key is the
``DHTID`` bytes of the key string, the subkey and the value are msgpack-serialized with ``DHTProtocol.serializer``,
and the value is signed by the composite validator before it is stored.
"""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
from fake_dht import FakeDHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import CompositeValidator, DHTRecord
from hivemind.utils import MSGPackSerializer, ValueWithExpiration, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from swarm.config import ModelConfig, to_dict
from swarm.records import (
    MAX_STAGES,
    MAX_TTL_S,
    RECORD_VERSION,
    RecordError,
    StageRecord,
    SwarmConfigRecord,
    SwarmRecordValidator,
    TrainerProgressRecord,
    check_record,
    config_key,
    make_validators,
    owner_peer_id,
    parse_subkeyed,
    progress_key,
    stage_key,
)

RUN = "test-run"
dumps = DHTProtocol.serializer.dumps
ME = owner_peer_id(
    RSASignatureValidator().local_public_key
)  # the peer id of this process's key (make_validators)


def stage_value(**overrides):
    value = StageRecord(
        peer_id=ME, stage=1, state="online", throughput=12.5, served=3, device="cpu", updated_at=1000.0
    ).to_value()
    value.update(overrides)
    return value


def config_value(**overrides):
    value = SwarmConfigRecord(
        run_id=RUN,
        model=to_dict(ModelConfig()),
        num_stages=2,
        seq_len=64,
        microbatch_size=4,
        target_batch_size=64,
        lr=1e-3,
        created_at=1000.0,
        extra={"sentinel": True},
    ).to_value()
    value.update(overrides)
    return value


# ------------------------------------------------------------------------------------------------ schemas


def test_stage_record_round_trip():
    rec = StageRecord(
        peer_id="QmPeerA",
        stage=3,
        state="joining",
        throughput=7.25,
        served=11,
        device="cuda:0",
        updated_at=12345.5,
    )
    value = rec.to_value()
    assert value["version"] == RECORD_VERSION
    assert StageRecord.from_value(value) == rec
    # and through msgpack, as it travels in the DHT
    assert StageRecord.from_value(MSGPackSerializer.loads(MSGPackSerializer.dumps(value))) == rec


def test_stage_record_accepts_int_throughput_and_bounds():
    rec = StageRecord.from_value(stage_value(throughput=5, stage=MAX_STAGES - 1, served=0, updated_at=0))
    assert rec.throughput == 5.0 and isinstance(rec.throughput, float)
    assert rec.stage == MAX_STAGES - 1


def test_swarm_config_record_round_trip():
    value = config_value()
    rec = SwarmConfigRecord.from_value(value)
    assert rec.to_value() == value
    assert ModelConfig(**rec.model) == ModelConfig()
    assert SwarmConfigRecord.from_value(MSGPackSerializer.loads(MSGPackSerializer.dumps(value))) == rec


def test_swarm_config_extra_defaults_to_empty():
    value = config_value()
    del value["extra"]
    assert SwarmConfigRecord.from_value(value).extra == {}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(throughput=math.nan), "throughput must be finite"),
        (dict(throughput=math.inf), "throughput must be finite"),
        (dict(throughput=-math.inf), "throughput must be finite"),
        (dict(throughput=-1.0), "throughput=-1.0 is outside"),
        (dict(throughput=1e10), "is outside"),
        (dict(stage=-1), "stage=-1 is outside"),
        (dict(stage=MAX_STAGES), f"stage={MAX_STAGES} is outside"),
        (dict(served=-5), "served=-5 is outside"),
        (dict(served=2**63), "is outside"),
        (dict(updated_at=-0.5), "updated_at=-0.5 is outside"),
        (dict(updated_at=math.nan), "updated_at must be finite"),
        (dict(stage=True), "stage must be an integer"),
        (dict(served=False), "served must be an integer"),
        (dict(throughput=True), "throughput must be a number"),
        (dict(stage=1.0), "stage must be an integer"),
        (dict(stage="1"), "stage must be an integer"),
        (dict(throughput="fast"), "throughput must be a number"),
        (dict(throughput=None), "throughput must be a number"),
        (dict(peer_id=123), "peer_id must be a string"),
        (dict(peer_id=b"QmPeerA"), "peer_id must be a string"),
        (dict(peer_id=""), "peer_id must have 1..128 characters"),
        (dict(peer_id="x" * 129), "peer_id must have 1..128 characters"),
        (dict(device="d" * 65), "device must have 1..64 characters"),
        (dict(state="dead"), "state='dead' is not one of"),
        (dict(state="ONLINE"), "is not one of"),
        (dict(state=1), "state must be a string"),
        (dict(version=2), "unsupported record version 2"),
        (dict(version="1"), "unsupported record version '1'"),
        (dict(version=None), "unsupported record version None"),
        (dict(evil="payload"), "unknown fields ['evil']"),
    ],
)
def test_stage_record_rejections(overrides, message):
    with pytest.raises(RecordError, match=re.escape(message)):
        StageRecord.from_value(stage_value(**overrides))


@pytest.mark.parametrize("missing", sorted(StageRecord.FIELDS - {"version"}))
def test_stage_record_missing_field(missing):
    value = stage_value()
    del value[missing]
    with pytest.raises(RecordError, match=f"missing field '{missing}'"):
        StageRecord.from_value(value)


def test_stage_record_missing_version_is_rejected():
    value = stage_value()
    del value["version"]
    with pytest.raises(RecordError, match="unsupported record version None"):
        StageRecord.from_value(value)


@pytest.mark.parametrize("value", [None, [], "record", 42, b"bytes", ("a", 1)])
def test_non_dict_values_rejected(value):
    with pytest.raises(RecordError, match="record value must be a dict"):
        StageRecord.from_value(value)
    with pytest.raises(RecordError, match="record value must be a dict"):
        SwarmConfigRecord.from_value(value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_stages=0), "num_stages=0 is outside"),
        (dict(num_stages=MAX_STAGES + 1), "is outside"),
        (dict(num_stages=True), "num_stages must be an integer"),
        (dict(seq_len=1), "seq_len=1 is outside"),
        (dict(microbatch_size=0), "microbatch_size=0 is outside"),
        (dict(target_batch_size=-4), "target_batch_size=-4 is outside"),
        (dict(lr=math.nan), "lr must be finite"),
        (dict(lr=math.inf), "lr must be finite"),
        (dict(lr=-1e-3), "is outside"),
        (dict(lr=100.0), "is outside"),
        (dict(lr="0.001"), "lr must be a number"),
        (dict(created_at=-1.0), "created_at=-1.0 is outside"),
        (dict(run_id=""), "run_id must have 1..128 characters"),
        (dict(run_id="r" * 129), "run_id must have 1..128 characters"),
        (dict(run_id=7), "run_id must be a string"),
        (dict(extra=[1, 2]), "extra must be a dict"),
        (dict(extra={f"k{i}": i for i in range(65)}), "extra must be a dict of at most 64"),
        (dict(model=None), "model must be a dict"),
        (dict(model="tiny"), "model must be a dict"),
        (dict(model={f"k{i}": i for i in range(65)}), "model must be a dict of at most 64"),
        (dict(version=0), "unsupported record version 0"),
        (dict(owner="me"), "unknown fields ['owner']"),
    ],
)
def test_swarm_config_rejections(overrides, message):
    with pytest.raises(RecordError, match=re.escape(message)):
        SwarmConfigRecord.from_value(config_value(**overrides))


@pytest.mark.parametrize(
    "missing", ["run_id", "num_stages", "seq_len", "microbatch_size", "target_batch_size", "lr", "created_at"]
)
def test_swarm_config_missing_field(missing):
    value = config_value()
    del value[missing]
    with pytest.raises(RecordError, match=f"missing field '{missing}'"):
        SwarmConfigRecord.from_value(value)


@pytest.mark.parametrize(
    "model_overrides",
    [
        dict(hidden_size=190),  # not divisible by num_heads
        dict(num_heads=4, num_kv_heads=3),
        dict(num_layers=0),
        dict(vocab_size=-1),
        dict(max_position_embeddings=4),
        dict(init_std=0.0),
        dict(init_std=math.nan),
        dict(hidden_size="wide"),
        dict(hidden_size=None),
        dict(num_heads=[4]),
        dict(not_a_field=1),
        dict(hidden_size=math.inf),  # int(inf) raises OverflowError inside ModelConfig
        dict(hidden_size=math.nan),
    ],
)
def test_swarm_config_invalid_model(model_overrides):
    model = {**to_dict(ModelConfig()), **model_overrides}
    with pytest.raises(RecordError, match="invalid model config"):
        SwarmConfigRecord.from_value(config_value(model=model))


# ------------------------------------------------------------------------------------------------ validators


@pytest.fixture(scope="module")
def composite():
    return CompositeValidator(make_validators(RUN))


@pytest.fixture(scope="module")
def owner_marker():
    """The public-key marker of this process's key: the one ``make_validators`` signs with."""
    return RSASignatureValidator().local_public_key


@pytest.fixture(scope="module")
def other_key():
    return RSAPrivateKey()


def _key(name: str) -> bytes:
    return DHTID.generate(source=name).to_bytes()


def _record(key: str, marker: bytes, value, ttl_s: float = 10.0) -> DHTRecord:
    return DHTRecord(
        key=_key(key), subkey=dumps(marker), value=dumps(value), expiration_time=get_dht_time() + ttl_s
    )


def _signed(validator, record: DHTRecord) -> DHTRecord:
    return dataclasses.replace(record, value=validator.sign_value(record))


def test_subkey_serialization_keeps_owner_marker(owner_marker):
    # hivemind msgpack-serializes subkeys before validating; the raw marker survives inside the bin payload
    assert owner_marker.startswith(b"[owner:")
    assert owner_marker in dumps(owner_marker)


def test_signed_stage_and_config_records_validate(composite, owner_marker):
    stage = _signed(composite, _record(stage_key(RUN, 1), owner_marker, stage_value()))
    assert b"[signature:" in stage.value
    assert composite.validate(stage)
    config = _signed(composite, _record(config_key(RUN), owner_marker, config_value()))
    assert composite.validate(config)
    # what the DHT hands back to readers is the stripped value, which parses to the original record
    assert DHTProtocol.serializer.loads(composite.strip_value(stage)) == stage_value()


def test_every_stage_key_is_covered(composite, owner_marker):
    for stage in (0, MAX_STAGES - 1):
        bad = _signed(composite, _record(stage_key(RUN, stage), owner_marker, stage_value(throughput=-1.0)))
        assert not composite.validate(bad)


def test_record_signed_in_another_owners_name_is_valid_for_that_owner(composite, other_key):
    # B signs its own record: that is legitimate, and our validator accepts it
    other = RSASignatureValidator(other_key)
    record = _signed(
        other,
        _record(
            stage_key(RUN, 0),
            other.local_public_key,
            stage_value(peer_id=owner_peer_id(other.local_public_key)),
        ),
    )
    assert composite.validate(record)


def test_forged_signature_rejected(composite, owner_marker, other_key):
    other = RSASignatureValidator(other_key)
    record = _record(
        stage_key(RUN, 0), other.local_public_key, stage_value(peer_id=owner_peer_id(other.local_public_key))
    )
    # our validator refuses to sign a record that claims another owner's key: the value stays unsigned
    assert composite.sign_value(record) == record.value
    assert not composite.validate(record)
    # signing with key A while the subkey names key B: the signature does not verify against B
    forged_signature = RSAPrivateKey.process_wide().sign(MSGPackSerializer.dumps(dataclasses.astuple(record)))
    forged = dataclasses.replace(record, value=record.value + b"[signature:" + forged_signature + b"]")
    assert not composite.validate(forged)
    # B's genuine signature moved onto a record that claims A's key is rejected too
    genuine = _signed(other, record)
    assert composite.validate(genuine)
    stolen = dataclasses.replace(genuine, subkey=dumps(owner_marker))
    assert not composite.validate(stolen)
    # and so is B's signature carried over to another key (another stage)
    moved = dataclasses.replace(genuine, key=_key(stage_key(RUN, 1)))
    assert not composite.validate(moved)


def test_two_signatures_rejected(composite, owner_marker):
    record = _signed(composite, _record(stage_key(RUN, 0), owner_marker, stage_value()))
    doubled = dataclasses.replace(record, value=record.value + b"[signature:abc]")
    assert not composite.validate(doubled)


def test_valid_signature_over_malformed_value_rejected(composite, owner_marker):
    for bad in (
        stage_value(throughput=math.nan),
        stage_value(state="hacked"),
        stage_value(extra=1),
        [1, 2, 3],
    ):
        record = _signed(composite, _record(stage_key(RUN, 2), owner_marker, bad))
        assert b"[signature:" in record.value
        assert not composite.validate(record), bad
    bad_config = _signed(composite, _record(config_key(RUN), owner_marker, config_value(num_stages=0)))
    assert not composite.validate(bad_config)


def test_undecodable_value_rejected(owner_marker):
    record = DHTRecord(_key(stage_key(RUN, 0)), dumps(owner_marker), b"\xc1\xff garbage", get_dht_time() + 10)
    with pytest.raises(RecordError, match="undecodable value"):
        check_record(record, StageRecord.from_value)
    assert not SwarmRecordValidator(RUN).validate(record)


def test_unsigned_record_under_swarm_key_rejected(composite):
    for subkey in (dumps(b"just-a-subkey"), dumps("peer-a"), dumps(None)):
        record = DHTRecord(_key(stage_key(RUN, 0)), subkey, dumps(stage_value()), get_dht_time() + 10)
        assert composite.sign_value(record) == record.value  # nothing to sign with
        assert not composite.validate(record)
        with pytest.raises(RecordError, match="owner-signed"):
            check_record(record, StageRecord.from_value)


def test_expiration_beyond_max_ttl_rejected(composite, owner_marker):
    too_long = _signed(
        composite, _record(stage_key(RUN, 0), owner_marker, stage_value(), ttl_s=MAX_TTL_S + 60)
    )
    assert not composite.validate(too_long)
    with pytest.raises(RecordError, match="expires more than"):
        check_record(composite_strip(composite, too_long), StageRecord.from_value)
    just_fine = _signed(
        composite, _record(stage_key(RUN, 0), owner_marker, stage_value(), ttl_s=MAX_TTL_S - 60)
    )
    assert composite.validate(just_fine)


def composite_strip(composite, record: DHTRecord) -> DHTRecord:
    return dataclasses.replace(record, value=composite.strip_value(record))


def test_custom_max_ttl(owner_marker):
    validator = SwarmRecordValidator(RUN, max_ttl_s=5.0)
    record = _record(stage_key(RUN, 0), owner_marker, stage_value(), ttl_s=30.0)
    assert not validator.validate(record)
    assert validator.validate(dataclasses.replace(record, expiration_time=get_dht_time() + 1.0))


def test_unrelated_keys_are_not_ours(composite):
    for key in (
        "some.other.key",
        stage_key("another-run", 0),
        config_key("another-run"),
        f"{RUN}.stage.{MAX_STAGES}",
    ):
        record = DHTRecord(_key(key), dumps(None), dumps({"anything": [1, 2, 3]}), get_dht_time() + 10**6)
        assert composite.validate(record), key


def test_value_modified_after_signing_rejected(composite, owner_marker):
    record = _signed(composite, _record(stage_key(RUN, 0), owner_marker, stage_value(throughput=1.0)))
    assert composite.validate(record)
    stripped = composite.strip_value(record)
    signature = record.value[len(stripped) :]
    assert signature.startswith(b"[signature:")
    tampered_value = dumps(stage_value(throughput=1e6)) + signature
    assert not composite.validate(dataclasses.replace(record, value=tampered_value))
    # the expiration time is signed as well: it cannot be extended by a relaying node
    assert not composite.validate(dataclasses.replace(record, expiration_time=record.expiration_time + 5))


def test_validator_merging():
    validators = make_validators(RUN)
    assert isinstance(validators[0], RSASignatureValidator)
    assert isinstance(validators[1], SwarmRecordValidator)
    mine = SwarmRecordValidator(RUN)
    assert mine.merge_with(SwarmRecordValidator(RUN))
    assert not mine.merge_with(SwarmRecordValidator("another-run"))
    assert not mine.merge_with(RSASignatureValidator())
    composite = CompositeValidator(make_validators(RUN) + make_validators(RUN))
    assert len(composite._validators) == 2


# ------------------------------------------------------------------------------------------------ parse_subkeyed


def test_parse_subkeyed_filters_and_reports(owner_marker, other_key):
    now = get_dht_time()
    other_marker = RSASignatureValidator(other_key).local_public_key
    third_marker = owner_marker.replace(b"[owner:", b"[owner:x")
    good = stage_value(peer_id=ME)
    entry = ValueWithExpiration(
        {
            owner_marker: ValueWithExpiration(good, now + 30),
            other_marker: ValueWithExpiration(
                stage_value(peer_id="QmOld"), now - 1
            ),  # expired: dropped silently
            b"plain-subkey": ValueWithExpiration(stage_value(peer_id="QmUnsigned"), now + 30),
            "text-subkey": ValueWithExpiration(stage_value(peer_id="QmText"), now + 30),
            third_marker: ValueWithExpiration(stage_value(throughput=math.inf), now + 30),
        },
        now + 30,
    )
    records, rejected = parse_subkeyed(entry, StageRecord.from_value, "stage 1 record")
    assert list(records) == [owner_marker]
    rec, expiration = records[owner_marker]
    assert rec == StageRecord.from_value(good) and expiration == now + 30
    assert sorted(rejected) == sorted(
        [
            "stage 1 record: unsigned subkey",
            "stage 1 record: unsigned subkey",
            "stage 1 record: throughput must be finite, got inf",
        ]
    )


def test_parse_subkeyed_empty_or_non_dictionary():
    assert parse_subkeyed(None, StageRecord.from_value, "x") == ({}, [])
    # a plain dict value stored without a subkey (a foreign node may have accepted it): refused, not a crash
    regular = ValueWithExpiration(stage_value(), get_dht_time() + 10)
    assert parse_subkeyed(regular, StageRecord.from_value, "x") == ({}, ["x: not a dictionary of subkeys"])
    plain = ValueWithExpiration([1, 2], get_dht_time() + 10)
    assert parse_subkeyed(plain, StageRecord.from_value, "x") == ({}, [])


# ------------------------------------------------------------------------------------------------ signer binding


def progress_value(**overrides):
    value = TrainerProgressRecord(peer_id=ME, step=3, updated_at=1000.0).to_value()
    value.update(overrides)
    return value


def test_owner_peer_id_is_the_libp2p_peer_id(tmp_path):
    from hivemind.p2p import P2P, PeerID

    from swarm.identity import load_identity_key

    path = str(tmp_path / "identity.key")
    P2P.generate_identity(path)
    with open(path, "rb") as f:
        expected = PeerID.from_identity(f.read()).to_base58()
    marker = RSASignatureValidator(load_identity_key(path)).local_public_key
    assert owner_peer_id(marker) == expected
    assert (
        owner_peer_id(dumps(marker)) == expected
    )  # a stored record's serialized subkey carries the same marker
    other = RSASignatureValidator(RSAPrivateKey()).local_public_key
    for not_one_key in (b"plain", marker.replace(b"ssh-rsa ", b"ssh-rsa x"), marker + other, None, "text"):
        assert owner_peer_id(not_one_key) is None
    (tmp_path / "junk.key").write_bytes(b"\xff\x00 not a key")
    with pytest.raises(ValueError, match="junk.key"):
        load_identity_key(str(tmp_path / "junk.key"))


SIGNED_BY_PEER = [
    (stage_key(RUN, 0), stage_value, StageRecord.from_value),
    (progress_key(RUN), progress_value, TrainerProgressRecord.from_value),
]


@pytest.mark.parametrize("key, make_value, parse", SIGNED_BY_PEER)
def test_record_naming_another_peer_is_refused(composite, owner_marker, other_key, key, make_value, parse):
    attacker = RSASignatureValidator(other_key)  # a stock hivemind peer, signing with its own key
    forged = _signed(attacker, _record(key, attacker.local_public_key, make_value(peer_id=ME)))
    assert attacker.validate(forged)  # a valid signature: hivemind alone would store it
    assert not composite.validate(forged)  # our DHT nodes refuse it
    with pytest.raises(RecordError, match="is not the signer"):
        check_record(composite_strip(composite, forged), parse)
    # and so do readers (a foreign DHT node may have stored it); the honest peer's own record stays
    now = get_dht_time()
    entry = ValueWithExpiration(
        {
            owner_marker: ValueWithExpiration(make_value(), now + 30),
            attacker.local_public_key: ValueWithExpiration(make_value(peer_id=ME), now + 30),
        },
        now + 30,
    )
    records, rejected = parse_subkeyed(entry, parse, "record")
    assert list(records) == [owner_marker]
    assert len(rejected) == 1 and "is not the signer" in rejected[0] and ME in rejected[0]


def test_stage_record_naming_an_honest_peer_cannot_move_it_or_take_it_offline(owner_marker, other_key):
    """The attack run live: the attacker's own records name the honest stage-0 peer, newer than its own."""
    from swarm.network import fetch_stage_peers

    attacker = RSASignatureValidator(other_key).local_public_key
    dht = FakeDHT()
    dht.put(stage_key(RUN, 0), owner_marker, stage_value(stage=0, updated_at=1000.0))
    dht.put(stage_key(RUN, 0), attacker, stage_value(stage=0, state="offline", updated_at=2000.0))
    dht.put(stage_key(RUN, 1), attacker, stage_value(stage=1, updated_at=2000.0))
    dht.put(
        stage_key(RUN, 1), owner_marker, stage_value(stage=1, peer_id=owner_peer_id(attacker))
    )  # not its own
    peers = fetch_stage_peers(dht, RUN, 2)
    assert [(p.peer_id, p.record.state) for p in peers[0]] == [(ME, "online")]
    assert peers[1] == []


def test_peer_ids_in_initial_peers():
    from swarm.network import peer_ids_in

    a, b, relay = "QmaaaaA", "QmbbbbB", "QmrelayR"
    assert peer_ids_in(
        [
            f"/ip4/127.0.0.1/tcp/1/p2p/{a}",
            f"/ip6/::1/tcp/1/p2p/{a}",
            f"/dns/x/tcp/2/ipfs/{b}",
            f"/ip4/1.2.3.4/tcp/3/p2p/{relay}/p2p-circuit/p2p/{b}",
            "/ip4/1.2.3.4/tcp/4",
        ]
    ) == {a, b}
    assert peer_ids_in([]) == frozenset()


def test_identity_key_signs_and_config_is_read_only_from_its_owner_on_a_real_dht():
    """One bootstrap and one reader on 127.0.0.1. The bootstrap's records are signed with its libp2p identity key; a
    record of it naming another peer is refused; a latecomer's older config never replaces the creator's."""
    from swarm.network import (
        config_owners,
        create_dht,
        fetch_swarm_config,
        owner_subkey,
        publish_swarm_config,
    )

    boot = create_dht(RUN)
    reader = None
    try:
        me = owner_subkey(boot)
        assert owner_peer_id(me) == str(boot.peer_id)
        now = get_dht_time()
        assert boot.store(
            stage_key(RUN, 0), stage_value(stage=0, peer_id=str(boot.peer_id)), now + 30, subkey=me
        )
        assert not boot.store(stage_key(RUN, 1), stage_value(stage=1, peer_id=ME), now + 30, subkey=me)
        assert boot.get(stage_key(RUN, 1), latest=True) is None

        honest = SwarmConfigRecord.from_value(config_value(created_at=now))
        assert publish_swarm_config(boot, honest)
        # a latecomer's validly signed config, older and of another shape, under another key (this process's, which
        # the node also signs with, for hivemind's own records)
        latecomer = SwarmConfigRecord.from_value(config_value(created_at=0.0, num_stages=3, lr=9.5))
        assert boot.store(config_key(RUN), latecomer.to_value(), now + 60, subkey=owner_marker_of_process())

        reader = create_dht(RUN, [str(addr) for addr in boot.get_visible_maddrs()], client_mode=True)
        assert config_owners(reader) == {str(boot.peer_id), str(reader.peer_id)}
        assert fetch_swarm_config(reader, RUN, timeout_s=10) == honest
        assert fetch_swarm_config(boot, RUN, timeout_s=10) == honest  # the creator reads its own
        # a reader that joined through anyone else finds no owned config: a clear error, never the latecomer's
        with pytest.raises(TimeoutError, match="none signed by a peer this node joined through"):
            fetch_swarm_config(reader, RUN, timeout_s=1, owners={ME + "x"})
    finally:
        if reader is not None:
            reader.shutdown()
        boot.shutdown()


def owner_marker_of_process() -> bytes:
    return RSASignatureValidator().local_public_key
