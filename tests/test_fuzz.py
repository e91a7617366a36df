"""Fuzzing every RPC handler of a stage peer, in-process: at least 1,000 malformed inputs per handler (random bytes,
mutated valid messages, NaN/inf, absurd shapes and dtypes, header/payload mismatches). Each one must be answered
with an error (never an exception out of the handler, never a hang), and the peer must still serve a valid
request afterwards."""

import asyncio
import math
import random
import time
from types import SimpleNamespace

import msgpack
import pytest
import torch
from hivemind.proto import runtime_pb2
from hivemind.utils.crypto import RSAPrivateKey

from swarm.config import model_preset
from swarm.identity import peer_id_of
from swarm.optimizer import OptimizerConfig
from swarm.protocol import ChainHeader, check_reports
from swarm.stage_server import StageServer, StageServerConfig
from swarm.transport import TensorLimits, limits_for, pack, receive

N = 1000
MODEL = model_preset(
    "tiny", num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=2, intermediate_size=64, vocab_size=128
)
BATCH, SEQ = 2, 16
TRAINER_KEY, SERVER_KEY = RSAPrivateKey(), RSAPrivateKey()
TRAINER = peer_id_of(TRAINER_KEY.get_public_key().to_bytes())


def make_server():
    """A whole single-stage swarm's only peer (first and last stage at once: token ids in, labels, loss)."""
    cfg = StageServerConfig(
        run_id="fuzz",
        stage=0,
        num_stages=1,
        max_batch=BATCH,
        max_seq_len=SEQ,
        limits=limits_for(BATCH, SEQ, MODEL.hidden_size),
        read_timeout_s=2.0,
        labels_timeout_s=0.5,
    )
    server = StageServer(cfg, MODEL, None, OptimizerConfig(averaging=False), identity_key=SERVER_KEY)
    server.peer_id = peer_id_of(SERVER_KEY.get_public_key().to_bytes())
    server._slots = asyncio.Semaphore(cfg.max_inflight)
    return server


def context(peer: str = TRAINER):
    return SimpleNamespace(remote_id=peer)


async def stream(messages):
    for m in messages:
        yield m


def valid_chain_request(server, mb: str, tokens=None):
    tokens = torch.randint(0, MODEL.vocab_size, (BATCH, SEQ)) if tokens is None else tokens
    header, reveal = ChainHeader.create(
        TRAINER_KEY,
        run_id="fuzz",
        trainer=TRAINER,
        mb=mb,
        step=0,
        route=[server.peer_id],
        tokens=tokens,
        now=time.time(),
    )
    return tokens, dict(header=header.to_wire(), audit=reveal), header


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 2 else 6)
    return [
        lambda: None,
        lambda: rng.random() * 10 ** rng.randint(-5, 30),
        lambda: rng.choice([math.nan, math.inf]),
        lambda: rng.randint(-(2**63), 2**63 - 1),
        lambda: "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(0, 300))),
        lambda: rng.randbytes(rng.randrange(0, 64)),
        lambda: [random_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))],
        lambda: {str(rng.random()): random_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))},
        lambda: rng.choice([True, False]),
    ][kind]()


def mutate_metadata(rng: random.Random, meta: dict) -> dict:
    meta = msgpack.unpackb(msgpack.packb(meta, use_bin_type=True), raw=False)  # a deep copy
    target = meta
    path = []
    while isinstance(target, dict) and target and rng.random() < 0.7:
        key = rng.choice(list(target))
        path.append(key)
        if not isinstance(target[key], dict):
            break
        target = target[key]
    if isinstance(target, dict) and target:
        key = rng.choice(list(target))
        if rng.random() < 0.2:
            del target[key]
        else:
            target[key] = random_value(rng)
    return meta


def bad_tensor(rng: random.Random) -> torch.Tensor:
    choice = rng.randrange(7)
    if choice == 0:
        return torch.full((BATCH, SEQ), float(rng.choice([math.nan, math.inf, -math.inf])))
    if choice == 1:
        return torch.randint(-5, 10**6, (BATCH, SEQ))
    if choice == 2:
        return torch.zeros([rng.randrange(0, 3) for _ in range(rng.randrange(0, 5))], dtype=torch.int64)
    if choice == 3:
        return torch.randint(0, MODEL.vocab_size, (rng.randrange(1, 6), rng.randrange(1, 40)))
    if choice == 4:
        return torch.randn(BATCH, SEQ, MODEL.hidden_size).half()
    if choice == 5:
        return torch.randint(0, MODEL.vocab_size, (BATCH, SEQ), dtype=torch.int32)
    return torch.randint(0, MODEL.vocab_size, (BATCH * SEQ,))


