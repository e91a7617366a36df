"""Admission controls a swarm's creator can turn on: a proof-of-work cost per identity and an allowlist.

Reputation makes a banned peer start again as an untrusted newcomer, but identities are free to make: a Sybil
attacker can mint thousands. Two controls, both named in the swarm's config (``extra["admission"]``) so every
peer verifies the same rule, and both off by default (a local swarm needs neither):

- **Proof of work** (``pow_bits``): an identity (a libp2p peer id) is admitted only with a nonce such that
  ``sha256(run_id | peer_id | nonce)`` starts with ``pow_bits`` zero bits. Finding one costs about
  ``2**pow_bits`` hashes (20 bits: about a second on one core; 26 bits: about a minute); checking it costs one
  hash. The nonce is bound to the run and the peer id, so it cannot be reused for another identity or swarm.
- **Allowlist** (``authority``): an identity is admitted only with a token signed by the swarm's authority key
  (Ed25519), naming the run, the peer id and an expiry. ``swarm admit`` issues tokens; the creator keeps the
  private key, the config publishes the public key.

With both on, an identity needs both. A peer carries its proof in its stage record and its reputation reports
(``admission``) and in the metadata of every chain request it sends; readers ignore records, reports and requests
of identities that are not admitted, with the reason logged.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from swarm.records import MAX_TOKEN_CHARS

MAX_POW_BITS = 40


class AdmissionError(ValueError):
    """An identity that the swarm's admission rule does not let in; the message says why."""


def _pow_digest(run_id: str, peer_id: str, nonce: int) -> bytes:
    return hashlib.sha256(f"{run_id}|{peer_id}|{nonce}".encode()).digest()


def _leading_zero_bits(digest: bytes) -> int:
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()


def solve_pow(run_id: str, peer_id: str, bits: int, start: int = 0) -> int:
    """The first nonce from ``start`` that gives ``bits`` leading zero bits (about ``2**bits`` hashes)."""
    if not 0 <= bits <= MAX_POW_BITS:
        raise ValueError(f"pow_bits must be in [0, {MAX_POW_BITS}]")
    nonce = start
    while _leading_zero_bits(_pow_digest(run_id, peer_id, nonce)) < bits:
        nonce += 1
    return nonce


