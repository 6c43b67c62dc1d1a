"""Mask2Former's multi-scale deformable-attention pixel decoder."""
