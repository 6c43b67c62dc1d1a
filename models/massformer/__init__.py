"""MaSSFormer: model (backbone, pixel decoders, masked-attention transformer decoder), builders, weights."""