def verify_pow(run_id: str, peer_id: str, bits: int, nonce: Any) -> bool:
    if bits <= 0:
        return True
    if not isinstance(nonce, int) or isinstance(nonce, bool) or not 0 <= nonce < 2**63:
        return False
    return _leading_zero_bits(_pow_digest(run_id, peer_id, nonce)) >= bits


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_or_create_authority_key(path: str) -> Ed25519PrivateKey:
    """The swarm authority's private key from a PEM file, created (mode 0600) if missing."""
    if os.path.exists(path):
        with open(path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 private key")
        return key
    key = Ed25519PrivateKey.generate()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return key


def public_key_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def issue_token(
    key: Ed25519PrivateKey,
    run_id: str,
    peer_id: str,
    ttl_s: float = 30 * 86400.0,
    now: Optional[float] = None,
) -> str:
    """An allowlist token for one identity in one swarm, valid ``ttl_s`` seconds."""
    payload = json.dumps(
        {"run": run_id, "peer": peer_id, "exp": int((now or time.time()) + ttl_s)},
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    return f"{_b64(payload)}.{_b64(key.sign(payload))}"


def verify_token(
    authority_hex: str, run_id: str, peer_id: str, token: Any, now: Optional[float] = None
) -> None:
    """Raises :class:`AdmissionError` unless ``token`` is the authority's signature for this run and peer, unexpired."""
    if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_CHARS or token.count(".") != 1:
        raise AdmissionError("no allowlist token, or a malformed one")
    body, signature = token.split(".")
    try:
        payload = _unb64(body)
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(authority_hex)).verify(_unb64(signature), payload)
        claims = json.loads(payload)
    except (InvalidSignature, ValueError, TypeError):
        raise AdmissionError("allowlist token is not signed by the swarm's authority") from None
    if not isinstance(claims, dict) or claims.get("run") != run_id or claims.get("peer") != peer_id:
        raise AdmissionError("allowlist token was issued for another swarm or identity")
    expires = claims.get("exp")
    if not isinstance(expires, int) or expires < (now or time.time()):
        raise AdmissionError("allowlist token has expired")


@dataclass(frozen=True)
class AdmissionPolicy:
    """The swarm's admission rule, from its config: ``pow_bits`` (0: off) and ``authority`` (None: no allowlist)."""

    run_id: str
    pow_bits: int = 0
    authority: Optional[str] = None  # hex of the authority's Ed25519 public key

    def __post_init__(self) -> None:
        if not (isinstance(self.pow_bits, int) and 0 <= self.pow_bits <= MAX_POW_BITS):
            raise ValueError(f"pow_bits must be an integer in [0, {MAX_POW_BITS}]")
        if self.authority is not None:
            try:
                Ed25519PublicKey.from_public_bytes(bytes.fromhex(self.authority))
            except (ValueError, TypeError):
                raise ValueError("authority must be the hex of an Ed25519 public key") from None

    @property
    def enabled(self) -> bool:
        return self.pow_bits > 0 or self.authority is not None

    def to_extra(self) -> Dict[str, Any]:
        return {"pow_bits": self.pow_bits, "authority": self.authority}

    @classmethod
    def from_extra(cls, run_id: str, extra: Dict[str, Any]) -> "AdmissionPolicy":
        """From a swarm config's ``extra``; a malformed rule is an error (joining under a rule we cannot read
        would only get us ignored by everyone)."""
        settings = extra.get("admission") or {}
        if not isinstance(settings, dict):
            raise ValueError("the swarm's admission settings are malformed")
        return cls(
            run_id=run_id, pow_bits=settings.get("pow_bits", 0) or 0, authority=settings.get("authority")
        )

    def check(self, peer_id: str, proof: Any, now: Optional[float] = None) -> None:
        """Raises :class:`AdmissionError` with the reason unless ``proof`` admits ``peer_id``."""
        if not self.enabled:
            return
        if not isinstance(proof, dict):
            raise AdmissionError("no admission proof")
        if not verify_pow(self.run_id, peer_id, self.pow_bits, proof.get("pow")):
            raise AdmissionError(f"missing or wrong proof of work ({self.pow_bits} bits)")
        if self.authority is not None:
            verify_token(self.authority, self.run_id, peer_id, proof.get("token"), now)

    def admits(self, peer_id: str, proof: Any) -> bool:
        try:
            self.check(peer_id, proof)
            return True
        except AdmissionError:
            return False

    def prove(self, peer_id: str, token: Optional[str] = None) -> Optional[Dict[str, Any]]:
        """This identity's proof (solving the work if needed), or None when admission is off. Checks it."""
        if not self.enabled:
            return None
        proof: Dict[str, Any] = {
            "pow": solve_pow(self.run_id, peer_id, self.pow_bits) if self.pow_bits else 0
        }
        if token is not None:
            proof["token"] = token.strip()
        self.check(peer_id, proof)
        return proof


class AdmissionCache:
    """Remembers verdicts per (peer, proof), so a proof is checked once, not on every request."""

    def __init__(self, policy: AdmissionPolicy, max_entries: int = 4096, recheck_s: float = 600.0):
        self.policy, self.max_entries, self.recheck_s = policy, max_entries, recheck_s
        self._verdicts: Dict[tuple, Tuple[Optional[str], float]] = {}

    def reason(self, peer_id: str, proof: Any) -> Optional[str]:
        """None if admitted, else why not."""
        if not self.policy.enabled:
            return None
        key = (peer_id, json.dumps(proof, sort_keys=True, default=str)[:1024])
        now = time.monotonic()
        hit = self._verdicts.get(key)
        if hit is not None and now - hit[1] < self.recheck_s:  # tokens expire: verdicts are not kept for ever
            return hit[0]
        if len(self._verdicts) >= self.max_entries:
            self._verdicts.clear()
        try:
            self.policy.check(peer_id, proof)
            reason = None
        except AdmissionError as e:
            reason = str(e)
        self._verdicts[key] = (reason, now)
        return reason
