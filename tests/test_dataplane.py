"""Tests for swarm.dataplane: framing, limits before the payload, identity proofs, certificate pinning, caps, and
the fallback the callers rely on (None: nothing was sent). In-process, on 127.0.0.1, seconds in all."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import struct
import time

import msgpack
import pytest
import torch
from hivemind.utils.crypto import RSAPrivateKey

from swarm import dataplane
from swarm.dataplane import DataPlaneClient, DataPlaneConfig, DataPlaneServer, Endpoint, endpoint_of
from swarm.identity import peer_id_of
from swarm.records import RecordError, StageRecord
from swarm.transport import TensorLimits, TransportError

SERVER_KEY, CLIENT_KEY, OTHER_KEY = RSAPrivateKey(), RSAPrivateKey(), RSAPrivateKey()


def pid(key) -> str:
    return peer_id_of(key.get_public_key().to_bytes())


SERVER, CLIENT, OTHER = pid(SERVER_KEY), pid(CLIENT_KEY), pid(OTHER_KEY)
LIMITS = TensorLimits(max_elements=1 << 20, max_total_bytes=(4 << 20) + 4096)


class Echo:
    """A handler that records who sent what and answers with the request's tensors doubled."""

    def __init__(self):
        self.calls = []

    async def __call__(self, sender, read):
        try:
            received = await read()
        except (TransportError, asyncio.TimeoutError) as e:
            self.calls.append((sender, e))
            return dict(ok=False, error=str(e) or type(e).__name__), []
        self.calls.append((sender, received))
        return dict(ok=True, echo=received.metadata), [t * 2 for t in received.tensors]


async def serve(cfg=None, limits=LIMITS):
    handler = Echo()
    server = DataPlaneServer(SERVER, handler, limits, asyncio.get_running_loop(), cfg)
    endpoint = server.start("127.0.0.1")
    return server, handler, endpoint


def test_round_trip_is_exact_and_reuses_the_connection():
    async def main():
        server, handler, endpoint = await serve()
        client = DataPlaneClient(CLIENT, CLIENT_KEY)
        try:
            x = torch.randn(2, 16, 32)
            ids = torch.randint(0, 100, (2, 16))
            half = torch.randn(3, 5).to(torch.bfloat16)
            for i in range(3):
                reply = await client.call(SERVER, endpoint, dict(i=i), [x, ids, half], LIMITS, timeout=10)
                assert reply.metadata == dict(ok=True, echo=dict(i=i))
                assert torch.equal(reply.tensors[0], x * 2) and torch.equal(reply.tensors[1], ids * 2)
                assert reply.tensors[2].dtype == torch.bfloat16 and torch.equal(reply.tensors[2], half * 2)
            assert [sender for sender, _ in handler.calls] == [CLIENT] * 3  # the proven identity
            assert server.stats.accepted == 1 and client.stats.requests == 3  # one connection, reused
            empty = await client.call(SERVER, endpoint, {}, [torch.empty(0, 4)], LIMITS, timeout=10)
            assert empty.tensors[0].shape == (0, 4)
        finally:
            client.close()
            server.close()

    asyncio.run(main())


def test_parallel_calls_open_parallel_connections_up_to_the_pool():
    async def main():
        server, handler, endpoint = await serve()
        client = DataPlaneClient(CLIENT, CLIENT_KEY, DataPlaneConfig(pool_per_peer=2))
        try:
            x = torch.randn(64, 1024)
            replies = await asyncio.gather(
                *(client.call(SERVER, endpoint, dict(i=i), [x], LIMITS, timeout=10) for i in range(4))
            )
            sent = [r for r in replies if r is not None]
            assert all(torch.equal(r.tensors[0], x * 2) for r in sent)
            assert server.stats.accepted <= 2  # never more than the pool; calls beyond it fell back
            assert len(sent) + client.stats.fallbacks == 4
        finally:
            client.close()
            server.close()

    asyncio.run(main())


def raw_client(endpoint: Endpoint, key=CLIENT_KEY, claim: str = CLIENT):
    """A hand-driven client: TLS, then an identity proof signed by ``key`` claiming ``claim``."""
    raw = socket.create_connection((endpoint.host, endpoint.port), timeout=5)
    sock = dataplane.client_context().wrap_socket(raw)
    nonce = sock.recv(dataplane.NONCE_BYTES)
    sig = key.sign(dataplane.proof_message(endpoint.cert, nonce, claim, SERVER))
    proof = msgpack.packb(dict(peer=claim, key=key.get_public_key().to_bytes(), sig=sig), use_bin_type=True)
    sock.sendall(struct.pack("!I", len(proof)) + proof)
    return sock


