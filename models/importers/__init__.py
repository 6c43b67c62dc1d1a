"""Importers of released checkpoints (the MaSS13K release's MaSSFormer)."""
