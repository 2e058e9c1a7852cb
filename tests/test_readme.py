"""The README and docs/ cannot drift from the code: every command they show parses with the parser that runs it.

Fast: nothing is trained, no Ray instance starts and nothing touches the network. Each command line of a ```bash,
```sh or ```console block, in README.md and in every page under docs/ (guides, reference, results, design), is
checked by the parser of the program it names (`anodfd`, `tune/search.py`, `cluster/submit.py`, the benchmarks), by
the Makefile (`make X`), or is skipped on purpose (SKIP). Any other command fails, so a new kind of command cannot
slip into the docs unchecked. Also checked: the README stays a user's guide (at most 300 lines, none over 200
characters, no first person), relative links and #anchors resolve, every docs page is listed in docs/README.md, the
tests the docs name exist, and docs/reference/ is what the parsers print now (`make docs` rewrites it).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import inspect
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from anodfd.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").rglob("*.md"))]  # recursive: guides/, reference/, results/, design/
DOCS_INDEX = ROOT / "docs" / "README.md"
README_MAX_LINES = 300
README_MAX_LINE_CHARS = 200
SHELL_LANGS = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^\s*```\s*([\w+-]*)")

# Commands shown but not checked, and why. They need a cloud account, a cluster or a running service (or only set up
# the shell), so there is nothing local to parse them with.
SKIP = {
    "aws": "needs an AWS account",
    "ray": "the Ray CLI acts on a running cluster (ray up, ray dashboard, ray job ...)",
    "kubectl": "needs a Kubernetes cluster",
    "docker": "needs a Docker daemon and a registry",
    "mlflow": "starts an MLflow server or UI (a service)",
    "curl": "talks to a running server",
    "printf": "writes a request body for the curl call after it",
    "pip": "talks to a package index",
    "git": "acts on the repository, not on anodfd",
    "sed": "prepares cluster files (the AWS IAM policies)",
    "cd": "shell set-up",
    "export": "shell set-up (tokens, URIs for a cluster)",
    "open": "opens a browser",
    "for": "shell loop syntax around skipped cloud commands",
    "do": "shell loop syntax",
    "done": "shell loop syntax",
}
CHAIN = {"&&", "||", ";", "|", "&"}
REDIRECT = re.compile(r"^\d*>>?(.*)$")
ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
FIRST_PERSON = re.compile(r"\b(I|we|We|my|our|Our|me)\b")


@dataclass(frozen=True)
class Command:
    path: Path
    line: int
    text: str
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}: {self.text}"


def code_blocks(path: Path) -> list[tuple[str, list[tuple[int, str]]]]:
    """(language, [(line number, line)]) of every fenced block of a Markdown file."""
    blocks, current, lang = [], None, ""
    for n, line in enumerate(path.read_text().splitlines(), 1):
        m = FENCE.match(line)
        if m and current is None:
            current, lang = [], m.group(1).lower()
        elif line.strip().startswith("```") and current is not None:
            blocks.append((lang, current))
            current = None
        elif current is not None:
            current.append((n, line))
    assert current is None, f"{path.name}: a code block is never closed"
    return blocks


def split_commands(text: str) -> list[list[str]]:
    """The simple commands of one shell line: comments, `$ ` prompts, redirections, $(...) and VAR= dropped."""
    text = re.sub(r"\$\([^()]*\)", "$SUBST", text)  # a command substitution is one opaque argument
    tokens = shlex.split(text, comments=True)
    commands, current = [], []
    for tok in tokens:
        if tok in CHAIN:
            commands.append(current)
            current = []
        elif tok.endswith(";") and tok != ";":
            current.append(tok[:-1])
            commands.append(current)
            current = []
        else:
            current.append(tok)
    commands.append(current)
    out = []
    for cmd in commands:
        argv, skip_next = [], False
        for tok in cmd:
            if skip_next:
                skip_next = False
            elif m := REDIRECT.match(tok):
                skip_next = not m.group(1)  # `> file` takes the next token; `>file` does not
            else:
                argv.append(tok)
        while argv and ASSIGN.match(argv[0]):  # GPUS=0 bash ...
            argv.pop(0)
        if argv:
            out.append(argv)
    return out


def commands(path: Path) -> list[Command]:
    found = []
    for lang, lines in code_blocks(path):
        if lang not in SHELL_LANGS:
            continue
        joined: list[tuple[int, str]] = []
        start, buf = None, ""
        for n, line in lines:
            if start is None:
                start = n
            stripped = line.rstrip()
            if stripped.endswith("\\"):
                buf += stripped[:-1] + " "
                continue
            buf += stripped
            joined.append((start, buf))
            start, buf = None, ""
        if buf:
            joined.append((start, buf))
        for n, line in joined:
            line = line.strip()
            line = line.removeprefix("$ ")
            if not line or line.startswith("#"):
                continue
            for argv in split_commands(line):
                text = " ".join(argv)
                found.append(Command(path, n, text, tuple(argv)))
    return found


ALL = [c for p in DOCS for c in commands(p)]


@functools.cache
def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class _Parsed(Exception):
    """Raised in place of running a benchmark once its arguments parsed."""


def parse_or_fail(parse, args: list[str], cmd: Command) -> object:
    try:
        return parse(args)
    except SystemExit as e:
        pytest.fail(f"{cmd}\n  does not parse (argparse exit {e.code}); fix the command or the parser")


def check_anodfd(args: list[str], cmd: Command) -> None:
    parse_or_fail(build_parser().parse_args, args, cmd)


def check_search(args: list[str], cmd: Command) -> None:
    search = load(ROOT / "tune" / "search.py", "anodfd_readme_search")
    parse_or_fail(search.parse_args, args, cmd)


def check_submit(args: list[str], cmd: Command) -> None:
    submit = load(ROOT / "cluster" / "submit.py", "anodfd_readme_submit")
    options, job_flags = parse_or_fail(submit.parse_args, args, cmd)
    # What submit.py does before it uploads anything: the job's flags through the job's own parser.
    parse_or_fail(submit.check_score_args if options.score else submit.check_search_args, job_flags, cmd)


def check_benchmark(script: Path, args: list[str], cmd: Command, monkeypatch) -> None:
    """The script exists; its arguments parse with its own parser. A script without a `parse_args(argv)` builds
    its parser inside `main()`: main runs up to its parse_args call, which parses and then stops it."""
    assert script.is_file(), f"{cmd}\n  {script.relative_to(ROOT)} does not exist"
    if script.suffix != ".py":
        return
    module = load(script, f"anodfd_readme_{script.stem}")
    if hasattr(module, "parse_args"):
        parse_or_fail(module.parse_args, args, cmd)
        return
    assert hasattr(module, "main"), f"{cmd}\n  {script.name} has neither parse_args(argv) nor main()"
    # Never run a benchmark for real: its main must build and parse its arguments itself.
    assert ".parse_args()" in inspect.getsource(module.main), f"{cmd}\n  give {script.name} a parse_args(argv)"
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, argv=None, namespace=None):
        real(self, argv, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    with pytest.raises(_Parsed):
        parse_or_fail(lambda _: module.main(), args, cmd)


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {t for m in re.finditer(r"^([A-Za-z0-9_.-]+(?:\s+[A-Za-z0-9_.-]+)*)\s*:(?!=)", text, re.MULTILINE)
            for t in m.group(1).split()}


@pytest.mark.parametrize("cmd", ALL, ids=[f"{c.path.relative_to(ROOT)}:{c.line} {c.text[:60]}" for c in ALL])
def test_command_parses(cmd: Command, monkeypatch) -> None:
    argv = list(cmd.argv)
    prog = argv[0]
    name = Path(prog).name
    if name in SKIP:
        pytest.skip(f"`{name}` {SKIP[name]}")
    if name == "anodfd":
        return check_anodfd(argv[1:], cmd)
    if name == "make":
        targets = make_targets()
        missing = [t for t in argv[1:] if not t.startswith("-") and t not in targets]
        assert argv[1:] and not missing, f"{cmd}\n  no Makefile target {missing or '(none given)'}"
        return
    if name in {"python", "python3"}:
        if argv[1:3] == ["-m", "anodfd"]:
            return check_anodfd(argv[3:], cmd)
        script = argv[1] if len(argv) > 1 else ""
        if script == "tune/search.py":
            return check_search(argv[2:], cmd)
        if script == "cluster/submit.py":
            return check_submit(argv[2:], cmd)
        if script.startswith("benchmarks/"):
            return check_benchmark(ROOT / script, argv[2:], cmd, monkeypatch)
    if name in {"bash", "sh"} and len(argv) > 1 and argv[1].startswith("benchmarks/"):
        return check_benchmark(ROOT / argv[1], argv[2:], cmd, monkeypatch)
    pytest.fail(f"{cmd}\n  no checker for `{prog}`: add one to tests/test_readme.py, or add `{name}` to SKIP with the "
                "reason it cannot be checked here")


def test_commands_found() -> None:
    readme = [c for c in ALL if c.path == README]
    assert len(readme) > 30, "the README's commands were not found: has the block syntax changed?"
    assert any(c.argv[0] == "anodfd" for c in readme) and any("tune/search.py" in c.argv for c in readme)


def test_first_block_is_make_demo_and_make_test() -> None:
    lang, lines = code_blocks(README)[0]
    assert lang in SHELL_LANGS
    first = [c.text for c in commands(README)][:2]
    body = [line for _, line in lines if line.strip() and not line.strip().startswith("#")]
    assert first == ["make demo", "make test"] and len(body) == 2, body


def prose(path: Path, code_spans: bool = False) -> list[tuple[int, str]]:
    """Lines outside fenced blocks, with inline code spans removed unless ``code_spans``."""
    inside, out = False, []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip().startswith("```"):
            inside = not inside
        elif not inside:
            out.append((n, line if code_spans else re.sub(r"`[^`]*`", "", line)))
    return out


def test_readme_has_no_first_person() -> None:
    hits = [f"README.md:{n}: {line.strip()}" for n, line in prose(README) if FIRST_PERSON.search(line)]
    assert not hits, "first person in the README (write neutral statements):\n" + "\n".join(hits)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"`", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings (repeats get -1, -2, ... as on GitHub)."""
    counts: dict[str, int] = {}
    out: set[str] = set()
    for _, line in prose(path, code_spans=True):
        if m := re.match(r"^#{1,6}\s+(.*)$", line):
            s = slug(m.group(1))
            n = counts.get(s, 0)
            out.add(s if n == 0 else f"{s}-{n}")
            counts[s] = n + 1
    return out


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_links_resolve(path: Path) -> None:
    """Relative links point at files that exist, and #anchors at headings that exist."""
    text = "\n".join(line for _, line in prose(path, code_spans=True))
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            bad.append(f"{target}: no file {dest.relative_to(ROOT)}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, f"{path.relative_to(ROOT)}:\n" + "\n".join(bad)


def test_readme_is_a_short_guide() -> None:
    """A user's guide, not a notebook: evidence goes to docs/design/, measurements to docs/results/."""
    lines = README.read_text().splitlines()
    long = [f"README.md:{n}: {len(line)} characters"
            for n, line in enumerate(lines, 1) if len(line) > README_MAX_LINE_CHARS]
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines, over {README_MAX_LINES}: move detail to a page under docs/ and link it")
    assert not long, f"README lines over {README_MAX_LINE_CHARS} characters (wrap them):\n" + "\n".join(long)


def test_every_docs_page_is_listed_in_the_index() -> None:
    """docs/README.md lists every page, so none is orphaned by a move."""
    text = "\n".join(line for _, line in prose(DOCS_INDEX, code_spans=True))
    linked = {(DOCS_INDEX.parent / t.partition("#")[0]).resolve() for t in re.findall(r"\]\(([^)\s]+)\)", text)}
    missing = [str(p.relative_to(ROOT)) for p in DOCS if p not in (README, DOCS_INDEX) and p.resolve() not in linked]
    assert not missing, "pages not listed in docs/README.md:\n" + "\n".join(missing)


def test_cli_reference_is_current() -> None:
    """docs/reference/*.md is the --help the parsers print now, regenerated here in memory (at a fixed width)."""
    generate = load(ROOT / "docs" / "reference" / "generate.py", "anodfd_readme_reference")
    stale = [str(path.relative_to(ROOT)) for path, text in generate.pages().items()
             if not path.is_file() or path.read_text() != text]
    assert not stale, f"out of date: {', '.join(stale)}; run `make docs` (python docs/reference/generate.py)"


def test_named_tests_exist() -> None:
    """A page that says `tests/test_x.py::test_name` holds a claim names a test that exists (a trailing * matches a
    prefix), so docs/design/tests.md cannot point at a renamed or deleted test."""
    bad = []
    for path in DOCS:
        for file, name in re.findall(r"(tests/test_\w+\.py)::(test_\w+\*?)", path.read_text()):
            source = (ROOT / file).read_text() if (ROOT / file).is_file() else ""
            pattern = rf"def {name[:-1]}\w*\(" if name.endswith("*") else rf"def {name}\("
            if not re.search(pattern, source):
                bad.append(f"{path.relative_to(ROOT)}: {file}::{name}")
    assert not bad, "tests named in the docs that do not exist:\n" + "\n".join(bad)
