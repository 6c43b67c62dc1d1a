"""Labeler kinds: ``LabelerConfig`` (which labeler and how) and ``LABELERS``, the one table from a kind's name
to how it is built, checked and keyed.

A new labeler (SAM 2, HQ-SAM, ...) is a class that satisfies ``models.labelers.base.Labeler``, a
``build_<kind>_labeler(config, *, embedding_cache=None)`` function and one entry below; `tasks.labels.pseudo_label`
then runs it without a change. The labeler classes are imported inside the builders, so reading
``LABELER_KINDS`` (the CLI's choices) loads neither torch nor the models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from addclass.common.errors import InputError
from addclass.models.labelers.options import (
    BOX_THRESHOLD,
    DINO_CONFIG,
    DINO_IMAGE_SIZE,
    MAX_BOXES,
    NEGATIVE_IOU,
    NMS_IOU,
    REFINE_MARGIN,
    SAM_VARIANT,
    TEXT_THRESHOLD,
    TILE_OVERLAP,
    check_options,
    without_off_options,
)

if TYPE_CHECKING:
    from addclass.models.labelers.base import Labeler
    from addclass.models.labelers.embedding_cache import EmbeddingCache
    from addclass.models.labelers.grounded_sam import GroundedSamLabeler
    from addclass.models.labelers.simulated_labeler import SimulatedLabeler

LabelerKind = Literal["grounded-sam", "simulated"]  # the keys of LABELERS (a test checks they agree)


@dataclass(frozen=True)
class LabelerConfig:
    """Which labeler and how (the flow parameter; every field that applies to the kind but ``device`` is part
    of the resume key, so a run interrupted on the GPU can finish on the CPU without relabelling)."""

    kind: LabelerKind = "grounded-sam"
    sam_variant: str = SAM_VARIANT
    sam_checkpoint: str | None = None
    dino_config: str = DINO_CONFIG
    dino_checkpoint: str | None = None
    device: str = "cpu"
    dtype: str | None = None
    box_threshold: float = BOX_THRESHOLD
    text_threshold: float = TEXT_THRESHOLD
    nms_iou: float | None = NMS_IOU
    max_boxes: int | None = MAX_BOXES
    dino_image_size: int = DINO_IMAGE_SIZE
    random_weights: bool = False
    seed: int = 0
    simulated: dict[str, Any] = field(default_factory=dict)  # SimulatedLabeler keyword overrides
    tile_size: int | None = None  # GroundingDINO also on overlapping tiles of this many px (None: whole image)
    tile_overlap: int = TILE_OVERLAP
    min_region_area: int = 0  # px: mask islands and holes smaller than this are removed / filled (0: none)
    negative_phrases: tuple[str, ...] = ()  # their boxes remove overlapping prompt boxes ("toy car")
    negative_iou: float = NEGATIVE_IOU
    refine: bool = False  # decode every box again on a crop around it (finer masks of small objects)
    refine_margin: float = REFINE_MARGIN  # context around a refined box, fraction of its side
    hq_token_only: bool = False  # HQ-SAM: the HQ token's mask alone

    def __post_init__(self) -> None:
        if self.kind not in LABELERS:
            raise InputError(f"Expected labeler {' or '.join(map(repr, LABELER_KINDS))}. "
                             f"Got {self.kind!r} instead.")
        check_options(box_threshold=self.box_threshold, text_threshold=self.text_threshold, nms_iou=self.nms_iou,
                      max_boxes=self.max_boxes, tile_size=self.tile_size, tile_overlap=self.tile_overlap,
                      min_region_area=self.min_region_area, negative_iou=self.negative_iou,
                      refine_margin=self.refine_margin)
        if isinstance(self.negative_phrases, str):
            raise InputError(f"Expected negative_phrases as a list. Got the string {self.negative_phrases!r}.")
        object.__setattr__(self, "negative_phrases", tuple(self.negative_phrases))
        if self.kind == "grounded-sam":
            from addclass.models.labelers.sam_engines import sam_variant

            if self.hq_token_only and sam_variant(self.sam_variant).family != "hq":
                raise InputError(f"hq_token_only applies to HQ-SAM variants (hq_*). Got sam_variant "
                                 f"{self.sam_variant!r}.")

    @property
    def entry(self) -> LabelerEntry:
        """This kind's entry of ``LABELERS``."""
        return LABELERS[self.kind]

    def to_dict(self) -> dict[str, Any]:
        """The fields that apply to this kind (``LabelerEntry.config_fields``), JSON-serialisable."""
        d = asdict(self)
        fields = self.entry.config_fields
        return d if fields is None else {name: d[name] for name in fields}

    def resume_settings(self) -> dict[str, Any]:
        """The settings that decide the labels (the resume key's): all but the device. Options that are off
        are left out (`models.labelers.options.without_off_options`), so runs made before an option existed
        keep their key."""
        return {k: v for k, v in without_off_options(self.to_dict()).items() if k != "device"}


