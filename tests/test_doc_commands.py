"""Every command line the docs show uses flags that exist: each ``jobs/X.py``, ``bench/X.py`` and
``bench/gpu.sh`` command in README.md, docs/*.md, bench/README.md and infra/README.md (fenced
blocks and inline code) is checked against the script's real argparse parser (``build_parser()``), flag by flag,
spelled out in full; and an inline ```--flag``` named alone in the prose must be a flag of some
job or benchmark (or of a tool listed in :data:`OTHER_TOOLS_FLAGS`)."""

from __future__ import annotations

import argparse
import functools
import importlib.util
import re
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCS = [
    REPO / "README.md",
    *sorted((REPO / "docs").glob("*.md")),
    REPO / "bench" / "README.md",
    REPO / "infra" / "README.md",
]
#: A script command (``jobs/X.py``, one capital letter, is a placeholder).
SCRIPT = re.compile(r"(?<![\w./-])(?:\./)?(?P<dir>jobs|bench)/(?P<name>(?![A-Z]\.)\w+)\.(?P<ext>py|sh)\b")
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
FENCE = re.compile(r"^[ \t]*```(\w*)[^\n]*\n(.*?)^[ \t]*```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
#: Where a command line ends: a comment, a pipe, a list of commands, a redirect.
END = re.compile(r"\s#|\s\|\s|&&|;|\s>")
QUOTED = re.compile(r"\"[^\"]*\"|'[^']*'")
#: Flags of other programs the docs name alone in inline code (ray, pytest, pip, uv, kubectl...).
OTHER_TOOLS_FLAGS = {
    "--run-slow",
    "--working-dir",
    "--address",
    "--head",
    "--help",
    "--runtime-env-json",
    "--build-arg",
}


@functools.cache
def parser_of(script: str) -> argparse.ArgumentParser | None:
    """The real parser of ``jobs/X.py`` or ``bench/X.py`` (``bench/gpu.sh`` passes its flags to
    ``bench/gpu.py``); None for a module without one (``bench/procstat.py``)."""
    path = REPO / script.replace("gpu.sh", "gpu.py")
    assert path.is_file(), f"{script} does not exist"
    spec = importlib.util.spec_from_file_location(f"_doc_cmd_{path.parent.name}_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.build_parser() if hasattr(module, "build_parser") else None


def commands(text: str) -> list[tuple[int, str, list[str]]]:
    """(line, script, flags) of every script command in the fenced blocks and inline code of a
    Markdown text (shell line continuations joined)."""
    spans: list[tuple[int, str]] = []
    for m in FENCE.finditer(text):
        if m.group(1).lower() not in ("python", "py", "yaml", "yml", "json"):
            line = text[: m.start(2)].count("\n") + 1
            for i, ln in enumerate(m.group(2).split("\n")):
                if spans and spans[-1][1].endswith("\\"):  # a continuation: joined to its command
                    spans[-1] = (spans[-1][0], spans[-1][1][:-1] + " " + ln)
                else:
                    spans.append((line + i, ln))
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for m in INLINE.finditer(prose):
        spans.append((prose[: m.start()].count("\n") + 1, m.group(1)))
    out = []
    for line, span in spans:
        hits = list(SCRIPT.finditer(span))
        for i, m in enumerate(hits):
            rest = span[m.end() : hits[i + 1].start() if i + 1 < len(hits) else len(span)]
            cut = END.search(rest)
            rest = rest[: cut.start()] if cut else rest
            rest = QUOTED.sub("", rest)  # a quoted value holds another program's flags
            out.append((line, m.group(0).removeprefix("./"), FLAG.findall(rest)))
    return out


def lone_flags(text: str) -> list[tuple[int, str]]:
    """(line, flag) of inline code in the prose that is a flag alone (``--x`` or ``--x value``)."""
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return [
        (prose[: m.start()].count("\n") + 1, m.group(1))
        for m in re.finditer(r"`(--[A-Za-z][\w-]*)(?:[ =][^`\n]*)?`", prose)
    ]


def all_flags() -> set[str]:
    scripts = [f"jobs/{p.name}" for p in (REPO / "jobs").glob("*.py")]
    scripts += [f"bench/{p.name}" for p in (REPO / "bench").glob("*.py")]
    return {f for s in scripts if (p := parser_of(s)) for f in p._option_string_actions}


def unknown(script: str, flags: list[str]) -> list[str]:
    parser = parser_of(script)
    known = set(parser._option_string_actions) if parser else set()
    return [f for f in flags if f not in known]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_documented_command_uses_real_flags(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    bad = [f"{doc.name}:{line}: {script} has no {f}" for line, script, flags in commands(text)
           for f in unknown(script, flags)]  # fmt: skip
    assert bad == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_flag_named_alone_exists(doc: Path) -> None:
    known = all_flags() | OTHER_TOOLS_FLAGS
    bad = [f"{doc.name}:{line}: {flag}" for line, flag in lone_flags(doc.read_text(encoding="utf-8"))
           if flag not in known]  # fmt: skip
    assert bad == []


def test_the_check_finds_a_flag_that_does_not_exist() -> None:
    text = (
        "Run `python jobs/embed_catalog.py --catalog c.csv --output s --no-such-flag 3`, or\n\n"
        "```bash\npython bench/decode_formats.py --quick \\\n    --variants  # a comment --ignored\n"
        "bash bench/gpu.sh --no-compile --bogus --json-args '--not-this' && ls --color\n```\n"
    )
    found = commands(text)
    assert found == [
        (4, "bench/decode_formats.py", ["--quick", "--variants"]),
        (6, "bench/gpu.sh", ["--no-compile", "--bogus", "--json-args"]),
        (1, "jobs/embed_catalog.py", ["--catalog", "--output", "--no-such-flag"]),
    ]
    assert [unknown(s, f) for _, s, f in found] == [
        ["--variants"],
        ["--bogus", "--json-args"],
        ["--no-such-flag"],
    ]
    assert lone_flags("the `--variants` runs and `--precision auto`") == [
        (1, "--variants"),
        (1, "--precision"),
    ]
    assert "--variants" not in all_flags() and "--no-variants" in all_flags()
    assert commands("see tests/jobs/test_embed_job.py and `bench/procstat.py`") == [
        (1, "bench/procstat.py", [])
    ]
    assert commands("`python jobs/X.py --any`") == []  # a placeholder
