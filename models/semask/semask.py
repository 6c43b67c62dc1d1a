# Follows SeMask (Jain et al., "SeMask: Semantically Masked Transformers for Semantic Segmentation", 2021),
# Picsart-AI-Research/SeMask-Segmentation `SeMask-FPN/mmseg/models/backbones/semask_swin_transformer.py` (Swin
# blocks after Liu et al. 2021, SeMask semantic layers), `.../decode_heads/branch_fpn_head.py` (Semantic FPN
# head with the semantic decoder) and `configs/_base_/models/semfpn_semask_swin.py`. Own code; docs/design.md §1.9.
"""SeMask FPN as a mask-classification model: a SeMask Swin backbone, a Semantic FPN pixel decoder and a fixed
per-class head, for the `models.massformer.model.MaSSFormer` container (docs/design.md §1.9).

Data flow (s = stride w.r.t. the padded input; K classes; C_i = ``embed_dim * 2**i``)::

    image --patch 4x4--> stage 1..4 (Swin blocks, then a semantic layer; patch merging between stages)
    stage i: features X_i (s 4 * 2**i, C_i) and semantic maps S_i (K channels) = Linear(norm(X_i))
    backbone -> (image, norm0(X_1) .. norm3(X_4), [S_1 .. S_4])
    pixel decoder (Semantic FPN head, no neck as released): per-level conv-BN-ReLU(-up 2x) branches on C2..C5
        summed at s4 -> dropout -> 1x1 classifier: class logits B x K x H/4 x W/4 (the "mask features");
        semantic decoder: S_1 + up(S_2) + up(S_3) + up(S_4) at s4 (no parameters) -> ``aux_semantic``
    FixedClassHead: query k = class k; class logits fixed (one-hot); masks = the class logits, 2x upsampled

The container's semantic scores ``sum_q softmax(cls)[q, k] * sigmoid(mask_q)`` then equal
``sigmoid(class logit k)`` (up to ~1e-11), so the argmax is the per-pixel model's argmax.

This module holds the backbone (Swin blocks and semantic layers); the pixel decoder and the fixed class head
are in `models.semask.heads`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from addclass.common.errors import InputError

# The shifted-window attention mask value of the reference (Swin): -100, not -inf.
SHIFT_MASK_VALUE = -100.0

SemanticFeatures = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, list[Tensor]]


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth per sample: zeroes whole residual branches with probability ``p``, rescales the rest."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)  # B x 1 x ... x 1
    return x * mask / keep


def window_partition(x: Tensor, window: int) -> Tensor:
    """B x Hp x Wp x C (Hp, Wp multiples of ``window``) -> (B * nW) x window² x C, windows row-major."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)  # B x nh x ws x nw x ws x C
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)  # (B * nh * nw) x ws² x C


def window_reverse(windows: Tensor, window: int, h: int, w: int) -> Tensor:
    """Inverse of `window_partition`: (B * nW) x window² x C -> B x h x w x C."""
    c = windows.shape[-1]
    nh, nw = h // window, w // window
    x = windows.view(-1, nh, nw, window, window, c)  # B x nh x nw x ws x ws x C
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)  # B x h x w x C


