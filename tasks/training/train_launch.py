"""Training on one process or many: `run_training` trains in this process, or launches torchrun for a
data-parallel run (`Launch`), which is what ``addclass train --nproc N`` and the flows' training task call.

A data-parallel run is ``python -m torch.distributed.run --nproc-per-node N [--nnodes M --rdzv-endpoint H:P]
-m tasks.train_launch --config JSON [--resume]``: every process trains its share of each batch
(`tasks.training.train.train`, `tasks.training.distributed`); rank 0 logs, validates and writes. The launching process streams the
processes' output into its own log (so a Prefect task shows it) and follows the run's ``train_log.jsonl`` to call
``on_step`` as `train` would in-process.
"""

from __future__ import annotations

import argparse
import contextvars
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from addclass.common.errors import InputError
from addclass.tasks.training.train import LOG_FILE, StepInfo, TrainConfig, train

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
FOLLOW_SECONDS = 2.0  # how often the launcher reads the run's log for on_step
ERROR_LINE = re.compile(r"^(\[rank ?\d+\]: ?)?[\w.]*(Error|Exception|Interrupt)\b.*: ")  # "addclass.common.errors.InputError: ..."


@dataclass(frozen=True)
class Launch:
    """Where a run trains: ``nproc`` processes (one per GPU, or CPU processes) on each of ``nnodes`` nodes;
    several nodes meet at ``rdzv_endpoint`` (host:port of the first node, the same on every node, where the
    same command runs)."""

    nproc: int = 1
    nnodes: int = 1
    rdzv_endpoint: str | None = None

    def __post_init__(self) -> None:
        if self.nproc < 1 or self.nnodes < 1:
            raise InputError(f"Expected nproc >= 1 and nnodes >= 1. Got {self.nproc}, {self.nnodes} instead.")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise InputError(f"Expected rdzv_endpoint (host:port of the first node) with nnodes {self.nnodes}. "
                             f"Got none.")

    @property
    def distributed(self) -> bool:
        return self.nproc * self.nnodes > 1 or self.rdzv_endpoint is not None


def torchrun_command(config: TrainConfig, launch: Launch, *, resume: bool = False) -> list[str]:
    """The torchrun command line that trains ``config``: a standalone rendezvous on one node, the c10d one at
    ``launch.rdzv_endpoint`` for several."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={launch.nproc}"]
    if launch.rdzv_endpoint:
        cmd += [f"--nnodes={launch.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={launch.rdzv_endpoint}"]
    else:
        cmd += ["--standalone", "--nnodes=1"]
    cmd += ["-m", "addclass.tasks.training.train_launch", "--config", json.dumps(config.to_dict())]
    return cmd + (["--resume"] if resume else [])


def run_training(config: TrainConfig, *, launch: Launch | None = None, resume: bool = False, progress: bool = True,
                 on_step: Callable[[StepInfo], None] | None = None) -> Path:
    """Trains ``config`` in this process (`tasks.training.train.train`), or under torchrun when ``launch`` asks for more
    than one process (`launch_training`). Returns the run's ``final/`` model folder."""
    if launch is None or not launch.distributed:
        return train(config, resume=resume, progress=progress, on_step=on_step)
    return launch_training(config, launch, resume=resume, on_step=on_step)


def launch_training(config: TrainConfig, launch: Launch, *, resume: bool = False,
                    on_step: Callable[[StepInfo], None] | None = None, command: list[str] | None = None) -> Path:
    """Trains ``config`` under torchrun (`torchrun_command`, or ``command``), streaming the processes' output to
    this log and calling ``on_step`` for the steps the run logs.

    Raises:
        RuntimeError: a training process failed; the message names the run folder and ends with its last
            output lines.
    """
    processes = launch.nproc * launch.nnodes
    if config.batch_size % (processes * config.accumulate):
        raise InputError(f"Expected batch_size {config.batch_size} divisible by processes x accumulate = "
                         f"{processes} x {config.accumulate} ({launch.nproc} per node x {launch.nnodes} nodes).")
    cmd = command or torchrun_command(config, launch, resume=resume)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    shown = " ".join("CONFIG_JSON" if arg.startswith("{") else arg for arg in cmd)
    log.info("training %s on %d process(es) x %d node(s): %s", config.out_dir, launch.nproc, launch.nnodes, shown)
    if launch.nnodes > 1:  # the other nodes join with the same command (the same config)
        log.info("start this on each of the other %d nodes: %s", launch.nnodes - 1, shlex.join(cmd))
    log_path = Path(config.out_dir) / LOG_FILE
    done = threading.Event()
    # in a copy of this context: on_step may need the caller's context variables (a Prefect task's run context)
    follower = threading.Thread(target=contextvars.copy_context().run, daemon=True,
                                args=(_follow_log, log_path, config.iters, on_step, done))
    tail: deque[str] = deque(maxlen=12)
    errors: list[str] = []  # exception lines of the processes (torchrun's own summary follows them)
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as proc:
        if on_step is not None:
            follower.start()
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            if ERROR_LINE.match(line) and line not in errors:
                errors.append(line)
            log.info("%s", line)
        code = proc.wait()
    done.set()
    if follower.is_alive():
        follower.join()
    if code != 0:
        cause = f"; the processes raised: {' | '.join(errors[:3])}" if errors else ""
        last = "\n".join(tail)
        raise RuntimeError(f"Training {config.out_dir} under torchrun failed (exit code {code}){cause}. Last "
                           f"output:\n{last}")
    return Path(config.out_dir) / "final"


class _LogReader:
    """The complete training lines a run's log gains (not validation lines, not a line being written): each call
    reads from where the previous one stopped, so following a long run does not re-read its log."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def new_steps(self) -> list[dict[str, float]]:
        try:
            with open(self.path, "rb") as f:
                if f.seek(0, os.SEEK_END) < self.offset:  # rewritten shorter (a resume truncates it): start over
                    self.offset = 0
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1  # a last line without its newline is still being written
        self.offset += end
        rows = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
        return [row for row in rows if "total" in row]


def _follow_log(path: Path, iters: int, on_step: Callable[[StepInfo], None] | None, done: threading.Event) -> None:
    """Calls ``on_step`` for each step the run logs after the launch, until ``done`` (then once more)."""
    if on_step is None:
        return
    reader = _LogReader(path)
    seen = max((int(r["step"]) for r in reader.new_steps()), default=0)  # a resumed run's earlier steps
    while True:
        finished = done.wait(FOLLOW_SECONDS)
        for row in reader.new_steps():
            if int(row["step"]) > seen:
                seen = int(row["step"])
                losses = {k: float(v) for k, v in row.items() if k.startswith("loss_")}
                on_step(StepInfo(step=seen, iters=iters, losses=losses, total=float(row["total"]),
                                 lr=float(row["lr"]), seconds=float(row["seconds"])))
        if finished:
            return


def main(argv: list[str] | None = None) -> int:
    """One process of a data-parallel run (what torchrun starts)."""
    parser = argparse.ArgumentParser(prog="python -m tasks.train_launch",
                                     description="one process of a data-parallel training run (under torchrun)")
    parser.add_argument("--config", required=True, help="TrainConfig as JSON (TrainConfig.to_dict)")
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout,
                        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    train(TrainConfig.from_dict(json.loads(args.config)), resume=args.resume, progress=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
