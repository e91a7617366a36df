"""The data plane: chain tensors over direct TLS connections between adjacent peers; hivemind P2P stays the fallback.

libp2p and the DHT keep discovery, identity and control. A stage peer also listens on a plain TLS socket (Python's
``ssl``, i.e. OpenSSL: the maintained stack; this module writes only the framing) and announces ``host``, ``port``
and the SHA-256 fingerprint of its self-signed certificate in its signed stage record (``StageRecord.dataplane``),
so the record's signature, made with the peer's libp2p identity key, binds the certificate to the peer id.

**Handshake.** The client completes TLS and compares the server's certificate with the fingerprint in the record
(a peer that shows another certificate is not the peer the record names: the client falls back to P2P). The
server then sends a fresh 32-byte nonce; the client answers with its libp2p public key and an RSA signature, by its
identity key, over (label, the server's certificate fingerprint, the nonce, both peer ids). The server checks that
the key derives the claimed peer id and that the signature verifies; only then is the connection bound to that
peer id, which the request handler sees as the sender, exactly as it sees libp2p's authenticated ``remote_id``. A
proof cannot be replayed (fresh nonce) or relayed to another server (its certificate is in the signed message, and
only the holder of that certificate's key ends the TLS session the client checked).

**Framing.** One message = a 12-byte prefix (magic, version, kind, header length), a msgpack header (the metadata
and one ``[dtype, shape]`` descriptor per tensor), then the tensors' raw bytes, back to back. The receiver checks the
prefix and the header against :class:`~swarm.transport.TensorLimits` (header bytes, number of tensors, dtypes, rank,
elements, total bytes) *before* it reads any payload, allocates each tensor once and decrypts the payload straight
into its storage (``recv_into`` a memoryview: no copy beyond TLS's own). Tensors travel uncompressed (the P2P path
keeps the compression codecs; a peer configured with compression uses P2P).

**Bounds** (:class:`DataPlaneConfig`): connections accepted at once in total and per authenticated peer, and
connections still in their handshake; a deadline on the handshake, on a whole message once its prefix arrived
(a slowloris stream is cut there) and on idleness between messages. A broken limit is answered with the handler's
refusal (the same code as P2P's, so the sender gets a strike) and the connection closed, its payload unread.

**What it defends against**: spoofed identities (proof above), oversized or malformed headers (checked before any
payload is read), slowloris streams (deadlines), connection floods (caps; an unproven connection costs a thread for
at most the handshake deadline). Memory a server commits to reading is at most ``max_connections`` messages of
``limits.max_total_bytes`` (as many as concurrent P2P streams may hold). It does not hide traffic volume, and the announced host must be one of the
record's libp2p addresses, so a record cannot point clients at an arbitrary host.

**Threads, not the event loop**: each connection's socket work runs on a thread (blocking ``ssl`` sockets measured
faster here than asyncio's TLS transport, and OpenSSL releases the GIL); request handling itself runs on the
server's event loop (``asyncio.run_coroutine_threadsafe``), so there is one implementation of it for both paths.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import hashlib
import ipaddress
import logging
import os
import select
import socket
import ssl
import struct
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Dict, List, Optional, Sequence, Tuple

import msgpack
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hivemind.utils.crypto import RSAPublicKey

from swarm.identity import peer_id_of
from swarm.transport import Received, TensorLimits, TransportError, call, pack

logger = logging.getLogger(__name__)

VERSION = 1
MAGIC = b"SWDP"
PREFIX = struct.Struct("!4sBBHI")  # magic, version, kind, reserved, header length
REQUEST, REPLY = 1, 2
NONCE_BYTES = 32
PROOF_LABEL = b"swarm-dataplane-v1\x00"
MAX_PUBLIC_KEY_BYTES = 1024  # an OpenSSH RSA key of up to ~6000 bits; libp2p's are 2048
MAX_PROOF_BYTES = 4096
DTYPES: Dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(kw_only=True)
class DataPlaneConfig:
    """Bounds of a data plane server and client. Times in seconds."""

    max_connections: int = 64  # connections a server holds at once, proven or not
    max_connections_per_peer: int = 16  # ... per authenticated peer id
    max_handshakes: int = 16  # ... still in their TLS handshake or identity proof
    handshake_timeout_s: float = 5.0
    idle_timeout_s: float = 120.0  # a server closes a connection idle this long between messages
    read_timeout_s: float = 60.0  # a whole message must arrive within this once its prefix did
    connect_timeout_s: float = 2.0
    unreachable_retry_s: float = 60.0  # a client that could not connect to a peer uses P2P for it this long
    pool_per_peer: int = 8  # a client's connections to one peer (busy + idle); more calls go over P2P
    max_client_connections: int = 32  # a client's connections in use at once, all peers together
    client_idle_s: float = 60.0  # a client drops a pooled connection idle this long (below the server's)

    def __post_init__(self) -> None:
        if min(self.max_connections, self.max_connections_per_peer, self.max_handshakes) < 1:
            raise ValueError("data plane connection caps must be >= 1")
        if min(self.pool_per_peer, self.max_client_connections) < 1:
            raise ValueError("data plane client pools must hold >= 1 connection")
        if (
            min(self.handshake_timeout_s, self.idle_timeout_s, self.read_timeout_s, self.connect_timeout_s)
            <= 0
        ):
            raise ValueError("data plane timeouts must be > 0")
        if self.client_idle_s >= self.idle_timeout_s:
            raise ValueError(
                "client_idle_s must be below idle_timeout_s (else clients reuse closed connections)"
            )


@dataclass(frozen=True)
class Endpoint:
    """Where a peer's data plane listens and the SHA-256 (hex) of the certificate it must present."""

    host: str
    port: int
    cert: str

    def to_value(self) -> Dict[str, Any]:
        return dict(host=self.host, port=self.port, cert=self.cert)


