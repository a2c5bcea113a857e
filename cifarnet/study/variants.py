"""The six cumulative steps of the CIFAR-10 study and what each one switches on.

Models, data pipeline and training loop all read a variant through :func:`recipe`, so "which
step adds what" is written here once (see SEED.md, "The training schedule and the six variants").
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["VARIANTS", "Recipe", "check_variant", "recipe"]

VARIANTS = ("baseline", "normalized", "augmented", "momentum", "dropout", "full")
"""The study's variants in order; each one keeps everything the previous ones added."""


@dataclass(frozen=True)
class Recipe:
    """What one variant of the study uses.

    Attributes:
        variant: one of :data:`VARIANTS`.
        normalize: per-channel input normalisation (``normalized`` on).
        augment: random 28×28 crop + horizontal flip for training, centre crop for testing, and
            ``ceil_mode=True`` on pool3 (``augmented`` on).
        momentum: SGD momentum (0.9 from ``momentum`` on, else 0).
        lr_gamma: ExponentialLR decay per epoch (0.95 from ``momentum`` on), or None for a
            constant learning rate.
        dropout: dropout probability between fc4 and fc5 (0.5 from ``dropout`` on, else 0).
        batch_norm: BatchNorm2d after each convolution (``full`` only).
    """

    variant: str
    normalize: bool
    augment: bool
    momentum: float
    lr_gamma: float | None
    dropout: float
    batch_norm: bool


def check_variant(variant: str) -> str:
    """Returns ``variant`` if it is one of :data:`VARIANTS`, else raises ``ValueError``."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}; got {variant!r}")
    return variant


def recipe(variant: str) -> Recipe:
    """The :class:`Recipe` of ``variant``: everything its step and the earlier steps add."""
    step = VARIANTS.index(check_variant(variant))
    return Recipe(
        variant=variant,
        normalize=step >= VARIANTS.index("normalized"),
        augment=step >= VARIANTS.index("augmented"),
        momentum=0.9 if step >= VARIANTS.index("momentum") else 0.0,
        lr_gamma=0.95 if step >= VARIANTS.index("momentum") else None,
        dropout=0.5 if step >= VARIANTS.index("dropout") else 0.0,
        batch_norm=step >= VARIANTS.index("full"),
    )