def mutate_messages(rng: random.Random, messages):
    """Byte-level and structural mutations of serialized stream messages."""
    messages = [type(m).FromString(m.SerializeToString()) for m in messages]
    choice = rng.randrange(6)
    if choice == 0:  # flip bytes in a tensor buffer or in the metadata
        m = rng.choice(messages)
        if m.tensors and m.tensors[0].buffer:
            buf = bytearray(m.tensors[0].buffer)
            for _ in range(rng.randrange(1, 8)):
                buf[rng.randrange(len(buf))] = rng.randrange(256)
            m.tensors[0].buffer = bytes(buf)
        elif m.metadata:
            buf = bytearray(m.metadata)
            buf[rng.randrange(len(buf))] = rng.randrange(256)
            m.metadata = bytes(buf)
    elif choice == 1:  # lie about the shape or the chunks
        for m in messages:
            for part in m.tensors:
                if part.dtype:
                    part.size[:] = [rng.randrange(0, 10**6) for _ in range(rng.randrange(0, 6))]
                    part.chunks = rng.randrange(0, 4)
    elif choice == 2:  # a stream of empty messages
        messages = messages[:1] + [type(messages[0])() for _ in range(rng.randrange(1, 3000))]
    elif choice == 3:  # drop or duplicate messages
        if len(messages) > 1 and rng.random() < 0.5:
            messages.pop(rng.randrange(len(messages)))
        else:
            messages.append(messages[rng.randrange(len(messages))])
    elif choice == 4:  # an unknown dtype
        for m in messages:
            for part in m.tensors:
                if part.dtype:
                    part.dtype = rng.choice(["complex128", "", "int8", "float64", "x" * 100])
    else:  # random bytes as the only message
        messages = [runtime_pb2.ExpertRequest(metadata=rng.randbytes(rng.randrange(0, 200)))]
    return messages


async def decode(reply):
    if isinstance(reply, runtime_pb2.ExpertResponse):
        reply = [reply]
    return await receive(stream(reply), TensorLimits())


async def valid_deposit(messages) -> bool:
    """Whether a (mutated) label deposit is still a valid one: a mutation may leave it so."""
    try:
        got = await receive(stream(messages), limits_for(BATCH, SEQ, MODEL.hidden_size))
    except Exception:
        return False
    mb, tensors = got.metadata.get("mb"), got.tensors
    if not (isinstance(mb, str) and 0 < len(mb) <= 256 and len(tensors) == 1):
        return False
    t = tensors[0]
    return (
        t.dtype == torch.int64
        and t.ndim == 2
        and 1 <= t.shape[0] <= BATCH
        and 2 <= t.shape[1] <= SEQ
        and 0 <= int(t.min())
        and int(t.max()) < MODEL.vocab_size
    )


async def chain_reply(server, messages, peer=TRAINER):
    return await decode([m async for m in server.rpc_chain(stream(messages), context(peer))])


async def serves_a_valid_request(server, mb: str) -> float:
    tokens, meta, header = valid_chain_request(server, mb)
    labels = await decode(await server.rpc_labels(stream(pack({"mb": mb}, [tokens])), context()))
    assert labels.metadata == {"ok": True}, labels.metadata
    reply = await chain_reply(server, pack(meta, [tokens]))
    reports = check_reports(header, reply.metadata["reports"], 0, server.peer_id)
    assert reports[0].ok and math.isfinite(reports[0].loss), reply.metadata
    return reports[0].loss