def endpoint_of(record) -> Optional[Endpoint]:
    """The data plane endpoint a (parsed, signature-checked) stage record announces, or None: none announced, or
    its host is not among the record's own libp2p addresses (a record must not send clients to another host)."""
    value = getattr(record, "dataplane", None)
    if not value:
        return None
    hosts = {_host_of(addr) for addr in getattr(record, "addrs", ())}
    if value["host"] not in hosts:
        return None
    return Endpoint(value["host"], value["port"], value["cert"])


def _host_of(maddr: str) -> Optional[str]:
    parts = maddr.split("/")
    return parts[2] if len(parts) > 2 and parts[1] in ("ip4", "ip6") else None


def host_of_addrs(addrs: Sequence[str]) -> Optional[str]:
    """The first IP host among libp2p multiaddrs (the host a peer's data plane binds to and announces)."""
    for addr in addrs:
        host = _host_of(addr)
        if host is not None and "/p2p-circuit" not in addr:
            try:
                ipaddress.ip_address(host)
            except ValueError:
                continue
            return host
    return None


# ---- certificates and identity proofs ------------------------------------------------------------------------
def make_certificate() -> Tuple[bytes, bytes, str]:
    """A fresh self-signed ECDSA P-256 certificate: (cert PEM, key PEM, SHA-256 hex of its DER). Its trust comes from
    the fingerprint in the signed stage record, not from any CA, so names and dates are placeholders."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "swarm-dataplane")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem, key_pem, hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def server_context(cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.num_tickets = (
        0  # no resumption: and no unsolicited records, so a readable idle socket means closed
    )
    with tempfile.TemporaryDirectory() as tmp:  # ssl loads certificates from files only; private to this user
        paths = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        for path, data in zip(paths, (cert_pem, key_pem)):
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                f.write(data)
        context.load_cert_chain(*paths)
    return context


def client_context() -> ssl.SSLContext:
    # no CA and no host name: the server is authenticated by the certificate fingerprint its signed record announces
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def proof_message(cert_fingerprint: str, nonce: bytes, client: str, server: str) -> bytes:
    """What a client signs to prove, on one TLS session, that it holds the identity key of peer ``client``."""
    return b"\x00".join(
        [PROOF_LABEL, bytes.fromhex(cert_fingerprint), nonce, client.encode(), server.encode()]
    )


def check_proof(proof: Any, cert_fingerprint: str, nonce: bytes, server: str) -> str:
    """The peer id a client's proof establishes; raises TransportError unless the key derives the claimed id and
    signed this session's message."""
    if not (isinstance(proof, dict) and set(proof) == {"peer", "key", "sig"}):
        raise TransportError("identity proof must be {peer, key, sig}")
    peer, key, sig = proof["peer"], proof["key"], proof["sig"]
    if not (
        isinstance(peer, str) and 0 < len(peer) <= 128 and isinstance(key, bytes) and isinstance(sig, bytes)
    ):
        raise TransportError("malformed identity proof")
    if len(key) > MAX_PUBLIC_KEY_BYTES or len(sig) > 2 * MAX_PUBLIC_KEY_BYTES:
        raise TransportError("identity proof too large")
    try:
        derived = peer_id_of(key)
        public = RSAPublicKey.from_bytes(key)
    except Exception:
        raise TransportError("identity proof holds no RSA public key") from None
    if derived != peer:
        raise TransportError(f"identity proof: the key is peer {derived[-8:]}, not the claimed {peer[-8:]}")
    if not public.verify(proof_message(cert_fingerprint, nonce, peer, server), sig):
        raise TransportError("identity proof: bad signature")
    return peer


