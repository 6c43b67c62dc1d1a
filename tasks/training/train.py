"""Train a MaSSFormer on one label version of a store, with checkpoints and exact resume.

Two recipes (`models.training.optim.RECIPES`): ``paper`` for a model that starts from trained weights (an
ImageNet backbone or ``init_model``): AdamW (lr 3e-4, wd 0.05, backbone lr x0.1, no decay on embeddings and
norms), gradient clipping at L2 norm 0.01, per-iteration cosine decay without warm-up; and ``scratch`` for a
random start (higher lr, the backbone at the full rate, warm-up, a looser clip). ``recipe="auto"`` picks by
the start; fields set explicitly win over the recipe. Augmentation: random resize 0.5-2.0 /
``RandomCrop(cat_max_ratio=0.75)`` / flip / photometric distortion (`tasks.training.dataset`). Classes whose registry
``source`` is ``"pseudo"`` get the inverse loss weights (docs/design.md §2.8, ``reweight``). Training is fp32,
as the reference recipe; ``amp=True`` opts in to bf16 autocast of the forward pass on a GPU (the losses stay
fp32: the criterion turns autocast off). On the CPU the loop is deterministic for a given seed.

Outputs in ``out_dir``: ``train_config.json`` (the resolved `TrainConfig`), ``train_log.jsonl`` (one line
per step: step, lr, every loss term, total, seconds), ``checkpoints/`` + ``latest.json`` (`tasks.training.checkpoint`)
and ``final/`` (a model folder: `tasks.model_files.model_folder.load_trained_model` rebuilds the model from it).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from addclass.common.errors import InputError
from addclass.models.massformer.model import MaSSFormer
from addclass.models.training.criterion import LossNormalizers, SetCriterion, build_criterion
from addclass.models.training.ema import WeightEma
from addclass.models.training.optim import GRAD_CLIP_NORM_TYPE, build_lr_scheduler, build_optimizer
from addclass.models.training.sync_norm import sync_batch_norm
from addclass.models.training.targets import build_targets
from addclass.models.weights import load_backbone_checkpoint
from addclass.storage.registry import PROV_REVIEWED
from addclass.tasks.model_files.model_folder import (
    FINAL_DIR,
    LATEST_FILE,
    CheckpointError,
    build_model,
    init_from_model,
    latest_checkpoint,
    load_model_weights,
    save_model_dir,
)
from addclass.tasks.training.checkpoint import (
    atomic_write_bytes,
    atomic_write_json,
    get_rng_state,
    load_training_state,
    remove_partial_writes,
    save_checkpoint,
    set_rng_state,
)
from addclass.tasks.training.dataset import WORKER_START_METHOD, LabelVersionDataset, StepSampler, worker_init
from addclass.tasks.training.distributed import Distributed
from addclass.tasks.training.train_config import (  # re-exported: the config and its helpers are part of the training API
    RESUME_FREE_FIELDS,
    TrainConfig,
    check_resumable,
    model_config,
    resolve_recipe,
    resolve_train_config,
    run_name,
    version_classes,
)
from addclass.tasks.training.train_memory import check_train_memory
from addclass.tasks.training.validation import (
    format_scores,
    learning_curve_png,
    unpredicted_classes,
    validate,
)

__all__ = [
    "RESUME_FREE_FIELDS", "StepInfo", "TrainConfig", "check_resumable", "model_config", "resolve_device",
    "resolve_recipe", "resolve_train_config", "run_name", "train", "version_classes",
]

log = logging.getLogger(__name__)

LOG_FILE = "train_log.jsonl"
# A diverged run cannot be resumed with another lr (the optimizer state restores the old one, and `lr` is part of
# the run's identity): the deterministic loop would replay the same steps.
DIVERGED_ADVICE = "Start a new run (another out_dir) with a lower lr, or from the last checkpoint's weights " \
                  "with init_model."
TRAIN_CONFIG_FILE = "train_config.json"
WARN_UNLEARNED_AFTER = 0.3  # share of the run after which a class with IoU 0 on val is warned about


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass(frozen=True)
class StepInfo:
    """One finished optimisation step, as `train` hands it to its ``on_step`` hook (the log line's values)."""

    step: int  # 1-based; the last one is ``iters``
    iters: int
    losses: dict[str, float]  # every loss term
    total: float  # their sum
    lr: float  # the rate this step used (head group)
    seconds: float  # data wait + forward + backward + update of this step (not validation or checkpointing)


def _truncate_log(path: Path, *, step: int) -> None:
    """Keeps the log lines of steps <= ``step`` (a killed run may have logged past its last checkpoint)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line)["step"]) <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):  # a line cut by the kill
            continue
    atomic_write_bytes(path, "".join(f"{line}\n" for line in kept).encode())


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True,
          on_step: Callable[[StepInfo], None] | None = None) -> Path:
    """Trains (or resumes) a run and writes ``out_dir/final``.

    Args:
        config: The run's configuration (resolved here with `resolve_train_config`).
        resume: Continue from ``out_dir/latest.json`` (with the same step, weights, optimizer, scheduler and
            RNG states, and data order); a fresh start when the run has no checkpoint yet.
        progress: Show a tqdm progress bar.
        on_step: Called after each step (after its validation and checkpoint, when due), e.g. to report
            progress elsewhere; not part of the run's identity. An exception from it stops the run.

    Returns:
        The final model folder ``out_dir/final`` (``model.safetensors`` + ``config.json``).

    Raises:
        FileExistsError: ``out_dir`` already holds a run and ``resume`` is False.
        MemoryError: the run would not fit in the device's free memory (`tasks.training.train_memory`).
        CheckpointError: the checkpoint to resume is corrupt or belongs to another run (other variant,
            classes, label version or recipe); the message names the file.
    """
    config = resolve_train_config(config)
    ctx = Distributed.from_env(resolve_device(config.device))
    try:
        return _train(config, ctx, resume=resume, progress=progress, on_step=on_step)
    finally:
        ctx.close()


def _train(config: TrainConfig, ctx: Distributed, *, resume: bool, progress: bool,
           on_step: Callable[[StepInfo], None] | None) -> Path:
    """`train` in one process of the run (``ctx``); only the main process writes."""
    out = Path(config.out_dir)
    micro_batch = _micro_batch(config, ctx)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    expected = model_config(config)
    checkpoint = _checkpoint_to_resume(out, expected, resume=resume, clean=ctx.is_main)
    check_train_memory(variant=config.variant, batch_size=micro_batch, crop_size=config.crop_size,
                       device=ctx.device)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    random.seed(config.seed)
    run = _build_run(config, expected, checkpoint=checkpoint, ctx=ctx)
    start_step = 0
    if checkpoint is not None:
        start_step = _restore_training_state(run, checkpoint)
        if ctx.is_main:
            _truncate_log(out / LOG_FILE, step=start_step)
        log.info("resuming %s at step %d", out, start_step)
    elif ctx.is_main:
        atomic_write_json(out / TRAIN_CONFIG_FILE, config.to_dict())
        atomic_write_bytes(out / LOG_FILE, b"")
    if ctx.is_main:
        log.info("%s; torch threads: %d", os.environ.get("ADDCLASS_THREADS", "threads: OpenMP's default wait policy"),
                 torch.get_num_threads())
    if ctx.active:
        log.info("data parallel: %d processes x %d images x %d accumulation steps = batch %d", ctx.world_size,
                 micro_batch, config.accumulate, config.batch_size)
    if start_step < config.iters:
        _train_steps(config, run, expected=expected, start_step=start_step, progress=progress and ctx.is_main,
                     on_step=on_step if ctx.is_main else None)
    final = out / FINAL_DIR
    if ctx.is_main:
        model_cfg = {**expected, "step": config.iters}
        save_model_dir(final, model=run.kept, config=model_cfg, step=config.iters)
        learning_curve_png(out)
    ctx.barrier()  # every process returns once final/ is written
    return final


def _micro_batch(config: TrainConfig, ctx: Distributed) -> int:
    """Images per forward pass in each process: the batch shared by the processes and accumulation steps.

    Raises:
        InputError: they do not divide the batch, or batch norm would see a single image.
    """
    parts = ctx.world_size * config.accumulate
    if config.batch_size % parts:
        raise InputError(f"Expected batch_size {config.batch_size} divisible by processes x accumulate = "
                         f"{ctx.world_size} x {config.accumulate}. Got a remainder of {config.batch_size % parts}.")
    return config.batch_size // parts


@dataclass
class _Run:
    """What the loop updates: the model (and the wrapper that runs it), its loss, the optimizer and schedule."""

    model: MaSSFormer
    criterion: SetCriterion
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ctx: Distributed
    net: torch.nn.Module  # what the step runs: the model, or its DistributedDataParallel wrapper
    ema: WeightEma | None = None

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def kept(self) -> MaSSFormer:
        """The model the run validates, checkpoints and ends with: the weight average when there is one."""
        return self.model if self.ema is None else self.ema.module  # type: ignore[return-value]


def _checkpoint_to_resume(out: Path, expected: dict[str, Any], *, resume: bool, clean: bool = True) -> Path | None:
    """The checkpoint a resume continues from (checked to belong to this run), None for a fresh start;
    ``clean``: remove what a killed checkpoint write left (the main process does).

    Raises:
        FileExistsError: ``out`` holds a run and ``resume`` is False.
    """
    if not resume:
        if (out / LATEST_FILE).exists() or (out / FINAL_DIR).exists():
            raise FileExistsError(
                f"{out} already holds a training run; resume it (resume=True) or pick another out_dir."
            )
        return None
    for partial in remove_partial_writes(out) if clean else ():  # a kill during a checkpoint write left these
        log.info("removed the partial write %s", partial)
    checkpoint = latest_checkpoint(out)
    if checkpoint is not None:
        check_resumable(checkpoint, expected)
    return checkpoint


def _build_run(config: TrainConfig, expected: dict[str, Any], *, checkpoint: Path | None,
               ctx: Distributed | None = None) -> _Run:
    """The model (from the checkpoint, ``init_model``, a backbone checkpoint or random), loss and optimizer;
    in a data-parallel run (``ctx``) with batch norm over all processes, wrapped in DistributedDataParallel."""
    ctx = ctx or Distributed(device=resolve_device(config.device))
    device = ctx.device
    model = build_model(expected)
    if checkpoint is not None:
        load_model_weights(model, checkpoint)
    elif config.init_model is not None:
        init_from_model(model, config.init_model, expected=expected)
    elif config.backbone_checkpoint is not None:
        load_backbone_checkpoint(model, config.backbone_checkpoint, strict=not config.variant.endswith("tiny"))
    if ctx.active:
        model = sync_batch_norm(model, device=device)  # type: ignore[assignment]
    model.to(device).train()
    net: torch.nn.Module = model
    if ctx.active:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    criterion = build_criterion(
        num_classes=expected["num_classes"],
        num_points=config.num_points,
        reweight=config.reweight,  # type: ignore[arg-type]
        inverse_weight_near_pseudo=config.inverse_weight_near_pseudo,
    ).to(device)
    assert config.lr is not None and config.backbone_lr_mult is not None and config.warmup_iters is not None
    log.info("recipe %s: lr %g, backbone x%g, warm-up %d of %d iterations, gradient clip %s", config.recipe,
             config.lr, config.backbone_lr_mult, config.warmup_iters, config.iters, config.grad_clip or "none")
    optimizer = build_optimizer(model, lr=config.lr, weight_decay=config.weight_decay,
                                backbone_lr_mult=config.backbone_lr_mult)
    scheduler = build_lr_scheduler(optimizer, max_iters=config.iters, warmup_iters=config.warmup_iters)
    # a checkpoint's weights are the average (`_save_checkpoint`): it starts there, the trained weights are
    # restored from its training state
    ema = WeightEma(model, decay=config.ema_decay) if config.ema_decay else None
    return _Run(model, criterion, optimizer, scheduler, ctx, net, ema)


def _restore_training_state(run: _Run, checkpoint: Path) -> int:
    """Loads the optimizer, scheduler and RNG states of ``checkpoint``; returns its step.

    Raises:
        CheckpointError: the state does not fit this run (the message names the file).
    """
    state = load_training_state(checkpoint)
    try:
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        if run.ema is not None:
            run.model.load_state_dict(state["trained_weights"])
        set_rng_state(state["rng"])
        return int(state["step"])
    except (KeyError, ValueError, RuntimeError) as e:
        path = checkpoint / "training_state.pt"
        raise CheckpointError(f"Cannot restore the training state {path}: {e}") from e


def _data_loader(config: TrainConfig, *, start_step: int, ctx: Distributed) -> DataLoader:
    """Augmented micro-batches of this process's share of the training split, in the seed's order from
    ``start_step`` on (`StepSampler`)."""
    dataset = LabelVersionDataset(
        config.store, version=config.version, split=config.split, augment=True, crop_size=config.crop_size,
        scale_range=config.scale_range, cat_max_ratio=config.cat_max_ratio, seed=config.seed,
    )
    sampler = StepSampler(
        len(dataset), batch_size=config.batch_size, total_steps=config.iters, start_step=start_step,
        seed=config.seed, rank=ctx.rank, world_size=ctx.world_size,
    )
    return DataLoader(
        dataset, batch_size=_micro_batch(config, ctx), sampler=sampler, num_workers=config.num_workers,
        pin_memory=ctx.device.type == "cuda", worker_init_fn=worker_init if config.num_workers else None,
        multiprocessing_context=WORKER_START_METHOD if config.num_workers else None,
    )


def _train_steps(
    config: TrainConfig, run: _Run, *, expected: dict[str, Any], start_step: int, progress: bool,
    on_step: Callable[[StepInfo], None] | None = None,
) -> None:
    """Steps ``start_step + 1 .. iters``: one log line each, validation and checkpoints on their schedule."""
    out = Path(config.out_dir)
    pseudo = set(expected["pseudo_classes"])
    batches = _step_batches(_data_loader(config, start_step=start_step, ctx=run.ctx), config.accumulate)
    head_group = next((i for i, g in enumerate(run.optimizer.param_groups) if g.get("name") == "head"), 0)
    bar = tqdm(total=config.iters, initial=start_step, desc="train", unit="it", disable=not progress)
    step = start_step
    t0 = time.perf_counter()
    with open(out / LOG_FILE, "a") if run.ctx.is_main else nullcontext(None) as log_file:
        for micro_batches in batches:
            losses, total = _step(config, run, micro_batches, pseudo=pseudo, step=step + 1)
            lr = float(run.optimizer.param_groups[head_group]["lr"])  # the rate this step used
            run.scheduler.step()
            step += 1
            values = torch.stack([v.detach().float() for v in losses.values()] + [total.detach()]).tolist()
            seconds = time.perf_counter() - t0  # data wait + forward + backward + update (not checkpointing)
            record = {"step": step, "lr": lr, **dict(zip(losses, values[:-1], strict=True)), "total": values[-1],
                      "seconds": round(seconds, 4)}
            if log_file is not None:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{values[-1]:.3f}")
            if log_file is not None and config.val_every and (step % config.val_every == 0 or step == config.iters):
                # before the checkpoint: a resume from this step keeps this step's scores in the log
                _validate_step(config, run.kept, step=step, device=run.device, log_file=log_file)
                run.model.train()
            if run.ctx.is_main and (step % config.checkpoint_every == 0 or step == config.iters):
                _save_checkpoint(config, run, expected=expected, step=step)
            if on_step is not None:
                on_step(StepInfo(step=step, iters=config.iters, total=values[-1], lr=lr, seconds=seconds,
                                 losses=dict(zip(losses, values[:-1], strict=True))))
            t0 = time.perf_counter()
    bar.close()
    if step != config.iters:
        raise RuntimeError(f"The data loader stopped at step {step} of {config.iters}.")


def _step_batches(loader: DataLoader, accumulate: int) -> Iterator[list[dict[str, Any]]]:
    """The loader's micro-batches, ``accumulate`` at a time: one list per training step."""
    group: list[dict[str, Any]] = []
    for batch in loader:
        group.append(batch)
        if len(group) == accumulate:
            yield group
            group = []


def point_generators(seed: int, samples: Any) -> list[torch.Generator]:
    """One CPU generator per sample for its loss points, seeded by the run's seed and the sample's position in
    the run (`tasks.training.dataset.StepSampler`): an image's points do not depend on the process or micro-batch it
    lands in, nor on a resume."""
    return [torch.Generator().manual_seed(int(np.random.SeedSequence([seed, int(p)]).generate_state(1)[0]))
            for p in samples]


def _step(
    config: TrainConfig, run: _Run, micro_batches: list[dict[str, Any]], *, pseudo: set[int], step: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One optimisation step (step number ``step``) over this process's micro-batches; returns the loss terms of
    the whole batch (all processes) and their sum.

    Raises:
        FloatingPointError: the loss or the gradient norm is not finite (the weights are then not updated).
    """
    out, ctx = config.out_dir, run.ctx
    parts = []
    counts = torch.zeros(3, dtype=torch.float64)
    for batch in micro_batches:
        images = batch["image"].to(run.device, non_blocking=True)  # b x 3 x H x W
        labels = batch["labels"].to(run.device, non_blocking=True)  # b x H x W
        reviewed = batch["provenance"].to(run.device, non_blocking=True) == PROV_REVIEWED  # b x H x W
        targets = [build_targets(lab, pseudo_classes=pseudo, reviewed=rev)
                   for lab, rev in zip(labels, reviewed, strict=True)]
        counts += run.criterion.count(targets, num_queries=run.model.num_queries)
        parts.append((images, targets, point_generators(config.seed, batch["sample"])))
    # DDP averages the gradients over the processes: each one's losses are sums over its images divided by the
    # whole batch's counts over the number of processes, so the average is the loss of the batch in one piece
    normalizers = LossNormalizers(*(ctx.all_reduce_sum(counts) / ctx.world_size).tolist())
    use_amp = config.amp and run.device.type == "cuda"
    run.optimizer.zero_grad(set_to_none=True)
    summed: dict[str, torch.Tensor] = {}
    for i, (images, targets, generators) in enumerate(parts):
        last = i == len(parts) - 1
        with nullcontext() if last or not ctx.active else run.net.no_sync():  # type: ignore[operator]
            with torch.autocast(device_type=run.device.type, dtype=torch.bfloat16, enabled=use_amp):
                outputs = run.net(images)
            losses = run.criterion(outputs, targets, generator=generators, normalizers=normalizers)
            torch.stack(list(losses.values())).sum().backward()
        for k, v in losses.items():
            summed[k] = summed.get(k, 0.0) + v.detach().float()
    names = list(summed)
    values = ctx.all_reduce_sum(torch.stack([summed[k] for k in names]).cpu()) / ctx.world_size  # the batch's
    losses, total = dict(zip(names, values, strict=True)), values.sum()
    if not torch.isfinite(total):
        raise FloatingPointError(
            f"Non-finite loss at step {step} of {out}: "
            f"{ {k: float(v) for k, v in losses.items()} }. {DIVERGED_ADVICE}"
        )
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.grad_clip or math.inf,
                                               GRAD_CLIP_NORM_TYPE)
    if not torch.isfinite(grad_norm):  # clipping would spread it: no step, so no bad checkpoint
        raise FloatingPointError(
            f"Non-finite gradient norm at step {step} of {out} (loss {float(total):.4g}); the weights "
            f"were not updated. {DIVERGED_ADVICE}"
        )
    run.optimizer.step()
    if run.ema is not None:
        run.ema.update(run.model, step=step)
    return losses, total


def _save_checkpoint(config: TrainConfig, run: _Run, *, expected: dict[str, Any], step: int) -> None:
    """A checkpoint holds the model the run keeps (`_Run.kept`, usable as any model folder); with a weight
    average, its training state also holds the trained weights, which a resume continues from."""
    state: dict[str, Any] = {
        "step": step,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "rng": get_rng_state(),
    }
    if run.ema is not None:
        state["trained_weights"] = run.model.state_dict()
    save_checkpoint(
        Path(config.out_dir), step=step, model=run.kept, config={**expected, "step": step},
        training_state=state,
        keep=config.keep_checkpoints,
    )


def _validate_step(config: TrainConfig, model: MaSSFormer, *, step: int, device: torch.device,
                   log_file: IO[str]) -> None:
    """Scores the model on ``val``, logs and records the scores, and warns about classes not learned yet."""
    scores = validate(model, store=config.store, version=config.version, max_images=config.val_max_images,
                      device=str(device))
    log_file.write(json.dumps({"step": step, "val": scores}) + "\n")
    log_file.flush()
    log.info("step %d/%d %s", step, config.iters, format_scores(scores))
    missing = unpredicted_classes(scores)
    if missing and step >= WARN_UNLEARNED_AFTER * config.iters:
        log.warning("step %d/%d (%.0f %% of the run): classes %s are not predicted on val (IoU 0). The model is "
                    "not learning them: check their labels (addclass inspect) or the recipe (lr, iters).",
                    step, config.iters, 100 * step / config.iters, missing)
