"""The `space:` section of a space file -> dimensions -> an Optuna define-by-run function.

A dimension is one searched hyperparameter. The syntax (one entry per hyperparameter):

    lora_r: [4, 8, 16]                                  # categorical choices
    lora_r: {choices: [4, 8, 16]}                       # the same, spelled out
    learning_rate: {loguniform: [1.0e-5, 5.0e-4]}      # log-uniform range
    lora_dropout: {uniform: [0.0, 0.1], step: 0.05}    # uniform range, optionally stepped
    lora_alpha: {ratio_of: lora_r, choices: [0.5, 1, 2]}   # alpha = r x ratio
    batch: {pairs: [[1, 32], [2, 16], [4, 8]]}          # micro-batch x accumulation
    target_modules: [attention, mlp, all-linear, [q_proj, v_proj]]

Optuna categorical parameters must be plain scalars, so a choice that is a list (a batch pair, an
explicit module list) is stored in the study under a readable label ("4x8", "q_proj,v_proj") and
decoded back before it reaches the trial. Pure: no Optuna import at module load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Union

from core.schema import NOT_SEARCHABLE

# A checker validates one candidate value of a hyperparameter: returns the normalised value, or
# raises ValueError whose text says what is accepted.
Checker = Callable[[Any], Any]


def label_of(value: Any) -> str | int | float | bool:
    """The scalar Optuna stores for a choice: scalars as they are, pairs as AxB, lists joined by ','."""
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return f"{value[0]}x{value[1]}"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    raise TypeError(f"cannot label choice {value!r}")


@dataclass(frozen=True)
class Choice:
    """Categorical: one of `options` (already validated and normalised)."""

    name: str
    options: tuple[Any, ...]

    @property
    def labels(self) -> tuple[Any, ...]:
        return tuple(label_of(o) for o in self.options)

    def suggest(self, trial: Any) -> Any:
        label = trial.suggest_categorical(self.name, list(self.labels))
        return self.decode(label)

    def decode(self, label: Any) -> Any:
        return self.options[self.labels.index(label)]

    def grid(self) -> list[Any] | None:
        return list(self.labels)

    def size(self) -> int | None:
        return len(self.options)

    def describe(self) -> str:
        return "[" + ", ".join(str(label) for label in self.labels) + "]"


@dataclass(frozen=True)
class Range:
    """Numeric range, inclusive at both ends; integer ranges for integer hyperparameters."""

    name: str
    low: float
    high: float
    log: bool = False
    step: float | None = None
    integer: bool = False

    def suggest(self, trial: Any) -> Any:
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def decode(self, value: Any) -> Any:
        return value

    def grid(self) -> list[Any] | None:
        if self.integer and not self.log:
            step = int(self.step or 1)
            return list(range(int(self.low), int(self.high) + 1, step))
        if self.step is not None and not self.log:
            n = int(round((self.high - self.low) / self.step))
            return [round(self.low + i * self.step, 12) for i in range(n + 1)]
        return None

    def size(self) -> int | None:
        points = self.grid()
        return None if points is None else len(points)

    def describe(self) -> str:
        kind = "loguniform" if self.log else "uniform"
        step = f" step {self.step:g}" if self.step is not None else ""
        return f"{kind} [{self.low:g}, {self.high:g}]{step}" + (" (int)" if self.integer else "")


@dataclass(frozen=True)
class Ratio:
    """A value that is `factor` times another hyperparameter (e.g. lora_alpha = lora_r x ratio).

    The factor is the searched dimension; Optuna stores it as `<name>_ratio`.
    """

    name: str
    of: str
    factor: Union[Choice, Range]

    def suggest_factor(self, trial: Any) -> float:
        return self.factor.suggest(trial)

    def grid(self) -> list[Any] | None:
        return self.factor.grid()

    def size(self) -> int | None:
        return self.factor.size()

    def describe(self) -> str:
        return f"{self.of} x {self.factor.describe()}"


Dimension = Union[Choice, Range, Ratio]


@dataclass(frozen=True)
class HyperparamSpec:
    """What a searchable hyperparameter accepts: how to check one value, and its number kind."""

    check: Checker
    kind: str  # "int", "float", "pair", "modules", "other"


def _numbers(value: Any, path: str, errors: list[str]) -> list[float] | None:
    if not (isinstance(value, list) and len(value) == 2):
        errors.append(f"{path}: got {value!r}; expected a two-element list [low, high]")
        return None
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int | float):
            errors.append(f"{path}: bound {v!r} is not a number; expected [low, high] with numbers")
            return None
        out.append(float(v))
    return out


def _parse_range(name: str, raw: dict, spec: HyperparamSpec, path: str, errors: list[str]) -> Range | None:
    kinds = [k for k in ("uniform", "loguniform") if k in raw]
    extra = set(raw) - {"uniform", "loguniform", "step"}
    if extra or len(kinds) != 1:
        errors.append(
            f"{path}: got keys {sorted(raw)}; a range is {{uniform: [low, high]}} or "
            f"{{loguniform: [low, high]}}, optionally with step"
        )
        return None
    kind = kinds[0]
    bounds = _numbers(raw[kind], f"{path}.{kind}", errors)
    if bounds is None:
        return None
    low, high = bounds
    integer = spec.kind == "int"
    n_before = len(errors)
    if spec.kind not in ("int", "float"):
        errors.append(f"{path}: {name} is not numeric; give a list of choices instead of a range")
        return None
    if low >= high:
        errors.append(f"{path}.{kind}: low {low:g} must be below high {high:g}")
    if kind == "loguniform" and low <= 0:
        errors.append(f"{path}.loguniform: low {low:g} must be > 0 for a log scale")
    if integer and not (low.is_integer() and high.is_integer()):
        errors.append(f"{path}.{kind}: {name} is an integer; bounds must be whole numbers (got {low:g}, {high:g})")
    for bound in (low, high):
        try:
            spec.check(int(bound) if integer and bound.is_integer() else bound)
        except ValueError as exc:
            errors.append(f"{path}.{kind}: bound {bound:g} is not a valid {name}: {exc}")
    step = raw.get("step")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, int | float) or step <= 0:
            errors.append(f"{path}.step: got {step!r}; expected a positive number")
        elif kind == "loguniform" and not integer:
            errors.append(f"{path}.step: a stepped range must be uniform (Optuna has no stepped log-float)")
        elif integer and not float(step).is_integer():
            errors.append(f"{path}.step: {name} is an integer; step must be a whole number (got {step!r})")
        elif low < high and not math.isclose(((high - low) / step) % 1, 0, abs_tol=1e-9) and not math.isclose(
            ((high - low) / step) % 1, 1, abs_tol=1e-9
        ):
            errors.append(f"{path}.step: ({high:g} - {low:g}) is not a multiple of step {step:g}")
        elif integer and kind == "loguniform" and step != 1:
            errors.append(f"{path}.step: an integer log range takes no step other than 1")
    if len(errors) > n_before:
        return None
    return Range(name=name, low=low, high=high, log=kind == "loguniform",
                 step=float(step) if step is not None else None, integer=integer)


def _parse_choices(name: str, values: Any, spec: HyperparamSpec, path: str, errors: list[str]) -> Choice | None:
    if not isinstance(values, list) or not values:
        errors.append(f"{path}: got {values!r}; expected a non-empty list of choices")
        return None
    options: list[Any] = []
    for i, value in enumerate(values):
        try:
            options.append(spec.check(value))
        except ValueError as exc:
            errors.append(f"{path}[{i}]: got {value!r}; {exc}")
    if len(options) != len(values):
        return None
    labels = [label_of(o) for o in options]
    duplicates = sorted({str(label) for label in labels if labels.count(label) > 1})
    if duplicates:
        errors.append(f"{path}: duplicate choices {duplicates}; list each choice once")
        return None
    return Choice(name=name, options=tuple(options))


def parse_dimension(name: str, raw: Any, specs: dict[str, HyperparamSpec], errors: list[str]) -> Dimension | None:
    """Parse one `space.<name>` entry; append every problem to `errors` (path, bad value, what is accepted)."""
    path = f"space.{name}"
    spec = specs.get(name)
    if spec is None and name in NOT_SEARCHABLE:
        errors.append(f"{path}: not searchable: train.{name} {NOT_SEARCHABLE[name]}")
        return None
    if spec is None:
        errors.append(f"{path}: unknown hyperparameter; searchable: {', '.join(sorted(specs))}")
        return None
    if isinstance(raw, list):
        return _parse_choices(name, raw, spec, path, errors)
    if not isinstance(raw, dict):
        errors.append(
            f"{path}: got {raw!r}; expected a list of choices or a mapping "
            "({choices: [...]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]}, {ratio_of: NAME, ...}, {pairs: [...]})"
        )
        return None
    if "ratio_of" in raw:
        of = raw["ratio_of"]
        if spec.kind not in ("int", "float"):
            errors.append(f"{path}.ratio_of: {name} is not numeric and cannot be a ratio of another value")
            return None
        if not isinstance(of, str) or of not in specs or specs[of].kind not in ("int", "float"):
            numeric = sorted(k for k, s in specs.items() if s.kind in ("int", "float"))
            errors.append(f"{path}.ratio_of: got {of!r}; expected a numeric hyperparameter: {', '.join(numeric)}")
            return None
        if of == name:
            errors.append(f"{path}.ratio_of: {name} cannot be a ratio of itself")
            return None
        rest = {k: v for k, v in raw.items() if k != "ratio_of"}
        factor_spec = HyperparamSpec(check=_positive_number, kind="float")
        factor = _parse_factor(f"{name}_ratio", rest, factor_spec, path, errors)
        return None if factor is None else Ratio(name=name, of=of, factor=factor)
    if "pairs" in raw:
        if spec.kind != "pair":
            errors.append(f"{path}.pairs: only `batch` takes pairs; use choices for {name}")
            return None
        if set(raw) != {"pairs"}:
            errors.append(f"{path}: got keys {sorted(raw)}; pairs takes no other keys")
            return None
        return _parse_choices(name, raw["pairs"], spec, f"{path}.pairs", errors)
    if "choices" in raw:
        if set(raw) != {"choices"}:
            errors.append(f"{path}: got keys {sorted(raw)}; choices takes no other keys")
            return None
        return _parse_choices(name, raw["choices"], spec, f"{path}.choices", errors)
    return _parse_range(name, raw, spec, path, errors)


def _parse_factor(name: str, raw: dict, spec: HyperparamSpec, path: str, errors: list[str]) -> Choice | Range | None:
    if "choices" in raw:
        if set(raw) != {"choices"}:
            errors.append(f"{path}: got keys {sorted(raw) + ['ratio_of']}; a ratio takes choices or a range")
            return None
        return _parse_choices(name, raw["choices"], spec, f"{path}.choices", errors)
    return _parse_range(name, raw, spec, path, errors)


def _positive_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError("expected a positive number")
    return float(value)


@dataclass(frozen=True)
class Space:
    """All searched dimensions, in file order."""

    dims: tuple[Dimension, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.dims)

    def study_params(self) -> tuple[str, ...]:
        """The parameter names as stored in the Optuna study."""
        return tuple(d.factor.name if isinstance(d, Ratio) else d.name for d in self.dims)

    def size(self) -> int | None:
        """Number of distinct configurations, or None when a dimension is continuous."""
        total = 1
        for d in self.dims:
            n = d.size()
            if n is None:
                return None
            total *= n
        return total

    def describe_size(self) -> str:
        discrete = [d.size() for d in self.dims if d.size() is not None]
        continuous = [d.name if not isinstance(d, Ratio) else d.factor.name for d in self.dims if d.size() is None]
        product = math.prod(discrete) if discrete else 1
        text = " x ".join(str(n) for n in discrete) or "1"
        out = f"{text} = {product} discrete combination{'s' if product != 1 else ''}"
        if continuous:
            out += f" x {len(continuous)} continuous dimension{'s' if len(continuous) > 1 else ''} ({', '.join(continuous)})"
        return out

    def distributions(self) -> dict[str, Any]:
        """The Optuna distribution of each study parameter, as the define-by-run function samples it."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        out: dict[str, Any] = {}
        for d in self.dims:
            dim = d.factor if isinstance(d, Ratio) else d
            if isinstance(dim, Choice):
                out[dim.name] = CategoricalDistribution(list(dim.labels))
            elif dim.integer:
                out[dim.name] = IntDistribution(int(dim.low), int(dim.high), step=int(dim.step or 1), log=dim.log)
            else:
                out[dim.name] = FloatDistribution(dim.low, dim.high, step=dim.step, log=dim.log)
        return out

    def grid(self) -> dict[str, list[Any]]:
        """The Optuna GridSampler search space; only valid when every dimension is discrete."""
        out: dict[str, list[Any]] = {}
        for d in self.dims:
            points = d.grid()
            assert points is not None, f"{d.name} is continuous"
            out[d.factor.name if isinstance(d, Ratio) else d.name] = points
        return out

    def sample(self, trial: Any, fixed: dict[str, Any]) -> dict[str, Any]:
        """Define-by-run: suggest every dimension on an Optuna trial; returns decoded values.

        `fixed` holds the train-section values, for ratios of a hyperparameter that is not searched.
        """
        values: dict[str, Any] = {}
        for d in self.dims:
            if not isinstance(d, Ratio):
                values[d.name] = d.suggest(trial)
        for d in self.dims:
            if isinstance(d, Ratio):
                factor = d.suggest_factor(trial)
                base = values.get(d.of, fixed.get(d.of))
                values[d.name] = _tidy(base * factor)
        return values

    def decode(self, params: dict[str, Any], fixed: dict[str, Any]) -> dict[str, Any]:
        """Optuna study params (labels) -> hyperparameter values, as sample() would return them."""
        values: dict[str, Any] = {}
        for d in self.dims:
            if not isinstance(d, Ratio):
                values[d.name] = d.decode(params[d.name])
        for d in self.dims:
            if isinstance(d, Ratio):
                values[d.name] = _tidy(values.get(d.of, fixed.get(d.of)) * params[d.factor.name])
        return values

    def encode(self, values: dict[str, Any], path: str, errors: list[str]) -> dict[str, Any]:
        """Hyperparameter values written by a user (e.g. points_to_evaluate) -> study params.

        A value must be one of a dimension's choices or inside its range; a ratio is given by its
        factor (`lora_alpha_ratio: 2`), since the derived value depends on another dimension.
        """
        by_param: dict[str, Choice | Range] = {}
        for d in self.dims:
            if isinstance(d, Ratio):
                by_param[d.factor.name] = d.factor
            else:
                by_param[d.name] = d
        out: dict[str, Any] = {}
        for key, value in values.items():
            d = by_param.get(key)
            if d is None:
                ratio = next((r for r in self.dims if isinstance(r, Ratio) and r.name == key), None)
                hint = f"give {ratio.factor.name} ({ratio.describe()})" if ratio else f"searched: {', '.join(by_param)}"
                errors.append(f"{path}.{key}: not a searched parameter; {hint}")
            elif isinstance(d, Choice):
                label = label_of(tuple(value) if isinstance(value, list) else value)
                if label in d.labels:
                    out[key] = label
                else:
                    errors.append(f"{path}.{key}: got {value!r}; expected one of {d.describe()}")
            elif isinstance(value, bool) or not isinstance(value, int | float) or not d.low <= value <= d.high:
                errors.append(f"{path}.{key}: got {value!r}; expected a number in {d.describe()}")
            else:
                out[key] = int(value) if d.integer else float(value)
        return out


def _tidy(value: float) -> float | int:
    """1.0 * 16 -> 16: keep derived integers readable in MLflow and run names."""
    return int(value) if float(value).is_integer() else float(value)
