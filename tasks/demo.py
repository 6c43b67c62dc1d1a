"""The embedded demo's settings and the comparison it ends with (`flows.demo.run_demo` runs it).

The demo ingests procedural scenes (`tasks.data.synthetic_scenes`: exact car masks), runs the add-class flow with
the simulated labeler and the tiny model, and then compares, on the **test** images, the model's car masks
with the pseudo labels the same labeler makes there. Those test pseudo labels are made in memory for scoring
only (`pseudo_label_scores`): they are never stored and never train anything, since the flow only labels
train and val. Both are scored class vs rest against the exact masks (`models.metrics`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from addclass.common.errors import InputError
from addclass.models.pretrained import DEMO_BASE
from addclass.models.release import CPU_NUM_POINTS

if TYPE_CHECKING:  # imported where used: the CLI reads DemoConfig's defaults without loading torch
    from addclass.tasks.evaluation.evaluation_results import ClassResult
    from addclass.tasks.labels.pseudo_label import LabelerConfig


FINE_TUNE_LR = 1e-3  # the demo's fine-tuning learning rate, chosen on val (docs/quickstart.md)


@dataclass(frozen=True)
class DemoConfig:
    """The demo's settings (``addclass demo``): data, the model it starts from, training length and sizes.

    The demo starts from the shipped 7-class tiny MaSSFormer (``base_model``, `models.pretrained.DEMO_BASE`:
    trained on these scenes' precise classes by ``bench/make_demo_base.py``) and fine-tunes it on the label
    version that adds car, as ``addclass add-class --init-model`` does for a user's model: every weight is
    kept and the class head gets a car row. It trains ``iters`` steps with the short-run recipe ``scratch``
    (warm-up, cosine decay, the backbone at the full rate) at ``lr`` 1e-3: on val it beat the release's
    fine-tuning recipe ``paper`` by far in 200 steps, and lr 2e-3 and 5e-4 (docs/quickstart.md "How the demo's
    settings were chosen"). ``base_model`` None trains every class from random weights instead (it needs ~600
    steps at lr 2e-3: docs/quickstart.md "The from-scratch demo").

    Training crops are the scenes resized by ``scale_range``; the model predicts at scales 1.5, 2 and 3
    (``test_scale`` 2, ``test_ratios`` 0.75, 1 and 1.5), in tiles of its 256 crops, averaging the class
    probabilities: its masks, at half the network's input resolution, fall on the scenes' pixel grid at scale 2,
    1.5x finer at 3 and with more context at 1.5 (`models.massformer.model`; docs/recipes.md "Inference at
    scales 2 and 3"). The steps, learning rate and scales were chosen on val (docs/quickstart.md "How the demo's
    settings were chosen").
    """

    out: str = "demo-out"
    images: int = 40
    size: tuple[int, int] = (256, 384)
    base_model: str | None = str(DEMO_BASE)
    iters: int = 300
    recipe: str = "scratch"
    lr: float | None = None
    crop: int = 256
    scale_range: tuple[float, float] = (0.75, 1.5)
    test_scale: float = 2.0
    test_ratios: tuple[float, ...] = (0.75, 1.0, 1.5)
    points: int = CPU_NUM_POINTS
    val_every: int = 100
    seed: int = 0
    progress: bool = True

    @property
    def training_lr(self) -> float | None:
        """``lr``, else 1e-3 to fine-tune the base model and the recipe's own (None) from scratch."""
        if self.lr is not None:
            return self.lr
        return FINE_TUNE_LR if self.base_model else None


def pseudo_label_scores(store_path: str | os.PathLike[str], *, class_name: str, split: str,
                        labeler: LabelerConfig) -> ClassResult:
    """Scores the simulated labeler's masks of ``class_name`` on ``split`` against the split's hand masks,
    in memory (nothing is written: evaluation masks never feed a stored label).

    Returns:
        The class vs rest (counts summed over the split), as `tasks.evaluation.evaluate` scores a model.

    Raises:
        ValueError: ``labeler`` is not the simulated one, or the split has no hand masks of the class.
    """
    from addclass.models.metrics import binary_counts
    from addclass.storage.store import open_label_store
    from addclass.tasks.evaluation.evaluate_scoring import binary_summary
    from addclass.tasks.labels.pseudo_label import build_labeler

    if labeler.kind != "simulated":
        raise InputError(f"Expected the simulated labeler (it reads hand masks). Got {labeler.kind!r} instead.")
    store = open_label_store(store_path)
    kind: Literal["eval", "reference"] = "eval" if split == "test" else "reference"
    ids = store.hand_mask_ids(kind, class_name, split)
    if not ids:
        raise InputError(f"{store.path} has no {kind}/{class_name} hand masks on split {split!r}.")
    model = build_labeler(labeler, store_path=store_path)
    total: dict[str, Any] | None = None
    for image_id in ids:
        hand = store.read_hand_mask(kind, class_name, image_id)
        record = store.image_record(split, image_id)
        mask = model.label(None, class_name, reference_mask=hand == 1, image_sha256=record.sha256).mask
        counts = binary_counts(mask, hand)
        total = counts if total is None else {k: total[k] + counts[k] for k in total}
    assert total is not None
    return binary_summary(total, num_images=len(ids), name=class_name, hand_mask_kind=[kind])


def comparison_lines(*, model: ClassResult, pseudo: ClassResult, split: str, class_name: str,
                     model_name: str = "model (trained on them)") -> list[str]:
    """The demo's closing lines: model vs pseudo labels on ``split`` (IoU and BIoU in %, BF1; an undefined
    score counts as 0)."""
    def row(name: str, m: ClassResult) -> str:
        return f"  {name:<44} {100 * (m.iou or 0):>6.2f} {100 * (m.biou or 0):>6.2f} {m.bf1 or 0:>7.4f}"

    better = (model.biou or 0) > (pseudo.biou or 0)
    return [
        f"{class_name} on the {model.summary.num_images} {split} images, against their exact masks:",
        f"  {'':<44} {'IoU':>6} {'BIoU':>6} {'BF1':>7}",
        row("pseudo labels (simulated Grounded-SAM)*", pseudo),
        row(model_name, model),
        f"  model BIoU {'>' if better else '<='} pseudo-label BIoU: the model's {class_name} edges are "
        f"{'sharper than' if better else 'not sharper than'} its labels'",
        f"  * made on {split} for this comparison only; they trained nothing",
    ]
