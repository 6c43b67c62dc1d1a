"""Parts several architectures share: the ResNet backbone, sine position encodings and the masked-attention transformer decoder (MaSSFormer, Mask2Former)."""
