"""Runs the pinned, unmodified MaSS13K model code (../shared/reference/mass13k) with small stand-ins for the
mmcv / mmdet / mmengine / mmseg pieces it imports, which are not installable here.

The stand-ins are written from those libraries' documented behaviour (mmcv 2.0 ``MultiheadAttention`` /
``FFN`` / ``ModulatedDeformConv2d`` / ``build_norm_layer``, mmdet 3.3 ``SinePositionalEncoding`` /
``Mask2FormerHead`` / ``Mask2FormerTransformerDecoderLayer``, mmseg ``ResLayer``), with the same attribute names,
so the official modules build the official state-dict names and run their own forward code. The reference
files are only read and executed at test time; nothing of them is copied here.

What is official here: ``ResNet_m`` and its blocks, ``HR_Pixel_Decoder`` with every block, and
``MaSSFormerHead.__init__`` / ``forward`` / ``_forward_head``. What is a stand-in: the deformable conv kernel
(``torchvision.ops.deform_conv2d``, same offset layout as mmcv), the attention / FFN wrappers, the sine
encoding, mmdet's ``Mask2FormerHead.__init__`` (which builds the queries, the transformer decoder and the
mask MLP) and the decoder layer's forward (cross-attention, norms[0], self-attention, norms[1], FFN, norms[2]).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops import deform_conv2d

# ---- mmcv -------------------------------------------------------------------------------------------------


def build_norm_layer(cfg: dict[str, Any], num_features: int, postfix: int | str = "") -> tuple[str, nn.Module]:
    kind = cfg.get("type", "BN")
    if kind in ("BN", "SyncBN", "BN2d"):
        layer: nn.Module = nn.BatchNorm2d(num_features)
        name = f"bn{postfix}"
    elif kind == "LN":
        layer, name = nn.LayerNorm(num_features), f"ln{postfix}"
    else:
        raise ValueError(f"the stand-in norm layer builds BN or LN only (the release uses those); got {kind!r}")
    for p in layer.parameters():
        p.requires_grad_(cfg.get("requires_grad", True))
    return name, layer


def build_conv_layer(cfg: dict[str, Any] | None, *args: Any, **kwargs: Any) -> nn.Module:
    if cfg is not None and cfg.get("type", "Conv2d") != "Conv2d":
        raise ValueError(f"the stand-in conv builder builds Conv2d only (the release uses it); got {cfg!r}")
    return nn.Conv2d(*args, **kwargs)


def _activation(cfg: dict[str, Any] | None) -> nn.Module:
    cfg = cfg or {"type": "ReLU", "inplace": True}
    if cfg["type"] == "ReLU":
        return nn.ReLU(inplace=cfg.get("inplace", False))
    if cfg["type"] == "GELU":
        return nn.GELU()
    raise ValueError(f"the stand-in activation is ReLU or GELU only (the release uses those); got {cfg!r}")


class ModulatedDeformConv2d(nn.Module):
    """mmcv DCNv2: ``weight`` (out, in/groups, k, k), optional ``bias``; offsets (dy, dx) per tap, row-major."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, groups: int = 1, deform_groups: int = 1, bias: bool = True) -> None:
        super().__init__()
        assert groups == 1 and deform_groups == 1
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kernel_size, kernel_size))
        if bias:
            self.bias: nn.Parameter | None = nn.Parameter(torch.zeros(out_channels))
        else:
            self.register_parameter("bias", None)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        return deform_conv2d(x, offset, self.weight, self.bias, stride=self.stride, padding=self.padding,
                             dilation=self.dilation, mask=mask)


class MultiheadAttention(nn.Module):
    """mmcv's wrapper: ``attn`` = nn.MultiheadAttention (sequence-first), returns identity + attention."""

    def __init__(self, embed_dims: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 dropout_layer: Any = None, init_cfg: Any = None, batch_first: bool = False, **kwargs: Any) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.attn = nn.MultiheadAttention(embed_dims, num_heads, dropout=attn_drop, **kwargs)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, query: Tensor, key: Tensor | None = None, value: Tensor | None = None,
                identity: Tensor | None = None, query_pos: Tensor | None = None, key_pos: Tensor | None = None,
                attn_mask: Tensor | None = None, key_padding_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        key = query if key is None else key
        value = key if value is None else value
        identity = query if identity is None else identity
        if key_pos is None and query_pos is not None and query_pos.shape == key.shape:
            key_pos = query_pos
        if query_pos is not None:
            query = query + query_pos
        if key_pos is not None:
            key = key + key_pos
        if self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        out = self.attn(query, key, value, attn_mask=attn_mask, key_padding_mask=key_padding_mask)[0]
        if self.batch_first:
            out = out.transpose(0, 1)
        return identity + self.proj_drop(out)