# ---- framing ----------------------------------------------------------------------------------------------------
def _byte_view(tensor: torch.Tensor) -> memoryview:
    """The tensor's storage as writable bytes (no copy; the tensor must be contiguous on the CPU)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B")


def _outgoing(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if tensor.dtype not in DTYPE_NAMES:
        raise TransportError(f"dtype {tensor.dtype} cannot travel on the data plane")
    return tensor.contiguous()


def send_message(sock, kind: int, metadata: Dict[str, Any], tensors: Sequence[torch.Tensor] = ()) -> int:
    """Write one message; returns the payload bytes sent."""
    tensors = [_outgoing(t) for t in tensors]
    header = msgpack.packb(
        dict(m=metadata, t=[[DTYPE_NAMES[t.dtype], list(t.shape)] for t in tensors]), use_bin_type=True
    )
    sock.sendall(PREFIX.pack(MAGIC, VERSION, kind, 0, len(header)) + header)
    sent = 0
    for tensor in tensors:
        if tensor.numel():
            view = _byte_view(tensor)
            sock.sendall(view)
            sent += len(view)
    return sent


def _recv_into(sock, view: memoryview, deadline: float) -> None:
    while len(view):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise asyncio.TimeoutError()
        sock.settimeout(remaining)
        try:
            n = sock.recv_into(view)
        except (socket.timeout, TimeoutError):
            raise asyncio.TimeoutError() from None
        if n == 0:
            raise ConnectionError("connection closed mid-message")
        view = view[n:]


def header_limit(limits: TensorLimits) -> int:
    """The largest header a receiver reads: the metadata limit plus room for the tensor descriptors."""
    return limits.max_metadata_bytes + limits.max_tensors * (32 + 12 * limits.max_ndim) + 64


def read_prefix(sock, kind: int, limits: TensorLimits, deadline: float) -> int:
    """Read and check a message prefix; returns the header length."""
    prefix = bytearray(PREFIX.size)
    _recv_into(sock, memoryview(prefix), deadline)
    magic, version, got_kind, _, length = PREFIX.unpack(prefix)
    if magic != MAGIC or version != VERSION or got_kind != kind:
        raise TransportError(f"not a data plane message of kind {kind} (version {VERSION})")
    if length > header_limit(limits):
        raise TransportError(f"message header of {length} bytes exceeds the limit of {header_limit(limits)}")
    return length


def parse_header(
    raw: bytes, limits: TensorLimits
) -> Tuple[Dict[str, Any], List[Tuple[torch.dtype, List[int]]]]:
    """Metadata and tensor descriptors of a header, checked against ``limits``: nothing of the payload is read
    before this passes."""
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as e:
        raise TransportError(f"undecodable header: {type(e).__name__}") from None
    if not (isinstance(header, dict) and set(header) == {"m", "t"}):
        raise TransportError("header must be {m: metadata, t: tensors}")
    metadata, descriptors = header["m"], header["t"]
    if not isinstance(metadata, dict):
        raise TransportError("metadata must be a map")
    if not isinstance(descriptors, list) or len(descriptors) > limits.max_tensors:
        raise TransportError(f"more than {limits.max_tensors} tensors in one message")
    parsed, total = [], 0
    for descriptor in descriptors:
        if not (isinstance(descriptor, list) and len(descriptor) == 2 and isinstance(descriptor[1], list)):
            raise TransportError("tensor descriptor must be [dtype, shape]")
        name, shape = descriptor
        if name not in limits.dtypes or name not in DTYPES:
            raise TransportError(f"dtype {name!r} not accepted (allowed: {', '.join(limits.dtypes)})")
        if len(shape) > limits.max_ndim:
            raise TransportError(f"tensor rank {len(shape)} exceeds {limits.max_ndim}")
        if not all(type(d) is int and 0 <= d <= limits.max_elements for d in shape):
            raise TransportError("tensor dimensions must be integers in [0, max_elements]")
        numel = 1
        for d in shape:
            numel *= d
        if numel > limits.max_elements:
            raise TransportError(f"tensor of {numel} elements exceeds the limit of {limits.max_elements}")
        dtype = DTYPES[name]
        total += numel * dtype.itemsize
        if total > limits.max_total_bytes:
            raise TransportError(f"message exceeds {limits.max_total_bytes} bytes")
        parsed.append((dtype, shape))
    return metadata, parsed


def read_message(
    sock, kind: int, limits: TensorLimits, deadline: float, length: Optional[int] = None
) -> Received:
    """Read one message (its prefix too, unless ``length`` says it was read): header checked, then the payload
    straight into freshly allocated tensors."""
    if length is None:
        length = read_prefix(sock, kind, limits, deadline)
    raw = bytearray(length)
    _recv_into(sock, memoryview(raw), deadline)
    metadata, descriptors = parse_header(bytes(raw), limits)
    tensors, total = [], 0
    for dtype, shape in descriptors:
        tensor = torch.empty(shape, dtype=dtype)
        if tensor.numel():
            view = _byte_view(tensor)
            _recv_into(sock, view, deadline)
            total += len(view)
        tensors.append(tensor)
    return Received(metadata=metadata, tensors=tensors, num_bytes=total)


# ---- server ------------------------------------------------------------------------------------------------------
# (sender peer id, a coroutine function returning the request or raising why it could not be read) -> reply
Handler = Callable[
    [str, Callable[[], Awaitable[Received]]], Awaitable[Tuple[Dict[str, Any], List[torch.Tensor]]]
]


@dataclass
class DataPlaneStats:
    """What a server or client counts (exposed in ``rpc_info``)."""

    accepted: int = 0  # connections whose identity proof passed
    refused: int = 0  # connections refused: caps, failed handshakes or proofs
    requests: int = 0  # messages served (server) or sent (client)
    fallbacks: int = 0  # client: calls that went over P2P because no direct connection could be made
    bytes_in: int = 0
    bytes_out: int = 0

    def to_dict(self) -> Dict[str, int]:
        return dict(self.__dict__)


class DataPlaneServer:
    """Accepts data plane connections, proves their peers, and feeds each request to ``handler`` on ``loop``."""

    def __init__(
        self,
        peer_id: str,
        handler: Handler,
        limits: TensorLimits,
        loop: asyncio.AbstractEventLoop,
        cfg: Optional[DataPlaneConfig] = None,
    ):
        self.peer_id, self.handler, self.limits, self.loop = peer_id, handler, limits, loop
        self.cfg = cfg or DataPlaneConfig()
        cert_pem, key_pem, self.fingerprint = make_certificate()
        self.context = server_context(cert_pem, key_pem)
        self.stats = DataPlaneStats()
        self._lock = threading.Lock()
        self._conns: Dict[int, socket.socket] = {}  # id -> raw socket, for shutdown
        self._per_peer: Dict[str, int] = {}
        self._handshaking = 0
        self._listener: Optional[socket.socket] = None
        self._closed = False
        self.host, self.port = "", 0

    def start(self, host: str, port: int = 0) -> Endpoint:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(128)
        self._listener = listener
        self.host, self.port = host, listener.getsockname()[1]
        threading.Thread(target=self._accept_loop, name="dataplane-accept", daemon=True).start()
        return Endpoint(host, self.port, self.fingerprint)

    def close(self) -> None:
        self._closed = True
        if self._listener is not None:
            _shutdown(self._listener)
        with self._lock:
            conns = list(self._conns.values())
        for sock in conns:
            _shutdown(sock)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                if self._closed:
                    return
                time.sleep(0.05)  # e.g. out of file descriptors: do not spin
                continue
            with self._lock:
                full = (
                    len(self._conns) >= self.cfg.max_connections
                    or self._handshaking >= self.cfg.max_handshakes
                )
                if not full:
                    self._conns[id(sock)] = sock
                    self._handshaking += 1
            if full:
                self.stats.refused += 1
                _shutdown(sock)
                continue
            threading.Thread(target=self._serve, args=(sock,), name="dataplane-conn", daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        peer: Optional[str] = None
        handshaking = True
        key, sock = id(raw), raw
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.settimeout(self.cfg.handshake_timeout_s)
            deadline = time.monotonic() + self.cfg.handshake_timeout_s
            # the TLS socket takes the descriptor over (``raw`` is detached): it is the one to shut down from now on
            sock = self.context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            with self._lock:
                self._conns[key] = sock
            sock.do_handshake()
            peer = self._prove(sock, deadline)
            with self._lock:
                self._handshaking -= 1
                handshaking = False
                if self._per_peer.get(peer, 0) >= self.cfg.max_connections_per_peer:
                    peer_full = True
                else:
                    peer_full = False
                    self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
            if peer_full:
                self.stats.refused += 1
                peer = None
                sock.sendall(b"\x00")
                return
            sock.sendall(b"\x01")
            self.stats.accepted += 1
            while not self._closed and self._serve_one(sock, peer):
                pass
        except Exception as e:  # a failed handshake, a closed or stalled connection: drop it
            if peer is None:
                self.stats.refused += 1
            logger.debug(f"data plane connection ended: {type(e).__name__}: {e}")
        finally:
            with self._lock:
                self._conns.pop(key, None)
                if handshaking:
                    self._handshaking -= 1
                if peer is not None:
                    self._per_peer[peer] -= 1
                    if not self._per_peer[peer]:
                        del self._per_peer[peer]
            _shutdown(sock)

    def _prove(self, sock, deadline: float) -> str:
        nonce = os.urandom(NONCE_BYTES)
        sock.sendall(nonce)
        size = bytearray(4)
        _recv_into(sock, memoryview(size), deadline)
        (length,) = struct.unpack("!I", size)
        if length > MAX_PROOF_BYTES:
            raise TransportError("identity proof too large")
        raw = bytearray(length)
        _recv_into(sock, memoryview(raw), deadline)
        try:
            proof = msgpack.unpackb(bytes(raw), raw=False)
        except Exception:
            raise TransportError("undecodable identity proof") from None
        return check_proof(proof, self.fingerprint, nonce, self.peer_id)

    def _serve_one(self, sock, peer: str) -> bool:
        """Serve one request on a proven connection; False when the connection is to be closed."""
        try:
            length = read_prefix(sock, REQUEST, self.limits, time.monotonic() + self.cfg.idle_timeout_s)
        except (asyncio.TimeoutError, ConnectionError):
            return False  # idle, or closed by the client: nothing to answer
        except TransportError as e:
            error: Optional[BaseException] = e
            received = None
        else:
            try:
                received = read_message(
                    sock, REQUEST, self.limits, time.monotonic() + self.cfg.read_timeout_s, length=length
                )
                error = None
                self.stats.bytes_in += received.num_bytes
            except (TransportError, asyncio.TimeoutError) as e:
                error, received = e, None

        async def read() -> Received:
            if error is not None:
                raise error
            return received

        future = asyncio.run_coroutine_threadsafe(self.handler(peer, read), self.loop)
        metadata, tensors = future.result()
        self.stats.bytes_out += send_message(sock, REPLY, metadata, tensors)
        self.stats.requests += 1
        return error is None  # after a broken message the stream is out of step: close it


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


# ---- client ------------------------------------------------------------------------------------------------------
class _Connection:
    def __init__(self, sock, key: Tuple[str, Endpoint]):
        self.sock, self.key = sock, key
        self.last_used = time.monotonic()

    def alive(self, idle_s: float) -> bool:
        """Not idle too long, and nothing to read: a server never speaks unasked, so readable means closed."""
        if time.monotonic() - self.last_used > idle_s:
            return False
        try:  # poll, not select: descriptors above 1024 are fine
            poller = select.poll()
            poller.register(self.sock, select.POLLIN | select.POLLERR | select.POLLHUP)
            readable = poller.poll(0)
        except (OSError, ValueError):
            return False
        return not readable and self.sock.pending() == 0

    def close(self) -> None:
        _shutdown(self.sock)


class DataPlaneClient:
    """Calls peers' data planes over pooled, authenticated connections; ``call`` returns None where no direct
    connection can be made, so the caller uses P2P instead."""

    def __init__(self, peer_id: str, identity_key, cfg: Optional[DataPlaneConfig] = None):
        self.peer_id, self.identity_key = peer_id, identity_key
        self.cfg = cfg or DataPlaneConfig()
        self.context = client_context()
        self.stats = DataPlaneStats()
        self._lock = threading.Lock()
        self._idle: Dict[Tuple[str, Endpoint], List[_Connection]] = {}
        self._open: Dict[Tuple[str, Endpoint], int] = {}  # busy + idle, per peer and endpoint
        self._busy = 0
        self._unreachable: Dict[
            Tuple[str, Endpoint], float
        ] = {}  # key -> monotonic time until which P2P is used
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.cfg.max_client_connections, thread_name_prefix="dataplane-client"
        )

    async def call(
        self,
        peer: str,
        endpoint: Endpoint,
        metadata: Dict[str, Any],
        tensors: Sequence[torch.Tensor],
        limits: TensorLimits,
        timeout: float,
    ) -> Optional[Received]:
        """Send one request to ``peer`` and return its reply. None: no direct connection (caps reached, the peer
        unreachable or not proving the announced certificate); nothing was sent. Once the request is sent, failures
        raise as the P2P call's do (``asyncio.TimeoutError``, ``TransportError``, connection errors)."""
        key = (peer, endpoint)
        if self._busy >= self.cfg.max_client_connections or self._unreachable.get(key, 0) > time.monotonic():
            self.stats.fallbacks += 1
            return None
        self._busy += 1
        holder: List[_Connection] = []  # the connection in use, to close if the caller gives up
        deadline = time.monotonic() + timeout
        # one executor hop for connecting (or reusing) and the whole exchange
        work = asyncio.get_event_loop().run_in_executor(
            self.executor, self._call, key, holder, metadata, list(tensors), limits, deadline
        )
        try:
            received = await asyncio.shield(work)
        except asyncio.CancelledError:
            for conn in holder:
                conn.close()  # wakes the thread; the connection is never reused
            raise
        finally:
            self._busy -= 1
        if received is None:
            self.stats.fallbacks += 1
        return received

    def _call(
        self, key, holder: List[_Connection], metadata, tensors, limits, deadline
    ) -> Optional[Received]:
        conn = self._acquire(key)
        if conn is None:
            return None
        holder.append(conn)
        return self._request(conn, metadata, tensors, limits, deadline)

    def _acquire(self, key: Tuple[str, Endpoint]) -> Optional[_Connection]:
        with self._lock:
            idle = self._idle.get(key, [])
            while idle:
                conn = idle.pop()
                if conn.alive(self.cfg.client_idle_s):
                    return conn
                self._forget(conn)
            if self._open.get(key, 0) >= self.cfg.pool_per_peer:
                return None
            self._open[key] = self._open.get(key, 0) + 1
        try:
            conn = self._connect(key)
        except Exception as e:
            logger.info(f"no data plane connection to {key[0][-8:]} ({type(e).__name__}: {e}); using P2P")
            with self._lock:
                self._open[key] -= 1
                self._unreachable[key] = time.monotonic() + self.cfg.unreachable_retry_s
                if len(self._unreachable) > 4096:  # peer ids are free to mint: keep this table bounded
                    self._unreachable.clear()
            return None
        return conn

    def _connect(self, key: Tuple[str, Endpoint]) -> _Connection:
        peer, endpoint = key
        deadline = time.monotonic() + self.cfg.connect_timeout_s
        sock = socket.create_connection((endpoint.host, endpoint.port), timeout=self.cfg.connect_timeout_s)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = self.context.wrap_socket(sock)  # takes the descriptor over
            der = sock.getpeercert(binary_form=True)
            if der is None or hashlib.sha256(der).hexdigest() != endpoint.cert:
                raise TransportError("the server's certificate is not the one its stage record announces")
            nonce = bytearray(NONCE_BYTES)
            _recv_into(sock, memoryview(nonce), deadline)
            message = proof_message(endpoint.cert, bytes(nonce), self.peer_id, peer)
            proof = msgpack.packb(
                dict(
                    peer=self.peer_id,
                    key=self.identity_key.get_public_key().to_bytes(),
                    sig=self.identity_key.sign(message),
                ),
                use_bin_type=True,
            )
            sock.sendall(struct.pack("!I", len(proof)) + proof)
            verdict = bytearray(1)
            _recv_into(sock, memoryview(verdict), deadline)
            if verdict[0] != 1:
                raise TransportError("the server refused the connection (its per-peer cap)")
            return _Connection(sock, key)
        except BaseException:
            _shutdown(sock)
            raise

    def _request(
        self, conn: _Connection, metadata, tensors, limits: TensorLimits, deadline: float
    ) -> Received:
        ok = False
        try:
            conn.sock.settimeout(max(deadline - time.monotonic(), 1e-3))
            try:
                self.stats.bytes_out += send_message(conn.sock, REQUEST, metadata, tensors)
            except (socket.timeout, TimeoutError):
                raise asyncio.TimeoutError() from None
            self.stats.requests += 1
            received = read_message(conn.sock, REPLY, limits, deadline)
            self.stats.bytes_in += received.num_bytes
            ok = True
            return received
        finally:
            with self._lock:
                if ok:
                    conn.last_used = time.monotonic()
                    self._idle.setdefault(conn.key, []).append(conn)
                else:
                    self._forget(conn)

    def _forget(self, conn: _Connection) -> None:
        conn.close()
        self._open[conn.key] -= 1
        if not self._open[conn.key]:
            del self._open[conn.key]
            self._idle.pop(conn.key, None)

    def close(self) -> None:
        with self._lock:
            for conns in self._idle.values():
                for conn in conns:
                    conn.close()
            self._idle.clear()
        self.executor.shutdown(wait=False, cancel_futures=True)


