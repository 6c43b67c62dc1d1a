"""Importing the official MaSS13K MaSSFormer weights: safe reading of an mmengine checkpoint, one versioned key
mapping from the official module names to ours, and a checked conversion.

The official release (xiechenxi99/MaSS13K, an mmsegmentation fork) saves mmengine training checkpoints
``{'meta', 'state_dict', 'message_hub', 'optimizer', 'param_schedulers'}``. The weights sit under ``state_dict``
as ``backbone.*`` (mmseg ``ResNet_m``, the same names as torchvision's ResNet) and ``decode_head.*``
(``MaSSFormerHead``: its ``pixel_decoder.pixel_decoder`` is ``HR_Pixel_Decoder``; the transformer decoder, the
queries and the class/mask heads come from mmdet's ``Mask2FormerHead``).

Safe reading (`read_mass13k_checkpoint`): ``message_hub`` pickles mmengine objects (``HistoryBuffer``) and numpy
arrays, so ``torch.load(weights_only=True)`` refuses the file, and ``weights_only=False`` would let the file run
any code. Instead the pickle's globals are listed statically first
(``torch.serialization.get_unsafe_globals_in_checkpoint``, which disassembles without unpickling). Globals of
the training stack (`PLACEHOLDER_MODULES`: mmengine, mmcv, mmdet, mmseg, numpy) are then allowed *as inert
placeholders*: each name is bound to a fresh class that accepts any arguments and discards its state, and
torch's own weights-only unpickler loads the file with them (``torch.serialization.safe_globals``). No code of
those libraries is imported or run, and no other global is allowed: a file naming anything else (``os.system``,
``builtins.eval``, a class of another package) is refused before unpickling, with the names in the message.
The placeholders only ever stand for the parts we discard (message hub, numpy scalars in ``meta``): a
placeholder inside ``state_dict`` is an error. This was preferred over a hand-written restricted
``pickle.Unpickler`` because torch's weights-only unpickler already restricts every opcode (``BUILD``, ``REDUCE``,
``APPEND``, persistent ids = storages only) and reads the storages itself; we only add names that do nothing.

Mapping (`MAPPING_RULES`, version `MAPPING_VERSION`): derived by reading the official modules
(``mass_decoder.py``: ``HR_Pixel_Decoder``, ``ConvBNReLU`` = ``conv``/``bn``, ``DeformLayer`` = ``dcn_offset``,
``dcn`` (mmcv ``ModulatedDeformConv2d``: ``weight``), ``dcn_bn``, ``up_sample``, ``up_bn``; ``SEB.mlp`` =
Sequential(MLP, Sigmoid) with ``MLP.mlp``; ``CST.cross_self_attn`` = ``CSAttn``; ``RFB.deformaspp``,
``conv1``/``bn``/``upconv``/``bn2``; ``LSE.cbn1/dcn3/conv1/conv2/cbn2``; ``edge_conv``; ``edge_rec`` = ``ERM``
``conv1``/``dcn``/``conv2``/``norm``; ``massformer_head.py``: ``FPNbaseline.pixel_decoder``, ``cls_embed``) and
mmcv/mmdet's attribute names (``MultiheadAttention.attn`` = ``nn.MultiheadAttention``; ``FFN.layers`` =
Sequential(Sequential(Linear, act, Dropout), Linear, Dropout); ``Mask2FormerTransformerDecoderLayer`` with
``self_attn``, ``cross_attn``, ``ffn`` and ``norms.0/1/2`` applied after cross-attention, self-attention and
the FFN; ``Mask2FormerHead.query_feat/query_embed/level_embed/mask_embed``; ``transformer_decoder.post_norm``)
against ``MODEL_BUILDERS["r50"](num_classes=7).state_dict()``. The rules rename module paths, never shapes, and
the widths do not enter them, so the same table serves a Lite (ResNet-18) layout with ``variant="lite_r18"``.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from addclass.common.errors import InputError
from addclass.models.build import MODEL_BUILDERS

# Bump when a rule changes: imported model folders record the version they were converted with.
MAPPING_VERSION = 1

MASS13K_CLASS_NAMES: tuple[str, ...] = ("background", "person", "building", "tree", "ground", "sky", "water")
# Official name -> ours (docs/interfaces.md ids 0..6 are the same classes in the same order).
MASS13K_TO_OURS: dict[str, str] = {
    "background": "others",
    "person": "human",
    "building": "building",
    "tree": "vegetation",
    "ground": "ground",
    "sky": "sky",
    "water": "water",
}

# Top-level packages whose pickled objects may appear (outside the weights) in an mmengine checkpoint.
PLACEHOLDER_MODULES = ("mmengine", "mmcv", "mmdet", "mmseg", "numpy")

_PD = r"pixel_decoder\."  # our pixel decoder prefix, after rule 1
_ATTN = r"(?:pixel_decoder\.cst\.attn|transformer_decoder\.layers\.\d+)\.(?:cross_attn|self_attn)"
_FFN = r"pixel_decoder\.cst\.attn\.ffn[12]|transformer_decoder\.layers\.\d+\.ffn"
_BN_LEAF = r"(weight|bias|running_mean|running_var|num_batches_tracked)"

# Ordered (regex, replacement) rules, applied one after the other with ``re.sub`` to every official key:
# first the module paths (head, then the pixel decoder's blocks), then the leaves inside the shared building
# blocks. ``backbone.*`` passes through unchanged (ResNet_m names = torchvision names).
MAPPING_RULES: tuple[tuple[str, str], ...] = (
    # Head: MaSSFormerHead.pixel_decoder (FPNbaseline).pixel_decoder (HR_Pixel_Decoder), mmdet head parts.
    (r"^decode_head\.pixel_decoder\.pixel_decoder\.", "pixel_decoder."),
    (r"^decode_head\.transformer_decoder\.", "transformer_decoder."),
    (r"^decode_head\.(query_feat|query_embed|level_embed|mask_embed)\.", r"transformer_decoder.\1."),
    (r"^decode_head\.cls_embed\.", "transformer_decoder.class_embed."),
    # Pixel decoder blocks.
    (rf"^{_PD}SEB\.(\d+)\.mlp\.0\.mlp\.", r"pixel_decoder.seb.\1.mlp."),  # SEB.mlp = (MLP, Sigmoid)
    (rf"^{_PD}CST\.cross_self_attn\.", "pixel_decoder.cst.attn."),
    (rf"^{_PD}CST\.", "pixel_decoder.cst."),
    (rf"^{_PD}RFB\.deformaspp\.", "pixel_decoder.rfb.branches."),
    (rf"^{_PD}RFB\.conv1\.", "pixel_decoder.rfb.fuse.0."),
    (rf"^{_PD}RFB\.bn\.", "pixel_decoder.rfb.fuse.1."),
    (rf"^{_PD}RFB\.upconv\.", "pixel_decoder.rfb.up_conv.0."),
    (rf"^{_PD}RFB\.bn2\.", "pixel_decoder.rfb.up_conv.1."),
    (rf"^{_PD}LSE\.cbn1\.", "pixel_decoder.lse.conv_branch."),
    (rf"^{_PD}LSE\.dcn3\.", "pixel_decoder.lse.dcn_branch."),
    (rf"^{_PD}LSE\.conv([12])\.", r"pixel_decoder.lse.attn_conv\1."),
    (rf"^{_PD}LSE\.cbn2\.", "pixel_decoder.lse.fuse."),
    (rf"^{_PD}edge_conv\.", "pixel_decoder.edge_head."),
    (rf"^{_PD}edge_rec\.conv1\.", "pixel_decoder.erm.reduce."),
    (rf"^{_PD}edge_rec\.conv2\.", "pixel_decoder.erm.expand."),
    (rf"^{_PD}edge_rec\.", "pixel_decoder.erm."),
    # ConvBNReLU (conv, bn) -> our Sequential (0, 1): in_projections, conv_avg, out, LSE cbn1/cbn2, edge_conv.0.
    (rf"^({_PD}.+)\.conv\.weight$", r"\1.0.weight"),
    (rf"^({_PD}.+)\.bn\.{_BN_LEAF}$", r"\1.1.\2"),
    # DeformLayer: dcn_offset, dcn (ModulatedDeformConv2d, bias=False), dcn_bn, up_sample, up_bn.
    (rf"^({_PD}.+)\.dcn_offset\.(weight|bias)$", r"\1.offset_conv.\2"),
    (rf"^({_PD}.+)\.dcn\.weight$", r"\1.weight"),
    (rf"^({_PD}.+)\.dcn_bn\.{_BN_LEAF}$", r"\1.norm.\2"),
    (rf"^({_PD}.+)\.up_sample\.weight$", r"\1.up.weight"),
    (rf"^({_PD}.+)\.up_bn\.{_BN_LEAF}$", r"\1.up_norm.\2"),
    # mmcv MultiheadAttention wraps nn.MultiheadAttention as .attn.
    (rf"^({_ATTN})\.attn\.", r"\1."),
    # mmcv FFN: layers = (Sequential(Linear, act, Dropout), Linear, Dropout) -> ours (Linear, act, Linear).
    (rf"^({_FFN})\.layers\.0\.0\.", r"\1.0."),
    (rf"^({_FFN})\.layers\.1\.", r"\1.2."),
    # Mask2FormerTransformerDecoderLayer.norms: 0 after cross-attention, 1 after self-attention, 2 after the FFN.
    (r"^(transformer_decoder\.layers\.\d+)\.norms\.0\.", r"\1.cross_norm."),
    (r"^(transformer_decoder\.layers\.\d+)\.norms\.1\.", r"\1.self_norm."),
    (r"^(transformer_decoder\.layers\.\d+)\.norms\.2\.", r"\1.ffn_norm."),
)
_COMPILED = tuple((re.compile(pattern), repl) for pattern, repl in MAPPING_RULES)

# Backbone layouts: (Bottleneck?, blocks per stage) -> our variant.
_BACKBONES: dict[tuple[bool, tuple[int, ...]], str] = {(True, (3, 4, 6, 3)): "r50", (False, (2, 2, 2, 2)): "lite_r18"}
_SHOWN = 10  # names listed per kind of problem in an error


def map_key(key: str) -> str:
    """Our name for an official MaSS13K key (`MAPPING_RULES` applied in order; unknown keys pass unchanged)."""
    for pattern, repl in _COMPILED:
        key = pattern.sub(repl, key)
    return key


class _Placeholder:
    """An inert stand-in for a pickled object of the training stack: takes any arguments, keeps nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Placeholder:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<placeholder for {type(self).__qualname__}>"