class FFN(nn.Module):
    """mmcv's FFN: ``layers`` = (Sequential(Linear, act, Dropout), Linear, Dropout); identity added."""

    def __init__(self, embed_dims: int = 256, feedforward_channels: int = 1024, num_fcs: int = 2,
                 act_cfg: dict[str, Any] | None = None, ffn_drop: float = 0.0, dropout_layer: Any = None,
                 add_identity: bool = True, init_cfg: Any = None, **kwargs: Any) -> None:
        super().__init__()
        assert num_fcs == 2
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(embed_dims, feedforward_channels), _activation(act_cfg), nn.Dropout(ffn_drop)),
            nn.Linear(feedforward_channels, embed_dims),
            nn.Dropout(ffn_drop),
        )
        self.add_identity = add_identity

    def forward(self, x: Tensor, identity: Tensor | None = None) -> Tensor:
        out = self.layers(x)
        if not self.add_identity:
            return out
        return (x if identity is None else identity) + out


# ---- mmdet ------------------------------------------------------------------------------------------------


class SinePositionalEncoding(nn.Module):
    """mmdet's: cumulative sums of the unpadded mask, normalised to (0, scale], sin/cos interleaved, y first."""

    def __init__(self, num_feats: int, temperature: int = 10000, normalize: bool = False,
                 scale: float = 2 * math.pi, eps: float = 1e-6, offset: float = 0.0, init_cfg: Any = None) -> None:
        super().__init__()
        self.num_feats, self.temperature, self.normalize = num_feats, temperature, normalize
        self.scale, self.eps, self.offset = scale, eps, offset

    def forward(self, mask: Tensor, input: Tensor | None = None) -> Tensor:
        not_mask = 1 - mask.to(torch.int)
        y = not_mask.cumsum(1, dtype=torch.float32)
        x = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            y = (y + self.offset) / (y[:, -1:, :] + self.eps) * self.scale
            x = (x + self.offset) / (x[:, :, -1:] + self.eps) * self.scale
        dim_t = torch.arange(self.num_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_feats)
        pos_x, pos_y = x[..., None] / dim_t, y[..., None] / dim_t  # B x H x W x F
        b, h, w = mask.shape
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).view(b, h, w, -1)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).view(b, h, w, -1)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # B x 2F x H x W


class _DecoderLayer(nn.Module):
    """Mask2FormerTransformerDecoderLayer: cross-attn -> norms[0] -> self-attn -> norms[1] -> FFN -> norms[2]."""

    def __init__(self, self_attn_cfg: dict[str, Any], cross_attn_cfg: dict[str, Any], ffn_cfg: dict[str, Any],
                 norm_cfg: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(**self_attn_cfg)
        self.cross_attn = MultiheadAttention(**cross_attn_cfg)
        self.ffn = FFN(**ffn_cfg)
        dims = self_attn_cfg["embed_dims"]
        self.norms = nn.ModuleList(nn.LayerNorm(dims) for _ in range(3))

    def forward(self, query: Tensor, key: Tensor, value: Tensor, query_pos: Tensor, key_pos: Tensor,
                cross_attn_mask: Tensor | None = None, self_attn_mask: Tensor | None = None,
                query_key_padding_mask: Tensor | None = None, key_padding_mask: Tensor | None = None,
                **kwargs: Any) -> Tensor:
        query = self.cross_attn(query=query, key=key, value=value, query_pos=query_pos, key_pos=key_pos,
                                attn_mask=cross_attn_mask, key_padding_mask=key_padding_mask)
        query = self.norms[0](query)
        query = self.self_attn(query=query, key=query, value=query, query_pos=query_pos, key_pos=query_pos,
                               attn_mask=self_attn_mask, key_padding_mask=query_key_padding_mask)
        query = self.norms[1](query)
        return self.norms[2](self.ffn(query))


class _TransformerDecoder(nn.Module):
    def __init__(self, num_layers: int, layer_cfg: dict[str, Any], return_intermediate: bool = True,
                 init_cfg: Any = None, **kwargs: Any) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_DecoderLayer(**layer_cfg) for _ in range(num_layers))
        self.post_norm = nn.LayerNorm(layer_cfg["self_attn_cfg"]["embed_dims"])


