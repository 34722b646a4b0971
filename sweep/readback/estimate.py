"""Peak GPU memory of a trial, for the driver: the arithmetic is core.estimate's (re-exported here);
this module adds the corners of a search space, which `python -m sweep estimate` and placement's
"nothing fits" check evaluate.
"""

from __future__ import annotations

from core.estimate import (  # noqa: F401 - importable from here as before
    GB,
    LOSS_CHUNK,
    NF4_BYTES,
    OVERHEAD,
    Estimate,
    ModelProfile,
    TextShape,
    TrialShape,
    estimate,
    layer_activation_bytes,
    trial_shape,
    wants_checkpointing,
)
from core.rules import target_names

# Dimensions that change memory; the others (learning rate, alpha, ...) never do.
MEMORY_DIMENSIONS = ("method", "lora_r", "target_modules", "batch", "gradient_checkpointing", "optimizer", "lora_dropout")


def corners(space: object, fixed: dict) -> list[dict]:
    """Every combination of the extreme values of the memory-relevant searched dimensions.

    Numeric dimensions contribute their lowest and highest value, `batch` the pairs with the
    smallest and the largest micro-batch, `target_modules` the choices with the fewest and most
    modules, categorical switches (method, checkpointing, optimizer) every value.
    """
    import itertools

    from sweep.config.space import Choice, Range

    axes: list[tuple[str, list]] = []
    for d in space.dims:
        if d.name not in MEMORY_DIMENSIONS:
            continue
        if isinstance(d, Range):
            values = [int(d.low), int(d.high)] if d.integer else [d.low, d.high]
        elif d.name == "batch":
            values = [min(d.options, key=lambda p: (p[0], p[1])), max(d.options, key=lambda p: (p[0], p[1]))]
        elif d.name == "target_modules":
            size = lambda t: len(target_names(t))  # noqa: E731
            values = [min(d.options, key=size), max(d.options, key=size)]
        elif isinstance(d, Choice) and all(isinstance(o, int | float) and not isinstance(o, bool) for o in d.options):
            values = [min(d.options), max(d.options)]
        else:
            values = list(d.options)
        unique = []
        for v in values:
            if v not in unique:
                unique.append(v)
        axes.append((d.name, unique))
    names = [n for n, _ in axes]
    return [{**fixed, **dict(zip(names, combo))} for combo in itertools.product(*(v for _, v in axes))]
