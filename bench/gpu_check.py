"""GPU check: every CUDA path of addclass once, in one command of at most ~8 minutes on one GPU.

Random weights and small synthetic data (nothing is downloaded). One function per check; each returns a dict
with an ``ok`` flag and its figures. A check that raises records the error (type, message, the traceback's
last lines) and the script goes on with the others; it exits 1 when any check failed. One JSON document goes to
stdout (everything else, the project's logs included, to stderr); ``--out FILE`` also writes it, after every
check (``"complete": false`` until the end), so a run killed by a time limit still leaves the checks it finished.

Checks (docs/gpu_check.md explains every figure):

- ``train``: a few steps of ``tasks.training.train.train`` for tiny, lite_r18 and r50 in fp32 and bf16 (``amp``): loss
  finite, steps/s, peak GPU memory, model FLOPs utilisation (MFU) against the card's peak bf16 dense TFLOPs.
- ``resume``: a run interrupted twice, CPU -> GPU -> CPU, against the uninterrupted CPU run (losses step by
  step; the CUDA RNG state in the GPU leg's checkpoint and its round trip through ``set_rng_state``).
- ``ddp``: 2-process data-parallel training under torchrun (``tasks.training.train_launch``) against one process: NCCL
  on >= 2 GPUs; on one GPU NCCL is tried (it refuses two ranks on one device) and the run goes on with gloo on
  the GPU (DistributedDataParallel, SyncBatchNorm); gloo on the CPU.
- ``labeler``: Grounded-SAM (GroundingDINO + SAM vit_b, bf16 vit_b, HQ-SAM, SAM 2.1) on a few 2160 x 3840
  images: ``label_many`` against the one-image-and-prompt-at-a-time loop of ``label`` (ratio), peak memory.
- ``predict``: ``tasks.prediction.predict.image_scores`` of r50 on a 3072 x 4096 image, whole and sliding, fp32 and bf16:
  seconds, peak GPU memory, ``tasks.prediction.predict_memory``'s estimate.
- ``evaluate``: ``tasks.evaluation.evaluate.evaluate_model`` on the GPU (and on the CPU, for the labels' agreement).
- ``efficiency``: MaSSFormer R50 vs Mask2Former R50 forward time at 1024^2 and 2048^2 (the paper's efficiency
  claim), MACs (``models.macs``), peak memory; one training step of Mask2Former (its deformable
  sampling's backward).

``--cpu`` runs the same checks end to end on the CPU at small sizes (tiny images, one or few steps, tiny
stand-ins where a model would take minutes), so the script is known to work before GPU time is spent;
tests/bench/test_gpu_check.py runs it. GPU-only figures are then null, with the reason next to them.

Usage::

    .venv/bin/python bench/gpu_check.py --out bench/results/gpu_check.json     # on a GPU machine
    .venv/bin/python bench/gpu_check.py --cpu                                  # the dry run (~1.5 min, 2 cores)
    .venv/bin/python bench/gpu_check.py --checks train predict                 # some checks only
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import math
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

if "--cpu" in sys.argv[1:]:  # before torch loads OpenMP: its threads sleep instead of spinning on a shared machine
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # (docs/reliability.md; the torchrun workers inherit it)

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

log = logging.getLogger("gpu_check")

GIB = 2**30
SCHEMA = 1
GPU_BUDGET_S = 480  # the ~8 minutes the check is sized for on one GPU
# Peak dense bf16 tensor TFLOPs (no sparsity) by device name, first match wins; unknown cards: None (MFU null),
# unless --peak-tflops says. From NVIDIA's data sheets.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"H100.*PCIe", 756.0),
    (r"H100.*NVL", 835.0),
    (r"H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"H200", 989.0),
    (r"A100", 312.0),
    (r"\bL4\b", 121.0),
)
CHECKS = ("train", "resume", "ddp", "labeler", "predict", "evaluate", "efficiency")
NO_GPU = "CPU run: no GPU"


@dataclass(frozen=True)
class Sizes:
    """What each check runs, per mode (`GPU` / `CPU`)."""

    store_images: int  # synthetic scenes (60/20/20 % train/val/test)
    store_hw: tuple[int, int]
    train_variants: tuple[str, ...]
    bf16_variants: tuple[str, ...]  # the variants with a bf16 row (the others' bf16 rows say why not)
    train_crop: tuple[int, int]
    train_batch: int
    train_iters: int
    train_warmup: int  # steps left out of steps/s
    num_points: int
    num_workers: int
    small_crop: tuple[int, int]  # resume and ddp (tiny)
    ddp_batch: int  # global batch of the 2-process run
    ddp_iters: int
    torchrun_timeout_s: int
    nccl_attempt_timeout_s: int
    label_rows: tuple[tuple[str, str | None], ...]  # (SAM variant, autocast dtype)
    dino: str
    dino_size: int
    label_images: int
    label_hw: tuple[int, int]
    label_prompts: tuple[str, ...]
    max_boxes: int
    predict_variant: str
    predict_hw: tuple[int, int]
    predict_window: int
    predict_rows: tuple[tuple[str, bool], ...]  # (mode, bf16)
    predict_repeats: int  # the first is the warm-up (cuDNN algorithm search, allocator)
    eval_variant: str
    forward_rows: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # row -> (variant, decoder)
    forward_sizes: tuple[tuple[int, int], ...] = ()
    forward_repeats: int = 1


GPU = Sizes(
    store_images=10, store_hw=(640, 768),
    train_variants=("tiny", "lite_r18", "r50"), bf16_variants=("tiny", "lite_r18", "r50"),
    train_crop=(512, 512), train_batch=8, train_iters=8, train_warmup=3, num_points=12544, num_workers=4,
    small_crop=(256, 256), ddp_batch=4, ddp_iters=3, torchrun_timeout_s=240, nccl_attempt_timeout_s=90,
    label_rows=(("vit_b", None), ("vit_b", "bfloat16"), ("hq_vit_b", None), ("sam2.1_hiera_t", None)),
    dino="swint_ogc", dino_size=800, label_images=3, label_hw=(2160, 3840), label_prompts=("car", "person"),
    max_boxes=10,
    predict_variant="r50", predict_hw=(3072, 4096), predict_window=1024,
    predict_rows=(("whole", False), ("whole", True), ("slide", False), ("slide", True)), predict_repeats=2,
    eval_variant="r50",
    forward_rows={"massformer": ("r50", "hr"), "mask2former": ("mask2former_r50", None)},
    forward_sizes=((1024, 1024), (2048, 2048)), forward_repeats=5,
)  # fmt: skip
CPU = Sizes(
    store_images=5, store_hw=(256, 320),
    train_variants=("tiny", "lite_r18", "r50"), bf16_variants=("tiny",),
    train_crop=(256, 256), train_batch=2, train_iters=1, train_warmup=0, num_points=256, num_workers=0,
    small_crop=(256, 256), ddp_batch=2, ddp_iters=2, torchrun_timeout_s=600, nccl_attempt_timeout_s=300,
    label_rows=(("tiny", None), ("hq_tiny", None), ("sam2_tiny", None)),
    dino="test", dino_size=128, label_images=1, label_hw=(270, 480), label_prompts=("car", "person"),
    max_boxes=3,
    predict_variant="tiny", predict_hw=(384, 512), predict_window=256,
    predict_rows=(("whole", False), ("slide", False)), predict_repeats=1,
    eval_variant="tiny",
    forward_rows={"massformer": ("tiny", "hr"), "mask2former": ("mask2former_tiny", None)},
    forward_sizes=((256, 256), (256, 512)), forward_repeats=1,
)  # fmt: skip


# -------------------------------------------------------------------------------------------------- helpers


class Context:
    """The run: mode, device, sizes, work folder and the synthetic store (made on first use)."""

    def __init__(self, *, cpu: bool, work: Path, peak_tflops: float | None) -> None:
        self.cpu = cpu
        self.device = torch.device("cpu" if cpu else "cuda")
        self.sizes = CPU if cpu else GPU
        self.work = work
        self.peak_tflops = peak_tflops
        self._store: tuple[Path, str, int] | None = None

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    def store(self) -> tuple[Path, str, int]:
        """(store, its merged label version with the pseudo class, number of classes K): synthetic scenes,
        simulated pseudo labels of "car" on train and val, merged (the pipeline's own tasks, as the demo)."""
        if self._store is None:
            from addclass.tasks.data.ingest import ingest_synthetic
            from addclass.tasks.labels.merge import merge
            from addclass.tasks.labels.pseudo_label import LabelerConfig, pseudo_label
            from addclass.tasks.training.train_config import version_classes

            path = self.work / "scenes.zarr"
            ingest_synthetic(path, images=self.sizes.store_images, size=self.sizes.store_hw, seed=0, progress=False)
            for split in ("train", "val"):
                pseudo_label(path, prompt="car", split=split, labeler=LabelerConfig(kind="simulated"), progress=False)
            version = merge(path, classes="car", allow_partial=True, progress=False)
            from addclass.storage.store import open_label_store

            names, _ = version_classes(open_label_store(path), version)
            self._store = (path, version, len(names))
        return self._store


def peak_tflops_for(name: str) -> float | None:
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, name):
            return tflops
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def gpu_peak(device: torch.device) -> Iterator[dict[str, Any]]:
    """Fills the yielded dict with the peak GPU memory allocated (and reserved) inside the block, GiB; None on
    the CPU (with the reason)."""
    box: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    yield box
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        box["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / GIB, 3)
        box["peak_gpu_reserved_gb"] = round(torch.cuda.max_memory_reserved(device) / GIB, 3)
    else:
        box["peak_gpu_mem_gb"] = None
        box.setdefault("null_reasons", {})["peak_gpu_mem_gb"] = NO_GPU


def null_reason(row: dict[str, Any], key: str, reason: str) -> None:
    row[key] = None
    row.setdefault("null_reasons", {})[key] = reason


def mfu_figures(ctx: Context, row: dict[str, Any], *, flops: float, seconds: float) -> None:
    """Achieved TFLOPs and MFU (achieved / the card's peak bf16 dense TFLOPs) into ``row``."""
    achieved = flops / seconds / 1e12
    row["achieved_tflops"] = round(achieved, 4)
    if not ctx.gpu:
        null_reason(row, "mfu", f"{NO_GPU} (MFU is against a GPU's peak)")
    elif ctx.peak_tflops is None:
        null_reason(row, "mfu", "unknown card: no peak TFLOPs figure (pass --peak-tflops)")
    else:
        row["mfu"] = round(achieved / ctx.peak_tflops, 4)


def relative_differences(a: list[float], b: list[float]) -> list[float]:
    return [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True)]


