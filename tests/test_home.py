import os
import stat
from pathlib import Path

import pytest

from prsm_node.exceptions import ConfigError, HomeError, KeyFileError, LockedError
from prsm_node.home import Home, HomeLock, find_network, init_home
from prsm_node.keys import NodeKey


def test_init_writes_a_complete_home(tmp_path: Path) -> None:
    home = Home(tmp_path / "h")
    key = init_home(home)
    assert home.config_path.exists() and home.genesis_path.exists()
    assert stat.S_IMODE(home.key_path.stat().st_mode) == 0o600
    assert home.load_key() == key
    genesis = home.load_genesis()
    assert genesis.network == "dev"
    assert [v.peer_id for v in genesis.validators] == [str(key.peer_id)]
    assert genesis.balances == {key.account.hex(): genesis.balances[key.account.hex()]}


def test_init_never_overwrites_without_force(tmp_path: Path) -> None:
    home = Home(tmp_path / "h")
    first = init_home(home)
    with pytest.raises(HomeError, match="--force"):
        init_home(home)
    assert home.load_key() == first
    second = init_home(home, force=True)
    assert second != first and home.load_key() == second


def test_peer_id_is_stable_for_a_key(tmp_path: Path) -> None:
    key = NodeKey.generate()
    key.save(tmp_path / "k")
    assert NodeKey.load(tmp_path / "k").peer_id == key.peer_id


def test_corrupt_or_exposed_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k"
    NodeKey.generate().save(path)
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        NodeKey.load(path)
    os.chmod(path, 0o600)
    path.write_bytes(b"short")
    with pytest.raises(KeyFileError, match="corrupt"):
        NodeKey.load(path)


def test_unknown_network_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="unknown network 'nope'"):
        find_network("nope")


def test_network_folder_by_path(tmp_path: Path) -> None:
    src = Home(tmp_path / "src")
    init_home(src)
    net = tmp_path / "net"
    net.mkdir()
    (net / "genesis.json").write_text(src.genesis_path.read_text())
    (net / "peers.txt").write_text(
        "# comment\n/ip4/127.0.0.1/tcp/1/p2p/12D3KooWMbbPVGsZYh3ChQjue712NHHGNybRRXwnuSpezYjGbCDS\n"
    )
    home = Home(tmp_path / "joiner")
    init_home(home, network=str(net))
    assert home.load_genesis().chain_id == src.load_genesis().chain_id
    found = find_network(str(net))
    assert found is not None and len(found.bootstrap_peers()) == 1
    (net / "peers.txt").write_text("/ip4/127.0.0.1/tcp/1\n")
    with pytest.raises(ConfigError, match="peers.txt:1"):
        found.bootstrap_peers()


def test_lock_admits_one_holder(tmp_path: Path) -> None:
    home = Home(tmp_path)
    first, second = HomeLock(home), HomeLock(home)
    first.acquire()
    with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
        second.acquire()
    first.release()
    second.acquire()
    second.release()


def test_devnet_genesis_stakes_every_node(tmp_path: Path) -> None:
    """devnet.create(stake=...) writes genesis stakes (ledger r3): each node's account starts
    staked, its balance untouched, and the block interval is the one asked for."""
    from prsm_node import devnet
    from prsm_node.genesis import Genesis
    from prsm_node.home import Home
    from prsm_node.ledger import LedgerState

    nodes = devnet.create(tmp_path / "dn", 3, stake=5 * 10**18, block_interval=0.5)
    genesis = Genesis.load(tmp_path / "dn" / devnet.NETWORK_DIR / "genesis.json")
    state = LedgerState.from_genesis(genesis)
    for node in nodes:
        home = Home(Path(node.home))
        account = state.account(home.load_key().account)
        assert account.stake == 5 * 10**18 and account.balance == 10**24
        assert home.load_config().ledger.block_interval == 0.5
    devnet.create(tmp_path / "plain", 1)
    assert "stakes" not in Genesis.load(tmp_path / "plain" / devnet.NETWORK_DIR / "genesis.json").to_json()


def test_genesis_refuses_a_malformed_stake() -> None:
    from prsm_node.genesis import Genesis

    data = {"chain_id": "c", "network": "n", "genesis_time": 0, "stakes": {"ab" * 32: 5}}
    with pytest.raises(ConfigError, match=r"stakes\["):
        Genesis.from_json(data, "g")