class Mask2FormerHead(nn.Module):
    """mmdet 3.3 Mask2FormerHead.__init__ (the module structure; losses, assigner and sampler left out)."""

    def __init__(self, in_channels: list[int], feat_channels: int, out_channels: int,
                 num_things_classes: int = 80, num_stuff_classes: int = 53, num_queries: int = 100,
                 num_transformer_feat_level: int = 3, pixel_decoder: Any = None,
                 enforce_decoder_input_project: bool = False, transformer_decoder: Any = None,
                 positional_encoding: Any = None, **kwargs: Any) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.num_transformer_feat_level = num_transformer_feat_level
        self.num_heads = transformer_decoder["layer_cfg"]["cross_attn_cfg"]["num_heads"]
        self.num_transformer_decoder_layers = transformer_decoder["num_layers"]
        self.pixel_decoder = nn.Identity()  # MaSSFormerHead replaces it
        self.transformer_decoder = _TransformerDecoder(**transformer_decoder)
        self.decoder_embed_dims = self.transformer_decoder.post_norm.normalized_shape[0]
        assert not enforce_decoder_input_project and self.decoder_embed_dims == feat_channels
        self.decoder_input_projs = nn.ModuleList(nn.Identity() for _ in range(num_transformer_feat_level))
        self.decoder_positional_encoding = SinePositionalEncoding(**positional_encoding)
        self.query_embed = nn.Embedding(num_queries, feat_channels)
        self.query_feat = nn.Embedding(num_queries, feat_channels)
        self.level_embed = nn.Embedding(num_transformer_feat_level, feat_channels)
        self.cls_embed = nn.Linear(feat_channels, num_things_classes + num_stuff_classes + 1)
        self.mask_embed = nn.Sequential(
            nn.Linear(feat_channels, feat_channels), nn.ReLU(inplace=True),
            nn.Linear(feat_channels, feat_channels), nn.ReLU(inplace=True),
            nn.Linear(feat_channels, out_channels),
        )


# ---- mmengine / mmseg -------------------------------------------------------------------------------------


class BaseModule(nn.Module):
    def __init__(self, init_cfg: Any = None) -> None:
        super().__init__()
        self.init_cfg = init_cfg


class _Registry:
    def register_module(self, *args: Any, **kwargs: Any) -> Any:
        return lambda cls: cls


class ResLayer(nn.Sequential):
    """mmseg's ResLayer (no avg_down, no multi-grid): the first block strides and carries the downsample."""

    def __init__(self, block: Any, inplanes: int, planes: int, num_blocks: int, stride: int = 1,
                 dilation: int = 1, avg_down: bool = False, conv_cfg: Any = None,
                 norm_cfg: dict[str, Any] | None = None, multi_grid: Any = None, contract_dilation: bool = False,
                 **kwargs: Any) -> None:
        assert not avg_down and multi_grid is None
        norm_cfg = norm_cfg or {"type": "BN"}
        downsample = None
        if stride != 1 or inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                build_conv_layer(conv_cfg, inplanes, planes * block.expansion, kernel_size=1, stride=stride,
                                 bias=False),
                build_norm_layer(norm_cfg, planes * block.expansion)[1],
            )
        layers = [block(inplanes=inplanes, planes=planes, stride=stride, dilation=dilation, downsample=downsample,
                        conv_cfg=conv_cfg, norm_cfg=norm_cfg, **kwargs)]
        for _ in range(1, num_blocks):
            layers.append(block(inplanes=planes * block.expansion, planes=planes, stride=1, dilation=dilation,
                                conv_cfg=conv_cfg, norm_cfg=norm_cfg, **kwargs))
        super().__init__(*layers)


