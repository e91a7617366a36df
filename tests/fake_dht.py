"""A stand-in for the reading side of ``hivemind.DHT`` (subkeyed ``get``, sync or awaitable), for in-process tests
of readers: values come back as hivemind hands them over (signature stripped, subkey = the owner marker)."""

from __future__ import annotations

from hivemind.utils import ValueWithExpiration, get_dht_time


class FakeDHT:
    def __init__(self):
        self.values = {}

    def put(self, key: str, marker: bytes, value, ttl_s: float = 60.0) -> None:
        self.values.setdefault(key, {})[marker] = ValueWithExpiration(value, get_dht_time() + ttl_s)

    def get(self, key: str, latest: bool = True, return_future: bool = False):
        entry = self.values.get(key)
        result = None if entry is None else ValueWithExpiration(dict(entry), get_dht_time() + 60)
        if return_future:

            async def done():
                return result

            return done()
        return result
