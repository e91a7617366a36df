"""Signed parts and the evidence of a re-check (swarm.aggregator_check), as pure logic."""

import random

import torch
from hivemind.compression import serialize_torch_tensor

from swarm.aggregator_check import (
    IN,
    SignedPart,
    SigningKey,
    check_signed_inputs,
    part_payload,
    pick_parts,
    relative_error,
    sign,
    signer_key,
    tensor_digest,
)

KEY, OTHER = SigningKey(), SigningKey()


def test_digest_covers_bytes_shape_and_dtype():
    t = torch.arange(6, dtype=torch.float32)
    base = tensor_digest(serialize_torch_tensor(t))
    assert tensor_digest(serialize_torch_tensor(t.clone())) == base
    assert tensor_digest(serialize_torch_tensor(t.reshape(2, 3))) != base
    assert tensor_digest(serialize_torch_tensor(t + 1e-6)) != base
    assert tensor_digest(serialize_torch_tensor(t.double())) != base


def test_signature_binds_every_field():
    payload = part_payload(IN, b"group", b"agg", b"sender", 3, b"d" * 32)
    blob = sign(KEY, payload)
    assert signer_key(blob, payload) == KEY.public_bytes()
    for other in (
        part_payload(IN, b"group2", b"agg", b"sender", 3, b"d" * 32),
        part_payload(IN, b"group", b"agg2", b"sender", 3, b"d" * 32),
        part_payload(IN, b"group", b"agg", b"sender", 4, b"d" * 32),
        part_payload(IN, b"group", b"agg", b"sender", 3, b"e" * 32),
        part_payload(IN, b"group", b"agg", b"sender", 3, b"d" * 32, contributes=False),
    ):
        assert signer_key(blob, other) is None
    assert signer_key(b"garbage", payload) is None
    assert signer_key(b"x" * 5000, payload) is None


def test_evidence_needs_each_senders_own_key():
    part = serialize_torch_tensor(torch.ones(4))
    payload = part_payload(IN, b"g", b"agg", b"s1", 0, tensor_digest(part))
    inputs = {b"s1": SignedPart(part, sign(KEY, payload))}
    assert check_signed_inputs(b"g", b"agg", 0, inputs, {b"s1": KEY.public_bytes()}) is None
    # the aggregator signed the part itself, claiming it came from s1
    forged = {b"s1": SignedPart(part, sign(OTHER, payload))}
    assert "not signed" in check_signed_inputs(b"g", b"agg", 0, forged, {b"s1": KEY.public_bytes()})
    assert "no key" in check_signed_inputs(b"g", b"agg", 0, inputs, {})
    # a tensor swapped after signing
    swapped = {b"s1": SignedPart(serialize_torch_tensor(torch.zeros(4)), sign(KEY, payload))}
    assert check_signed_inputs(b"g", b"agg", 0, swapped, {b"s1": KEY.public_bytes()}) is not None


def test_relative_error_and_part_picks():
    a = torch.randn(100)
    assert relative_error(a, a) == 0.0
    assert relative_error(a, -a) == 1.0
    assert relative_error(torch.zeros(3), torch.zeros(3)) == 0.0
    rng = random.Random(0)
    assert pick_parts(5, 2, rng) == sorted(set(pick_parts(5, 2, random.Random(0))))
    assert len(pick_parts(5, 2, rng)) == 2 and pick_parts(1, 3, rng) == [0] and pick_parts(0, 1, rng) == []


def test_signing_key_survives_pickling_and_refuses_malformed_blobs():
    import pickle

    import msgpack

    payload = part_payload(IN, b"group", b"agg", b"sender", 0, b"d" * 32)
    copy = pickle.loads(pickle.dumps(KEY))
    assert copy.public_bytes() == KEY.public_bytes()
    assert signer_key(sign(copy, payload), payload) == KEY.public_bytes()
    good = msgpack.unpackb(sign(KEY, payload))
    for blob in (
        b"",
        b"\xc1",
        msgpack.packb({"key": good["key"][:31], "sig": good["sig"]}),
        msgpack.packb({"key": good["key"], "sig": good["sig"][:-1] + bytes([good["sig"][-1] ^ 1])}),
        msgpack.packb({"key": OTHER.public_bytes(), "sig": good["sig"]}),
        msgpack.packb([1, 2]),
    ):
        assert signer_key(blob, payload) is None