def _placeholder_for(name: str) -> type[_Placeholder]:
    return type(name, (_Placeholder,), {"__module__": __name__, "__qualname__": name})


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def read_mass13k_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Reads the weights (and the readable part of ``meta``) of an mmengine checkpoint without running its code.

    Args:
        path: the official ``.pth`` (an mmengine checkpoint, or a bare state dict of official keys).

    Returns:
        (state dict with official key names, info): info holds ``meta`` (plain values only; placeholders
        dropped) and ``placeholders``, the sorted global names that were read as placeholders.

    Raises:
        FileNotFoundError: no file at ``path``.
        InputError: not a torch checkpoint, a global outside `PLACEHOLDER_MODULES`, no state dict, or a
            non-tensor among the weights (one line, naming the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MaSS13K checkpoint not found: {path}.")
    placeholders: list[str] = []
    if zipfile.is_zipfile(path):
        try:
            unsafe = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception as e:  # a zip that torch.save did not write (e.g. a TorchScript archive)
            raise InputError(f"Cannot read {path}: not a torch checkpoint ({_first_line(e)}).") from e
        refused = [g for g in unsafe if g.split(".", 1)[0] not in PLACEHOLDER_MODULES]
        if refused:
            raise InputError(
                f"Refused {path}: it pickles {', '.join(refused[:_SHOWN])}, which an mmengine checkpoint does not "
                f"hold (only {'/'.join(PLACEHOLDER_MODULES)} objects are read, as inert placeholders)."
            )
        placeholders = unsafe
    allowed: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [
        (_placeholder_for(name), name) for name in placeholders
    ]
    try:
        with torch.serialization.safe_globals(allowed):
            obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # garbage, a truncated file, an opcode the weights-only unpickler refuses
        raise InputError(f"Cannot read {path}: not a readable torch checkpoint ({_first_line(e)}).") from e
    if not isinstance(obj, Mapping):
        raise InputError(f"{path} holds a {type(obj).__name__}, not an mmengine checkpoint or a state dict.")
    if isinstance(obj.get("state_dict"), Mapping):
        weights, meta = obj["state_dict"], obj.get("meta")
    elif obj and all(isinstance(k, str) for k in obj):
        weights, meta = obj, None
    else:
        raise InputError(f"{path} holds no state dict: top-level keys {sorted(map(str, obj))[:_SHOWN]}.")
    bad = [str(k) for k, v in weights.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise InputError(f"{path}: the state dict holds non-tensor entries {bad[:_SHOWN]}; not a weights file.")
    return dict(weights), {"meta": _plain(meta) if isinstance(meta, Mapping) else {}, "placeholders": placeholders}


def _plain(value: Any) -> Any:
    """JSON-able copy of ``value`` (dicts, lists, str, numbers, bools, None); anything else is dropped."""
    if isinstance(value, Mapping):
        out = {str(k): _plain(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v is not _DROP}
    if isinstance(value, list | tuple):
        return [v for v in map(_plain, value) if v is not _DROP]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return _DROP


_DROP = object()


def detect_backbone(state_dict: Mapping[str, Tensor]) -> str | None:
    """The variant (``r50``, ``lite_r18``) whose ResNet the official ``backbone.*`` keys describe, or None."""
    blocks = []
    for stage in range(1, 5):
        ids = {int(m.group(1)) for k in state_dict if (m := re.match(rf"backbone\.layer{stage}\.(\d+)\.", k))}
        blocks.append(len(ids))
    bottleneck = "backbone.layer1.0.conv3.weight" in state_dict
    return _BACKBONES.get((bottleneck, tuple(blocks)))


def check_mass13k_layout(state_dict: Mapping[str, Tensor], *, variant: str, source: str = "state dict") -> None:
    """Refuses, in one line, what is not an official MaSSFormer of ``variant``.

    Raises:
        InputError: no official pixel decoder keys (another model, or an addclass model), or the backbone of
            another variant (e.g. a Lite file imported as r50).
    """
    if not any(k.startswith("decode_head.pixel_decoder.pixel_decoder.") for k in state_dict):
        ours = any(k.startswith("pixel_decoder.") for k in state_dict)
        hint = (" It has addclass key names: use it as an addclass model folder instead." if ours else "")
        raise InputError(
            f"{source} is not a MaSS13K MaSSFormer checkpoint: no decode_head.pixel_decoder.pixel_decoder.* "
            f"weights (keys such as {sorted(state_dict)[:3]}).{hint}"
        )
    found = detect_backbone(state_dict)
    if found != variant:
        what = {"r50": "ResNet-50 (MaSSFormer R50)", "lite_r18": "ResNet-18 (MaSSFormer Lite)"}
        seen = what.get(found or "", "an unrecognised ResNet")
        fix = f"; import it with variant={found!r}" if found else ""
        raise InputError(f"{source} holds a {seen} backbone, not the {what.get(variant, variant)} asked for{fix}.")


def convert_mass13k_state_dict(
    state_dict: Mapping[str, Tensor], *, variant: str = "r50", num_classes: int = 7, source: str = "state dict"
) -> dict[str, Tensor]:
    """Renames every official key through `MAPPING_RULES` and checks the result against our model.

    Each of our tensors (``MODEL_BUILDERS[variant](num_classes).state_dict()``, buffers included) must be produced
    exactly once, with its shape.

    Args:
        state_dict: official keys (``backbone.*``, ``decode_head.*``), e.g. from `read_mass13k_checkpoint`.
        variant: our variant to convert to.
        num_classes: K of the checkpoint (MaSS13K: 7).
        source: how errors name the input (the file).

    Returns:
        Our state dict (the tensors themselves, not copies).

    Raises:
        InputError: naming the unknown official keys (with what they map to), our missing keys, duplicates
            (official keys mapping to the same name) and shape mismatches.
    """
    if variant not in MODEL_BUILDERS:
        raise InputError(f"variant must be one of {sorted(MODEL_BUILDERS)}. Got {variant!r} instead.")
    with torch.device("meta"):
        expected = MODEL_BUILDERS[variant](num_classes).state_dict()
    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    unknown, duplicates, shapes = [], [], []
    for key, value in state_dict.items():
        new = map_key(key)
        if new not in expected:
            unknown.append(f"{key} (-> {new})" if new != key else key)
        elif new in out:
            duplicates.append(f"{origin[new]} and {key} -> {new}")
        else:
            out[new], origin[new] = value, key
            if tuple(value.shape) != tuple(expected[new].shape):
                shapes.append(f"{key} {tuple(value.shape)} -> {new} {tuple(expected[new].shape)}")
    missing = [k for k in expected if k not in out]
    problems = [
        f"{len(items)} {what}: {items[:_SHOWN]}"
        for what, items in (("unknown keys", unknown), ("missing keys", missing),
                            ("duplicate targets", duplicates), ("shape mismatches", shapes))
        if items
    ]
    if problems:
        raise InputError(
            f"{source} does not convert to an addclass {variant} MaSSFormer (mapping v{MAPPING_VERSION}): "
            + "; ".join(problems) + "."
        )
    return out


def official_class_names(meta: Mapping[str, Any]) -> list[str] | None:
    """The class names an mmengine ``meta`` records (``dataset_meta.classes``), or None."""
    dataset_meta = meta.get("dataset_meta")
    classes = dataset_meta.get("classes") if isinstance(dataset_meta, Mapping) else None
    return [str(c) for c in classes] if isinstance(classes, Iterable) and not isinstance(classes, str) else None