def _unavailable(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("the stand-ins cover the official forward pass only; this mmcv/mmdet piece is not part of it")


def _modules() -> dict[str, dict[str, Any]]:
    """Fake module name -> attributes, for every import of the three reference files."""
    registry = _Registry()
    return {
        "mmcv": {}, "mmcv.cnn": {"build_norm_layer": build_norm_layer, "build_conv_layer": build_conv_layer,
                                 "build_plugin_layer": _unavailable, "Conv2d": nn.Conv2d,
                                 "ConvModule": _unavailable},
        "mmcv.cnn.bricks": {}, "mmcv.cnn.bricks.transformer": {"FFN": FFN, "MultiheadAttention": MultiheadAttention},
        "mmcv.ops": {"ModulatedDeformConv2d": ModulatedDeformConv2d, "point_sample": _unavailable},
        "mmdet": {}, "mmdet.models": {}, "mmdet.models.layers": {"SinePositionalEncoding": SinePositionalEncoding},
        "mmdet.models.dense_heads": {"Mask2FormerHead": Mask2FormerHead},
        "mmdet.models.utils": {"get_uncertain_point_coords_with_randomness": _unavailable,
                               "multi_apply": _unavailable},
        "mmdet.utils": {"reduce_mean": _unavailable},
        "mmengine": {}, "mmengine.model": {"BaseModule": BaseModule, "ModuleList": nn.ModuleList,
                                           "caffe2_xavier_init": _unavailable, "normal_init": _unavailable,
                                           "xavier_init": _unavailable},
        "mmengine.structures": {"InstanceData": dict}, "mmengine.utils": {}, "mmengine.utils.dl_utils": {},
        "mmengine.utils.dl_utils.parrots_wrapper": {"_BatchNorm": nn.modules.batchnorm._BatchNorm},
        "mmseg": {}, "mmseg.registry": {"MODELS": registry}, "mmseg.structures": {},
        "mmseg.structures.seg_data_sample": {"SegDataSample": dict},
        "mmseg.utils": {"ConfigType": dict, "SampleList": list},
        # Packages of the reference files (their relative imports: .mass_decoder, ..utils).
        "mass13k_ref": {}, "mass13k_ref.decode_heads": {}, "mass13k_ref.backbones": {},
        "mass13k_ref.utils": {"ResLayer": ResLayer},
    }


@contextlib.contextmanager
def _fake_modules() -> Iterator[None]:
    saved = {name: sys.modules.get(name) for name in _modules()}
    try:
        for name, attrs in _modules().items():
            module = types.ModuleType(name)
            module.__path__ = []  # a package, so that submodules import
            module.__dict__.update(attrs)
            sys.modules[name] = module
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def _exec_file(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module


class OfficialMaSSFormer(nn.Module):
    """The official segmentor's parts: ``backbone`` (ResNet_m) and ``decode_head`` (MaSSFormerHead)."""

    def __init__(self, backbone: nn.Module, decode_head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head

    def forward(self, normalized: Tensor) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """Normalized B x 3 x H x W image -> (class logits per output, mask logits per output, edge logits)."""
        return self.decode_head(self.backbone(normalized), [])


def read_config(reference: Path) -> dict[str, Any]:
    """Executes the released config file (plain dict literals) and returns its namespace."""
    path = reference / "mmsegmentation/configs/massformer/massformer_r50_8xb2-90k_mass13k-1024x1024.py"
    namespace: dict[str, Any] = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    return namespace


def build_official(reference: Path, *, depth: int = 50) -> OfficialMaSSFormer:
    """The official model (random init), built by the reference code from the released config."""
    root = reference / "mmsegmentation/mmseg/models"
    with _fake_modules():
        decoder_name = "mass13k_ref.decode_heads.mass_decoder"
        sys.modules[decoder_name] = _exec_file(decoder_name, root / "decode_heads/mass_decoder.py")
        try:
            head_module = _exec_file("mass13k_ref.decode_heads.massformer_head",
                                     root / "decode_heads/massformer_head.py")
        finally:
            sys.modules.pop(decoder_name, None)
        backbone_module = _exec_file("mass13k_ref.backbones.resnet_m", root / "backbones/resnet_m.py")
        cfg = read_config(reference)["model"]
        backbone_cfg = {k: v for k, v in cfg["backbone"].items() if k not in ("type", "init_cfg")}
        backbone_cfg["depth"] = depth
        head_cfg = {k: v for k, v in cfg["decode_head"].items() if k != "type"}
        backbone = backbone_module.ResNet_m(**backbone_cfg)
        head = head_module.MaSSFormerHead(**head_cfg)
    return OfficialMaSSFormer(backbone, head)


def randomize_(model: nn.Module, *, seed: int) -> None:
    """Random values in every float tensor (offset convs included, so sampling moves off the grid)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("running_mean") or (t.dim() == 1 and name.endswith("bias")):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif t.dim() == 1:  # norm weights
                t.copy_(1 + torch.randn(t.shape, generator=g) * 0.1)
            else:
                fan_in = t[0].numel() if t.dim() > 1 else t.numel()
                scale = 0.5 if "dcn_offset" in name else 1.0
                t.copy_(torch.randn(t.shape, generator=g) * scale / math.sqrt(fan_in))


