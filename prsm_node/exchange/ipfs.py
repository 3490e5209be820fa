"""Optional IPFS backing for chunks (``[ipfs] api``): publishing also puts every chunk into a
local IPFS node as a raw block, and a fetch asks IPFS for the chunks no peer provides.

A chunk's block is addressed by the CIDv1 ``raw`` + ``sha2-256`` of its bytes, which is derived
from the chunk hash alone (``raw_cid``), so no mapping is stored. Nothing from IPFS is trusted:
a block is checked against the chunk's SHA-256 before it is stored, like a chunk from a peer.

Tested only against a fake HTTP API implementing ``/api/v0/block/put`` and ``/api/v0/block/get``
(tests/test_exchange_ipfs.py); no IPFS daemon could be installed where this was written. The
client is ``ipfshttpclient.Client(addr)`` constructed directly: ``ipfshttpclient.connect()``
refuses every current daemon version (PITFALLS). Calls block: the exchange makes them in a
worker thread.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..logs import kv

log = logging.getLogger(__name__)

CID_RAW_SHA256_PREFIX = b"\x01\x55\x12\x20"  # CIDv1, codec raw, multihash sha2-256, 32 bytes


@contextmanager
def _quiet() -> Iterator[None]:
    """ipfshttpclient 0.7 passes urllib3 a ``strict`` argument that urllib3 2 deprecates with a
    FutureWarning on every new connection: harmless, and not ours to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The 'strict' parameter", category=FutureWarning)
        yield


def raw_cid(chunk_hash: bytes) -> str:
    """The CIDv1 (base32) of the raw block whose SHA-256 is ``chunk_hash``."""
    if len(chunk_hash) != 32:
        raise ValueError("a chunk hash is 32 bytes")
    return "b" + base64.b32encode(CID_RAW_SHA256_PREFIX + chunk_hash).decode("ascii").lower().rstrip("=")


class IpfsBlocks:
    """Chunks as raw blocks through an IPFS HTTP API. Every method blocks; none raises for an
    IPFS failure (it is logged): IPFS is a fallback, never a reason for an operation to fail."""

    def __init__(self, api: str, *, timeout: float = 30.0) -> None:
        import ipfshttpclient  # imported only when [ipfs] api is set

        self.api = api
        self.timeout = timeout
        with _quiet():
            self._client: Any = ipfshttpclient.Client(api, timeout=timeout)
        self.put_count = self.get_count = self.failures = 0

    def put(self, data: bytes) -> bool:
        """Store ``data`` as a raw block; True when IPFS acknowledged the expected CID."""
        expected = raw_cid(hashlib.sha256(data).digest())
        try:
            with _quiet():
                reply = self._client.block.put(io.BytesIO(data), opts={"cid-codec": "raw", "mhtype": "sha2-256"})
            key = reply["Key"]
        except Exception as exc:  # ipfshttpclient raises its own hierarchy and requests' errors
            self.failures += 1
            log.info("ipfs block put failed", extra=kv(api=self.api, cid=expected, error=repr(exc)))
            return False
        if key != expected:
            self.failures += 1
            log.info("ipfs stored a block under another CID", extra=kv(api=self.api, cid=expected, got=str(key)))
            return False
        self.put_count += 1
        return True

    def get(self, chunk_hash: bytes) -> bytes | None:
        """The block of ``chunk_hash`` if IPFS has it and it hashes right; None otherwise."""
        cid = raw_cid(chunk_hash)
        try:
            with _quiet():
                data = self._client.block.get(cid)
        except Exception as exc:  # not found, daemon down, timeout: all mean "not from IPFS"
            self.failures += 1
            log.info("ipfs block get failed", extra=kv(api=self.api, cid=cid, error=repr(exc)))
            return None
        if not isinstance(data, bytes) or hashlib.sha256(data).digest() != chunk_hash:
            self.failures += 1
            log.warning("ipfs returned a block that does not match its hash", extra=kv(api=self.api, cid=cid))
            return None
        self.get_count += 1
        return data

    def close(self) -> None:
        try:
            with _quiet():
                self._client.close()
        except Exception:  # a session that never opened has nothing to close
            pass


def ipfs_from_config(section: Any) -> IpfsBlocks | None:
    """The IpfsBlocks of an ``[ipfs]`` config section, or None when ``api`` is empty (off)."""
    return IpfsBlocks(section.api, timeout=section.timeout) if section.api else None
