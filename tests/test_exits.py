"""The exit-code table is written once (pipeline/exits.py); README.md and the jobs' --help repeat it."""

from __future__ import annotations

import re

import pytest

from pipeline.commands.runs import embed_parser, refresh_parser
from pipeline.exits import EXIT_CODES, exit_codes_help
from tests.conftest import REPO


def readme_table() -> list[tuple[int, str]]:
    text = (REPO / "README.md").read_text()
    section = text.split("### Exit codes", 1)[1].split("\n#", 1)[0]
    return [
        (int(m.group(1)), m.group(2).strip()) for m in re.finditer(r"^\| (\d+) \| (.+?) \|$", section, re.M)
    ]


def test_readme_states_the_exit_codes_of_pipeline_exits() -> None:
    assert readme_table() == list(EXIT_CODES)


@pytest.mark.parametrize("parser", [embed_parser, refresh_parser])
def test_each_jobs_help_repeats_the_table(parser) -> None:
    text = " ".join(parser().format_help().split())
    assert " ".join(exit_codes_help().split()) in text
    for code, meaning in EXIT_CODES:
        assert f"{code} {meaning}" in text
