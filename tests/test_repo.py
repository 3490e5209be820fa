"""The repository keeps its promises: .ci/run is the README's test command."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = text.split("```")[1::2]
    return [b.split("\n", 1)[1].strip() for b in blocks[:2]]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    run_cmd, test_cmd = _readme_commands()
    ci_lines = [
        ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln and not ln.startswith(("#", "set ", "cd "))
    ]
    assert ci_lines == [test_cmd]
    assert "prsm-node" in run_cmd
