"""Every command in the README's and docs' shell blocks names things that exist.

Each ``esmsearch ...`` line in a fenced ``bash``/``sh`` block is parsed by the CLI's own
argument parser (a renamed flag or subcommand fails here), ``python -m esmsearch.X`` by
that module's parser, and ``python benchmarks/X.py`` / ``bash scripts/X.sh`` must name
an existing file. Running them is the job of ``scripts/demo.sh``, the tests of each
command and the benchmarks named next to them; this test keeps the documentation from
drifting away from the code.
"""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest

from esmsearch import cli

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
HEREDOC = re.compile(r"<<-?\s*'?\"?(\w+)'?\"?")


def shell_commands(text: str) -> Iterator[tuple[int, str]]:
    """(line number, command) of every command in the bash/sh blocks of ``text``:
    continuations joined, comments and heredoc bodies dropped, ``&&``/``;``/``|`` split."""
    lines = text.splitlines()
    i, inside, in_block, heredoc_end = 0, False, False, None
    while i < len(lines):
        line = lines[i]
        fence = FENCE.match(line.strip())
        if fence and heredoc_end is None:
            inside = not inside
            in_block = inside and fence.group(1) in ("bash", "sh", "shell")
            i += 1
            continue
        if not in_block:
            i += 1
            continue
        if heredoc_end is not None:
            if line.strip() == heredoc_end:
                heredoc_end = None
            i += 1
            continue
        start = i
        while line.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line.rstrip()[:-1] + " " + lines[i].strip()
        i += 1
        doc = HEREDOC.search(line)
        if doc:
            heredoc_end = doc.group(1)
            line = line[: doc.start()]
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        command: list[str] = []
        for w in [*words, ";"]:
            if w in ("&&", "||", ";", "|", "&") or w.endswith(";"):
                if w.endswith(";") and w != ";":
                    command.append(w[:-1])
                if command:
                    yield start + 1, shlex.join(command)
                command = []
            else:
                command.append(w)


def _all_commands() -> list[tuple[str, str]]:
    out = []
    for page in PAGES:
        for lineno, cmd in shell_commands(page.read_text(encoding="utf-8")):
            out.append((f"{page.relative_to(REPO)}:{lineno}", cmd))
    return out


COMMANDS = _all_commands()


def _strip_env(words: list[str]) -> list[str]:
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        words = words[1:]
    return words


def _parse(parser: argparse.ArgumentParser, argv: list[str], where: str) -> None:
    try:
        parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code not in (0, None):
            pytest.fail(f"{where}: {shlex.join(argv)!r} is not a valid command line")


def test_the_pages_have_commands_to_check() -> None:
    esm = [c for _, c in COMMANDS if c.startswith("esmsearch ")]
    assert len(esm) >= 20, esm  # the extraction itself works on the pages as written
    subcommands = {shlex.split(c)[1] for c in esm}
    assert {"index", "serve", "search", "easy-search"} <= subcommands


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_parses(where: str, command: str) -> None:
    words = _strip_env(shlex.split(command))
    if not words:
        return
    if words[0] == "esmsearch":
        _parse(cli.build_parser(), words[1:], where)
    elif words[:3] == ["python", "-m", "esmsearch.checkpoints"] or words[:3] == [
        "python",
        "-m",
        "esmsearch.hf_convert",
    ]:
        module = __import__(words[2], fromlist=["main"])
        with mock.patch.object(argparse.ArgumentParser, "exit", side_effect=SystemExit):
            captured: dict[str, argparse.Namespace] = {}
            real = argparse.ArgumentParser.parse_args

            def parse_only(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
                captured["ns"] = real(self, args, namespace)
                raise SystemExit(0)

            with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_only):
                try:
                    module.main(words[3:])
                except SystemExit as exc:
                    if exc.code not in (0, None):
                        pytest.fail(f"{where}: {command!r} is not a valid command line")
        assert "ns" in captured or "--help" in words
    elif words[0] in ("python", "bash") and len(words) > 1 and words[1].startswith(("benchmarks/", "scripts/")):
        assert (REPO / words[1]).is_file(), f"{where}: {words[1]} does not exist"
    elif words[0].startswith(("benchmarks/", "scripts/", ".ci/")):
        assert (REPO / words[0]).is_file(), f"{where}: {words[0]} does not exist"


def test_a_renamed_flag_would_fail() -> None:
    """The check above catches a documented flag the parser no longer has."""
    with pytest.raises(pytest.fail.Exception):
        _parse(cli.build_parser(), ["search", "q.fasta", "--no-such-flag"], "self-test")
