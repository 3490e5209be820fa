"""Regenerate node.example.toml from the config definitions (tests check it is current)."""

from pathlib import Path

from prsm_node.config import render_example

Path(__file__).resolve().parent.parent.joinpath("node.example.toml").write_text(render_example())
