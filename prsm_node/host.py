"""The libp2p host: TCP, Noise (set explicitly, nothing else offered), yamux; identify and ping.

See shared PITFALLS: with ``sec_opt=None`` py-libp2p would also accept plaintext, secio and
TLS, and ``max_connections_per_peer=3`` adds a 250 ms happy-eyeballs wait to every dial.
"""

from __future__ import annotations

import ipaddress
import os
import socket

import multiaddr
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from .config import Config
from .keys import NodeKey

# py-libp2p 0.8.1's yamux answers every read with a WINDOW_UPDATE frame for the bytes read
# (its RELEASE_ON_READ tuning, on by default): one more encrypted frame each way for every small
# message (a vote, a gossip control RPC). Off, it batches updates as go-yamux does (at half the
# window). Measured on 20 idle daemons: 24.6 -> 21.0 ms/s of CPU per node. Read at each use.
YAMUX_TUNING = {"PY_YAMUX_RELEASE_ON_READ": "0"}


def build_host(key: NodeKey, cfg: Config) -> IHost:
    for name, value in YAMUX_TUNING.items():
        os.environ.setdefault(name, value)
    key_pair = key.libp2p_key_pair()
    noise = NoiseTransport(key_pair, noise_privkey=new_x25519_key_pair().private_key)
    listen = [multiaddr.Multiaddr(a) for a in cfg.p2p.listen]
    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        listen_addrs=listen,
        addrs_factory=expand_wildcards,
        connection_config=ConnectionConfig(
            max_connections=cfg.p2p.max_connections,
            high_watermark=cfg.p2p.max_connections,
            min_connections=0,
            low_watermark=0,
            max_connections_per_peer=1,
            dial_timeout=cfg.p2p.dial_timeout,
        ),
    )
    _disable_auto_connector(host)
    return host


def _disable_auto_connector(host: IHost) -> None:
    """Discovery decides whom to dial. py-libp2p 0.8.1's auto-connector aims for
    (low + high watermark) / 2 connections and, every 30 s and after every disconnect, dials
    every peer in the peerstore to get there; it has no setting to turn it off."""

    async def no_auto_dial() -> None:
        return None

    network = host.get_network()
    connector = getattr(network, "auto_connector", None)
    if connector is None:
        raise RuntimeError("py-libp2p changed: the swarm has no auto_connector to disable")
    connector.maybe_connect = no_auto_dial


def _local_ipv4_addresses() -> list[str]:
    """Addresses a wildcard listener is reachable on: loopback plus this host's own IPv4s."""
    found = {"127.0.0.1"}
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            found.add(str(info[4][0]))
    except OSError:
        pass
    return sorted(found, key=lambda a: (not ipaddress.ip_address(a).is_loopback, a))


def expand_wildcards(addrs: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
    """Advertise a 0.0.0.0 listener as the concrete addresses peers can dial."""
    out: list[multiaddr.Multiaddr] = []
    for ma in addrs:
        if ma.value_for_protocol("ip4") == "0.0.0.0":
            rest = str(ma)[len("/ip4/0.0.0.0") :]
            out += [multiaddr.Multiaddr(f"/ip4/{ip}{rest}") for ip in _local_ipv4_addresses()]
        else:
            out.append(ma)
    unique: dict[str, multiaddr.Multiaddr] = {}
    for ma in out:
        unique.setdefault(str(ma), ma)
    return list(unique.values())


def listen_addrs(host: IHost) -> list[str]:
    """The host's advertised addresses, each with its /p2p/<peer id>."""
    return [str(a) for a in host.get_addrs()]
