# Follows MaskFormer (Cheng et al., "Per-Pixel Classification is Not All You Need for Semantic Segmentation",
# NeurIPS 2021), facebookresearch/MaskFormer `mask_former/modeling/transformer/transformer_predictor.py`
# (TransformerPredictor) and `.../transformer/transformer.py` (DETR's post-norm TransformerDecoderLayer, Carion et
# al. 2020), R50 semantic config: no encoder layers, 6 decoder layers, transformer input res5. Own code.
"""MaskFormer's standard transformer decoder (DETR-style, no masked attention) with its class and mask heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from addclass.models.parts.position_encoding import sine_position_encoding
from addclass.models.parts.transformer_decoder import MLP


class DETRDecoderLayer(nn.Module):
    """Post-norm DETR decoder layer: self-attention -> add & LN -> cross-attention -> add & LN -> FFN (ReLU) ->
    add & LN, dropout after each block and inside the FFN."""

    def __init__(self, *, dim: int, num_heads: int, ffn_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)  # no parameters: one module serves the four dropout sites
        self.dropout_ffn = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, query_pos: Tensor, memory: Tensor, memory_pos: Tensor) -> Tensor:
        """Updates the queries.

        Args:
            tgt: B x Q x D.
            query_pos: B x Q x D learnable query embeddings.
            memory: B x hw x D.
            memory_pos: 1 x hw x D sine encoding.

        Returns:
            B x Q x D.
        """
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout(self.self_attn(q, q, tgt, need_weights=False)[0]))
        attn = self.cross_attn(tgt + query_pos, memory + memory_pos, memory, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout(attn))
        ffn = self.linear2(self.dropout_ffn(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout(ffn))


class StandardTransformerDecoder(nn.Module):
    """MaskFormer's transformer predictor: input projection, DETR decoder, class and mask-embedding heads.

    The queries start at zero and carry learnable positional embeddings (``query_embed``); every layer's output,
    after the shared decoder norm, predicts classes and masks (deep supervision). Parameters split as
    `models.build.model_info` reports them: ``input_proj`` + ``layers`` + ``decoder_norm`` form the
    "transformer decoder"; ``query_embed``, ``class_embed`` and ``mask_embed`` are the "heads".
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int,
        hidden_dim: int = 256,
        num_queries: int = 100,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        num_layers: int = 6,
        dropout: float = 0.1,
        mask_dim: int = 256,
    ) -> None:
        """Builds the decoder.

        Args:
            num_classes: K; the class head has K + 1 outputs (last = no object).
            in_channels: channels of the transformer input (C5: 2048 for ResNet-50).
            hidden_dim: transformer width D.
            num_queries: Q.
            num_heads: attention heads.
            ffn_dim: FFN hidden width.
            num_layers: decoder layers.
            dropout: dropout of the attention weights, after each block and inside the FFN.
            mask_dim: channels of the per-pixel embeddings (the mask features).
        """
        super().__init__()
        self.num_classes = num_classes
        self.input_proj: nn.Module
        if in_channels != hidden_dim:
            self.input_proj = nn.Conv2d(in_channels, hidden_dim, 1)
            nn.init.kaiming_uniform_(self.input_proj.weight, a=1)  # c2_xavier_fill
            nn.init.zeros_(self.input_proj.bias)  # type: ignore[arg-type]  # bias=True
        else:
            self.input_proj = nn.Identity()
        self.layers = nn.ModuleList(
            DETRDecoderLayer(dim=hidden_dim, num_heads=num_heads, ffn_dim=ffn_dim, dropout=dropout)
            for _ in range(num_layers)
        )
        for p in self.layers.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)  # DETR Transformer._reset_parameters
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(in_dim=hidden_dim, hidden_dim=hidden_dim, out_dim=mask_dim, num_layers=3)

    @property
    def num_queries(self) -> int:
        """Q."""
        return self.query_embed.num_embeddings

    def forward(
        self, mask_features: Tensor, memories: list[Tensor], *, mask_stride: int, keep_aux: bool = True
    ) -> list[tuple[Tensor, Tensor]]:
        """Runs the decoder.

        Args:
            mask_features: B x D x H/4 x W/4 per-pixel embeddings, H and W the padded input size.
            memories: one map, the transformer input (C5, B x in_channels x H/32 x W/32).
            mask_stride: must be 4.
            keep_aux: False returns only the last prediction (inference).

        Returns:
            (class logits B x Q x (K+1), mask logits B x Q x h x w) for each layer: at stride 4, except the last
            layer's masks, bilinearly upsampled 2x to stride 2 (the container's output contract; equal to
            upsampling the mask features first, both maps being linear).
        """
        if mask_stride != 4:
            raise ValueError(f"mask_stride must be 4. Got {mask_stride} instead.")
        if len(memories) != 1:
            raise ValueError(f"expected one memory map (C5). Got {len(memories)} instead.")
        src = self.input_proj(memories[0])  # B x D x h x w
        b, d, h, w = src.shape
        memory = src.flatten(2).transpose(1, 2)  # B x hw x D
        pos = sine_position_encoding(h, w, num_feats=d // 2, device=src.device, dtype=src.dtype)
        pos = pos.flatten(2).transpose(1, 2)  # 1 x hw x D
        query_pos = self.query_embed.weight.unsqueeze(0).expand(b, -1, -1)  # B x Q x D
        tgt = torch.zeros_like(query_pos)  # B x Q x D
        predictions = []
        num_layers = len(self.layers)
        for i, layer in enumerate(self.layers):
            tgt = layer(tgt, query_pos, memory, pos)
            if not keep_aux and i < num_layers - 1:
                continue
            out = self.decoder_norm(tgt)  # B x Q x D
            logits = self.class_embed(out)  # B x Q x (K+1)
            masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(out), mask_features)  # B x Q x h x w
            if i == num_layers - 1:
                masks = F.interpolate(masks, scale_factor=2.0, mode="bilinear", align_corners=False)
            predictions.append((logits, masks))
        return predictions
