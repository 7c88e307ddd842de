"""Command-line flags shared by the jobs, and the one-line error handling around them."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from musicfm.profiles import PROFILES
from pipeline.exits import DEFAULT_MAX_ERROR_RATE, KEEP_PREVIOUS_RUNS


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (``prog: error: ...``) and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


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


_positive_float = number_arg(float, lambda v: 0 < v < float("inf"), "a positive number")
positive_int = number_arg(int, lambda v: v >= 1, "an integer >= 1")
non_negative_int = number_arg(int, lambda v: v >= 0, "an integer >= 0")
non_negative = number_arg(float, lambda v: 0 <= v < float("inf"), "a number >= 0")
fraction = number_arg(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
_rate = fraction


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


def _json_object(text: str) -> dict[str, Any]:
    try:
        v = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg} at char {e.pos})") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return v


def _prefixes(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


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


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--checkpoint",
        default="msd",
        help="msd | fma (released weights, cached by huggingface_hub), a .pt/.safetensors path or "
        "s3:// URI, or random[:SEED] (random weights, for demos/tests) (default: msd)",
    )
    g.add_argument("--stats", help="stats JSON for a .pt checkpoint (e.g. msd_stats.json)")
    g.add_argument("--model-config", help="MusicFMConfig JSON for non-default sizes")
    g.add_argument(
        "--layers", type=layers_arg, default=(7, 12), help="hidden states to store, e.g. 7,12 (default)"
    )
    g.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="auto: bf16 when the cluster has GPUs or the CPU has AMX-BF16, fp32 otherwise (default: auto)",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model in each model actor (same vectors within float rounding; "
        "not part of settings_id; the first call of each window length compiles)",
    )


def add_window_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("windows")
    g.add_argument("--window-s", type=_positive_float, help="window length in seconds (default 30)")
    g.add_argument("--hop-s", type=_positive_float, help="hop between windows in seconds (default: = window)")
    g.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        help="task preset from the MusicFM paper: sets window length and frame rate",
    )
    g.add_argument("--frames-hz", type=_positive_float, help="also store frame-level vectors at this rate")
    g.add_argument(
        "--loudness-target-db",
        type=number_arg(float, lambda v: -80.0 <= v <= 0.0, "a level in dBFS within [-80, 0]"),
        default=None,
        help="scale each window to this RMS level (dBFS, e.g. -20) before the model, so louder and "
        "quieter masters embed alike (recorded in settings_id; default: off)",
    )


def add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("execution")
    g.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="windows per model call (default: 8 on CPU; on a GPU as many as fit in 80 %% of its free memory)",
    )
    g.add_argument(
        "--gpu-actors",
        type=pool_size,
        help="model actors: N, or MIN:MAX to autoscale with the work (default: one per GPU; without "
        "GPUs one per core of the largest node, at most 4, each with its share of the cores as torch threads)",
    )
    g.add_argument(
        "--decode-cpus",
        type=pool_size,
        help="decode actors, one CPU each: N, or MIN:MAX to autoscale (default: 1 to the cluster's "
        "CPUs less one per model actor with GPUs; 1:2 without GPUs)",
    )
    g.add_argument(
        "--chunk-size",
        type=positive_int,
        default=1000,
        help="tracks per commit; a rerun after a crash redoes at most the chunks in flight (default 1000)",
    )
    g.add_argument(
        "--planner",
        choices=["auto", "driver", "ray"],
        default="auto",
        help="where the plan is made: on the driver, or as a distributed join in Ray (catalog rows "
        "never on the driver); auto: Ray for catalogs of 32 MiB or more, or listings with 8+ "
        "sub-prefixes (default auto)",
    )
    g.add_argument(
        "--keep-previous",
        type=non_negative_int,
        default=KEEP_PREVIOUS_RUNS,
        help="earlier ok runs whose store versions stay queryable (search --model) and restorable "
        f"(rollback_store) besides the newest (default {KEEP_PREVIOUS_RUNS})",
    )
    g.add_argument(
        "--break-lease",
        action="store_true",
        help="take over the store's lease even if its holder is not proven gone (only when you know "
        "that run is dead: two writers at once corrupt nothing but waste work)",
    )
    g.add_argument(
        "--format", choices=["lance", "parquet"], default="lance", help="store format (default lance)"
    )
    g.add_argument("--limit", type=positive_int, help="only the first N catalog rows")
    g.add_argument(
        "--storage-options",
        type=_json_object,
        default={},
        help='JSON of s3fs-style options, e.g. {"endpoint_url": "...", "region": "..."}; '
        "credentials are best left to the AWS environment",
    )
    g.add_argument(
        "--allowed-prefixes",
        type=_prefixes,
        default=(),
        help="comma-separated URI prefixes audio may be read from (default: the catalog's location)",
    )
    g.add_argument(
        "--max-file-mb", type=_positive_float, default=2048.0, help="largest audio file (default 2048)"
    )
    g.add_argument(
        "--max-duration-s",
        type=_positive_float,
        default=4 * 3600.0,
        help="longest audio accepted (default 14400)",
    )
    g.add_argument(
        "--max-channels", type=positive_int, default=32, help="most channels accepted (default 32)"
    )
    g.add_argument(
        "--min-duration-s",
        type=non_negative,
        default=0.0,
        help="shorter audio becomes an error row (default 0: one STFT frame, 0.043 s, is the floor)",
    )
    g.add_argument(
        "--max-row-chars",
        type=positive_int,
        default=65536,
        help="longest catalog row (characters, names + values); longer rows become error rows (default 65536)",
    )
    g.add_argument("--decode-timeout-s", type=_positive_float, default=600.0, help="per-file decode budget")
    g.add_argument(
        "--max-error-rate",
        type=_rate,
        default=DEFAULT_MAX_ERROR_RATE,
        help="exit 3 when failed/total tracks exceeds this, or when every track failed "
        f"(default {DEFAULT_MAX_ERROR_RATE}; nightly jobs: e.g. 0.01)",
    )
    g.add_argument("--log-format", choices=["text", "json"], default="text", help="log lines as text or JSON")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")
    g.add_argument("--debug", action="store_true", help="print tracebacks on failure")


def window_settings(args: argparse.Namespace) -> tuple[float, float, float | None]:
    """(window_s, hop_s, frames_hz) from --window-s/--hop-s/--frames-hz or --profile."""
    window_s, hop_s, frames_hz = args.window_s, args.hop_s, args.frames_hz
    if args.profile:
        prof = PROFILES[args.profile]
        window_s = window_s or prof.window_s
        frames_hz = frames_hz if frames_hz is not None else prof.frames_hz
    window_s = window_s or 30.0
    hop_s = hop_s or window_s
    return window_s, hop_s, frames_hz


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
