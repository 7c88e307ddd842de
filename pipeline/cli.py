"""Command-line flags shared by the jobs, and the one-line error handling around them.

A flag that sets a field of a job's settings dataclass is added with :func:`add_setting`: its
default (and the ``(default X)`` of its help) is the field's own default, so every knob has one
default, in the settings dataclass (tests/commands/test_settings_defaults.py walks every job's flags)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (``prog: error: ...``) and exits 2.

    ``settings``: the job's settings dataclass(es); every flag that sets one of their fields
    takes its default from the field (:func:`add_setting`), checked by tests/commands/test_settings_defaults.py."""

    def __init__(self, *args: Any, settings: tuple[type, ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings = settings

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def setting_default(cls: type, name: str) -> Any:
    """The default of field ``name`` of the settings dataclass ``cls`` (the knob's one default)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise ValueError(f"{cls.__name__}.{name} has no default")


def show_default(value: Any) -> str:
    """A default as the help text states it: ``7,12`` for a tuple, ``0.5`` for a float."""
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def default_help(cls: type, name: str, text: str = "", *, scale: Callable[[Any], Any] | None = None) -> str:
    """``text`` followed by ``(default X)`` where X is the field's default (``scale`` converts it
    to the flag's unit, e.g. bytes to MiB); ``%`` escaped for argparse."""
    value = setting_default(cls, name)
    shown = show_default(scale(value) if scale else value).replace("%", "%%")
    return f"{text} (default {shown})".lstrip()


def add_setting(
    g: Any,
    *flags: str,
    settings: type,
    field: str | None = None,
    help: str = "",
    scale: Callable[[Any], Any] | None = None,
    stated: bool = True,
    default: Any = dataclasses.MISSING,
    **kwargs: Any,
) -> argparse.Action:
    """``g.add_argument(*flags)`` for the settings field ``field`` (default: the flag's dest):
    its default is the field's own default (``scale``: converted to the flag's unit), and the
    help says so (``stated``). ``default=None`` instead leaves the flag unset unless given (the
    job passes only given flags, so the field's default applies) while the help still states it."""
    name = field or flags[0].lstrip("-").replace("-", "_")
    value = setting_default(settings, name)
    if default is dataclasses.MISSING:
        default = scale(value) if scale else value
    elif default is not None:
        raise ValueError(f"{flags[0]}: a flag of {settings.__name__}.{name} takes its default from the field")
    text = default_help(settings, name, help, scale=scale) if stated else help
    action = g.add_argument(*flags, default=default, help=text, **kwargs)
    action.setting = (settings, name, scale)  # type: ignore[attr-defined]
    return action


def given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The flags among ``names`` that were given (not None): keyword arguments for a settings
    dataclass whose own defaults fill the rest."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def layers_arg(text: str) -> tuple[int, ...]:
    """argparse type of ``--layers``: distinct non-negative layer indices, comma-separated."""
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from None
    if not out or any(i < 0 for i in out) or len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"expected distinct non-negative layer indices, got {text!r}")
    return out


def number_arg(cast: Callable[[str], Any], ok: Callable[[Any], bool], expect: str) -> Callable[[str], Any]:
    """An argparse ``type``: ``cast(text)`` that must satisfy ``ok`` (NaN never does), else the
    one-line message ``expected <expect>, got '<text>'``."""

    def parse(text: str) -> Any:
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expect}, got {text!r}") from None
        if v != v or not ok(v):
            raise argparse.ArgumentTypeError(f"expected {expect}, got {text!r}")
        return v

    parse.__name__ = f"number({expect})"
    return parse


positive_float = number_arg(float, lambda v: 0 < v < float("inf"), "a positive number")
positive_int = number_arg(int, lambda v: v >= 1, "an integer >= 1")
non_negative_int = number_arg(int, lambda v: v >= 0, "an integer >= 0")
non_negative = number_arg(float, lambda v: 0 <= v < float("inf"), "a number >= 0")
fraction = number_arg(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")


def pool_size(text: str) -> tuple[int, int]:
    """argparse type of an actor pool size: ``N`` (fixed) or ``MIN:MAX`` (autoscaling), as
    ``(min, max)`` with ``1 <= min <= max``."""
    parts = text.split(":")
    try:
        lo, hi = (int(parts[0]), int(parts[-1])) if 1 <= len(parts) <= 2 else (0, -1)
    except ValueError:
        lo, hi = 0, -1
    if lo < 1 or hi < lo:
        raise argparse.ArgumentTypeError(f"expected N or MIN:MAX with 1 <= MIN <= MAX, got {text!r}")
    return lo, hi


def storage_options_arg(text: str) -> dict[str, Any]:
    """argparse type for ``--storage-options``: a JSON object (s3fs-style or Lance ``aws_*`` keys)."""
    from pipeline.io.objects import parse_storage_options

    try:
        return parse_storage_options(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--storage-options ")) from None


def add_store_args(p: argparse.ArgumentParser) -> None:
    """``--store`` and ``--storage-options`` of the commands that read a store."""
    p.add_argument("--store", required=True, help="store root: local directory or s3://bucket/prefix")
    p.add_argument(
        "--storage-options",
        type=storage_options_arg,
        default=None,
        help="JSON object of storage options (s3fs-style or Lance aws_* keys)",
    )


def run_main(
    main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> int:
    """Parse, run, and turn any failure into one line on stderr (traceback only with --debug)."""
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "log_format", "text"))
    try:
        return main(args)
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the one place where errors become a user-facing line
        from pipeline.errors import redact

        if getattr(args, "debug", False):
            traceback.print_exc()
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"{parser.prog}: error: {redact(msg)}", file=sys.stderr)
        return 1


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        from pipeline.errors import redact

        payload = {
            "ts": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "event": redact(record.getMessage()),
        }
        payload.update(getattr(record, "fields", {}) or {})
        return json.dumps(payload, default=str)


def setup_logging(fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _JsonFormatter() if fmt == "json" else logging.Formatter("%(levelname)s %(message)s")
    )
    root = logging.getLogger("musicfm")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False
