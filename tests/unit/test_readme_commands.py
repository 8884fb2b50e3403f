"""Every ``persona …`` command the README shows parses as written (``--print_config``: no model loads).

A user pastes these lines; a documented flag or form the parser refuses (e.g. ``persona study -c`` before
``-c`` existed there) fails here instead of on their machine.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from persona.cli import main

README = Path(__file__).resolve().parents[2] / "README.md"
# Inline spans written as notation, not as a command to paste: placeholders, alternatives, an error's shape.
NOTATION = ("<", "[", "…", " / ", "error:")


def command_lines(text: str) -> list[str]:
    """``persona …`` commands of the README's code blocks (continuations joined, comments cut) and of its
    inline code spans that are written as commands."""
    found = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if not line.startswith("#") and (match := re.search(r"(?:^|\s)(persona\s.*)$", line)):
                found.append(match.group(1))
    for span in re.findall(r"`(persona [^`]+)`", text):
        if not any(mark in span for mark in NOTATION):
            found.append(" ".join(span.split()))
    return list(dict.fromkeys(found))


def test_the_readme_shows_the_commands_this_test_reads():
    lines = command_lines(README.read_text(encoding="utf-8"))
    assert "persona study -c configs/study/qwen2.5-7b-instruct.yaml" in lines
    assert any(line.startswith("persona fit -c") for line in lines)
    assert len(lines) >= 15


def test_notation_spans_are_not_read_as_commands():
    text = "Run `persona traits [list | new]` or `persona <command> --help`; `persona demo --quick`.\n"
    assert command_lines(text) == ["persona demo --quick"]


@pytest.mark.parametrize("line", command_lines(README.read_text(encoding="utf-8")))
def test_readme_command_parses_as_written(line, capsys):
    argv = [token for token in shlex.split(line)[1:] if token != "..."]
    if argv == ["--help"]:
        assert main(argv) == 0
        return
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--print_config"])
    captured = capsys.readouterr()
    assert stop.value.code in (0, None), f"{line!r} was refused:\n{captured.err}"
    assert captured.out.strip(), f"{line!r} printed no config"