def read_log(run: Path) -> list[dict[str, Any]]:
    """The training lines of a run's ``train_log.jsonl`` (validation lines have no "total")."""
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "total" in r]


def smooth_image(height: int, width: int, seed: int) -> np.ndarray:
    """H x W x 3 uint8: upsampled noise (some structure for the models, and cheap at 4K)."""
    import cv2

    small = (np.random.default_rng(seed).random((max(2, height // 64), max(2, width // 64), 3)) * 255)
    return np.ascontiguousarray(cv2.resize(small.astype(np.uint8), (width, height), interpolation=cv2.INTER_CUBIC))


def load_bench_module(name: str) -> Any:
    """Another bench script as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(f"bench_{name}", module)
    spec.loader.exec_module(module)
    return module


def error_record(e: BaseException) -> dict[str, Any]:
    lines = "".join(traceback.format_exception(e)).splitlines()
    return {"type": type(e).__name__, "message": str(e)[-3000:], "traceback": lines[-12:]}


def guarded(rows: list[dict[str, Any]], row: dict[str, Any], fn: Callable[[dict[str, Any]], None]) -> None:
    """Runs one row of a check: its error is recorded in the row (``ok`` false) and the check goes on."""
    rows.append(row)
    try:
        fn(row)
        row.setdefault("ok", True)
    except Exception as e:  # any failure of this row: recorded, the next row runs
        log.exception("row %s failed", {k: v for k, v in row.items() if isinstance(v, str | int | bool)})
        row["ok"] = False
        row["error"] = error_record(e)
    finally:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------- train


def check_train(ctx: Context) -> dict[str, Any]:
    """A few steps of each variant in fp32 and bf16 through `tasks.training.train.train` (the run's own loop, data loader,
    loss, optimizer, checkpoint and ``final/``)."""
    from addclass.models.macs import count_macs
    from addclass.tasks.training.train import StepInfo, TrainConfig, train

    s = ctx.sizes
    store, version, k = ctx.store()
    rows: list[dict[str, Any]] = []
    for variant in s.train_variants:
        for precision in ("fp32", "bf16"):
            row: dict[str, Any] = {"variant": variant, "precision": precision, "crop": list(s.train_crop),
                                   "batch": s.train_batch, "steps": s.train_iters}
            if precision == "bf16" and variant not in s.bf16_variants:
                rows.append({**row, "ok": True, "skipped": "CPU run: amp (bf16 autocast) is CUDA-only in "
                             "addclass.tasks.training.train, so this row would repeat fp32; the tiny bf16 row runs the code path"})
                continue

            def run(row: dict[str, Any], variant: str = variant, precision: str = precision) -> None:
                macs = count_macs(variant, height=s.train_crop[0], width=s.train_crop[1], num_classes=k)
                config = TrainConfig(
                    store=str(store), out_dir=str(ctx.work / f"train-{variant}-{precision}"), version=version,
                    variant=variant, iters=s.train_iters, batch_size=s.train_batch, crop_size=s.train_crop,
                    scale_range=(0.75, 1.25), num_points=s.num_points, checkpoint_every=s.train_iters,
                    keep_checkpoints=1, seed=0, device=str(ctx.device), amp=precision == "bf16",
                    num_workers=s.num_workers, val_every=0,
                )
                steps: list[StepInfo] = []
                start = time.perf_counter()
                with gpu_peak(ctx.device) as mem:
                    train(config, progress=False, on_step=steps.append)
                row["run_s"] = round(time.perf_counter() - start, 2)  # build, steps, checkpoint, final/
                row["amp_active"] = precision == "bf16" and ctx.gpu
                row["losses"] = [round(st.total, 6) for st in steps]
                row["loss_finite"] = bool(steps) and all(math.isfinite(st.total) for st in steps)
                timed = [st.seconds for st in steps[s.train_warmup:]] or [st.seconds for st in steps]
                step_s = statistics.median(timed)
                row["step_s_median"] = round(step_s, 4)
                row["step_s_all"] = [round(st.seconds, 4) for st in steps]
                row["steps_per_s"] = round(1 / step_s, 3)
                row["images_per_s"] = round(s.train_batch / step_s, 2)
                row.update(mem)
                row["macs_g_per_image"] = macs["macs_g"]
                # forward + backward ~ 3 forwards; MACs x 2 FLOPs; the loss and optimizer are not counted
                mfu_figures(ctx, row, flops=macs["macs_g"] * 1e9 * 2 * 3 * s.train_batch, seconds=step_s)
                row["ok"] = row["loss_finite"] and len(steps) == s.train_iters

            guarded(rows, row, run)
    return {"ok": all(r["ok"] for r in rows), "rows": rows, "num_classes": k}


# --------------------------------------------------------------------------------------------------- resume


class _StopRun(Exception):
    """Raised by ``on_step`` to interrupt a run right after a step (and its checkpoint)."""


def small_config(ctx: Context, out: Path, **overrides: Any) -> Any:
    """A tiny run on the synthetic store: batch 2 (or as given), small crops, a checkpoint every step."""
    from addclass.tasks.training.train import TrainConfig

    store, version, _ = ctx.store()
    fields: dict[str, Any] = dict(
        store=str(store), out_dir=str(out), version=version, variant="tiny", iters=3, batch_size=2,
        crop_size=ctx.sizes.small_crop, scale_range=(0.75, 1.25), num_points=256, checkpoint_every=1,
        keep_checkpoints=0, seed=7, device="cpu", num_workers=0, val_every=0,
    )
    fields.update(overrides)
    return TrainConfig(**fields)


def check_resume(ctx: Context) -> dict[str, Any]:
    """A run interrupted after step 1 (CPU) and step 2 (GPU) and finished on the CPU, against the uninterrupted
    CPU run: the same data, points and learning rates step by step; the losses equal on the CPU legs before the
    GPU's rounding enters, close after it. The GPU leg's checkpoint must hold the CUDA RNG state."""
    from addclass.tasks.model_files.model_folder import latest_checkpoint
    from addclass.tasks.training.checkpoint import load_training_state, set_rng_state
    from addclass.tasks.training.train import train

    straight = small_config(ctx, ctx.work / "resume-straight")
    train(straight, progress=False)
    out = ctx.work / "resume-legs"
    legs = [("cpu", 1), (str(ctx.device), 2), ("cpu", 3)]
    rng_keys: list[list[str]] = []
    cuda_roundtrip: bool | None = None
    for i, (device, stop_at) in enumerate(legs):
        def stop(info: Any, stop_at: int = stop_at) -> None:
            if info.step == stop_at and stop_at < straight.iters:
                raise _StopRun

        with contextlib.suppress(_StopRun):
            train(replace(straight, out_dir=str(out), device=device), resume=i > 0, progress=False, on_step=stop)
        checkpoint = latest_checkpoint(out)
        assert checkpoint is not None, f"leg {i + 1} left no checkpoint in {out}"
        state = load_training_state(checkpoint)
        rng_keys.append(sorted(state["rng"]))
        if device.startswith("cuda"):  # the project's restore of the saved CUDA states, on the GPU
            saved = state["rng"].get("cuda")
            if saved is not None:
                torch.cuda.manual_seed_all(12345)
                set_rng_state(state["rng"])
                cuda_roundtrip = bool(torch.equal(torch.cuda.get_rng_state(0), saved[0]))
    mine, theirs = read_log(out), read_log(Path(straight.out_dir))
    rel = relative_differences([r["total"] for r in mine], [r["total"] for r in theirs])
    lr_equal = all(math.isclose(a["lr"], b["lr"], rel_tol=1e-9) for a, b in zip(mine, theirs, strict=True))
    first_gpu_step = 2
    exact = rel[: first_gpu_step - 1] if ctx.gpu else rel  # CPU-only steps: as tests/tasks/test_train.py
    tol_after = 5e-2 if ctx.gpu else 1e-5
    result: dict[str, Any] = {
        "legs": [{"device": d, "steps_to": s} for d, s in legs],
        "steps": [r["step"] for r in mine],
        "losses_resumed": [r["total"] for r in mine],
        "losses_straight": [r["total"] for r in theirs],
        "rel_diff_by_step": [float(f"{x:.3g}") for x in rel],
        "lr_equal": lr_equal,
        "tolerance": {"cpu_steps": 1e-5, "after_gpu_step": tol_after},
        "checkpoint_rng_keys": rng_keys,
        "cuda_rng_roundtrip": cuda_roundtrip,
    }
    ok = (result["steps"] == list(range(1, straight.iters + 1)) and lr_equal
          and all(x <= 1e-5 for x in exact) and all(x <= tol_after for x in rel)
          and all(math.isfinite(r["total"]) for r in mine))
    if ctx.gpu:
        result["cuda_rng_saved"] = "cuda" in rng_keys[1]
        ok = ok and result["cuda_rng_saved"] and cuda_roundtrip is True
    else:
        null_reason(result, "cuda_rng_roundtrip", f"{NO_GPU}: every leg ran on the CPU")
        null_reason(result, "cuda_rng_saved", NO_GPU)
    result["ok"] = bool(ok)
    return result


# ------------------------------------------------------------------------------------------------------ ddp


def ddp_worker(backend: str, argv: list[str]) -> int:
    """One torchrun process of the 1-GPU data-parallel run: every process on the GPUs there are, in a group of
    ``backend``, then `tasks.training.train_launch.main` (whose `tasks.training.distributed.Distributed` joins this group)."""
    import torch.distributed as dist

    from addclass.tasks.training.distributed import TIMEOUT
    from addclass.tasks.training.train_launch import main as train_main

    config = json.loads(argv[argv.index("--config") + 1])
    if str(config.get("device", "")).startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        os.environ["LOCAL_RANK"] = str(local)
        torch.cuda.set_device(local)
    dist.init_process_group(backend, timeout=TIMEOUT)
    return train_main(argv)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _launch(config: Any, *, backend: str | None, timeout_s: int) -> dict[str, Any]:
    """Trains ``config`` under torchrun with 2 processes (`tasks.training.train_launch.launch_training`): the project's
    own command (``backend`` None), or this script's worker with ``backend``; the output lines are kept."""
    from addclass.tasks.training.train_launch import Launch, launch_training, torchrun_command

    launch = Launch(nproc=2)
    cmd = torchrun_command(config, launch)
    if backend is not None:
        at = cmd.index("addclass.tasks.training.train_launch") - 1  # "-m tasks.train_launch" -> this script's worker
        cmd[at: at + 2] = [str(Path(__file__).resolve()), "--ddp-worker", backend]
    if shutil.which("timeout"):
        cmd = ["timeout", "-k", "15", str(timeout_s), *cmd]
    lines = _Lines()
    launcher_log = logging.getLogger("addclass.tasks.training.train_launch")  # it logs every output line of the processes
    level = launcher_log.level
    launcher_log.addHandler(lines)
    launcher_log.setLevel(logging.INFO)
    start = time.perf_counter()
    try:
        launch_training(config, launch, command=cmd)
        return {"ok": True, "seconds": round(time.perf_counter() - start, 2), "lines": lines.lines}
    except RuntimeError as e:
        return {"ok": False, "seconds": round(time.perf_counter() - start, 2), "lines": lines.lines,
                "error": error_record(e)}
    finally:
        launcher_log.removeHandler(lines)
        launcher_log.setLevel(level)


def check_ddp(ctx: Context) -> dict[str, Any]:
    """2 processes x half the batch against 1 process x the batch, the same run otherwise.

    >= 2 GPUs: the project's own torchrun command (NCCL, cuda:0 and cuda:1). One GPU: NCCL is tried with both
    ranks on cuda:0 (NCCL refuses two ranks on one device, "Duplicate GPU detected"; that refusal is expected and
    recorded), then gloo on the GPU (DistributedDataParallel and SyncBatchNorm on CUDA tensors). The CPU dry run
    takes the one-GPU path (the NCCL attempt fails for want of a GPU; gloo on the CPU)."""
    from addclass.tasks.training.train import train

    s = ctx.sizes
    gpus = torch.cuda.device_count() if ctx.gpu else 0
    base = small_config(ctx, ctx.work / "ddp-one", iters=s.ddp_iters, batch_size=s.ddp_batch,
                        checkpoint_every=s.ddp_iters, device=str(ctx.device))
    result: dict[str, Any] = {"processes": 2, "gpus": gpus, "batch": s.ddp_batch, "steps": s.ddp_iters}
    two_dir = ctx.work / "ddp-two"
    if gpus >= 2:
        result["backend"] = "nccl"
        run = _launch(replace(base, out_dir=str(two_dir)), backend=None, timeout_s=s.torchrun_timeout_s)
        result["nccl"] = {"ok": run["ok"], "devices": ["cuda:0", "cuda:1"]}
    else:
        nccl_dir = ctx.work / "ddp-nccl"
        attempt = _launch(replace(base, out_dir=str(nccl_dir)), backend="nccl", timeout_s=s.nccl_attempt_timeout_s)
        text = "\n".join(attempt["lines"]) + json.dumps(attempt.get("error", ""))
        tried = {"ok": attempt["ok"], "seconds": attempt["seconds"],
                 "refused_two_ranks_on_one_gpu": not attempt["ok"] and bool(
                     re.search(r"Duplicated? GPU|invalid usage", text, re.IGNORECASE)),
                 "error_lines": [ln for ln in attempt["lines"] if re.search(r"NCCL|Error", ln)][-6:]}
        if ctx.gpu:
            result["nccl"] = tried
        else:
            null_reason(result, "nccl", f"{NO_GPU}: NCCL needs GPUs (the attempt only dry-runs the fallback)")
            result["nccl_attempt"] = tried
        if attempt["ok"]:
            result["backend"], run, two_dir = "nccl (two ranks on one GPU)", attempt, nccl_dir
        else:
            result["backend"] = "gloo (CUDA tensors, both ranks on cuda:0)" if ctx.gpu else "gloo"
            run = _launch(replace(base, out_dir=str(two_dir)), backend="gloo", timeout_s=s.torchrun_timeout_s)
    result["run_s"] = run["seconds"]
    if not run["ok"]:
        result.update(ok=False, error=run["error"], last_lines=run["lines"][-20:])
        return result
    train(base, progress=False)
    two, one = read_log(two_dir), read_log(Path(base.out_dir))
    rel = relative_differences([r["total"] for r in two], [r["total"] for r in one])
    # step 1: the same weights and images, so the same loss up to the reduction order (and on a GPU TF32 and
    # SyncBatchNorm's kernels); later steps also carry AdamW's first moves of near-zero gradients (see
    # tests/tasks/test_distributed.py)
    tol = {"step_1": 1e-2, "later": 5e-2} if ctx.gpu else {"step_1": 1e-5, "later": 5e-3}
    result.update({
        "losses_two_processes": [r["total"] for r in two], "losses_one_process": [r["total"] for r in one],
        "rel_diff_by_step": [float(f"{x:.3g}") for x in rel], "tolerance": tol,
        "step_s_two_processes": [r["seconds"] for r in two], "step_s_one_process": [r["seconds"] for r in one],
    })  # fmt: skip
    nccl_ok = True
    if ctx.gpu and gpus < 2:  # NCCL may refuse (expected); any other NCCL failure is a finding
        nccl_ok = result["nccl"]["ok"] or result["nccl"]["refused_two_ranks_on_one_gpu"]
    result["ok"] = bool(len(two) == s.ddp_iters and all(math.isfinite(r["total"]) for r in two)
                        and rel[0] <= tol["step_1"] and all(x <= tol["later"] for x in rel) and nccl_ok)
    return result


# -------------------------------------------------------------------------------------------------- labeler


def check_labeler(ctx: Context) -> dict[str, Any]:
    """Grounded-SAM with each mask model: ``label_many`` (one caption for all prompts, one embedding per image,
    all boxes in one decoder call, images read ahead) against the loop of ``label`` one image and one prompt at
    a time; random weights, ``box_threshold`` 0 and ``max_boxes`` boxes per prompt so every image has a fixed
    amount of mask work."""
    import cv2

    from addclass.models.labelers.grounded_sam import load_image_rgb
    from addclass.tasks.labels.pseudo_label import LabelerConfig

    s = ctx.sizes
    folder = ctx.work / "label-images"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(s.label_images):
        paths.append(folder / f"image{i}.png")
        cv2.imwrite(str(paths[-1]), cv2.cvtColor(smooth_image(*s.label_hw, seed=i), cv2.COLOR_RGB2BGR))
    prompts = list(s.label_prompts)
    rows: list[dict[str, Any]] = []
    for sam, dtype in s.label_rows:
        row: dict[str, Any] = {"sam": sam, "dino": s.dino, "dtype": dtype or "float32", "images": len(paths),
                               "image_hw": list(s.label_hw), "prompts": prompts, "max_boxes": s.max_boxes}

        def run(row: dict[str, Any], sam: str = sam, dtype: str | None = dtype) -> None:
            config = LabelerConfig(kind="grounded-sam", sam_variant=sam, dino_config=s.dino, device=str(ctx.device),
                                   dtype=dtype, random_weights=True, seed=0, dino_image_size=s.dino_size,
                                   box_threshold=0.0, max_boxes=s.max_boxes)
            start = time.perf_counter()
            # what build_labeler builds, without its per-process cache: each row's models are freed after it, so
            # its peak memory is its own
            labeler: Any = config.entry.build(config)
            row["build_s"] = round(time.perf_counter() - start, 2)
            if ctx.gpu:
                labeler.label(load_image_rgb(paths[0]), prompts[0])  # warm-up (CUDA kernels, cuDNN)
                sync(ctx.device)
            with gpu_peak(ctx.device) as mem_loop:
                start = time.perf_counter()
                loop = []
                for path in paths:  # one image, one prompt at a time, as a per-image script would
                    image = load_image_rgb(path)
                    loop.append({p: labeler.label(image, p) for p in prompts})
                sync(ctx.device)
                loop_s = time.perf_counter() - start
            with gpu_peak(ctx.device) as mem_many:
                start = time.perf_counter()
                many = list(labeler.label_many(paths, prompts, prefetch=2))
                sync(ctx.device)
                many_s = time.perf_counter() - start
            boxes = [[r[p].num_instances for p in prompts] for r in many]
            shapes_ok = all(r[p].mask.shape == tuple(s.label_hw) for r in many + loop for p in prompts)
            row.update({
                "loop_s": round(loop_s, 3), "label_many_s": round(many_s, 3),
                "loop_over_label_many": round(loop_s / many_s, 3),
                "label_many_images_per_s": round(len(paths) / many_s, 3),
                "boxes_per_image_and_prompt": boxes,
                "peak_gpu_mem_gb_loop": mem_loop["peak_gpu_mem_gb"],
                "peak_gpu_mem_gb_label_many": mem_many["peak_gpu_mem_gb"],
            })  # fmt: skip
            if not ctx.gpu:
                row["null_reasons"] = {"peak_gpu_mem_gb_loop": NO_GPU, "peak_gpu_mem_gb_label_many": NO_GPU}
            row["ok"] = shapes_ok and all(b > 0 for per in boxes for b in per)

        guarded(rows, row, run)
    return {"ok": all(r["ok"] for r in rows), "rows": rows}


# -------------------------------------------------------------------------------------------------- predict


def check_predict(ctx: Context) -> dict[str, Any]:
    """`tasks.prediction.predict.image_scores` (what ``addclass predict`` runs per image) of a random model on one large
    image, whole and in sliding windows, fp32 and bf16 autocast: seconds, peak GPU memory and the up-front
    estimate of `tasks.prediction.predict_memory` (measured on the CPU) for comparison."""
    from addclass.models.build import MODEL_BUILDERS
    from addclass.tasks.prediction.predict import PredictConfig, image_scores
    from addclass.tasks.prediction.predict_memory import estimate_predict_bytes

    s = ctx.sizes
    k = 8
    torch.manual_seed(0)
    model = MODEL_BUILDERS[s.predict_variant](k).eval().to(ctx.device)
    height, width = s.predict_hw
    image = smooth_image(height, width, seed=0)
    rows: list[dict[str, Any]] = []
    labels: dict[tuple[str, bool], np.ndarray] = {}
    for mode, bf16 in s.predict_rows:
        row: dict[str, Any] = {"variant": s.predict_variant, "image_hw": [height, width], "mode": mode,
                               "window": s.predict_window if mode == "slide" else None,
                               "precision": "bf16" if bf16 else "fp32"}

        def run(row: dict[str, Any], mode: str = mode, bf16: bool = bf16) -> None:
            config = PredictConfig(mode=mode, window=s.predict_window, device=str(ctx.device), bf16=bf16)  # type: ignore[arg-type]
            times = []
            with gpu_peak(ctx.device) as mem:
                for _ in range(s.predict_repeats):
                    start = time.perf_counter()
                    scores = image_scores(model, image, config)  # K x H x W
                    out = scores.argmax(dim=0).to(torch.uint8).cpu().numpy()  # as predict_batch: synchronises
                    times.append(time.perf_counter() - start)
            labels[(mode, bf16)] = out
            estimate = estimate_predict_bytes(variant=s.predict_variant, height=height, width=width, num_classes=k,
                                              scale=1.0, window=s.predict_window if mode == "slide" else None)
            row.update({"seconds": round(times[-1], 3), "first_s": round(times[0], 3),
                        "megapixels_per_s": round(height * width / 1e6 / times[-1], 3), **mem,
                        "estimate_gb": round(estimate / GIB, 2),
                        "scores_finite": bool(torch.isfinite(scores).all())})
            if mem["peak_gpu_mem_gb"]:
                row["estimate_over_peak"] = round(estimate / GIB / mem["peak_gpu_mem_gb"], 2)
            row["ok"] = row["scores_finite"] and out.shape == (height, width)

        guarded(rows, row, run)
    agreement: dict[str, float] = {}
    for mode in ("whole", "slide"):
        if (mode, False) in labels and (mode, True) in labels:
            agreement[f"{mode}_bf16_vs_fp32"] = round(float((labels[(mode, False)] == labels[(mode, True)]).mean()), 5)
    result: dict[str, Any] = {"ok": all(r["ok"] for r in rows), "rows": rows, "label_agreement": agreement}
    if not ctx.gpu:
        result["null_reasons"] = {"label_agreement": "CPU run: bf16 autocast is CUDA-only in tasks.predict"}
    return result


# ------------------------------------------------------------------------------------------------- evaluate


def check_evaluate(ctx: Context) -> dict[str, Any]:
    """`tasks.evaluation.evaluate.evaluate_model` of a random model folder on the store's val and test splits on the run's
    device, then on the CPU: scores finite, and the share of pixels the two label alike (the CPU dry run
    compares two CPU runs: 1.0, inference is deterministic there)."""
    import cv2

    from addclass.tasks.evaluation.evaluate import evaluate_model
    from addclass.tasks.model_files.model_folder import build_model, save_model_dir
    from addclass.tasks.training.train import model_config, resolve_train_config

    store, _, _ = ctx.store()
    cfg = model_config(resolve_train_config(small_config(ctx, ctx.work / "eval-run", variant=ctx.sizes.eval_variant)))
    torch.manual_seed(0)
    folder = save_model_dir(ctx.work / "eval-model", model=build_model(cfg), config={**cfg, "step": 0}, step=0)
    runs: list[dict[str, Any]] = []
    for i, device in enumerate([ctx.device, torch.device("cpu")]):
        pred = ctx.work / f"eval-pred-{i}-{device.type}"
        with gpu_peak(device) as mem:
            start = time.perf_counter()
            result = evaluate_model(store, folder, splits=("val", "test"), device=str(device), progress=False,
                                    pred_dir=pred)
            seconds = time.perf_counter() - start
        splits = {name: {"images": r.num_images, "miou": r.precise.miou} for name, r in result.splits.items()}
        runs.append({"device": str(device), "seconds": round(seconds, 3), "splits": splits, "pred_dir": pred, **mem})
    equal = total = 0
    for path in sorted(runs[0]["pred_dir"].rglob("*.png")):
        a = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        b = cv2.imread(str(runs[1]["pred_dir"] / path.relative_to(runs[0]["pred_dir"])), cv2.IMREAD_UNCHANGED)
        assert a is not None and b is not None, f"unreadable prediction {path.name}"
        equal, total = equal + int((a == b).sum()), total + a.size
    first = runs[0]
    out: dict[str, Any] = {"variant": ctx.sizes.eval_variant, "model_classes": cfg["num_classes"],
                           **{k: v for k, v in first.items() if k != "pred_dir"},
                           "cpu_seconds": runs[1]["seconds"], "predicted_pixels": total,
                           "label_agreement_vs_cpu": round(equal / total, 5) if total else None}
    scores = [sp["miou"] for sp in first["splits"].values()]
    out["ok"] = bool(scores) and total > 0 and all(m is not None and math.isfinite(m) for m in scores) and all(
        sp["images"] > 0 for sp in first["splits"].values())
    if not ctx.gpu:  # the same device twice: must agree exactly
        out["ok"] = out["ok"] and equal == total
    return out


# ----------------------------------------------------------------------------------------------- efficiency


def check_efficiency(ctx: Context) -> dict[str, Any]:
    """MaSSFormer vs Mask2Former (bench/model.py's rows): eval forward time (median of repeats, alternating the
    models), MACs (meta device) and peak memory at each size; then one training step of Mask2Former."""
    from addclass.models.build import MODEL_BUILDERS
    from addclass.models.macs import count_macs

    s = ctx.sizes
    bench_model = load_bench_module("model")
    k = bench_model.NUM_CLASSES
    dev = ctx.device
    torch.manual_seed(0)
    models = {row: MODEL_BUILDERS[v](k, pixel_decoder=d).eval().to(dev) for row, (v, d) in s.forward_rows.items()}
    sizes: list[dict[str, Any]] = []
    for height, width in s.forward_sizes:
        entry: dict[str, Any] = {"input_hw": [height, width], "rows": {}}
        sizes.append(entry)
        images = torch.rand(1, 3, height, width, device=dev) * 255
        times: dict[str, list[float]] = {row: [] for row in models}
        for row, (variant, decoder) in s.forward_rows.items():  # outside no_grad: the counter hooks autograd
            macs = count_macs(variant, height=height, width=width, num_classes=k, pixel_decoder=decoder)
            entry["rows"][row] = {"variant": variant, "macs_g": macs["macs_g"],
                                  "macs_excluding_sampling_g": macs["macs_excluding_sampling_g"]}
        with torch.no_grad():
            for row, model in models.items():
                rec = entry["rows"][row]
                with gpu_peak(dev) as mem:
                    out = model(images)  # the warm-up pass is also the memory pass
                rec.update(mem)
                rec["output_finite"] = bool(torch.isfinite(out["pred_masks"]).all())
                del out
            for _ in range(s.forward_repeats):
                for row, model in models.items():
                    sync(dev)
                    start = time.perf_counter()
                    model(images)
                    sync(dev)
                    times[row].append(time.perf_counter() - start)
        for row, rec in entry["rows"].items():
            median = statistics.median(times[row])
            rec["forward_ms"] = round(1000 * median, 2)
            rec["forward_ms_all"] = [round(1000 * t, 2) for t in times[row]]
            mfu_figures(ctx, rec, flops=rec["macs_g"] * 1e9 * 2, seconds=median)
        m, b = entry["rows"]["massformer"], entry["rows"]["mask2former"]
        entry["time_ratio_massformer_over_mask2former"] = round(m["forward_ms"] / b["forward_ms"], 3)
        entry["macs_ratio_massformer_over_mask2former"] = round(m["macs_g"] / b["macs_g"], 3)
        if m["peak_gpu_mem_gb"] and b["peak_gpu_mem_gb"]:
            entry["memory_ratio_massformer_over_mask2former"] = round(m["peak_gpu_mem_gb"] / b["peak_gpu_mem_gb"], 3)
        del images
    # Mask2Former's deformable sampling (grid_sample) backward: one training forward + backward, batch 2
    height, width = s.forward_sizes[0]
    m2f = models["mask2former"].train()
    with gpu_peak(dev) as mem:
        out = m2f(torch.rand(2, 3, height, width, device=dev) * 255)
        loss = out["pred_masks"].float().square().mean() + out["pred_logits"].float().square().mean()
        loss.backward()
    grads = [p.grad for p in m2f.parameters() if p.grad is not None]
    backward = {"input_hw": [height, width], "batch": 2, "params_with_grad": len(grads),
                "grads_finite": all(bool(torch.isfinite(g).all()) for g in grads), **mem}
    ok = all(rec["output_finite"] for e in sizes for rec in e["rows"].values()) and backward["grads_finite"] and (
        len(grads) > 0)
    return {"ok": ok, "sizes": sizes, "mask2former_backward": backward, "repeats": s.forward_repeats,
            "paper_macs_g_at_4096x3072": {"massformer": bench_model.PAPER["massformer"]["macs_g"],
                                          "mask2former": bench_model.PAPER["mask2former"]["macs_g"]}}


# ----------------------------------------------------------------------------------------------------- main


CHECK_FUNCTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "train": check_train, "resume": check_resume, "ddp": check_ddp, "labeler": check_labeler,
    "predict": check_predict, "evaluate": check_evaluate, "efficiency": check_efficiency,
}


def run_check(name: str, ctx: Context) -> dict[str, Any]:
    log.info("check %s: start", name)
    start = time.perf_counter()
    try:
        result = CHECK_FUNCTIONS[name](ctx)
    except Exception as e:  # the check failed: recorded, the others run
        log.exception("check %s failed", name)
        result = {"ok": False, "error": error_record(e)}
    finally:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    result["seconds"] = round(time.perf_counter() - start, 2)
    log.info("check %s: %s in %.1f s", name, "ok" if result.get("ok") else "FAILED", result["seconds"])
    return result


def environment(ctx: Context) -> dict[str, Any]:
    env: dict[str, Any] = {
        "mode": "cpu" if ctx.cpu else "gpu", "python": platform.python_version(), "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "platform": platform.platform(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    if ctx.gpu:
        props = torch.cuda.get_device_properties(0)
        env.update({
            "gpu": props.name, "gpu_count": torch.cuda.device_count(),
            "gpu_memory_gb": round(props.total_memory / GIB, 1), "capability": f"{props.major}.{props.minor}",
            "bf16_supported": torch.cuda.is_bf16_supported(),
            "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
        })  # fmt: skip
        try:
            version = torch.cuda.nccl.version()
            env["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        except Exception as e:  # no NCCL in this build
            env["nccl"] = f"unavailable: {e}"
    env["peak_bf16_tflops"] = ctx.peak_tflops
    if ctx.peak_tflops is None:
        env.setdefault("null_reasons", {})["peak_bf16_tflops"] = (
            NO_GPU if not ctx.gpu else "card not in PEAK_BF16_TFLOPS (pass --peak-tflops)")
    return env


def clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become None, paths strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(clean(doc), indent=1, allow_nan=False) + "\n")
    tmp.replace(path)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[int]:
    """Everything written to stdout (fd 1, C libraries included) goes to stderr inside the block; yields a
    descriptor of the real stdout."""
    sys.stdout.flush()
    real = os.dup(1)
    os.dup2(2, 1)
    try:
        yield real
    finally:
        sys.stdout.flush()
        os.dup2(real, 1)
        os.close(real)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--ddp-worker"]:
        return ddp_worker(argv[1], argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--cpu", action="store_true", help="the dry run: every check on the CPU, small sizes")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here (after every check)")
    parser.add_argument("--checks", nargs="+", choices=CHECKS, default=list(CHECKS), help="checks to run")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the card's peak dense bf16 TFLOPs, for MFU (default: from the device name)")
    parser.add_argument("--work-dir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.cpu and not torch.cuda.is_available():
        print(json.dumps({"schema": SCHEMA, "ok": False, "complete": True,
                          "error": "no CUDA device: run on a GPU machine, or pass --cpu for the dry run"}))
        return 1
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    peak = args.peak_tflops
    if peak is None and not args.cpu:
        peak = peak_tflops_for(torch.cuda.get_device_name(0))
    ctx = Context(cpu=args.cpu, work=work, peak_tflops=peak)
    start = time.perf_counter()
    doc: dict[str, Any] = {"schema": SCHEMA, "mode": "cpu" if args.cpu else "gpu", "ok": False, "complete": False,
                           "env": environment(ctx), "checks": {}}
    with stdout_to_stderr() as real_stdout:
        try:
            for name in args.checks:
                doc["checks"][name] = run_check(name, ctx)
                doc["wall_s"] = round(time.perf_counter() - start, 1)
                if args.out:
                    write_json(args.out, doc)
        finally:
            if not args.keep and args.work_dir is None:
                shutil.rmtree(work, ignore_errors=True)
        doc["failed"] = [n for n, c in doc["checks"].items() if not c.get("ok")]
        doc["ok"] = not doc["failed"]
        doc["complete"] = True
        doc["wall_s"] = round(time.perf_counter() - start, 1)
        if not args.cpu:
            doc["within_gpu_budget"] = doc["wall_s"] <= GPU_BUDGET_S
        if args.out:
            write_json(args.out, doc)
        with os.fdopen(os.dup(real_stdout), "w") as out:
            out.write(json.dumps(clean(doc), indent=1, allow_nan=False) + "\n")
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