def test_oversized_header_is_refused_before_the_payload_is_read():
    async def main():
        server, handler, endpoint = await serve()
        try:
            loop = asyncio.get_running_loop()

            def attack():
                sock = raw_client(endpoint)
                assert sock.recv(1) == b"\x01"
                # declares 64M float32 elements (256 MiB) and sends not one byte of them
                header = msgpack.packb(dict(m={}, t=[["float32", [1 << 13, 1 << 13]]]))
                sock.sendall(
                    dataplane.PREFIX.pack(
                        dataplane.MAGIC, dataplane.VERSION, dataplane.REQUEST, 0, len(header)
                    )
                )
                sock.sendall(header)
                started = time.monotonic()
                reply = dataplane.read_message(sock, dataplane.REPLY, LIMITS, time.monotonic() + 5)
                return reply, time.monotonic() - started, sock.recv(1)

            reply, seconds, after = await loop.run_in_executor(None, attack)
            assert reply.metadata["ok"] is False and "exceeds the limit" in reply.metadata["error"]
            assert seconds < 2 and after == b""  # answered at once (no payload awaited), then closed
            assert isinstance(handler.calls[-1][1], TransportError)

            def huge_header():
                sock = raw_client(endpoint)
                assert sock.recv(1) == b"\x01"
                sock.sendall(
                    dataplane.PREFIX.pack(dataplane.MAGIC, dataplane.VERSION, dataplane.REQUEST, 0, 1 << 30)
                )
                return dataplane.read_message(sock, dataplane.REPLY, LIMITS, time.monotonic() + 5)

            reply = await loop.run_in_executor(None, huge_header)
            assert "header of 1073741824 bytes exceeds" in reply.metadata["error"]
        finally:
            server.close()

    asyncio.run(main())


def test_slow_stream_is_cut_at_the_read_deadline():
    async def main():
        server, handler, endpoint = await serve(DataPlaneConfig(read_timeout_s=0.5))
        try:

            def slowloris():
                sock = raw_client(endpoint)
                assert sock.recv(1) == b"\x01"
                header = msgpack.packb(dict(m={}, t=[["float32", [1024]]]))
                sock.sendall(
                    dataplane.PREFIX.pack(
                        dataplane.MAGIC, dataplane.VERSION, dataplane.REQUEST, 0, len(header)
                    )
                )
                sock.sendall(header + b"\x00" * 100)  # 100 of 4096 bytes, then nothing
                return dataplane.read_message(sock, dataplane.REPLY, LIMITS, time.monotonic() + 5)

            started = time.monotonic()
            reply = await asyncio.get_running_loop().run_in_executor(None, slowloris)
            assert reply.metadata["ok"] is False and time.monotonic() - started < 3
            assert isinstance(handler.calls[-1][1], asyncio.TimeoutError)
        finally:
            server.close()

    asyncio.run(main())


@pytest.mark.parametrize("case", ["claims_another_peer", "signature_of_another_key"])
def test_a_client_that_cannot_prove_its_identity_is_refused(case):
    async def main():
        server, handler, endpoint = await serve()
        try:

            def impostor():
                if case == "claims_another_peer":  # signs with its own key, claims the victim's id
                    sock = raw_client(endpoint, key=OTHER_KEY, claim=CLIENT)
                else:  # the victim's public key, a signature by another key
                    raw = socket.create_connection((endpoint.host, endpoint.port), timeout=5)
                    sock = dataplane.client_context().wrap_socket(raw)
                    nonce = sock.recv(dataplane.NONCE_BYTES)
                    sig = OTHER_KEY.sign(dataplane.proof_message(endpoint.cert, nonce, CLIENT, SERVER))
                    proof = msgpack.packb(
                        dict(peer=CLIENT, key=CLIENT_KEY.get_public_key().to_bytes(), sig=sig),
                        use_bin_type=True,
                    )
                    sock.sendall(struct.pack("!I", len(proof)) + proof)
                try:
                    return sock.recv(1)
                except (ConnectionError, ssl.SSLError):
                    return b""

            assert await asyncio.get_running_loop().run_in_executor(None, impostor) == b""
            assert server.stats.accepted == 0 and server.stats.refused == 1 and not handler.calls
        finally:
            server.close()

    asyncio.run(main())


def test_proof_is_bound_to_the_session():
    nonce = os.urandom(32)
    cert = "ab" * 32
    proof = dict(peer=CLIENT, key=CLIENT_KEY.get_public_key().to_bytes())
    proof["sig"] = CLIENT_KEY.sign(dataplane.proof_message(cert, nonce, CLIENT, SERVER))
    assert dataplane.check_proof(proof, cert, nonce, SERVER) == CLIENT
    for args in ((cert, os.urandom(32), SERVER), ("cd" * 32, nonce, SERVER), (cert, nonce, OTHER)):
        with pytest.raises(TransportError, match="bad signature"):  # another session, server or certificate
            dataplane.check_proof(proof, *args)


def test_a_server_with_another_certificate_is_refused_and_the_call_falls_back():
    async def main():
        server, handler, endpoint = await serve()
        client = DataPlaneClient(CLIENT, CLIENT_KEY)
        try:
            forged = Endpoint(
                endpoint.host, endpoint.port, "00" * 32
            )  # the record announces another certificate
            assert await client.call(SERVER, forged, {}, [torch.ones(3)], LIMITS, timeout=5) is None
            assert client.stats.fallbacks == 1 and not handler.calls and server.stats.accepted == 0
        finally:
            client.close()
            server.close()

    asyncio.run(main())


