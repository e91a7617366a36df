"""A peer's identity: its libp2p RSA key, and the peer id every other peer derives from the public half.

hivemind identities are RSA keys; a peer id is the sha2-256 multihash of the protobuf-encoded public key, so a
signature by "peer X" is checked against X's id with nothing but the public key it carries: DHT records
(``swarm.records``: the ``[owner:...]`` marker of a subkey) and the chain protocol's headers and reports
(``swarm.protocol``) both rely on it.
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey

_SHA2_256_MULTIHASH = b"\x12\x20"  # multihash code sha2-256, digest length 32


def peer_id_of(public_key: bytes) -> str:
    """The base58 libp2p peer id of an RSA public key in OpenSSH encoding (hivemind's ``RSAPublicKey.to_bytes``):
    the sha2-256 multihash of the protobuf ``PublicKey{Type: RSA, Data: DER SubjectPublicKeyInfo}``, libp2p's rule
    (hivemind's ``PeerID.from_identity`` does the same from the private key). Raises ValueError for anything else."""
    key = serialization.load_ssh_public_key(public_key)
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("not an RSA public key")
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    return PeerID(_SHA2_256_MULTIHASH + hashlib.sha256(encoded).digest()).to_base58()


def load_identity_key(identity_path: str) -> RSAPrivateKey:
    """The RSA private key of a libp2p identity file (hivemind's format: protobuf ``PrivateKey{RSA, DER}``)."""
    with open(identity_path, "rb") as f:
        try:
            protobuf = crypto_pb2.PrivateKey.FromString(f.read())
        except Exception as e:  # protobuf's DecodeError and friends
            raise ValueError(f"{identity_path}: not a libp2p private key file ({type(e).__name__})") from None
    if protobuf.key_type != crypto_pb2.RSA:
        raise ValueError(
            f"{identity_path}: the identity key must be RSA (hivemind's kind), got key type "
            f"{protobuf.key_type}"
        )
    key = RSAPrivateKey.__new__(RSAPrivateKey)  # without generating a throwaway key first
    try:
        key.__setstate__({"_private_key": protobuf.data})  # hivemind's own deserialization (DER, PKCS#1)
    except ValueError as e:
        raise ValueError(f"{identity_path}: unreadable RSA key ({e})") from None
    return key
