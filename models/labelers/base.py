"""The labeler interface: what `tasks.labels.pseudo_label` needs from a pseudo-labeler, whatever its kind.

A labeler is a plain, stateful class (after SAM's ``SamPredictor``): built once per process with its models,
reused for every image, asked for one prompt on one image at a time. ``GroundedSamLabeler`` and
``SimulatedLabeler`` satisfy ``Labeler``; how a kind is built from a ``LabelerConfig`` is its entry in
``models.labelers.build.LABELERS``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # the CLI reads the labeler kinds without loading numpy/torch
    import numpy as np

    from addclass.models.labelers.label_record import LabelRecord


@runtime_checkable
class Labeler(Protocol):
    """Text prompt + image -> ``LabelRecord`` (union mask, instances, boxes, scores, phrases)."""

    def settings(self) -> dict[str, Any]:
        """Everything that changes the labels, JSON-serialisable (recorded with every pseudo-label run).

        Names the labeler (``"labeler"``) and says whether it is ``"simulated"``.
        """
        ...

    def label(
        self,
        image_rgb: np.ndarray | None,
        prompt: str,
        *,
        image_sha256: str | None = None,
        reference_mask: np.ndarray | None = None,
    ) -> LabelRecord:
        """Pseudo-label ``prompt`` on one image.

        Args:
            image_rgb: H x W x 3 uint8 RGB. None only for a labeler that reads no pixels (the simulated one);
                the others raise ``ValueError``.
            prompt: The class prompt.
            image_sha256: The image file's sha256, when known (a cache / seed key; computed otherwise).
            reference_mask: H x W bool hand mask of the prompt's class, for the labelers whose table entry has
                ``reads_reference`` (they raise ``ValueError`` without it); the others refuse one.

        Returns:
            The image's ``LabelRecord``.
        """
        ...
