"""Model folders shipped with addclass.

``demo_tiny_7class/``: the tiny MaSSFormer trained on the demo's synthetic scenes with their 7 precise classes
(car still inside "others"). The demo adds "car" to it as ``addclass add-class --init-model`` adds a class to
a user's trained model. It is made by ``bench/make_demo_base.py`` (docs/quickstart.md gives the command, its
settings, its scores and the file's sha256); its weights are stored in float16 and widened to float32 when
loaded.
"""

from __future__ import annotations

from pathlib import Path

DEMO_BASE = Path(__file__).resolve().parent / "demo_tiny_7class"
# what bench/make_demo_base.py printed for it (docs/quickstart.md; tests/models/test_pretrained.py checks both)
DEMO_BASE_SHA256 = "71f4ab778d40295f9c122835e7504c8cbf18bf053bf410d4fa80a31620a98a8c"
DEMO_BASE_VAL_MIOU = 85.62  # 7-class mIoU (%) on the demo's 8 val images, as published (float16 weights)
