"""The choices of the flow parameters and of the CLI flags that set them, spelled once.

Light on purpose (`cli.args` imports it, so ``addclass --help`` loads no torch). A choice whose owner
exports a Literal alias and loads no torch is re-exported from it (`LabelerKind`); the others are equal to
the list of the module that owns them (tests/flows/test_cli.py::test_cli_choices_are_their_owners_lists).
"""

from __future__ import annotations

from typing import Literal

from addclass.models.labelers.build import (
    LabelerKind as LabelerKind,  # the keys of models.labelers.build.LABELERS
)

# models.massformer.build.MODEL_BUILDERS: MaSSFormer, then the Mask2Former / MaskFormer / SeMask FPN baselines
ModelVariant = Literal[
    "tiny", "lite_r18", "r50", "mask2former_r50", "mask2former_tiny", "maskformer_r50", "maskformer_tiny",
    "semask_fpn_swint", "semask_fpn_tiny",
]
SamVariant = Literal[  # models.labelers.sam_engines.SAM_VARIANTS
    "vit_b", "vit_l", "vit_h", "tiny", "hq_vit_b", "hq_vit_l", "hq_vit_h", "hq_vit_tiny", "hq_tiny",
    "sam2.1_hiera_t", "sam2.1_hiera_s", "sam2.1_hiera_b+", "sam2.1_hiera_l", "sam2_tiny",
]
DinoConfig = Literal["swint_ogc", "swinb", "test"]  # models.labelers.grounded_sam_weights.DINO_VARIANTS
RecipeChoice = Literal["auto", "paper", "scratch"]  # models.training.optim.RECIPE_CHOICES
ReweightChoice = Literal["none", "edge", "inverse"]  # models.training.loss_weights.ReweightMode (loads torch)
MergePolicy = Literal["carve-others", "overwrite"]  # tasks.merge_plan.POLICIES
Promote = Literal["if-better", "always", "never"]  # tasks.model_registry.register_model
ScaleOut = Literal["auto", "threads", "dask"]  # flows.runners.scale_out_runner
PredictMode = Literal["auto", "whole", "slide"]  # tasks.predict.PREDICT_MODES
AutocastDtype = Literal["bfloat16", "float16"]  # the labeler's autocast on a GPU (LabelerConfig.dtype)
ReviewRanking = Literal["score", "disagreement", "uncertainty"]  # tasks.review.RANKINGS
ReviewFormat = Literal["coco", "labelstudio"]  # tasks.review.FORMATS
