"""Every knob has one default, in its job's settings dataclass.

Walks every flag of every job's real parser (``jobs/X.py``'s ``build_parser()``) and fails when
a default is written twice: a flag that sets a settings field with a default of its own (not the
field's), a help text that states another default than the one the flag has, a parser without its
job's settings dataclass, a second ``--storage-options`` parser, or a job entry point outside the
``<job>_main(argv)`` naming scheme."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import re
from typing import Any

import pytest

from pipeline.cli import setting_default, show_default, storage_options_arg
from tests.conftest import REPO

JOBS = sorted(p.stem for p in (REPO / "jobs").glob("*.py"))
#: ``(default X)`` / ``(default: X)`` / ``default X`` at the end of a help text's clause.
STATED = re.compile(r"\(default:? ([^)]*)\)|[;(,] default:? ([^;)]*)")
#: Defaults that are argparse's "not given": the settings field's default applies.
UNSET = (None, argparse.SUPPRESS)
#: Flags with a literal default that set no job setting: how the command prints or logs, not
#: what it computes. Each is (job, dest): reason.
NOT_SETTINGS = {
    ("embed_catalog", "log_format"): "how log lines are printed",
    ("refresh_catalog", "log_format"): "how log lines are printed",
    ("embed_catalog", "demo_dir"): "where the offline --demo writes, not a setting of the job",
    ("evaluate", "mode"): "which run the command makes (probe or finetune), not a knob of one",
}


def _module(job: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"jobs_{job}", REPO / "jobs" / f"{job}.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _parser(job: str) -> argparse.ArgumentParser:
    return _module(job).build_parser()


def _flags(p: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in p._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def _fields(p: argparse.ArgumentParser) -> dict[str, type]:
    return {f.name: cls for cls in getattr(p, "settings", ()) for f in dataclasses.fields(cls)}


def _has_default(cls: type, name: str) -> bool:
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _same(stated: str, value: Any) -> bool:
    """Whether a help text's stated default names ``value`` (``1e-3`` for 0.001, ``./x`` for x)."""
    word = stated.split()[0].rstrip(",;") if stated.split() else stated
    if word in (show_default(value), str(value)) or word.removeprefix("./") == str(value):
        return True
    try:
        return float(word) == float(value)
    except (TypeError, ValueError):
        return False


def _expected(action: argparse.Action) -> Any:
    cls, name, scale = action.setting  # type: ignore[attr-defined]
    value = setting_default(cls, name)
    return scale(value) if scale else value


def _stated(help_text: str | None) -> list[str]:
    return [(m.group(1) or m.group(2)).strip() for m in STATED.finditer(help_text or "")]


@pytest.mark.parametrize("job", JOBS)
def test_each_job_has_its_settings_dataclass(job: str) -> None:
    """The parser names its settings dataclass(es), frozen, each field with a default or required."""
    p = _parser(job)
    classes = getattr(p, "settings", None)
    assert classes is not None, f"{job}: the parser does not name its settings dataclass"
    for cls in classes:
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, f"{job}: {cls} not frozen"


def second_defaults(job: str, p: argparse.ArgumentParser) -> list[str]:
    """Each flag of ``p`` whose default is written a second time, with why."""
    fields = _fields(p)
    bad = []
    for a in _flags(p):
        flag = a.option_strings[-1]
        if hasattr(a, "setting"):
            want = _expected(a)
            same = a.default is want or (a.default == want and not isinstance(want, (int, float, str)))
            scaled = a.setting[2] is not None and a.default == want  # type: ignore[attr-defined]
            if a.default not in UNSET and not (same or scaled):
                bad.append(f"{flag}: parser default {a.default!r} is not the field's {want!r}")
            for s in _stated(a.help):
                if s != show_default(want) and not (want in (None, ()) or isinstance(want, bool)):
                    bad.append(f"{flag}: help says default {s!r}, the field's is {show_default(want)!r}")
            continue
        if a.dest in fields and _has_default(fields[a.dest], a.dest):
            want = setting_default(fields[a.dest], a.dest)
            trivial = a.default in UNSET or (a.default is False and want is False)
            if not trivial:
                bad.append(
                    f"{flag}: sets {fields[a.dest].__name__}.{a.dest} but spells its own default {a.default!r}"
                )
            continue
        if a.default in UNSET or a.default is False or a.default == [] or (job, a.dest) in NOT_SETTINGS:
            continue
        if isinstance(a, argparse._StoreFalseAction) and a.default is True:
            continue
        bad.append(f"{flag}: default {a.default!r} written in the parser, not in a settings field")
    return bad


