"""Every command in the README parses with the real CLI, and every script it names exists."""

import re
import shlex
from pathlib import Path

import pytest

from tokentune.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _commands(prefix: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith(prefix)]


@pytest.mark.parametrize("line", _commands("tokentune "))
def test_tokentune_commands_parse(line):
    build_parser().parse_args(shlex.split(line)[1:])


def test_torchrun_line_uses_the_cli_module():
    (line,) = _commands("torchrun ")
    args = shlex.split(line)
    assert args[args.index("-m") + 1] == "tokentune.cli"
    build_parser().parse_args(args[args.index("-m") + 2:])


def test_scripts_exist_and_ci_calls_the_test_command():
    for line in _commands("bash "):
        assert (ROOT / shlex.split(line)[1]).is_file(), line
    assert "bash scripts/test.sh" in _commands("bash ")
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