class EndpointBook:
    """Peer id -> data plane endpoint, from the peers' stage records; refreshed at most every ``ttl_s`` (and on a
    miss at most every ``miss_retry_s``), so a chain never waits on the DHT more than once in a while."""

    def __init__(
        self,
        fetch: Callable[[], Awaitable[Dict[str, Endpoint]]],
        ttl_s: float = 10.0,
        miss_retry_s: float = 2.0,
    ):
        self.fetch, self.ttl_s, self.miss_retry_s = fetch, ttl_s, miss_retry_s
        self.endpoints: Dict[str, Endpoint] = {}
        self._fetched_at = -float("inf")
        self._lock: Optional[asyncio.Lock] = None

    async def get(self, peer: str) -> Optional[Endpoint]:
        age = time.monotonic() - self._fetched_at
        if age > self.ttl_s or (peer not in self.endpoints and age > self.miss_retry_s):
            self._lock = self._lock or asyncio.Lock()
            async with self._lock:
                if time.monotonic() - self._fetched_at > min(self.ttl_s, self.miss_retry_s):
                    self._fetched_at = time.monotonic()
                    try:
                        self.endpoints = await self.fetch()
                    except Exception as e:
                        logger.debug(f"could not refresh data plane endpoints: {e!r}")
        return self.endpoints.get(peer)


async def call_chain(
    client: Optional["DataPlaneClient"],
    peer: str,
    endpoint: Optional["Endpoint"],
    p2p_method: Callable,
    meta: Dict[str, Any],
    tensors: List[torch.Tensor],
    limits: TensorLimits,
    timeout: float,
    compression: str = "none",
) -> Received:
    """A chain request's reply from ``peer``: over its data plane where it announces ``endpoint`` and a connection
    can be made, else (nothing sent yet) over P2P (``p2p_method``, its ``rpc_chain`` stub). Failures raise as
    ``transport.call``'s do. Shared by the trainer (to stage 0) and every stage server (to the next stage)."""
    if client is not None and endpoint is not None:
        received = await client.call(peer, endpoint, meta, tensors, limits, timeout=timeout)
        if received is not None:
            return received
    return await call(p2p_method, pack(meta, tensors, compression=compression), limits, timeout=timeout)
