"""The `addclass` console script: one handler per sub-command (`HANDLERS`) over tasks/ and flows/; the handlers
are in `cli.commands_store`, `cli.commands_models` and `cli.commands_flows`, the parser is `cli.args`, and
imports are lazy."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence

from addclass.cli.args import build_parser
from addclass.cli.commands_flows import cmd_add_class, cmd_demo, cmd_retrain
from addclass.cli.commands_models import (
    cmd_evaluate,
    cmd_export_model,
    cmd_import_model,
    cmd_model_info,
    cmd_predict,
    cmd_review,
    cmd_train,
)
from addclass.cli.commands_store import (
    cmd_discard_draft,
    cmd_evaluate_masks,
    cmd_export,
    cmd_import_pseudo,
    cmd_ingest,
    cmd_inspect,
    cmd_merge,
    cmd_pseudo_label,
)
from addclass.common.errors import UserError

Handler = Callable[[argparse.Namespace], int]


HANDLERS: dict[str, Handler] = {
    "ingest": cmd_ingest, "inspect": cmd_inspect, "pseudo-label": cmd_pseudo_label,
    "import-pseudo": cmd_import_pseudo, "evaluate-masks": cmd_evaluate_masks, "merge": cmd_merge,
    "discard-draft": cmd_discard_draft, "export": cmd_export, "train": cmd_train, "evaluate": cmd_evaluate,
    "model-info": cmd_model_info, "predict": cmd_predict, "export-model": cmd_export_model,
    "import-model": cmd_import_model, "review": cmd_review,
    "add-class": cmd_add_class, "retrain": cmd_retrain, "demo": cmd_demo,
}


# What the user caused (`common.errors.UserError`) and OS errors about a path (they name it) are one line and exit 2;
# anything else is a bug or an environment failure and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, FileExistsError, PermissionError,
                                               NotADirectoryError, IsADirectoryError, ConnectionError)


# Local, offline defaults for Prefect (a user's own settings win): no telemetry, and enough time for the
# ephemeral API server to start on a 2-core machine (docs/design.md §7.6).
PREFECT_DEFAULTS = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
                    # the stages' own log lines (validation scores, warnings) in the flow run's logs
                    "PREFECT_LOGGING_EXTRA_LOGGERS": "addclass.tasks"}


def main(argv: Sequence[str] | None = None) -> int:
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)

    args = build_parser().parse_args(argv)
    try:
        return HANDLERS[args.command](args)
    except USER_ERRORS as e:  # clear one-line errors for bad input; tracebacks for bugs
        print(f"addclass: error: {e}", file=sys.stderr)
        return 2


IN_PROCESS_FLOWS = ("demo", "add-class", "retrain")  # they start Prefect's temporary server in-process


def busy_cores(window: float = 0.25, *, stat: str = "/proc/stat") -> float | None:
    """Cores that other processes keep busy, measured now: the share of non-idle CPU time in the kernel's
    counters (``/proc/stat``) over ``window`` seconds, times the number of cores, while this process sleeps.

    Unlike the load average (a 1-minute mean), it does not remember a job that just ended: right after
    ``scripts/setup.sh`` the load average still says "busy" for a minute. None where there is no
    ``/proc/stat`` (not Linux).
    """
    def sample() -> tuple[int, int] | None:
        try:
            with open(stat) as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    first = sample()
    if first is None:
        return None
    time.sleep(window)
    second = sample()
    if second is None or second[0] <= first[0]:
        return None
    total, idle = second[0] - first[0], second[1] - first[1]
    return (os.cpu_count() or 1) * (total - idle) / total


def passive_threads(*, busy: float | None = None, cpus: int | None = None) -> str:
    """On a busy machine, makes torch's OpenMP threads sleep, not spin, while they wait for work; returns the
    decision as a line for the log. Must run before torch is imported.

    Spinning threads take whole cores from every other job: with two busy processes on 2 cores a tiny training
    step took 9.3 s instead of 0.81 s idle, 2.1 s with passive waiting, which costs 25 % on an idle machine
    (1.02 s; docs/reliability.md). So the policy is passive when other processes keep at least half the cores
    busy right now (``busy``, default `busy_cores`; the 1-minute load average where that cannot be measured)
    and left to OpenMP otherwise; a user who set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` decides.
    """
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return "threads: OpenMP wait policy as set in the environment"
    cpus = (os.cpu_count() or 1) if cpus is None else cpus
    measure = "busy now"
    if busy is None:
        busy = busy_cores()
    if busy is None:
        busy, measure = os.getloadavg()[0], "1-minute load average"
    if busy < cpus / 2:
        return f"threads: active waiting (other processes: {busy:.1f} of {cpus} cores {measure})"
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return f"threads: passive waiting, a shared machine (other processes: {busy:.1f} of {cpus} cores {measure})"


def console_main() -> int:
    """The `addclass` console script: `main`, with in-process flow commands supervised (`flows.supervise`) so
    that the temporary Prefect server they start ends with them, however they end; on a busy machine torch
    threads wait passively (`passive_threads`)."""
    argv = sys.argv[1:]
    args = build_parser().parse_args(argv)  # --help and usage errors stay in the user's process (no torch yet)
    # the decision (0.25 s of measuring, so not for --help), for the training log and the demo's last lines; a
    # supervised child keeps its parent's
    if "ADDCLASS_THREADS" not in os.environ:
        os.environ["ADDCLASS_THREADS"] = passive_threads()
    if args.command in IN_PROCESS_FLOWS and not getattr(args, "deployment", False):
        from addclass.flows.supervise import supervise

        rc = supervise(argv)
        if rc is not None:
            return rc if rc >= 0 else 128 - rc  # a child killed by signal N exits 128 + N, as a shell reports it
    return main(argv)


if __name__ == "__main__":
    sys.exit(console_main())
