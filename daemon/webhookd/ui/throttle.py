"""Wrong tokens at `POST /ui/signin`, counted per client address: past a limit the address
is locked out until its window ends, the right token included (a lock that let the right
token through would still let an attacker test one token per request).

A window opens at an address's first wrong token and lasts `window` seconds. The `limit`-th
wrong token within it locks the address for what is left of the window; when the window
ends, the address starts afresh. So an address tries at most `limit` tokens per window
(10 a minute: 14,400 a day, nothing against a token of 20 random characters, while an
operator who mistypes nine times is not held up). The right token before the lock clears
the address's count.

The table is bounded: windows all last as long, and an entry is made only when its window
opens, so entries are in the order they expire; the expired are dropped from the front on
every call, and past `capacity` the oldest entry (the one nearest its end anyway) goes. A
spray from many addresses keeps at most `capacity` small entries. IPv6 clients are counted
by their /64, the block one host or one household is given: otherwise one client owns
2^64 addresses, each with a count of its own, and could flush the table at will.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

LIMIT = 10
WINDOW_S = 60.0
# Addresses counted at most (each entry: a key and two numbers, ~160 bytes measured with
# tracemalloc: ~1.6 MB in all).
CAPACITY = 10_000


@dataclass(slots=True)
class Window:
    opened: float
    wrong: int = 0


def client_key(remote: str | None) -> str:
    """Whom to count: an IPv4 address as it is, an IPv6 one by its /64 (an IPv4-mapped one
    as its IPv4), anything else (a Unix socket's peer: no address) under its own text."""
    try:
        address = ipaddress.ip_address(remote or "")
    except ValueError:
        return remote or "-"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class SignInThrottle:
    """Each method takes the client's address (`request.remote`) and reads the time from
    `clock` (monotonic seconds; a test advances its own)."""

    def __init__(
        self,
        limit: int = LIMIT,
        window: float = WINDOW_S,
        capacity: int = CAPACITY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = window
        self.capacity = capacity
        self.clock = clock
        self._by_key: dict[str, Window] = {}

    def locked_for(self, remote: str | None) -> int:
        """Whole seconds until `remote` may try again (rounded up); 0 when it may now."""
        now = self._expire()
        found = self._by_key.get(client_key(remote))
        if found is None or found.wrong < self.limit:
            return 0
        return max(1, math.ceil(found.opened + self.window - now))

    def wrong(self, remote: str | None) -> int:
        """Counts a wrong token from `remote`: the lock's length in whole seconds when this
        one locks the address, else 0."""
        now = self._expire()
        key = client_key(remote)
        found = self._by_key.get(key)
        if found is None:
            while len(self._by_key) >= self.capacity:
                del self._by_key[next(iter(self._by_key))]  # dicts keep insertion order
            found = self._by_key[key] = Window(now)
        found.wrong += 1
        if found.wrong != self.limit:
            return 0
        return max(1, math.ceil(found.opened + self.window - now))

    def right(self, remote: str | None) -> None:
        """The right token (before any lock): the address's count starts again."""
        self._by_key.pop(client_key(remote), None)

    def _expire(self) -> float:
        now = self.clock()
        while self._by_key:
            key, oldest = next(iter(self._by_key.items()))
            if oldest.opened + self.window > now:
                break
            del self._by_key[key]
        return now

    def __len__(self) -> int:
        return len(self._by_key)
