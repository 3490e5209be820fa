"""Where a model's providers are found and announced: the one adapter between the exchange and
Kademlia's provider records (``provide``/``find_providers``) and signed values (model name
records). Besides DHT provider records, every connected peer is a candidate: on a small
network asking the peers we already talk to (HAVE) finds providers without a DHT round trip.
"""

from __future__ import annotations

import logging

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID

from ..kad.service import Kademlia
from ..logs import kv
from .registry import RECORD_PREFIX, select_record, validate_record

log = logging.getLogger(__name__)

PROVIDER_ADDR_TTL = 3600
DHT_TIMEOUT = 20.0


class Providers:
    def __init__(self, host: IHost, kad: Kademlia) -> None:
        self.host = host
        self.kad = kad

    def register_namespace(self) -> None:
        self.kad.register_namespace(RECORD_PREFIX, validate_record, select_record)

    async def announce(self, key: bytes) -> int:
        """Announce this node as a provider of ``key``; returns the peers that stored the record
        (0 without DHT providers, or when the announcement failed: it is retried later)."""
        try:
            with trio.fail_after(DHT_TIMEOUT):
                return await self.kad.provide(key)
        except Exception as exc:  # the DHT may be empty or unreachable; serving goes on
            log.info("provider announcement failed", extra=kv(key=key.hex()[:16], error=repr(exc)))
            return 0

    def withdraw(self, key: bytes) -> None:
        self.kad.stop_providing(key)

    async def find(self, key: bytes, count: int = 20) -> list[ID]:
        """Candidate providers of ``key``: DHT provider records first, then every connected peer
        (each is asked HAVE or GET_MANIFEST, and one without the manifest answers not_found)."""
        me = self.host.get_id()
        found: list[ID] = []
        try:
            with trio.fail_after(DHT_TIMEOUT):
                infos = await self.kad.find_providers(key, count)
        except Exception as exc:  # an empty or unreachable DHT leaves the fallback
            log.info("provider lookup failed", extra=kv(key=key.hex()[:16], error=repr(exc)))
            infos = []
        for info in infos:
            if info.peer_id != me and info.peer_id not in found:
                if info.addrs:
                    self.host.get_peerstore().add_addrs(info.peer_id, info.addrs, PROVIDER_ADDR_TTL)
                found.append(info.peer_id)
        for peer_id in self.host.get_network().connections:
            if peer_id != me and peer_id not in found:
                found.append(peer_id)
        return found

    async def put_value(self, key: bytes, value: bytes) -> bool:
        try:
            with trio.fail_after(DHT_TIMEOUT):
                await self.kad.put_value(key, value)
            return True
        except Exception as exc:  # a record that cannot be stored now is published again later
            log.info("name record not stored", extra=kv(key=key.hex()[:16], error=repr(exc)))
            return False

    async def get_value(self, key: bytes) -> bytes | None:
        try:
            with trio.fail_after(DHT_TIMEOUT):
                value = await self.kad.get_value(key)
        except Exception as exc:  # not found, or the DHT is unreachable
            log.info("name lookup failed", extra=kv(key=key.hex()[:16], error=repr(exc)))
            return None
        return bytes(value) if value is not None else None
