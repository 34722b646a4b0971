"""Memory-aware placement (`gpus_per_trial: auto`): the arithmetic lives in core.estimate; these
names stay importable from here."""

from core.estimate import CONTEXT_BYTES, STEP, Placement, Verdict  # noqa: F401
