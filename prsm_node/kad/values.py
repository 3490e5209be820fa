"""DHT values: namespaced, validated records. Pure: no I/O; time comes from an injected clock.

A value key is ``/<namespace>/<rest>``. A namespace is registered with two functions, as in
libp2p's record validators: ``validate(key, value)`` raises on a bad value (a bad signature,
a value for another key), and ``select(key, values)`` returns the index of the best of
several valid values (the newest version). A node stores, serves and accepts only values
of namespaces it has registered. See protocols/kad.md, "Values".
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ..exceptions import DiscoveryError

# A stored value lives this long unless it is put again (libp2p's record max age).
VALUE_TTL = 36 * 3600.0
# A node puts its own values again after this long.
VALUE_REPUBLISH_INTERVAL = 22 * 3600.0
MAX_VALUE_SIZE = 16 * 1024
MAX_VALUE_KEY_LEN = 128
MAX_VALUES = 4096
MAX_VALUE_BYTES = 16 * 1024 * 1024

Validate = Callable[[bytes, bytes], None]
Select = Callable[[bytes, list[bytes]], int]
Clock = Callable[[], float]


class InvalidRecord(DiscoveryError):
    """Raised when a value is refused: malformed key, no registered namespace, too large,
    or its namespace's validator rejected it."""


class ValueNotFound(DiscoveryError):
    """Raised when a lookup finds no valid value for a key (or fewer than the quorum)."""


def namespace_of(key: bytes) -> bytes:
    """``/ns/`` of ``/ns/rest``; InvalidRecord if the key has no namespace."""
    if not key.startswith(b"/") or len(key) > MAX_VALUE_KEY_LEN:
        raise InvalidRecord(f"value key must start with '/' and be at most {MAX_VALUE_KEY_LEN} bytes")
    end = key.find(b"/", 1)
    if end <= 1 or end == len(key) - 1:
        raise InvalidRecord("value key must look like /<namespace>/<name>")
    return key[: end + 1]


@dataclass(frozen=True)
class Namespace:
    validate: Validate
    select: Select


class Validators:
    """The registered namespaces."""

    def __init__(self) -> None:
        self._namespaces: dict[bytes, Namespace] = {}

    def register(self, prefix: bytes, validate: Validate, select: Select) -> None:
        if namespace_of(prefix + b"x") != prefix:
            raise ValueError(f"namespace prefix must look like /<name>/, got {prefix!r}")
        self._namespaces[prefix] = Namespace(validate, select)

    def check_key(self, key: bytes) -> Namespace:
        """The key's registered namespace; InvalidRecord if it has none."""
        namespace = self._namespaces.get(namespace_of(key))
        if namespace is None:
            raise InvalidRecord(f"no validator for namespace {namespace_of(key)!r}")
        return namespace

    def check(self, key: bytes, value: bytes) -> Namespace:
        """Return the key's namespace if ``value`` is acceptable for ``key``; else raise InvalidRecord."""
        namespace = self.check_key(key)
        if not value or len(value) > MAX_VALUE_SIZE:
            raise InvalidRecord(f"value must be 1 to {MAX_VALUE_SIZE} bytes, got {len(value)}")
        try:
            namespace.validate(key, value)
        except Exception as exc:  # validators raise whatever they raise; all mean "refused"
            raise InvalidRecord(f"{type(exc).__name__}: {exc}") from None
        return namespace

    def best(self, key: bytes, values: list[bytes]) -> int:
        """Index of the best of ``values`` (already checked) by the namespace's select."""
        index = self._namespaces[namespace_of(key)].select(key, list(values))
        if not 0 <= index < len(values):
            raise InvalidRecord(f"select returned index {index} of {len(values)}")
        return index


@dataclass(frozen=True)
class StoredValue:
    value: bytes
    expires: float


class ValueStore:
    """Bounded value store: at most ``max_entries`` keys and ``max_bytes`` of values, the
    least recently written evicted first. Holds only values the caller validated."""

    def __init__(
        self,
        *,
        ttl: float = VALUE_TTL,
        max_entries: int = MAX_VALUES,
        max_bytes: int = MAX_VALUE_BYTES,
        clock: Clock = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.clock = clock
        self._values: OrderedDict[bytes, StoredValue] = OrderedDict()
        self._bytes = 0
        self.stored = 0
        self.evicted = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self._values)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def put(self, key: bytes, value: bytes) -> None:
        self._pop(key)
        self._values[key] = StoredValue(value, self.clock() + self.ttl)
        self._bytes += len(key) + len(value)
        self.stored += 1
        while len(self._values) > self.max_entries or self._bytes > self.max_bytes:
            self._pop(next(iter(self._values)))
            self.evicted += 1

    def get(self, key: bytes) -> bytes | None:
        stored = self._values.get(key)
        if stored is None:
            return None
        if stored.expires <= self.clock():
            self._pop(key)
            self.expired += 1
            return None
        return stored.value

    def expire(self) -> int:
        now = self.clock()
        gone = [k for k, v in self._values.items() if v.expires <= now]
        for key in gone:
            self._pop(key)
        self.expired += len(gone)
        return len(gone)

    def _pop(self, key: bytes) -> None:
        stored = self._values.pop(key, None)
        if stored is not None:
            self._bytes -= len(key) + len(stored.value)
