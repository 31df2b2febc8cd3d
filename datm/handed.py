"""A set handed over for evaluation, as every reader returns it (datm/sets.py dispatches on a
folder's contents; datm/export.py reads its own layout)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class HandedSet:
    kind: str                      # "datm export" | "DATM .pt" | "image folder"
    targets: torch.Tensor          # label logits [N, K] (soft) or class ids [N] (hard)
    class_ids: torch.Tensor        # [N]: the class each image stands for
    inputs: torch.Tensor | None = None   # network inputs (model space), exactly
    pixels: torch.Tensor | None = None   # or pixels on the [0, 1] scale, to preprocess
    lr: float | None = None        # the set's learned lr, if it has one
    card: dict = field(default_factory=dict)  # a datm export's dataset_card.json
    notes: list[str] = field(default_factory=list)

    @property
    def soft(self) -> bool:
        return self.targets.dtype.is_floating_point

    @property
    def images(self) -> torch.Tensor:
        return self.inputs if self.inputs is not None else self.pixels

    def per_class(self, num_classes: int) -> int | None:
        """Images per class when every class has the same number (an IPC), else None."""
        counts = torch.bincount(self.class_ids, minlength=num_classes)
        return int(counts[0]) if bool((counts == counts[0]).all()) else None


def one_line(exc: BaseException) -> str:
    """Why a file could not be read, in one line: torch.load's weights_only refusal is
    paragraphs of advice (one of which suggests running the file's code) around its reason."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        reason = next((line for line in lines[1:] if not line.startswith(
            ("Please file", "Check the documentation", "WeightsUnpickler error"))), "")
        return ("not a tensor file torch.load reads safely (weights_only)"
                + (f": {reason}" if reason else ""))
    return f"{type(exc).__name__}: {lines[0] if lines else 'unreadable'}"
