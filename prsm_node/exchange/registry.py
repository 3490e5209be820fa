"""Signed name records: how ``model fetch NAME[:VERSION]`` finds a manifest id in the DHT.

A publisher puts one record under two DHT value keys, each the record namespace prefix plus a
32-byte key from prsm_node.shards.registry:

    /prsm-model/ + name_key(name)              the publisher's latest version of the name
    /prsm-model/ + version_key(name, version)  that exact version

Record (canonical msgpack, like the manifest)::

    [1, name: str, version: str, manifest_id: bin32, publisher: bin32, created: uint, signature: bin64]
    signature = Ed25519(publisher, msgpack(["prsm-model-record-v1", name, version, manifest_id,
                                            publisher, created]))

A record is valid under a key when it decodes canonically, its signature verifies, and the key
is its name key or its version key. When several valid records compete for one key,
``select_record`` keeps the newest version (``version_order``), then the latest ``created``,
then the larger encoding, so every node picks the same one. A record binds a name to a
manifest id; the manifest fetched by that id is then verified as always (its own signature
and publisher must match the record's publisher).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, replace
from typing import Any

import msgpack
import nacl.exceptions
import nacl.signing

from ..shards import name_key, version_key
from ..shards.registry import check_name, check_version, version_order
from .exceptions import ExchangeError

RECORD_PREFIX = b"/prsm-model/"
RECORD_DOMAIN = "prsm-model-record-v1"
RECORD_FORMAT = 1
MAX_RECORD_SIZE = 512


class InvalidRecord(ExchangeError):
    """Raised when bytes are not a valid signed name record for the key they came under."""


@dataclass(frozen=True)
class NameRecord:
    name: str
    version: str
    manifest_id: bytes
    publisher: bytes
    created: int
    signature: bytes = b""

    def payload(self) -> bytes:
        body = [RECORD_DOMAIN, self.name, self.version, self.manifest_id, self.publisher, self.created]
        return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]

    def keys(self) -> tuple[bytes, bytes]:
        """The DHT keys this record lives under: (name key, version key)."""
        return record_key(self.name), record_key(self.name, self.version)


def record_key(name: str, version: str | None = None) -> bytes:
    return RECORD_PREFIX + (name_key(name) if version is None else version_key(name, version))


def sign_record(key: nacl.signing.SigningKey, name: str, version: str, manifest_id: bytes,
                created: int | None = None) -> NameRecord:
    unsigned = NameRecord(check_name(name), check_version(version), manifest_id, bytes(key.verify_key),
                          int(time.time()) if created is None else created)
    signature = key.sign(unsigned.payload()).signature
    return replace(unsigned, signature=signature)


def encode_record(r: NameRecord) -> bytes:
    fields = [RECORD_FORMAT, r.name, r.version, r.manifest_id, r.publisher, r.created, r.signature]
    return msgpack.packb(fields, use_bin_type=True)  # type: ignore[no-any-return]


def decode_record(data: bytes) -> NameRecord:
    """Parse and verify untrusted record bytes (canonical form, field types, signature)."""
    if len(data) > MAX_RECORD_SIZE:
        raise InvalidRecord(f"record of {len(data)} bytes is over {MAX_RECORD_SIZE}")
    try:
        value: Any = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise InvalidRecord(f"record is not msgpack: {exc}") from None
    if type(value) is not list or len(value) != 7 or value[0] != RECORD_FORMAT:
        raise InvalidRecord("record must be a 7-element array of format 1")
    _, name, version, mid, publisher, created, signature = value
    if not (type(name) is str and type(version) is str and type(created) is int and created >= 0):
        raise InvalidRecord("record fields have the wrong types")
    for field, size in ((mid, 32), (publisher, 32), (signature, 64)):
        if type(field) is not bytes or len(field) != size:
            raise InvalidRecord("record id, publisher or signature has the wrong type or length")
    try:
        r = NameRecord(check_name(name), check_version(version), mid, publisher, created, signature)
    except ExchangeError:
        raise
    except Exception as exc:  # InvalidManifest from the name/version checks
        raise InvalidRecord(str(exc)) from None
    if encode_record(r) != bytes(data):
        raise InvalidRecord("record is not in canonical form")
    try:
        nacl.signing.VerifyKey(publisher).verify(r.payload(), signature)
    except nacl.exceptions.BadSignatureError:
        raise InvalidRecord("record signature does not verify") from None
    return r


def validate_record(key: bytes, value: bytes) -> None:
    """DHT namespace validator: ``value`` must be a valid record stored under one of its keys."""
    r = decode_record(value)
    if key not in r.keys():
        raise InvalidRecord(f"record for {r.name}:{r.version} does not belong under key {key.hex()}")


def record_order(value: bytes) -> tuple[tuple[int, tuple[int, ...], bytes], int, int, bytes]:
    r = decode_record(value)
    return version_order(r.version), r.created, len(value), hashlib.sha256(value).digest()


def select_record(key: bytes, values: list[bytes]) -> int:
    """DHT namespace selector: the index of the best valid record (newest version wins)."""
    best, best_order = 0, None
    for i, v in enumerate(values):
        try:
            validate_record(key, v)
            order = record_order(v)
        except InvalidRecord:
            continue
        if best_order is None or order > best_order:
            best, best_order = i, order
    return best
