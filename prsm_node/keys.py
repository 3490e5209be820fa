"""The node key: one Ed25519 key from which the libp2p peer id and the ledger account derive.

On disk, ``keys/node_key`` holds the 32-byte Ed25519 seed and nothing else, mode 0600.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import nacl.signing

from .exceptions import KeyFileError

if TYPE_CHECKING:
    from libp2p.crypto.keys import KeyPair
    from libp2p.peer.id import ID

SEED_SIZE = 32


@dataclass(frozen=True)
class NodeKey:
    seed: bytes

    @classmethod
    def generate(cls) -> NodeKey:
        return cls(os.urandom(SEED_SIZE))

    @property
    def signing_key(self) -> nacl.signing.SigningKey:
        return nacl.signing.SigningKey(self.seed)

    @property
    def account(self) -> bytes:
        """The ledger account: the raw 32-byte Ed25519 public key."""
        return bytes(self.signing_key.verify_key)

    def libp2p_key_pair(self) -> KeyPair:
        # libp2p costs ~1.5 s to import; CLI commands that only talk to the socket skip it.
        from libp2p.crypto.ed25519 import create_new_key_pair

        return create_new_key_pair(self.seed)

    @property
    def peer_id(self) -> ID:
        from libp2p.peer.id import ID

        return ID.from_pubkey(self.libp2p_key_pair().public_key)

    def save(self, path: Path) -> None:
        """Write the seed with mode 0600 from the start (never briefly world-readable)."""
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, self.seed)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> NodeKey:
        try:
            st = path.stat()
            data = path.read_bytes()
        except FileNotFoundError:
            raise KeyFileError(f"{path}: node key not found (run `prsm-node init`)") from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(
                f"{path}: node key is accessible by other users (mode {stat.S_IMODE(st.st_mode):o}); "
                f"run `chmod 600 {path}`"
            )
        if len(data) != SEED_SIZE:
            raise KeyFileError(
                f"{path}: corrupt node key ({len(data)} bytes, expected a {SEED_SIZE}-byte Ed25519 seed)"
            )
        return cls(data)
