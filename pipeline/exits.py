"""The jobs' exit codes in one table, and the default error budget.

The embed and refresh jobs' ``--help`` print :func:`exit_codes_help`; README.md repeats the table
(tests/test_exits.py checks both against :data:`EXIT_CODES`).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_ERROR_RATE = 3
EXIT_LOCKED = 4
EXIT_TERMINATED = 143  # 128 + SIGTERM: pipeline.signals

#: (code, meaning): what each exit code of the embed and refresh jobs says.
EXIT_CODES: tuple[tuple[int, str], ...] = (
    (EXIT_OK, "ok: the store holds every good track; failed tracks are in errors.lance"),
    (
        EXIT_FAILED,
        "failed: a fault of the system (a bug, a broken checkpoint, a device fault, non-finite model "
        "output, an unreachable store); committed chunks stay, run the same command again to resume",
    ),
    (EXIT_USAGE, "bad arguments: one line names the flag"),
    (EXIT_ERROR_RATE, "too many failed tracks: more than --max-error-rate, or every track failed"),
    (EXIT_LOCKED, "another run holds the store's lease"),
    (
        EXIT_TERMINATED,
        "stopped by SIGTERM: the commit in flight finished, committed chunks stay, the lease is "
        "released; the same command resumes",
    ),
)

#: Default of ``--max-error-rate``. A run where half of the tracks fail is not a catalog with some
#: broken files (real catalogs lose well under 1 % to bad uploads) but a broken run: a wrong prefix,
#: expired credentials, a codec missing from the decode image. Nightly jobs should set it lower
#: (the README's nightly command uses 0.01).
DEFAULT_MAX_ERROR_RATE = 0.5


#: Default of ``--keep-previous``: the run before the newest stays queryable and restorable
#: (``jobs/rollback_store.py``); its versions survive clean-up (:mod:`pipeline.store.snapshots`).
KEEP_PREVIOUS_RUNS = 1


def exit_codes_help() -> str:
    """The exit-code table as the jobs' ``--help`` prints it."""
    return "Exit codes:\n" + "\n".join(f"  {code}  {meaning}" for code, meaning in EXIT_CODES)