@pytest.mark.parametrize("job", JOBS)
def test_a_flag_of_a_setting_takes_the_fields_default(job: str) -> None:
    bad = second_defaults(job, _parser(job))
    assert not bad, f"{job}: " + "; ".join(bad)


@pytest.mark.parametrize("job", JOBS)
def test_help_states_the_default_the_flag_has(job: str) -> None:
    """A flag with a literal default (no settings field) may not state another one in its help."""
    p = _parser(job)
    bad = []
    for a in _flags(p):
        if hasattr(a, "setting") or a.default in UNSET or isinstance(a.default, bool):
            continue
        for s in _stated(a.help):
            if not _same(s, a.default):
                bad.append(f"{a.option_strings[-1]}: help says {s!r}, the parser has {a.default!r}")
    assert not bad, f"{job}: " + "; ".join(bad)


@pytest.mark.parametrize("job", JOBS)
def test_storage_options_are_parsed_in_one_place(job: str) -> None:
    for a in _flags(_parser(job)):
        if "--storage-options" in a.option_strings:
            assert a.type is storage_options_arg, f"{job}: --storage-options parsed by {a.type}"
            assert a.default is None


@pytest.mark.parametrize("job", JOBS)
def test_entry_points_follow_one_naming_scheme(job: str) -> None:
    """``jobs/X.py``'s ``main`` is a ``<name>_main(argv)`` of the package (or a one-line call of one)."""
    mod = _module(job)
    main = mod.main
    if main.__module__.startswith("jobs_"):
        src = (REPO / "jobs" / f"{job}.py").read_text()
        called = re.search(r"return (\w+)\(argv\)", src)
        assert called, f"jobs/{job}.py: main does not call an entry point"
        main = getattr(mod, called.group(1))
    assert main.__name__.endswith("_main"), f"jobs/{job}.py: entry point {main.__name__}"
    assert main.__module__.startswith("pipeline."), main.__module__
    assert list(__import__("inspect").signature(main).parameters)[0] == "argv"


def test_the_checker_catches_a_second_default() -> None:
    """The walk above fails on a parser that spells a setting's default itself."""
    from pipeline.cli import OneLineParser, add_setting
    from pipeline.runs.settings import RefreshJob

    p = OneLineParser(prog="x", settings=(RefreshJob,))
    add_setting(p, "--chunk-size", settings=RefreshJob, type=int, help="tracks per commit")
    p.add_argument("--lookup-threads", type=int, default=32, help="lookups (default 32)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    lying = add_setting(p, "--lock-wait-s", settings=RefreshJob, type=float, stated=False, help="(default 5)")
    assert p.get_default("chunk_size") is RefreshJob.chunk_size
    assert _stated(p._option_string_actions["--chunk-size"].help) == [show_default(RefreshJob.chunk_size)]
    assert second_defaults("x", p) == [
        "--lookup-threads: sets RefreshJob.lookup_threads but spells its own default 32",
        "--port: default 8000 written in the parser, not in a settings field",
        "--lock-wait-s: help says default '5', the field's is '0'",
    ]
    assert lying.default is RefreshJob.lock_wait_s
    with pytest.raises(ValueError, match="takes its default from the field"):
        add_setting(p, "--retention-days", settings=RefreshJob, type=float, default=3.0)