def test_closed_port_falls_back_quickly():
    async def main():
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()  # nothing listens there now
        client = DataPlaneClient(CLIENT, CLIENT_KEY)
        try:
            started = time.monotonic()
            endpoint = Endpoint("127.0.0.1", port, "00" * 32)
            assert await client.call(SERVER, endpoint, {}, [torch.ones(3)], LIMITS, timeout=5) is None
            assert (
                await client.call(SERVER, endpoint, {}, [torch.ones(3)], LIMITS, timeout=5) is None
            )  # remembered
            assert time.monotonic() - started < 2 and client.stats.fallbacks == 2
        finally:
            client.close()

    asyncio.run(main())


def test_connection_caps_per_peer_and_in_total():
    async def main():
        cfg = DataPlaneConfig(max_connections=3, max_connections_per_peer=2)
        server, handler, endpoint = await serve(cfg)
        try:
            loop = asyncio.get_running_loop()

            def open_proven(key, claim):
                sock = raw_client(endpoint, key=key, claim=claim)
                return sock, sock.recv(1)

            first = [await loop.run_in_executor(None, open_proven, CLIENT_KEY, CLIENT) for _ in range(3)]
            assert [verdict for _, verdict in first] == [b"\x01", b"\x01", b"\x00"]  # the third of one peer
            other = await loop.run_in_executor(None, open_proven, OTHER_KEY, OTHER)
            assert other[1] == b"\x01"  # another peer still gets in
            for _ in range(50):  # the refused one is gone once its thread ended
                if len(server._conns) == 3:
                    break
                await asyncio.sleep(0.02)

            def over_total():
                try:
                    return open_proven(OTHER_KEY, OTHER)[1]
                except (ConnectionError, ssl.SSLError, OSError):
                    return b""

            assert await loop.run_in_executor(None, over_total) == b""  # 3 held: refused before TLS
            for sock, _ in first + [other]:
                sock.close()
        finally:
            server.close()

    asyncio.run(main())


def test_handshake_deadline_frees_the_slot():
    async def main():
        cfg = DataPlaneConfig(max_handshakes=1, handshake_timeout_s=0.3)
        server, handler, endpoint = await serve(cfg)
        try:
            idle = socket.create_connection((endpoint.host, endpoint.port))  # never starts TLS
            await asyncio.sleep(0.1)
            assert server._handshaking == 1
            for _ in range(100):
                if server._handshaking == 0:
                    break
                await asyncio.sleep(0.02)
            assert server._handshaking == 0 and server.stats.refused == 1
            idle.close()
            client = DataPlaneClient(CLIENT, CLIENT_KEY)
            assert await client.call(SERVER, endpoint, {}, [torch.ones(2)], LIMITS, timeout=5) is not None
            client.close()
        finally:
            server.close()

    asyncio.run(main())


def test_record_field_is_optional_checked_and_host_bound():
    base = dict(
        peer_id=SERVER, stage=0, state="online", throughput=0.0, served=0, device="cpu", updated_at=1.0
    )
    old = StageRecord.from_value(dict(base, version=1))
    assert old.dataplane is None and endpoint_of(old) is None  # records without the field still parse
    good = dict(host="127.0.0.1", port=4242, cert="ab" * 32)
    rec = StageRecord.from_value(dict(base, version=1, addrs=["/ip4/127.0.0.1/tcp/1/p2p/x"], dataplane=good))
    assert endpoint_of(rec) == Endpoint("127.0.0.1", 4242, "ab" * 32)
    assert StageRecord.from_value(rec.to_value()).dataplane == good
    elsewhere = StageRecord.from_value(dict(base, version=1, addrs=["/ip4/10.0.0.1/tcp/1"], dataplane=good))
    assert endpoint_of(elsewhere) is None  # a host the peer does not listen on: not dialled
    for bad in (
        dict(good, host="example.com"),
        dict(good, port=0),
        dict(good, cert="AB" * 32),
        dict(good, extra=1),
        "127.0.0.1:4242",
    ):
        with pytest.raises(RecordError):
            StageRecord.from_value(dict(base, version=1, dataplane=bad))


def test_a_pooled_connection_the_server_closed_is_replaced_not_used():
    async def main():
        server, handler, endpoint = await serve(DataPlaneConfig(idle_timeout_s=0.3, client_idle_s=0.1))
        client = DataPlaneClient(CLIENT, CLIENT_KEY, DataPlaneConfig(client_idle_s=10.0))
        try:
            assert await client.call(SERVER, endpoint, {}, [torch.ones(2)], LIMITS, timeout=5) is not None
            await asyncio.sleep(0.8)  # the server dropped the idle connection; the client still pools it
            reply = await client.call(SERVER, endpoint, {}, [torch.ones(2)], LIMITS, timeout=5)
            assert reply is not None and reply.metadata["ok"]
            assert server.stats.accepted == 2 and client.stats.fallbacks == 0
        finally:
            client.close()
            server.close()

    asyncio.run(main())