def relative_position_index(window: int) -> Tensor:
    """window² x window² indices into the (2 window - 1)² relative position bias table (Swin's layout)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"))  # 2 x ws x ws
    flat = coords.flatten(1)  # 2 x ws²
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0)  # ws² x ws² x 2, (dy, dx)
    rel = rel + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]  # ws² x ws²


def shifted_window_mask(h: int, w: int, window: int, shift: int, device: torch.device) -> Tensor:
    """nW x window² x window² additive mask of the shifted windows of an h x w map (multiples of ``window``):
    0 between tokens from the same region of the unshifted map, `SHIFT_MASK_VALUE` otherwise."""
    region = torch.zeros(1, h, w, 1, device=device)  # 1 x h x w x 1
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for hs in cuts:
        for ws in cuts:
            region[:, hs, ws, :] = label
            label += 1
    windows = window_partition(region, window)[..., 0]  # nW x ws²
    diff = windows[:, None, :] - windows[:, :, None]  # nW x ws² x ws²
    return torch.where(diff == 0, torch.zeros_like(diff), torch.full_like(diff, SHIFT_MASK_VALUE))


class Mlp(nn.Module):
    """Linear -> GELU -> Linear (Swin's MLP; dropout 0 in the reference configs, so none here)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias (W-MSA / SW-MSA)."""

    relative_position_index: Tensor  # ws² x ws² buffer

    def __init__(self, *, dim: int, window: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise InputError(f"dim must be a multiple of num_heads={num_heads}. Got {dim} instead.")
        self.window = window
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        # Not persistent: derived from the window size (the Microsoft release saves it; the loader drops it).
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """Attends within each window.

        Args:
            x: (B * nW) x N x C, N = window².
            mask: nW x N x N additive mask (shifted windows), or None.

        Returns:
            (B * nW) x N x C.
        """
        bw, n, c = x.shape
        qkv = self.qkv(x).view(bw, n, 3, self.num_heads, c // self.num_heads)  # BW x N x 3 x h x c/h
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each BW x h x N x c/h
        attn = (q * self.scale) @ k.transpose(-2, -1)  # BW x h x N x N
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]  # N² x h
        attn = attn + bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)  # + 1 x h x N x N
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(bw // nw, nw, self.num_heads, n, n) + mask[None, :, None]  # B x nW x h x N x N
            attn = attn.view(bw, self.num_heads, n, n)
        out = attn.softmax(-1) @ v  # BW x h x N x c/h
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))  # BW x N x C


