# Behaviour of mmdet 3.x Mask2FormerHead / Mask2FormerTransformerDecoder as MaSS13K's MaSSFormerHead.forward
# (@ a6f8923) drives it: 6 layers, last layer on the stride-2 mask features, the others on a 0.5x resize.
"""Masked-attention transformer decoder (Mask2Former) with its class and mask heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from addclass.models.parts.position_encoding import sine_position_encoding

ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU}


class MaskedAttentionLayer(nn.Module):
    """Post-norm decoder layer: masked cross-attention -> norm -> self-attention -> norm -> FFN -> norm.

    The FFN activation is GELU in MaSSFormer (MaSS13K's config) and ReLU in Mask2Former.
    """

    def __init__(self, *, dim: int, num_heads: int, ffn_dim: int, activation: str = "gelu") -> None:
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.cross_norm = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.self_norm = nn.LayerNorm(dim)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}. Got {activation!r} instead.")
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), ACTIVATIONS[activation](), nn.Linear(ffn_dim, dim))
        self.ffn_norm = nn.LayerNorm(dim)

    def forward(
        self, query: Tensor, query_pos: Tensor, memory: Tensor, memory_pos: Tensor, attn_mask: Tensor
    ) -> Tensor:
        """Updates the queries.

        Args:
            query: B x Q x D.
            query_pos: B x Q x D learnable query positions.
            memory: B x hw x D (level embedding already added).
            memory_pos: 1 x hw x D sine encoding.
            attn_mask: (B * heads) x Q x hw bool, True = not attended.

        Returns:
            B x Q x D.
        """
        attn = self.cross_attn(
            query + query_pos, memory + memory_pos, memory, attn_mask=attn_mask, need_weights=False
        )
        query = self.cross_norm(query + attn[0])
        q = query + query_pos
        query = self.self_norm(query + self.self_attn(q, q, query, need_weights=False)[0])
        return self.ffn_norm(query + self.ffn(query))


class MLP(nn.Sequential):
    """Linear layers with ReLU between them (Mask2Former's mask_embed)."""

    def __init__(self, *, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        for i, d in enumerate(dims):
            layers.append(nn.Linear(d, out_dim if i == num_layers - 1 else hidden_dim))
            if i < num_layers - 1:
                layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class MaskedTransformerDecoder(nn.Module):
    """Mask2Former decoder cycling over 3 memory levels, plus the class and mask-embedding heads.

    Parameters split as in the accounting of docs/design.md §1.6: ``layers`` + ``post_norm`` form the
    "transformer decoder"; ``query_feat``, ``query_embed``, ``level_embed``, ``class_embed`` and
    ``mask_embed`` are the "heads".
    """

    def __init__(
        self,
        *,
        num_classes: int,
        hidden_dim: int = 256,
        num_queries: int = 100,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        num_layers: int = 6,
        num_feature_levels: int = 3,
        activation: str = "gelu",
        init: str = "xavier_normal",
    ) -> None:
        """Builds the decoder.

        Args:
            num_classes: K; the class head has K + 1 outputs (last = no object).
            hidden_dim: transformer width D (memories and mask features must have D channels).
            num_queries: Q.
            num_heads: attention heads.
            ffn_dim: FFN hidden width.
            num_layers: decoder layers (6 in MaSSFormer, 9 in Mask2Former).
            num_feature_levels: memory levels cycled through (layer i attends level i % levels).
            activation: FFN activation, ``"gelu"`` (MaSSFormer) or ``"relu"`` (Mask2Former).
            init: init of the layers' matrices, ``"xavier_normal"`` (mmdet's Mask2FormerHead, as MaSSFormer) or
                ``"xavier_uniform"`` (the Mask2Former repository's layers).
        """
        super().__init__()
        self.num_classes = num_classes
        self.num_heads = num_heads
        self.num_feature_levels = num_feature_levels
        self.layers = nn.ModuleList(
            MaskedAttentionLayer(dim=hidden_dim, num_heads=num_heads, ffn_dim=ffn_dim, activation=activation)
            for _ in range(num_layers)
        )
        self.post_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(num_feature_levels, hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(in_dim=hidden_dim, hidden_dim=hidden_dim, out_dim=hidden_dim, num_layers=3)
        if init not in ("xavier_normal", "xavier_uniform"):
            raise ValueError(f"init must be 'xavier_normal' or 'xavier_uniform'. Got {init!r} instead.")
        for p in self.layers.parameters():
            if p.dim() > 1:
                if init == "xavier_normal":
                    nn.init.xavier_normal_(p)  # mmdet Mask2FormerHead.init_weights
                else:
                    nn.init.xavier_uniform_(p)  # Mask2Former's SelfAttentionLayer/... _reset_parameters

    @property
    def num_queries(self) -> int:
        """Q."""
        return self.query_feat.num_embeddings

    def _predict(
        self, query: Tensor, mask_features: Tensor, attn_size: tuple[int, int] | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Class logits, mask logits and (optionally) the next layer's attention mask.

        Args:
            query: B x Q x D.
            mask_features: B x D x h x w.
            attn_size: memory size (h', w') of the next layer, or None to skip the attention mask.

        Returns:
            B x Q x (K+1) logits, B x Q x h x w mask logits, (B * heads) x Q x h'w' bool mask or None.
        """
        query = self.post_norm(query)
        logits = self.class_embed(query)  # B x Q x (K+1)
        embed = self.mask_embed(query)  # B x Q x D
        masks = torch.einsum("bqc,bchw->bqhw", embed, mask_features)  # B x Q x h x w
        if attn_size is None:
            return logits, masks, None
        attn = F.interpolate(masks.detach(), size=attn_size, mode="bilinear", align_corners=False)
        attn = attn.flatten(2) < 0  # sigmoid(x) < 0.5, B x Q x h'w'
        # A query that would see nothing attends everywhere (Mask2Former).
        attn = attn & ~attn.all(dim=-1, keepdim=True)
        attn = attn.unsqueeze(1).expand(-1, self.num_heads, -1, -1).flatten(0, 1)  # (B*heads) x Q x h'w'
        return logits, masks, attn

    def forward(
        self, mask_features: Tensor, memories: list[Tensor], *, mask_stride: int, keep_aux: bool = True
    ) -> list[tuple[Tensor, Tensor]]:
        """Runs the decoder.

        Args:
            mask_features: B x D x H/s x W/s, s = ``mask_stride`` (2 or 4), H and W the padded input size.
            memories: ``num_feature_levels`` maps B x D x h_l x w_l, low to high resolution.
            mask_stride: 2: intermediate predictions use a bilinear 0.5x resize of the mask features
                (stride 4) and the last layer the features themselves (stride 2), as MaSSFormer. 4: all
                predictions use the features (stride 4) and the last layer's mask logits are bilinearly
                upsampled 2x, which equals upsampling the features first (both maps are linear) and keeps the
                stride-2 output contract.
            keep_aux: False returns only the last prediction (inference; frees intermediate masks early).

        Returns:
            (class logits B x Q x (K+1), mask logits B x Q x h x w) for the initial queries and each layer;
            all at stride 4 except the last at stride 2.
        """
        b = mask_features.shape[0]
        if mask_stride == 2:
            h, w = mask_features.shape[-2:]
            low_res = F.interpolate(
                mask_features, size=(h // 2, w // 2), mode="bilinear", align_corners=False
            )
        elif mask_stride == 4:
            low_res = mask_features
        else:
            raise ValueError(f"mask_stride must be 2 or 4. Got {mask_stride} instead.")
        if len(memories) != self.num_feature_levels:
            raise ValueError(
                f"expected {self.num_feature_levels} memory levels. Got {len(memories)} instead."
            )

        inputs, positions, sizes = [], [], []
        for level, memory in enumerate(memories):
            d, mh, mw = memory.shape[1:]
            sizes.append((mh, mw))
            pos = sine_position_encoding(mh, mw, num_feats=d // 2, device=memory.device, dtype=memory.dtype)
            positions.append(pos.flatten(2).transpose(1, 2))  # 1 x hw x D
            inputs.append(memory.flatten(2).transpose(1, 2) + self.level_embed.weight[level])  # B x hw x D

        query = self.query_feat.weight.unsqueeze(0).expand(b, -1, -1)  # B x Q x D
        query_pos = self.query_embed.weight.unsqueeze(0).expand(b, -1, -1)  # B x Q x D
        logits, masks, attn = self._predict(query, low_res, sizes[0])
        predictions = [(logits, masks)] if keep_aux else []
        num_layers = len(self.layers)
        for i, layer in enumerate(self.layers):
            level = i % self.num_feature_levels
            query = layer(query, query_pos, inputs[level], positions[level], attn)
            if i < num_layers - 1:
                logits, masks, attn = self._predict(query, low_res, sizes[(i + 1) % self.num_feature_levels])
            elif mask_stride == 2:
                logits, masks, _ = self._predict(query, mask_features, None)
            else:
                logits, masks, _ = self._predict(query, low_res, None)
                masks = F.interpolate(masks, scale_factor=2.0, mode="bilinear", align_corners=False)
            if keep_aux or i == num_layers - 1:
                predictions.append((logits, masks))
        return predictions
