"""The node's LevelDB database (plyvel), one per home, shared by services through prefixes.

Every service gets a :class:`Namespace`: a prefix inside the one database. Writes that
must land together go through one ``write_batch``. The store opens first and closes last.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import plyvel

from .exceptions import StoreError


def _prefix_end(prefix: bytes) -> bytes | None:
    """The first key after every key that starts with ``prefix`` (None: no such key)."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return None
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


class Namespace:
    def __init__(self, db: plyvel.DB, prefix: bytes) -> None:
        self._db = db.prefixed_db(prefix)

    def get(self, key: bytes) -> bytes | None:
        value: bytes | None = self._db.get(key)
        return value

    def put(self, key: bytes, value: bytes, *, sync: bool = False) -> None:
        self._db.put(key, value, sync=sync)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        with self._db.iterator() as it:
            yield from it

    def scan(
        self, prefix: bytes, *, reverse: bool = False, start: bytes | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        """Keys under ``prefix`` in order (``start``: the first key to include, or with
        ``reverse`` the last one, both under the prefix)."""
        if start is None:
            it = self._db.iterator(prefix=prefix, reverse=reverse)
        elif reverse:
            it = self._db.iterator(start=prefix, stop=start, include_stop=True, reverse=True)
        else:
            it = self._db.iterator(start=start, stop=_prefix_end(prefix))
        with it:
            yield from it

    def write_batch(self, *, sync: bool) -> Any:
        """An atomic batch: every put and delete lands together, or none (``with`` commits)."""
        return self._db.write_batch(transaction=True, sync=sync)

    def replace_all(self, items: dict[bytes, bytes], *, sync: bool = False) -> None:
        """Make the namespace hold exactly ``items``, in one atomic batch."""
        with self._db.write_batch(sync=sync) as batch:
            for key, _ in self.items():
                if key not in items:
                    batch.delete(key)
            for key, value in items.items():
                batch.put(key, value)


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: plyvel.DB | None = None

    def open(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self._db = plyvel.DB(str(self.path), create_if_missing=True, paranoid_checks=True)
        except plyvel.IOError as exc:
            raise StoreError(f"{self.path}: cannot open the database: {exc}") from None
        except plyvel.CorruptionError as exc:
            raise StoreError(
                f"{self.path}: the database is corrupt ({exc}); restore it from a backup "
                "or resync by removing data/ with the daemon stopped"
            ) from None

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def namespace(self, name: str) -> Namespace:
        if self._db is None:
            raise StoreError("the store is not open")
        return Namespace(self._db, name.encode() + b"/")