class SwinBlock(nn.Module):
    """Pre-norm Swin block: (shifted) window attention and an MLP, each with a residual and stochastic depth.

    The map is zero-padded (after the norm) to multiples of the window, as the reference's segmentation code
    does; padded tokens take part in unshifted windows as the reference lets them.
    """

    def __init__(self, *, dim: int, num_heads: int, window: int, shift: int, mlp_ratio: float,
                 drop_path: float) -> None:
        super().__init__()
        if not 0 <= shift < window:
            raise InputError(f"shift must be in [0, {window}). Got {shift} instead.")
        self.window = window
        self.shift = shift
        self.drop_path = drop_path
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim=dim, window=window, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, h: int, w: int, mask: Tensor | None) -> Tensor:
        """Args: x B x hw x C; the map size; the shifted-window mask of the padded map (used if shifted).

        Returns: B x hw x C."""
        b, _, c = x.shape
        ws = self.window
        y, hp, wp = _pad_to_windows(self.norm1(x).view(b, h, w, c), ws)  # B x Hp x Wp x C
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(window_partition(y, ws), mask if self.shift else None)  # (B * nW) x ws² x C
        y = window_reverse(y, ws, hp, wp)  # B x Hp x Wp x C
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        y = y[:, :h, :w].reshape(b, h * w, c)  # B x hw x C
        x = x + drop_path(y, self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


def _pad_to_windows(y: Tensor, window: int) -> tuple[Tensor, int, int]:
    """B x h x w x C zero-padded bottom/right to multiples of ``window``: (B x Hp x Wp x C, Hp, Wp)."""
    h, w = y.shape[1:3]
    pad_b, pad_r = -h % window, -w % window
    return F.pad(y, (0, 0, 0, pad_r, 0, pad_b)), h + pad_b, w + pad_r


class SemanticAttention(nn.Module):
    """SeMask's semantic attention: class maps from the features (``mlp_cls_q``) attend to class maps
    (``mlp_cls_k``), single head and unscaled, over values ``mlp_v``; the result (``mlp_res``, dropout 0.1) is
    added to the input through a learned gate ``gamma`` that starts at 0."""

    def __init__(self, *, dim: int, num_classes: int) -> None:
        super().__init__()
        self.mlp_cls_q = nn.Linear(dim, num_classes)
        self.mlp_cls_k = nn.Linear(dim, num_classes)
        self.mlp_v = nn.Linear(dim, dim)
        self.mlp_res = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(0.1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Args: x BW x N x C (tokens of windows).

        Returns: (semantic maps BW x N x K, gated features BW x N x C)."""
        sem = self.mlp_cls_q(x)  # BW x N x K
        score = (sem @ self.mlp_cls_k(x).transpose(-2, -1)).softmax(-1)  # BW x N x N
        feats = self.dropout(self.mlp_res(score @ self.mlp_v(x)))  # BW x N x C
        return sem, x + self.gamma * feats


class SemanticLayer(nn.Module):
    """One SeMask block after a stage: LayerNorm, then semantic attention in non-overlapping windows (the
    reference's ``SWSeMaskBlock``). The residual is around the normalised features, as in the reference."""

    def __init__(self, *, dim: int, num_classes: int, window: int) -> None:
        super().__init__()
        self.window = window
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SemanticAttention(dim=dim, num_classes=num_classes)

    def forward(self, x: Tensor, h: int, w: int) -> tuple[Tensor, Tensor]:
        """Args: x B x hw x C.

        Returns: (semantic maps B x K x h x w logits, features B x hw x C)."""
        b, _, c = x.shape
        ws = self.window
        y, hp, wp = _pad_to_windows(self.norm1(x).view(b, h, w, c), ws)  # B x Hp x Wp x C
        sem, y = self.attn(window_partition(y, ws))  # (B * nW) x ws² x K, (B * nW) x ws² x C
        y = window_reverse(y, ws, hp, wp)[:, :h, :w].reshape(b, h * w, c)  # B x hw x C
        sem = window_reverse(sem, ws, hp, wp)[:, :h, :w].permute(0, 3, 1, 2)  # B x K x h x w
        return sem.contiguous(), y


class PatchMerging(nn.Module):
    """2x2 neighbourhood concatenation (zero-padded to even sizes), LayerNorm, Linear 4C -> 2C (no bias)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        """Args: x B x hw x C. Returns: B x (ceil(h/2) ceil(w/2)) x 2C."""
        b, _, c = x.shape
        y = F.pad(x.view(b, h, w, c), (0, 0, 0, w % 2, 0, h % 2))  # B x 2h' x 2w' x C
        # Order of the Microsoft release: (0, 0), (1, 0), (0, 1), (1, 1) as (row, col) offsets.
        y = torch.cat([y[:, 0::2, 0::2], y[:, 1::2, 0::2], y[:, 0::2, 1::2], y[:, 1::2, 1::2]], -1)  # B x h' x w' x 4C
        return self.reduction(self.norm(y.flatten(1, 2)))  # B x h'w' x 2C


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch`` x ``patch`` conv (inputs zero-padded to multiples), then LayerNorm."""

    def __init__(self, *, patch: int, dim: int) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, image: Tensor) -> Tensor:
        """Args: image B x 3 x H x W. Returns: B x C x H/p x W/p."""
        h, w = image.shape[-2:]
        x = self.proj(F.pad(image, (0, -w % self.patch, 0, -h % self.patch)))  # B x C x h x w
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # B x C x h x w


class SwinStage(nn.Module):
    """Swin blocks (alternately unshifted and shifted by window // 2), the semantic layer, then (except in the
    last stage) patch merging. Module names follow the Microsoft release (``blocks``, ``downsample``)."""

    def __init__(self, *, dim: int, depth: int, num_heads: int, window: int, num_classes: int,
                 mlp_ratio: float, drop_paths: Sequence[float], downsample: bool) -> None:
        super().__init__()
        self.window = window
        self.blocks = nn.ModuleList(
            SwinBlock(dim=dim, num_heads=num_heads, window=window, shift=0 if i % 2 == 0 else window // 2,
                      mlp_ratio=mlp_ratio, drop_path=drop_paths[i])
            for i in range(depth)
        )
        self.semantic_layer = SemanticLayer(dim=dim, num_classes=num_classes, window=window)
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor, h: int, w: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """Args: x B x hw x C.

        Returns: (stage output B x hw x C, semantic maps B x K x h x w, merged B x h'w' x 2C or None)."""
        ws = self.window
        hp, wp = h + -h % ws, w + -w % ws  # integer arithmetic only: sizes stay symbolic when traced
        mask = shifted_window_mask(hp, wp, ws, ws // 2, x.device).to(x.dtype) if len(self.blocks) > 1 else None
        for block in self.blocks:
            x = block(x, h, w, mask)
        sem, x = self.semantic_layer(x, h, w)
        merged = self.downsample(x, h, w) if self.downsample is not None else None
        return x, sem, merged


class SeMaskSwinBackbone(nn.Module):
    """SeMask Swin Transformer: (image, C2 s4, C3 s8, C4 s16, C5 s32, [semantic maps s4 .. s32]).

    Parameter names of the Swin parts (``patch_embed``, ``layers.i.blocks``, ``layers.i.downsample``) equal
    the Microsoft release's, so `models.weights.load_swin_backbone_checkpoint` loads an ImageNet
    ``swin_tiny_patch4_window7_224.pth``; ``layers.i.semantic_layer`` and the output norms ``norm0..3`` are
    SeMask's and stay at their initialisation.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window: int = 7,
        patch: int = 4,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.3,
    ) -> None:
        """Builds the backbone with the reference's initialisation (truncated normal 0.02 for linear weights,
        zero biases, unit LayerNorms; SeMask's gates at 0).

        Args:
            num_classes: K, the channels of the semantic maps.
            embed_dim: C of stage 1 (96 for Swin-T); stage i has ``embed_dim * 2**i``.
            depths: Swin blocks per stage.
            num_heads: attention heads per stage.
            window: window side (7).
            patch: patch side (4): stage 1 is at stride ``patch``; must be 4 for C2 at stride 4.
            mlp_ratio: MLP hidden width over C.
            drop_path_rate: stochastic depth, rising linearly from 0 to this over all blocks.
        """
        super().__init__()
        if len(depths) != 4 or len(num_heads) != 4:
            raise InputError(
                f"depths and num_heads must have 4 entries. Got {list(depths)}, {list(num_heads)} instead."
            )
        if patch != 4:
            raise InputError(f"patch must be 4 (C2 at stride 4). Got {patch} instead.")
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linspace(0, rate, total)
        self.patch_embed = PatchEmbed(patch=patch, dim=embed_dim)
        self.out_channels = [embed_dim * 2**i for i in range(4)]
        self.layers = nn.ModuleList(
            SwinStage(dim=self.out_channels[i], depth=depths[i], num_heads=num_heads[i], window=window,
                      num_classes=num_classes, mlp_ratio=mlp_ratio,
                      drop_paths=rates[sum(depths[:i]) : sum(depths[: i + 1])], downsample=i < 3)
            for i in range(4)
        )
        self.norm0 = nn.LayerNorm(self.out_channels[0])
        self.norm1 = nn.LayerNorm(self.out_channels[1])
        self.norm2 = nn.LayerNorm(self.out_channels[2])
        self.norm3 = nn.LayerNorm(self.out_channels[3])
        self.apply(_init_swin)

    def forward(self, image: Tensor) -> SemanticFeatures:
        """Extracts features.

        Args:
            image: B x 3 x H x W normalized image.

        Returns:
            (image, C2 .. C5 at strides 4 .. 32 with ``out_channels``, each ``ceil(H / s) x ceil(W / s)``
            after Swin's own padding, and the list of the four stages' semantic logits B x K x h x w).
        """
        x = self.patch_embed(image)  # B x C x h x w
        h, w = x.shape[-2:]
        tokens = x.flatten(2).transpose(1, 2)  # B x hw x C
        norms = (self.norm0, self.norm1, self.norm2, self.norm3)
        outs: list[Tensor] = []
        sems: list[Tensor] = []
        for i, stage in enumerate(self.layers):
            out, sem, merged = stage(tokens, h, w)
            c = out.shape[-1]
            outs.append(norms[i](out).transpose(1, 2).reshape(-1, c, h, w))  # B x C_i x h x w
            sems.append(sem)
            if merged is not None:
                tokens, h, w = merged, (h + 1) // 2, (w + 1) // 2
        return image, outs[0], outs[1], outs[2], outs[3], sems


def _init_swin(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