class LabelerBuilder(Protocol):
    """Builds one labeler (its models loaded once, then reused for every image)."""

    def __call__(
        self, config: LabelerConfig, *, embedding_cache: EmbeddingCache | None = None
    ) -> Labeler: ...


def _no_check(config: LabelerConfig) -> None:
    """A labeler that loads no weights has nothing to check before the work starts."""


@dataclass(frozen=True)
class LabelerEntry:
    """How the tasks build, check and key one kind of labeler (one row of ``LABELERS``).

    Attributes:
        build: Builds the labeler from a ``LabelerConfig``.
        check: Fails before any work when ``build`` would (e.g. a missing checkpoint: the error names the file
            and the URL), without loading a model.
        config_fields: The ``LabelerConfig`` fields that apply to the kind (the rest never enter its resume
            key); None = all.
        recorded_flags: ``LabelerConfig`` fields recorded with the run next to ``Labeler.settings()``.
        reads_reference: ``Labeler.label`` needs the class's reference hand mask (a simulated labeler: it can
            never label unlabelled data).
        embedding_cache: The labeler runs SAM's image encoder: ``build`` gets the store's embedding cache, so a
            second prompt over the same images reuses the embeddings.
    """

    build: LabelerBuilder
    check: Callable[[LabelerConfig], None] = _no_check
    config_fields: tuple[str, ...] | None = None
    recorded_flags: tuple[str, ...] = ()
    reads_reference: bool = False
    embedding_cache: bool = False


# ---------------------------------------------------------------------------------------------- Grounded-SAM


def build_grounded_sam_labeler(
    config: LabelerConfig, *, embedding_cache: EmbeddingCache | None = None
) -> GroundedSamLabeler:
    """GroundingDINO + SAM with the config's variants, checkpoints, thresholds and device."""
    from addclass.models.labelers.grounded_sam import GroundedSamLabeler

    return GroundedSamLabeler(
        sam_variant=config.sam_variant, sam_checkpoint=config.sam_checkpoint, dino_config=config.dino_config,
        dino_checkpoint=config.dino_checkpoint, device=config.device, dtype=config.dtype,
        box_threshold=config.box_threshold, text_threshold=config.text_threshold, nms_iou=config.nms_iou,
        max_boxes=config.max_boxes, dino_image_size=config.dino_image_size,
        random_weights=config.random_weights, seed=config.seed, embedding_cache=embedding_cache,
        tile_size=config.tile_size, tile_overlap=config.tile_overlap, min_region_area=config.min_region_area,
        negative_phrases=config.negative_phrases, negative_iou=config.negative_iou, refine=config.refine,
        refine_margin=config.refine_margin, hq_token_only=config.hq_token_only,
    )  # fmt: skip


def check_grounded_sam_weights(config: LabelerConfig) -> None:
    """Fail if a SAM or GroundingDINO checkpoint is missing (nothing to check with ``random_weights``)."""
    if config.random_weights:
        return
    from addclass.models.labelers import grounded_sam_weights as w
    from addclass.models.labelers.sam_engines import FAMILY_URLS, sam_variant

    variant = sam_variant(config.sam_variant)
    w.resolve_checkpoint(explicit=config.sam_checkpoint, env_var=w.SAM_ENV, url=FAMILY_URLS[variant.family],
                         file_name=variant.checkpoint_file, what=f"SAM {config.sam_variant}")
    w.resolve_checkpoint(explicit=config.dino_checkpoint, env_var=w.DINO_ENV, url=w.DINO_URL,
                         file_name=w.DINO_VARIANTS[config.dino_config].checkpoint_file,
                         what=f"GroundingDINO {config.dino_config}")


# ------------------------------------------------------------------------------------------------- simulated


def build_simulated_labeler(
    config: LabelerConfig, *, embedding_cache: EmbeddingCache | None = None
) -> SimulatedLabeler:
    """The simulated labeler with the config's seed and ``simulated`` overrides (no embedding cache)."""
    from addclass.models.labelers.simulated_labeler import SimulatedLabeler

    return SimulatedLabeler(seed=config.seed, **config.simulated)


# ----------------------------------------------------------------------------------------------------- table

LABELERS: dict[str, LabelerEntry] = {
    "grounded-sam": LabelerEntry(
        build=build_grounded_sam_labeler,
        check=check_grounded_sam_weights,
        recorded_flags=("random_weights",),  # smoke-test weights are flagged in the registry, explicitly
        embedding_cache=True,
    ),
    "simulated": LabelerEntry(
        build=build_simulated_labeler,
        config_fields=("kind", "seed", "simulated"),  # detector settings do not apply
        reads_reference=True,
    ),
}
LABELER_KINDS: tuple[str, ...] = tuple(LABELERS)  # the CLI's and the flows' choices
