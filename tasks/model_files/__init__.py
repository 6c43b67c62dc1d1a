"""Model folders: save, verify, load, register, export (ONNX) and import (MaSS13K release)."""