@pytest.mark.timeout(600)
def test_fuzz_every_handler():
    rng = random.Random(0)
    server = make_server()
    counts = {"chain": 0, "labels": 0, "sketch": 0, "dialback": 0, "info": 0}

    async def go():
        await serves_a_valid_request(server, "warmup.0")
        for i in range(N):
            # rpc_chain: a mutated valid request (header fields, tensors, stream structure) from a trainer or not
            tokens, meta, _ = valid_chain_request(server, f"c{i}.0")
            kind = i % 4
            if kind == 0:
                messages = pack(mutate_metadata(rng, meta), [tokens])
            elif kind == 1:
                messages = pack(meta, [bad_tensor(rng)])
            elif kind == 2:
                messages = mutate_messages(rng, pack(meta, [tokens]))
            else:
                messages = pack(
                    {k: random_value(rng) for k in ("header", "audit", "audit_only")}, [bad_tensor(rng)]
                )
            reply = await asyncio.wait_for(
                chain_reply(server, messages, peer=TRAINER if rng.random() < 0.8 else "QmSomeoneElse"), 10
            )
            meta_out = reply.metadata
            if "reports" in meta_out:
                assert not meta_out["reports"][0]["ok"], (i, kind, meta_out)
            else:
                assert meta_out["ok"] is False and meta_out["error"], (i, kind, meta_out)
            counts["chain"] += 1
            # rpc_labels: mutated deposits (never the same mb twice: a valid one is taken and held)
            label_meta = (
                {"mb": f"l{i}"} if rng.random() < 0.5 else {k: random_value(rng) for k in ("mb", "x")}
            )
            labels = bad_tensor(rng)
            messages = pack(label_meta, [labels])
            mutated = rng.random() < 0.5
            if mutated:
                messages = mutate_messages(rng, messages)
            # (from many senders: a valid deposit is held until it expires, and one sender may hold only 64)
            reply = await asyncio.wait_for(
                decode(await server.rpc_labels(stream(messages), context(f"QmF{i}"))), 10
            )
            fine = await valid_deposit(messages)
            if not fine:  # (a random shape may happen to be a valid micro-batch's)
                assert reply.metadata["ok"] is False and reply.metadata["error"], (i, reply.metadata)
            counts["labels"] += 1
            # unary handlers: random metadata
            request = pack({k: random_value(rng) for k in rng.sample(["seed", "dims", "maddrs", "x"], 2)})[0]
            if rng.random() < 0.3:
                request = runtime_pb2.ExpertRequest(metadata=rng.randbytes(rng.randrange(0, 100)))
            reply = await asyncio.wait_for(
                decode(await server.rpc_state_sketch(request, context(f"Qm{i}"))), 10
            )
            assert reply.metadata["ok"] is False or reply.metadata.get("sketch") is not None
            counts["sketch"] += 1
            reply = await asyncio.wait_for(decode(await server.rpc_dialback(request, context())), 10)
            assert reply.metadata["ok"] is False and reply.metadata["error"]
            counts["dialback"] += 1
            if i % 50 == 0:
                info = await decode(await server.rpc_info(runtime_pb2.ExpertRequest(), context()))
                assert len(msgpack.packb(info.metadata, use_bin_type=True)) < 64 * 1024
                counts["info"] += 1
        return await serves_a_valid_request(server, "after.0")

    loss = asyncio.run(go())
    assert math.isfinite(loss)
    assert min(counts["chain"], counts["labels"], counts["sketch"], counts["dialback"]) >= N, counts


def test_parameter_downloads_are_rationed_against_a_flood():
    """``rpc_parameters`` serves a whole copy of the stage, so anyone may ask but nobody gets it often: one caller
    again within the cooldown is refused, at most MAX_PARAMS_DOWNLOADS are served at once, a request's contents are
    ignored (garbage gets the same answer), and a flood of fresh identities leaves the table of callers bounded."""
    import threading

    from swarm.stage_server import MAX_PARAMS_DOWNLOADS

    server = make_server()

    from swarm.export import params_limits

    async def download(peer: str, request=None):
        request = request if request is not None else pack({})[0]
        replies = [m async for m in server.rpc_parameters(request, context(peer))]
        return await receive(stream(replies), params_limits(server.module))

    async def go():
        first = await download("QmA", runtime_pb2.ExpertRequest(metadata=b"\xff garbage"))
        assert first.metadata["ok"] and first.metadata["names"] == [
            n for n, _ in server.module.named_parameters()
        ]
        assert all(torch.equal(t, p.detach()) for t, p in zip(first.tensors, server.module.parameters()))
        again = await download("QmA")
        assert again.metadata["ok"] is False and "retry later" in again.metadata["error"]
        # hold the compute thread: the downloads in flight wait on it, and the next caller finds the slots taken
        gate = threading.Event()
        server.executor.submit(gate.wait)
        held = [asyncio.ensure_future(download(f"QmB{i}")) for i in range(MAX_PARAMS_DOWNLOADS)]
        await asyncio.sleep(0.2)
        busy = await download("QmC")
        assert busy.metadata["ok"] is False
        gate.set()
        assert all(r.metadata["ok"] for r in await asyncio.gather(*held))
        for i in range(2000):  # Sybil callers, each asking once (refused: served one by one is not the point)
            server._params_serving[f"QmS{i}"] = float(i)
        await download("QmD")
        assert len(server._params_serving) <= 1024 + MAX_PARAMS_DOWNLOADS + 1

    asyncio.run(go())
