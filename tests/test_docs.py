"""The documentation against the code: every `lverse ...` command line in README.md and docs/*.md
parses with the CLI's own parser, every relative link points to a file of the repository, and
every repository path the text names in code spans exists. So a renamed flag, a moved file or a
dropped command fails here, not in a user's terminal.

Command lines are taken from fenced code blocks (a line, its backslash continuations joined, from
the word ``lverse``, a path ending in ``/lverse`` or ``-m lverse.cli`` on; also inside a quoted
argument, as ``ray exec CFG "lverse ..."`` and ``--command "lverse ..."`` carry them) and from
inline code spans that start with ``lverse``, a command's name and an argument (a span naming
only the command, `lverse train`, is a name in a sentence). Optional parts written in
brackets (``[--ray-address auto]``) are parsed as given. Placeholder values (RUN_DIR, CONFIG.yaml)
are fine wherever the option takes any string; an option that must name an existing file is
checked for paths inside the repository (configs/...) and accepts anything else, since a guide's
example names the user's files.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import re
import shlex

import pytest

from lverse import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
# Top-level folders of the repository: a path in the text starting with one of them is the
# repository's and must exist.
REPO_DIRS = ("configs", "ds_configs", "benchmarks", "tests", "pipeline", "core", "runtime", "model", "preprocessing",
             "slurm", "lverse", "tools", "docs")
SHELL_OPERATORS = {"|", "||", "&&", ";", ">", ">>", "<", "2>", "&"}


def _text(doc: str) -> str:
    with open(os.path.join(ROOT, doc)) as f:
        return f.read()


def _fenced_blocks(text: str, shell_only: bool = False) -> list[str]:
    """The fenced code blocks; with ``shell_only``, not those marked as another language (python)."""
    blocks = re.findall(r"^```([^\n]*)\n(.*?)^```", text, flags=re.S | re.M)
    return [body for lang, body in blocks if not shell_only or lang.strip() in ("", "sh", "bash", "shell")]


def _inline_spans(text: str) -> list[str]:
    outside = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    return re.findall(r"`([^`\n]+)`", outside)


def _lverse_argv(words: list[str]) -> list[list[str]]:
    """The argv of each lverse invocation in one shell command line's words (nested in quoted
    arguments too)."""
    found = []
    for i, word in enumerate(words):
        if word == "lverse" or word.endswith("/lverse") or (
                word == "lverse.cli" and i > 0 and words[i - 1] in ("-m", "--module")):
            argv = []
            for rest in words[i + 1:]:
                if rest in SHELL_OPERATORS:
                    break
                argv.append(rest)
            found.append(argv)
        elif " " in word and "lverse" in word:
            found += _lverse_argv(shlex.split(word))
    return found


def _block_commands(block: str) -> list[str]:
    """The shell lines of a fenced block that run lverse, continuations joined."""
    lines, current = [], ""
    for line in block.splitlines():
        current += line
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        lines.append(current)
        current = ""
    return [line for line in lines + [current] if _runs_lverse(line)]


def _runs_lverse(line: str) -> bool:
    try:
        return bool(_lverse_argv(shlex.split(line, comments=True)))
    except ValueError:  # not a shell line (unbalanced quotes)
        return False


def command_lines() -> list[tuple[str, str, bool]]:
    """(document, command line, whole) for every lverse command line of the documentation; whole:
    from a code block, so a complete command (an inline span may show only the options it is
    about, `lverse encode --executor ray`)."""
    found = []
    for doc in DOCS:
        text = _text(doc)
        for block in _fenced_blocks(text, shell_only=True):
            found += [(doc, line.strip(), True) for line in _block_commands(block)]
        for span in _inline_spans(text):
            words = span.replace("[", " ").replace("]", " ").split()
            if len(words) > 1 and words[0] == "lverse":
                named = next((i for i, w in enumerate(words) if w in cli.COMMANDS), None)
                if named is not None and named + 1 < len(words):
                    found.append((doc, span, False))
    return found


def _repo_file_or_any(path: str) -> str:
    """--config and the other options that name a file: a path into the repository must exist."""
    if path.split("/")[0] in REPO_DIRS and not os.path.exists(os.path.join(ROOT, path)):
        raise cli.argparse.ArgumentTypeError(f"{path} is not a file of the repository")
    return path


PLACEHOLDER = re.compile(r"^([A-Z][A-Z0-9_]*|[a-z])$")  # N, SPEC, i: a value the reader fills in


def _fill_placeholders(parser, argv: list[str]) -> list[str]:
    """A placeholder given to an option that takes a number or a choice becomes one it takes."""
    sub = next(a for a in parser._actions if a.dest == "subcommand").choices[argv[0]] if argv else None
    actions = {o: a for a in (sub._actions if sub else []) for o in a.option_strings}
    filled = list(argv)
    for i in range(1, len(argv)):
        action = actions.get(argv[i - 1])
        if action is None or not PLACEHOLDER.match(argv[i]) or action.nargs == 0:
            continue
        if action.choices:
            filled[i] = str(list(action.choices)[0])
        elif action.type in (int, float, cli._positive):
            filled[i] = "1"
    return filled


def parse(line: str, whole: bool = True) -> None:
    """Parse one documented command line as `lverse` would; fail with argparse's own message.
    Not ``whole`` (an inline fragment): required options it leaves out are no failure."""
    words = shlex.split(line.replace("[", " ").replace("]", " "), comments=True)
    invocations = _lverse_argv(words)
    assert invocations, f"no lverse command found in {line!r}"
    for argv in invocations:
        named = [w for w in argv if w in cli.COMMANDS]
        assert named, f"{line!r}: no lverse command named (one of {', '.join(cli.COMMANDS)})"
        err = io.StringIO()
        parser = cli.build_parser(named[0])
        start = argv.index(named[0])
        argv = argv[:start] + _fill_placeholders(parser, argv[start:])
        with contextlib.redirect_stderr(err):
            try:
                parser.parse_args(argv)
            except SystemExit as e:
                if e.code and (whole or "arguments are required" not in err.getvalue()):
                    pytest.fail(f"{line!r} does not parse: {err.getvalue().strip()}")


def test_the_documentation_has_command_lines_to_check():
    lines = command_lines()
    assert len(lines) >= 40, lines  # a change in how they are found would otherwise pass in silence
    assert {doc for doc, _, _ in lines} >= {"README.md", "docs/slurm.md", "docs/ray.md", "docs/training.md"}


def test_every_documented_lverse_command_parses(monkeypatch):
    monkeypatch.setattr(cli, "_existing_file", _repo_file_or_any)
    failures = []
    for doc, line, whole in command_lines():
        try:
            parse(line, whole)
        except BaseException as e:  # noqa: BLE001 - every failure is listed, then the test fails
            failures.append(f"{doc}: {e}")
    assert not failures, "\n".join(failures)


def test_a_wrong_flag_is_caught(monkeypatch):
    monkeypatch.setattr(cli, "_existing_file", _repo_file_or_any)
    parse("lverse encode --shards s --vae v.safetensors --output o --executor ray")
    for wrong in ("lverse encode --shards s --vae v --output o --executer ray",
                  "lverse train --config configs/no_such.yaml",
                  "lverse slurm submit tokenizer --config c.yaml"):
        with pytest.raises(pytest.fail.Exception):
            parse(wrong)


def test_relative_links_point_to_files():
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", _text(doc)):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), target.split("#")[0]))
            if not os.path.exists(path):
                broken.append(f"{doc}: {target}")
    assert not broken, broken


def test_repository_paths_named_in_the_text_exist():
    missing = []
    for doc in DOCS:
        for span in _inline_spans(_text(doc)) + [w for b in _fenced_blocks(_text(doc)) for w in b.split()]:
            for word in span.split():
                word = word.strip("`'\",;:()")
                if word.split("/")[0] not in REPO_DIRS or "/" not in word or re.search(r"[A-Z]{3,}", word):
                    continue
                if not glob.glob(os.path.join(ROOT, word)):
                    missing.append(f"{doc}: {word}")
    assert not missing, sorted(set(missing))


def test_no_document_points_outside_the_repository():
    for doc in DOCS:
        text = _text(doc)
        assert "../shared" not in text and "/work/" not in text, doc
