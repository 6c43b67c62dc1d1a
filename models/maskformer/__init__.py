"""MaskFormer's parts: the FPN pixel decoder (also MaSSFormer's 'fpn' ablation) and the DETR-style transformer decoder."""
