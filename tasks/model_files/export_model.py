"""Export a trained model for use outside addclass (`addclass export-model`): ONNX or a ``torch.export`` program.

The exported graph maps ``images`` B x 3 x H x W float32 RGB in 0..255 to ``scores`` B x K x H x W, the per-class
scores ``MaSSFormer.semantic_probs(images, scale=1.0)`` returns (argmax over K = the label map). Normalisation
and the zero padding to multiples of 256 happen inside the graph, so H and W are free:

- ``"onnx"``: height, width and batch are dynamic. Written by ``torch.onnx.export(..., dynamo=False)`` (the
  TorchScript-based exporter): it records the size arithmetic as ONNX shape ops, so no size is specialised,
  it exports the tiny model in seconds, and it needs neither ``onnxscript`` nor a guard-free model. The
  dynamo-based exporter also works with this wrapper, but took ~100 s for the tiny model (vs ~7 s) and names
  the output sides ``Min(height, 256*(((height + 255)//256)))``.
- ``"torch-export"``: a ``torch.export`` ``.pt2`` program (`torch.export.save`; load with `torch.export.load`
  and call ``.module()``), height and width dynamic, batch 1. ``torch.jit`` is deprecated, and a trace would
  freeze the padding amounts. The batch stays 1 because ``nn.MultiheadAttention`` (batch_first) feeds a
  transposed query to ``F.linear``, whose contiguity check adds a ``B != 1`` guard; the ONNX graph has no such
  guard.

A JSON sidecar ``OUT.json`` (e.g. ``model.onnx.json``) records the classes (names and store ids), test_scale,
the input and output, format, opset, torch version and the verification: with ``check=True`` the exported model
and PyTorch score the same random images at two sizes that are not multiples of 256 (and, for ONNX, two batch
sizes); a max abs difference above ``atol`` raises `ExportCheckError` and writes nothing.

The model's ``test_scale`` and ``test_window`` are not applied in the graph: for a model with ``test_scale != 1``,
resize the image by it before and the scores back after, as ``semantic_probs`` does; for one with a
``test_window``, score images larger than it (after the scale) in tiles of that size, as ``MaSSFormer.scores``
does; for one with several ``test_ratios``, do both at each scale ``test_scale * ratio`` and average the scores
normalised to sum 1 per pixel.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from addclass.common.errors import InputError, UserError
from addclass.models.massformer import deform
from addclass.models.massformer.model import MaSSFormer
from addclass.tasks.model_files.model_folder import load_trained_model, read_model_config, resolve_model_dir

ExportFormat = Literal["onnx", "torch-export"]
EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)
DEFAULT_OPSET = 17
MIN_OPSET = 16  # ONNX GridSample (the deformable convolutions) needs opset 16
DEFAULT_ATOL = 1e-3
# (batch, height, width) of the check inputs: no side a multiple of 256, so the padding is exercised. The
# PyTorch reference fails on batch 2 at 320 x 256 (a one-window-wide CST map makes ``mask.view`` in
# `models.massformer.deform` fail), hence batch 2 at 256 x 384.
CHECK_SHAPES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "onnx": ((2, 256, 384), (1, 320, 256)),
    "torch-export": ((1, 256, 384), (1, 320, 256)),
}
# Example input of the export: each side spans 2 padding blocks and is no multiple of 256, so that the
# export cannot specialise a side (or its padding) to the example's value.
EXAMPLE_SIZE = (300, 280)
MAX_SIDE = 16384
SIDECAR_SUFFIX = ".json"


class ExportCheckError(UserError, RuntimeError):
    """The exported model's scores differ from PyTorch's by more than the tolerance."""


class SemanticScores(nn.Module):
    """Export wrapper: B x 3 x H x W RGB 0..255 -> B x K x H x W class scores, unchunked.

    Same values as ``MaSSFormer.semantic_probs(images, scale=1.0)``. It pads to ``size_divisor * ceil(H /
    size_divisor)`` (not ``H + (-H % size_divisor)`` as ``MaSSFormer.preprocess`` does): the same number, but
    ``torch.export`` can prove that this one is a multiple of 256, which the CST windows need.
    """

    def __init__(self, model: MaSSFormer) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        """B x 3 x H x W float RGB in 0..255 -> B x K x H x W float scores (not normalized over K)."""
        m = self.model
        h, w = images.shape[-2:]
        d = m.size_divisor
        x = (images - m.pixel_mean) / m.pixel_std
        x = F.pad(x, (0, (w + d - 1) // d * d - w, 0, (h + d - 1) // d * d - h), value=0.0)  # B x 3 x H' x W'
        decoded = m.pixel_decoder(m.backbone(x))
        logits, masks = m.transformer_decoder(
            decoded.mask_features, decoded.memories, mask_stride=decoded.mask_stride, keep_aux=False
        )[-1]  # B x Q x (K+1), B x Q x H'/2 x W'/2
        cls_probs = logits.softmax(dim=-1)[..., :-1]  # B x Q x K
        up = F.interpolate(masks, scale_factor=2.0, mode="bilinear", align_corners=False)  # B x Q x H' x W'
        up = up[..., :h, :w].sigmoid()  # B x Q x H x W
        return torch.einsum("bqk,bqhw->bkhw", cls_probs, up)  # B x K x H x W


@contextlib.contextmanager
def _exportable_deform() -> Iterator[None]:
    """Routes every ``DeformLayer`` through the all-taps ``grid_sample`` implementation while exporting.

    ``deform_conv2d(impl="auto")`` picks an implementation from the map size (a guard on H and W) and may pick
    ``embedding_bag`` or torchvision's kernel, which have no ONNX form; all three agree to float rounding.
    """

    def grid_sample_deform(
        x: Tensor, offset: Tensor, mask: Tensor, weight: Tensor, *, padding: int, impl: str = "auto"
    ) -> Tensor:
        return deform._deform_conv2d_grid_sample(x, offset, mask, weight, padding=padding, per_tap=False)

    original = deform.deform_conv2d
    deform.deform_conv2d = grid_sample_deform  # type: ignore[assignment]
    try:
        yield
    finally:
        deform.deform_conv2d = original


def parse_format(value: str) -> ExportFormat:
    """``value`` if it names an export format, else InputError quoting it."""
    if value not in EXPORT_FORMATS:
        raise InputError(f"format must be one of {list(EXPORT_FORMATS)}. Got {value!r} instead.")
    return value  # type: ignore[return-value]


def parse_opset(value: int) -> int:
    """``value`` if it is an ONNX opset this export supports, else InputError quoting it."""
    if not isinstance(value, int) or isinstance(value, bool) or value < MIN_OPSET:
        raise InputError(f"opset must be an integer >= {MIN_OPSET} (GridSample). Got {value!r} instead.")
    return value


def sidecar_path(out_path: str | os.PathLike[str]) -> Path:
    """The JSON sidecar of an exported file: ``model.onnx`` -> ``model.onnx.json``."""
    path = Path(out_path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _export_onnx(module: nn.Module, example: Tensor, path: Path, *, opset: int) -> None:
    with warnings.catch_warnings():
        # the legacy exporter announces its deprecation; the tracer warns about shape checks that are
        # constant for every input (CSAttn's window divisibility, the weight shapes)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["images"],
            output_names=["scores"],
            dynamic_axes={
                "images": {0: "batch", 2: "height", 3: "width"},
                "scores": {0: "batch", 2: "height", 3: "width"},
            },
        )
    import onnx

    onnx.checker.check_model(str(path))


def _export_program(module: nn.Module, example: Tensor, path: Path) -> None:
    height = torch.export.Dim("height", min=1, max=MAX_SIDE)
    width = torch.export.Dim("width", min=1, max=MAX_SIDE)
    # Size-oblivious reasoning keeps the padding-block counts (1 for sides <= 256) from being specialised to
    # the example's; torch.onnx's own dynamo exporter sets the same flag.
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):  # type: ignore[attr-defined]
        program = torch.export.export(
            module, (example,), dynamic_shapes={"images": {2: height, 3: width}}, strict=False
        )
    torch.export.save(program, str(path))


def load_exported(path: str | os.PathLike[str], *, format: ExportFormat, threads: int | None = None
                  ) -> Callable[[Tensor], Tensor]:
    """Loads an exported model as a function images -> scores (on the CPU).

    Args:
        path: The exported file.
        format: Its format.
        threads: onnxruntime intra-op threads (None: its default); torch-export uses torch's setting.

    Returns:
        B x 3 x H x W float32 RGB 0..255 -> B x K x H x W scores.
    """
    if parse_format(format) == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def run_onnx(images: Tensor) -> Tensor:
            scores = session.run(["scores"], {"images": images.detach().cpu().float().numpy()})[0]
            return torch.from_numpy(np.asarray(scores))

        return run_onnx
    program = torch.export.load(str(path)).module()

    def run_program(images: Tensor) -> Tensor:
        with torch.no_grad():
            return program(images.float())  # type: ignore[no-any-return]

    return run_program


def verify_export(
    path: str | os.PathLike[str], model: MaSSFormer, *, format: ExportFormat, atol: float = DEFAULT_ATOL,
    seed: int = 0
) -> list[dict[str, Any]]:
    """Scores random images with the exported model and with PyTorch (`MaSSFormer.semantic_probs`).

    Args:
        path: The exported file.
        model: The model it was exported from (eval mode, CPU).
        format: The file's format.
        atol: Largest allowed absolute difference of the scores.
        seed: Seed of the random images.

    Returns:
        Per checked shape: ``shape`` [B, 3, H, W] and ``max_abs_diff``.

    Raises:
        ExportCheckError: a difference above ``atol`` (the message lists every shape's).
    """
    run = load_exported(path, format=format)
    generator = torch.Generator().manual_seed(seed)
    results: list[dict[str, Any]] = []
    diffs: list[float] = []
    for b, h, w in CHECK_SHAPES[format]:
        images = torch.rand(b, 3, h, w, generator=generator) * 255  # B x 3 x H x W
        expected = model.semantic_probs(images, scale=1.0)  # B x K x H x W
        got = run(images)
        if got.shape != expected.shape:
            raise ExportCheckError(
                f"{path}: scores of a {list(images.shape)} input have shape {list(got.shape)}; PyTorch's "
                f"{list(expected.shape)}."
            )
        diffs.append(float((got - expected).abs().max()))
        results.append({"shape": [b, 3, h, w], "max_abs_diff": diffs[-1]})
    if not all(d <= atol for d in diffs):  # `not <=` also catches NaN
        raise ExportCheckError(
            f"{path}: the exported model's scores differ from PyTorch's by more than atol {atol:g}: {results}."
        )
    return results


def export_model(
    model_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    format: ExportFormat,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
    atol: float = DEFAULT_ATOL,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Exports a trained model to ``out_path`` and writes its JSON sidecar (`sidecar_path`).

    Args:
        model_dir: A run folder or a model folder (``RUN/final``, a checkpoint).
        out_path: The file to write (``.onnx``, ``.pt2``).
        format: ``"onnx"`` (dynamic batch, height, width) or ``"torch-export"`` (dynamic height, width;
            batch 1).
        opset: ONNX opset (ignored for torch-export).
        check: Compare the exported model with PyTorch at two sizes before writing (`verify_export`).
        atol: Largest allowed absolute difference of the scores in that check.
        overwrite: Replace an existing ``out_path`` (and its sidecar).

    Returns:
        The sidecar's content; ``path`` and ``sidecar`` are the written files.

    Raises:
        FileNotFoundError: nothing trained at ``model_dir``.
        CheckpointError: the model folder is corrupt.
        FileExistsError: ``out_path`` or its sidecar exists and ``overwrite`` is False.
        InputError: an unknown format or an unsupported opset.
        ExportCheckError: the exported model disagrees with PyTorch (nothing is written).
    """
    format = parse_format(format)
    if format == "onnx":
        opset = parse_opset(opset)
    out, sidecar = Path(out_path), sidecar_path(out_path)
    for path in (out, sidecar):
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it.")
        if path.is_dir():
            raise FileExistsError(f"{path} is a folder; pick a file name.")
    folder = resolve_model_dir(model_dir)
    config = read_model_config(folder)
    model = load_trained_model(folder).float()
    out.parent.mkdir(parents=True, exist_ok=True)
    # the same suffix: torch.export.save/load want ".pt2"
    tmp = out.with_name(f".{out.stem}.tmp-{uuid.uuid4().hex[:8]}{out.suffix}")
    try:
        example = torch.rand(1, 3, *EXAMPLE_SIZE, generator=torch.Generator().manual_seed(0)) * 255
        with torch.no_grad(), _exportable_deform():
            wrapper = SemanticScores(model).eval()
            if format == "onnx":
                _export_onnx(wrapper, example, tmp, opset=opset)
            else:
                _export_program(wrapper, example, tmp)
        verification = verify_export(tmp, model, format=format, atol=atol) if check else None
        info = _sidecar(config, folder=folder, format=format, opset=opset, atol=atol, verification=verification)
        _write_text(sidecar, json.dumps(info, indent=2) + "\n")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {**info, "path": str(out), "sidecar": str(sidecar)}


def _sidecar(config: dict[str, Any], *, folder: Path, format: ExportFormat, opset: int, atol: float,
             verification: list[dict[str, Any]] | None) -> dict[str, Any]:
    batch: str | int = "batch" if format == "onnx" else 1
    return {
        "format": format,
        "opset": opset if format == "onnx" else None,
        "torch_version": torch.__version__,
        "model_dir": str(folder.resolve()),
        "variant": config["variant"],
        "pixel_decoder": config.get("pixel_decoder", "hr"),
        "label_version": config.get("label_version"),
        "class_names": list(config["class_names"]),
        "store_class_ids": config.get("store_class_ids"),
        "test_scale": float(config.get("test_scale", 1.0)),
        "test_ratios": [float(r) for r in config.get("test_ratios", [1.0])],
        "test_window": int(config.get("test_window", 0)),
        "input": {
            "name": "images", "shape": [batch, 3, "height", "width"], "dtype": "float32",
            "description": "RGB in 0..255; any height and width (padded to multiples of 256 inside)",
        },
        "output": {
            "name": "scores", "shape": [batch, len(config["class_names"]), "height", "width"],
            "dtype": "float32",
            "description": "per-class scores sum_q softmax(cls)[q, k] * sigmoid(mask_q), as "
                           "MaSSFormer.semantic_probs(images, scale=1.0); argmax over classes = label map; "
                           "test_scale, test_ratios and test_window are not applied",
        },
        "verification": None if verification is None else {"atol": atol, "checks": verification},
    }


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
