"""The model commands in real daemon processes, through the CLI with --json: publish a small
safetensors model on node0 of a 3-node devnet, fetch it on node1 by id, then ls, info and rm
(by id prefix and by name); unknown ids get clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from .daemons import cli, devnet


def model_json(home: str | Path, *args: str) -> Any:
    result = cli("model", *args, "--home", str(home), "--json", timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_publish_fetch_ls_info_rm_through_the_cli(short_tmp: Path) -> None:
    src = short_tmp / "tiny"
    src.mkdir()
    rng = np.random.default_rng(3)
    tensors = {"embed.weight": rng.standard_normal((256, 256), dtype=np.float32),
               "head.bias": np.arange(100, dtype=np.int64)}
    save_file(tensors, str(src / "model.safetensors"))
    meta = short_tmp / "meta.json"
    meta.write_text(json.dumps({"architecture": {"name": "tiny", "layers": 1}}))

    with devnet(short_tmp / "dn", 3) as net:
        homes = [n["home"] for n in net.nodes]
        pub = model_json(homes[0], "publish", str(src), "--name", "prsm/tiny", "--version", "1.0.0",
                         "--tags", "lm,tiny", "--license", "MIT", "--metadata-json", str(meta),
                         "--chunk-size", "65536")
        mid = pub["id"]
        assert pub["chunks"] == pub["chunks_written"] >= 4 and pub["tags"] == ["lm", "tiny"]

        fetched = model_json(homes[1], "fetch", mid)
        assert fetched["state"] == "done"
        assert (fetched["chunks_fetched"], fetched["chunks_present"]) == (pub["chunks"], 0)
        out = Path(fetched["path"]) / "model.safetensors"
        assert out.read_bytes() == (src / "model.safetensors").read_bytes()
        loaded = load_file(str(out))
        assert all(np.array_equal(loaded[k], v) for k, v in tensors.items())

        listed = model_json(homes[1], "ls")["models"]
        assert [(m["id"], m["complete"], m["path"]) for m in listed] == [(mid, True, fetched["path"])]
        info = model_json(homes[1], "info", mid[:12])
        assert (info["name"], info["version"], info["license"]) == ("prsm/tiny", "1.0.0", "MIT")
        assert info["metadata"] == {"architecture": {"name": "tiny", "layers": 1}}
        assert info["publisher"] == pub["publisher"] and info["chunks_present"] == pub["chunks"]

        # Without --json: a summary on stdout; everything is here already, nothing is fetched.
        again = cli("model", "fetch", mid, "--home", homes[1], timeout=60)
        assert again.returncode == 0, again.stderr
        assert f"0 chunks fetched, {pub['chunks']} already here" in again.stdout
        assert "prsm/tiny" in cli("model", "ls", "--home", homes[1]).stdout

        # A local model is also named by NAME (its latest version here) or NAME:VERSION.
        assert model_json(homes[1], "info", "prsm/tiny")["id"] == mid
        removed = model_json(homes[1], "rm", "prsm/tiny:1.0.0")
        assert removed["id"] == mid
        assert removed["removed"] and removed["freed_bytes"] > 0
        assert model_json(homes[1], "ls")["models"] == []
        assert not Path(fetched["path"]).exists()

        unknown = "ab" * 32
        for args, message in [
            (("info", unknown), "no local model"),
            (("info", "prsm/tiny:2.0"), "no local model prsm/tiny:2.0"),
            (("rm", "abcd"), "at least 8"),
            (("fetch", unknown), "no peer serves manifest"),
            (("fetch", "no such name!"), "not a model id"),
        ]:
            result = cli("model", *args, "--home", homes[2], "--json", timeout=60)
            assert result.returncode == 1 and message in result.stderr, (args, result.stderr)
