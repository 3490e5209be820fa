from pathlib import Path

import pytest

from prsm_node import config
from prsm_node.config import Config, ConfigError, from_dict, render, render_example
from prsm_node.daemon import StartOptions, apply_flags

PEER = "12D3KooWMbbPVGsZYh3ChQjue712NHHGNybRRXwnuSpezYjGbCDS"


def test_empty_config_is_the_defaults() -> None:
    assert from_dict({}) == Config()


def test_values_are_applied() -> None:
    cfg = from_dict({"p2p": {"listen": ["/ip4/127.0.0.1/tcp/5000"]}, "discovery": {"alpha": 5, "request_timeout": 1}})
    assert cfg.p2p.listen == ["/ip4/127.0.0.1/tcp/5000"]
    assert cfg.discovery.alpha == 5
    assert cfg.discovery.request_timeout == 1.0 and isinstance(cfg.discovery.request_timeout, float)


@pytest.mark.parametrize(
    ("data", "names"),
    [
        ({"p2p": {"lisen": []}}, "[p2p].lisen: unknown key; did you mean 'listen'?"),
        ({"p2pp": {}}, "[p2pp]: unknown section; did you mean 'p2p'?"),
        ({"p2p": {"zzz": []}}, "[p2p].zzz: unknown key (known: "),
        ({"p2p": {"listen": "/ip4/127.0.0.1/tcp/1"}}, "[p2p].listen"),
        ({"p2p": {"listen": ["/ip4/1.2.3/tcp/1"]}}, "[p2p].listen[0]"),
        ({"p2p": {"listen": ["/ip4/127.0.0.1/udp/1"]}}, "[p2p].listen[0]"),
        ({"p2p": {"bootstrap": ["/ip4/127.0.0.1/tcp/1"]}}, "[p2p].bootstrap[0]"),
        ({"discovery": {"alpha": "3"}}, "[discovery].alpha"),
        ({"discovery": {"alpha": True}}, "[discovery].alpha"),
        ({"discovery": {"alpha": 0}}, "[discovery].alpha"),
        ({"discovery": {"bucket_size": 61}}, "[discovery].bucket_size"),
        ({"node": {"log_format": "xml"}}, "[node].log_format"),
        ({"metrics": {"listen": "0.0.0.0:9464"}}, "[metrics].listen"),
        ({"metrics": {"enabled": "yes"}}, "[metrics].enabled"),
        ({"node": 3}, "[node]"),
    ],
)
def test_bad_values_name_the_key(data: dict, names: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict(data)
    assert names in str(err.value)


def test_bad_toml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[p2p\nlisten=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(path)


def test_rendered_config_round_trips(tmp_path: Path) -> None:
    cfg = Config.for_tests()
    path = tmp_path / "config.toml"
    path.write_text(render(cfg, commented=False))
    assert config.load(path) == cfg


def test_node_example_toml_is_current() -> None:
    example = Path(__file__).resolve().parent.parent / "node.example.toml"
    assert example.read_text() == render_example(), "regenerate with: python scripts/gen_example_config.py"


def test_flags_map_onto_config() -> None:
    cfg = apply_flags(
        Config(),
        StartOptions(
            home=Path("/x"),
            listen=["/ip4/127.0.0.1/tcp/9"],
            bootstrap=[f"/ip4/127.0.0.1/tcp/10/p2p/{PEER}"],
            log_format="json",
            log_level="debug",
        ),
    )
    assert cfg.p2p.listen == ["/ip4/127.0.0.1/tcp/9"]
    assert cfg.p2p.bootstrap == [f"/ip4/127.0.0.1/tcp/10/p2p/{PEER}"]
    assert (cfg.node.log_format, cfg.node.log_level) == ("json", "debug")


def test_bad_flags_name_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"--bootstrap\[0\]"):
        apply_flags(Config(), StartOptions(home=Path("/x"), bootstrap=["/ip4/127.0.0.1/tcp/10"]))
    with pytest.raises(ConfigError, match=r"\[node\].log_format"):
        apply_flags(Config(), StartOptions(home=Path("/x"), log_format="yaml"))
