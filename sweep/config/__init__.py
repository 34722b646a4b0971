"""space.yaml -> a typed, validated SweepConfig.

Every problem in a file is collected and reported at once, each naming its key path, the bad value
and what would be accepted. Nothing here starts Ray, opens MLflow or writes a file. YAML is read
with a safe loader: python tags are refused, never executed; duplicate keys are errors.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, get_args

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from core import rules
from core.schema import (  # noqa: F401 - the sections and constants, importable from here as before
    DATA_SUFFIXES,
    HYPERPARAMS,
    METRICS,
    NAME_PATTERN,
    NOT_SEARCHABLE,
    SEARCHABLE,
    SECTIONS,
    TARGET_MODULES,
    TARGET_PRESETS,
    TINY_MODEL,
    TINY_MODELS,
    TINY_VISION_MODEL,
    Batch,
    DataSection,
    Duration,
    ModelSection,
    ResourcesSection,
    SchedulerSection,
    SearchSection,
    Section,
    Switch,
    TargetModules,
    TrackingSection,
    TrainSection,
    parse_duration,
)
from sweep.config.space import Dimension, HyperparamSpec, Ratio, Space, parse_dimension

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ConfigError(Exception):
    """A space file (or its overrides) is invalid; `problems` lists every one of them."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(str(self))

    def __str__(self) -> str:
        n = len(self.problems)
        lines = [f"{self.source}: {n} problem{'s' if n != 1 else ''}"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


TOP_KEYS = ("name", "model", "data", "train", "search", "space", "resources", "tracking")
REQUIRED = ("name", "model", "data", "search", "space")


def hyperparam_specs() -> dict[str, HyperparamSpec]:
    """How to check one value of each searchable hyperparameter, taken from TrainSection's fields."""
    specs = {}
    for name in SEARCHABLE:
        info = TrainSection.model_fields[name]
        adapter = TypeAdapter(Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation)
        ann = info.annotation
        kind = "int" if ann is int else "float" if ann is float else "pair" if name == "batch" else "modules" if name == "target_modules" else "other"

        def check(value: Any, adapter: TypeAdapter = adapter, info: Any = info, kind: str = kind) -> Any:
            if kind in ("int", "float") and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise ValueError(f"expected a number: {info.description}")
            if kind == "int" and isinstance(value, float) and not value.is_integer():
                raise ValueError(f"expected a whole number: {info.description}")
            try:
                return adapter.validate_python(value)
            except ValidationError as exc:
                msg = exc.errors()[0]["msg"].removeprefix("Value error, ").rstrip(".")
                raise ValueError(msg if "expected" in msg else f"{msg}; expected {info.description}") from None

        specs[name] = HyperparamSpec(check=check, kind=kind)
    return specs


# ----------------------------------------------------------------------------------------------
# YAML


class _SafeLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and reads 1e-5 as a float (YAML 1.1 wants 1.0e-5)."""


_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _mapping(loader: _SafeLoader, node: yaml.MappingNode) -> dict:
    loader.flatten_mapping(node)
    out: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in out:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (each key may appear once)", key_node.start_mark
            )
        out[key] = loader.construct_object(value_node, deep=True)
    return out


_SafeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def parse_yaml(text: str, source: str) -> Any:
    """Plain data only: python/object tags are refused with the line they are on."""
    try:
        return yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - _SafeLoader derives from SafeLoader
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}" if mark else "?"
        if "could not determine a constructor" in str(exc.problem):
            tag = str(exc.problem).split("tag", 1)[-1].strip(" '")
            raise ConfigError(source, [f"{where}: YAML tag {tag} is refused; a space file holds plain data only (no python tags)"]) from None
        raise ConfigError(source, [f"{where}: {exc.problem}"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        raise ConfigError(source, [f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}"]) from None
    except RecursionError:  # PyYAML's composer recurses once per level: [[[[... deeper than the stack
        raise ConfigError(source, ["not usable YAML: nested too deeply (hundreds of levels of [ or {); a space file holds plain, shallow data"]) from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits (Python's int-from-text limit)
        raise ConfigError(source, [f"not usable YAML: {str(exc).splitlines()[0][:200]}"]) from None


def apply_overrides(raw: dict, overrides: list[str], problems: list[str]) -> None:
    """`key.path=value` (value parsed as YAML) set into the raw mapping, before validation."""
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r}: expected key.path=value, e.g. search.num_trials=4")
            continue
        path, text = item.split("=", 1)
        keys = path.strip().split(".")
        if not all(keys):
            problems.append(f"override {item!r}: empty key in {path!r}")
            continue
        try:
            value = parse_yaml(text, f"override {item!r}")
        except ConfigError as exc:
            shown = repr(item) if len(item) <= 80 else f"{item[:60]!r}... ({len(item)} characters)"
            problems.extend(f"override {shown}: {p}" for p in exc.problems)
            continue
        node = raw
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                problems.append(f"override {item!r}: {'.'.join(keys[: depth + 1])} is {child!r}, not a mapping")
                break
            node = child
        else:
            node[keys[-1]] = value


def yaml_scalar(value: str) -> str:
    """`value` as an override's YAML text: as is where YAML reads it back unchanged, else quoted."""
    try:
        if parse_yaml(value, "path") == value:
            return value
    except ConfigError:
        pass
    return json.dumps(value)


# ----------------------------------------------------------------------------------------------
# pydantic errors -> our messages


def _model_at(cls: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    for part in loc:
        if not isinstance(part, str) or part not in cls.model_fields:
            return None
        ann = cls.model_fields[part].annotation
        candidates = [ann, *get_args(ann)]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return None
        cls = nested[0]
    return cls


def _field_info(cls: type[BaseModel], loc: tuple) -> Any:
    parent = _model_at(cls, loc[:-1])
    if parent is None or not isinstance(loc[-1], str):
        return None
    return parent.model_fields.get(loc[-1])


# keys earlier versions accepted: what to do instead of "unknown key"
REMOVED = {
    "train.cuda_graphs": "was removed: replaying the compiled layers as CUDA graphs measured slower everywhere it ran (bench/BENCH.md, \"One H200: "
    "12B at micro-batch 8, CUDA graphs, ...\"), and the layers' shapes vary (rows are padded per micro-batch to their longest row; cohort members "
    "come and go); delete the key (train.compile still compiles the layers)",
    "train.reuse_base_model": "was removed: every worker keeps its base model loaded for all the trials it trains; delete the key",
}


def _join(section: str, loc: tuple) -> str:
    out = section
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _describe_errors(section: str, cls: type[BaseModel], exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = _join(section, loc)
        if err["type"] == "extra_forbidden" and path in REMOVED:
            problems.append(f"{path}: {REMOVED[path]}")
            continue
        if err["type"] == "extra_forbidden":
            parent = _model_at(cls, loc[:-1])
            accepted = ", ".join(parent.model_fields) if parent else "?"
            problems.append(f"{path}: unknown key; {_join(section, loc[:-1])} accepts: {accepted}")
            continue
        info = _field_info(cls, loc)
        hint = f"; expected {info.description}" if info is not None and info.description else ""
        if err["type"] == "missing":
            problems.append(f"{path}: required{hint}")
        elif err["type"] == "model_type":
            parent = _model_at(cls, loc)
            keys = ", ".join(parent.model_fields) if parent else "?"
            problems.append(f"{path}: got {err['input']!r}; expected a mapping with keys: {keys}")
        else:
            msg = err["msg"].removeprefix("Value error, ").rstrip(".")
            problems.append(f"{path}: {msg} (got {err['input']!r}){hint if 'expected' not in msg else ''}")
    return problems


# ----------------------------------------------------------------------------------------------
# the config


@dataclass(frozen=True)
class SweepConfig:
    """A validated space file. Paths are absolute; defaults are filled in."""

    name: str
    model: ModelSection
    data: DataSection
    train: TrainSection
    search: SearchSection
    space: Space
    resources: ResourcesSection
    tracking: TrackingSection
    source: Path
    source_text: str
    overrides: tuple[str, ...] = ()
    study_points: tuple[dict[str, Any], ...] = field(default=())
    algorithm_reason: str = "as configured"  # why search.algorithm is what it is (auto: what it picked, and why)
    results_dir_given: str | None = None  # tracking.results_dir as written (None: the default, ./sweeps), before it was made absolute

    @property
    def sha256(self) -> str:
        """Hash of the file text plus overrides: two sweeps with the same hash searched the same thing."""
        return hashlib.sha256((self.source_text + "\n" + "\n".join(self.overrides)).encode()).hexdigest()

    @property
    def fixed_hyperparams(self) -> dict[str, Any]:
        """Train-section values of the hyperparameters that are not searched, and of the fixed
        settings a trial's hyperparameters carry too (gradient_checkpointing: estimates read it)."""
        return {k: getattr(self.train, k) for k in HYPERPARAMS if k not in self.space.names}

    @property
    def results_dir(self) -> Path:
        return Path(self.tracking.results_dir or "sweeps").resolve()  # absolute already (sweep.config._resolve_tracking)

    @property
    def mlflow_uri(self) -> str:
        """The tracking URI to connect with (${VAR} expanded: never write this one anywhere)."""
        from sweep.config.secrets import expand_env

        return expand_env(self.tracking.mlflow_uri) if self.tracking.mlflow_uri else f"sqlite:///{self.results_dir / 'mlflow.db'}"

    def optuna_storage(self, sweep_dir: Path) -> str:
        """The study's storage URL to connect with (${VAR} expanded: never write this one anywhere)."""
        from sweep.config.secrets import expand_env

        return expand_env(self.tracking.optuna_storage) if self.tracking.optuna_storage else f"sqlite:///{sweep_dir / 'optuna.db'}"

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name

    @property
    def objectives(self) -> list[tuple[str, str]]:
        """(metric, min|max) pairs: several for a multi-objective sweep, else the one metric."""
        if self.search.objectives:
            return [next(iter(o.items())) for o in self.search.objectives]
        return [(self.search.metric, self.search.mode)]

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def num_trials(self) -> int:
        return self.search.num_trials or (self.space.size() or 0)

    @property
    def grace_period(self) -> int:
        return self.search.scheduler.grace_period or self.train.eval_every

    @property
    def max_t(self) -> int:
        return self.search.scheduler.max_t or self.train.max_steps

    def resolved(self) -> dict[str, Any]:
        """The config as it will run: defaults filled in, paths absolute, the space described."""
        out: dict[str, Any] = {"name": self.name}
        for key in ("model", "data", "train", "search", "resources", "tracking"):
            out[key] = getattr(self, key).model_dump(mode="json")
        out["search"]["num_trials"] = self.num_trials
        out["search"]["scheduler"]["grace_period"] = self.grace_period
        out["search"]["scheduler"]["max_t"] = self.max_t
        from sweep.config.secrets import redact

        out["tracking"].update(
            results_dir=str(self.results_dir),
            mlflow_uri=redact(self.tracking.mlflow_uri or self.mlflow_uri),
            optuna_storage=redact(self.tracking.optuna_storage or "sqlite in the sweep folder"),
            experiment=self.experiment,
        )
        out["train"] = {k: v for k, v in out["train"].items() if k not in self.space.names}
        out["space"] = {d.name: d.describe() for d in self.space.dims}
        return out


def _looks_local(value: str) -> bool:
    """A path, not a hub id, even where nothing is there: it starts with '.', '/' or '~', or has a
    data file's suffix."""
    return value.startswith((".", "/", "~")) or Path(value).suffix in DATA_SUFFIXES


def _resolve_source(value: str, base: Path, path: str, kind: str, problems: list[str]) -> str | None:
    """A local path (made absolute, relative to the space file) or a hub id; else a problem."""
    if kind == "model" and value in TINY_MODELS:
        return value
    candidate = (base / Path(value).expanduser()).resolve()
    if candidate.exists():
        if kind == "data" and candidate.is_file() and candidate.suffix not in DATA_SUFFIXES:
            problems.append(f"{path}: {candidate} has suffix {candidate.suffix!r}; expected one of {', '.join(DATA_SUFFIXES)}")
            return None
        if kind == "data" and candidate.is_dir():
            problems.append(f"{path}: {candidate} is a folder; expected a {'/'.join(DATA_SUFFIXES)} file or a hub dataset id")
            return None
        return str(candidate)
    if _HUB_ID.match(value) and not _looks_local(value):
        return value
    what = "a local folder, a hub id (org/name)" + (f" or {' / '.join(TINY_MODELS)}" if kind == "model" else "")
    if kind == "data":
        what = f"a {'/'.join(DATA_SUFFIXES)} file or a hub dataset id (org/name)"
    where = "" if str(candidate) == value else f" (looked for {candidate})"  # an absolute path: once
    problems.append(f"{path}: {value!r} not found{where}; expected {what}")
    return None


def load_config(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), base_dir: str | Path | None = None, overrides_dir: str | Path | None = None,
) -> SweepConfig:  # fmt: skip
    """Read, validate and resolve a space file; raise ConfigError listing every problem.

    Relative paths in the file resolve against the file's folder, or `base_dir` (for a copy of a
    space file kept in a sweep folder, whose paths are relative to where the original was). Relative
    paths in `overrides` (the command line's key=value) resolve against the directory the command
    runs in, as the shell completes them, or `overrides_dir`; the config keeps those overrides with
    the paths made absolute (sweep.json records them so: `resume` reads the same files from anywhere).
    """
    source = Path(path)
    label = str(source)
    try:
        text = source.read_text()
    except FileNotFoundError:
        raise ConfigError(label, [f"file not found: {source.resolve()}"]) from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError(label, [f"cannot read: {exc}"]) from None
    raw = parse_yaml(text, label)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(label, [f"the file holds {type(raw).__name__}; expected a mapping with keys: {', '.join(TOP_KEYS)}"])
    problems: list[str] = []
    anchored = anchor_overrides(overrides, Path(overrides_dir) if overrides_dir else Path.cwd())
    apply_overrides(raw, anchored, problems)
    cfg = _validate(raw, source.resolve(), text, tuple(anchored), problems, label, Path(base_dir).resolve() if base_dir else None)
    written = [item.partition("=")[2] for item in overrides if item.partition("=")[0].strip() == "tracking.results_dir"]
    if written:  # as the user wrote it (submit refuses a relative one: it would name a folder of the job's)
        cfg = replace(cfg, results_dir_given=str(parse_yaml(written[-1], "tracking.results_dir")))
    return cfg


# Keys whose values are local paths (or, for sources, a hub id): given in an override, a relative
# one resolves against the directory the command runs in, not the space file's folder.
PATH_KEYS = ("model.id", "model.chat_template_from", "data.train", "data.eval", "tracking.results_dir", "search.warm_start")


def anchor_overrides(overrides: list[str] | tuple[str, ...], cwd: Path) -> list[str]:
    """`overrides` with each relative local path of a PATH_KEYS key made absolute against `cwd`.
    A source (model, data) is a local path when it exists there or looks like one (_looks_local);
    otherwise it is left as given: a hub id, or a tiny model's
    name. Anything that does not parse is left for apply_overrides to report."""
    anchored = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if sep and key.strip() in PATH_KEYS:
            try:
                value = parse_yaml(text, f"override {item!r}")
            except ConfigError:
                value = None
            if isinstance(value, str) and value and not Path(value).expanduser().is_absolute() and value not in TINY_MODELS:
                local = key.strip() in ("tracking.results_dir", "search.warm_start") or (cwd / value).exists() or _looks_local(value)
                if local:
                    item = f"{key}={yaml_scalar(str((cwd / Path(value).expanduser()).resolve()))}"
        anchored.append(item)
    return anchored


def _validate(raw: dict, source: Path, text: str, overrides: tuple[str, ...], problems: list[str], label: str, base: Path | None = None) -> SweepConfig:
    base = base or source.parent
    for key in raw:
        if key not in TOP_KEYS:
            problems.append(f"{key}: unknown key; the top level accepts: {', '.join(TOP_KEYS)}")
    for key in REQUIRED:
        if key not in raw:
            problems.append(f"{key}: required; see search_spaces/demo.yaml for a complete example")

    name = raw.get("name")
    if "name" in raw and not (isinstance(name, str) and re.fullmatch(NAME_PATTERN, name)):
        problems.append(f"name: got {name!r}; expected letters, digits, '.', '_' or '-' (up to 100), starting with a letter or digit")

    sections: dict[str, Any] = {}
    for key, cls in SECTIONS.items():
        value = raw.get(key, {} if key not in REQUIRED else None)
        if value is None and key in REQUIRED:
            if key in raw:
                problems.append(f"{key}: empty; expected a mapping with keys: {', '.join(cls.model_fields)}")
            continue
        if not isinstance(value, dict):
            problems.append(f"{key}: got {value!r}; expected a mapping with keys: {', '.join(cls.model_fields)}")
            continue
        try:
            sections[key] = cls.model_validate(value)
        except ValidationError as exc:
            problems.extend(_describe_errors(key, cls, exc))

    specs = hyperparam_specs()
    dims: list[Dimension] = []
    raw_space = raw.get("space")
    if "space" in raw:
        if not isinstance(raw_space, dict) or not raw_space:
            problems.append(f"space: got {raw_space!r}; expected a mapping of hyperparameters to search, e.g. lora_r: [8, 16]; searchable: {', '.join(SEARCHABLE)}")
        else:
            for dim_name, dim_raw in raw_space.items():
                dim = parse_dimension(str(dim_name), dim_raw, specs, problems)
                if dim is not None:
                    dims.append(dim)
    space = Space(tuple(dims))

    # cross-section checks, each on the sections that validated. Sources are resolved from the raw
    # values so that a missing file is reported even when its section has other problems.
    model, data, train, search = (sections.get(k) for k in ("model", "data", "train", "search"))
    resolved: dict[str, str | None] = {}
    for section, key, kind in (("model", "id", "model"), ("model", "chat_template_from", "model"), ("data", "train", "data"), ("data", "eval", "data")):
        value = (raw.get(section) or {}).get(key) if isinstance(raw.get(section), dict) else None
        if isinstance(value, str):
            resolved[f"{section}.{key}"] = _resolve_source(value, base, f"{section}.{key}", kind, problems)
    if model is not None:
        sections["model"] = model.model_copy(
            update={"id": resolved.get("model.id"), "chat_template_from": resolved.get("model.chat_template_from")}
        )
    if data is not None:
        updates: dict[str, Any] = {"train": resolved.get("data.train"), "eval": resolved.get("data.eval")}
        if data.eval is not None and data.eval_fraction is not None:
            problems.append("data.eval and data.eval_fraction: give one, not both")
        if data.eval is None and data.eval_fraction is None:
            updates["eval_fraction"] = 0.05
        sections["data"] = data.model_copy(update=updates)
    if train is not None:
        explicit = sorted(set(raw.get("train", {}) or {}) & set(space.names))
        for key in explicit:
            problems.append(f"train.{key} and space.{key}: search it in space or fix it in train, not both")
        if train.eval_every > train.max_steps:
            problems.append(f"train.eval_every: {train.eval_every} is beyond train.max_steps {train.max_steps}; no trial would be evaluated")
        for d in space.dims:
            if isinstance(d, Ratio) and any(isinstance(o, Ratio) and o.name == d.of for o in space.dims):
                problems.append(f"space.{d.name}.ratio_of: {d.of} is itself a ratio; chain ratios from a sampled or fixed value")
    tracking = sections.get("tracking")
    if tracking is not None:
        from sweep.config.secrets import expand_env

        for key in ("mlflow_uri", "optuna_storage"):
            value = getattr(tracking, key)
            try:
                value is not None and expand_env(value)
            except KeyError as exc:
                problems.append(f"tracking.{key}: refers to ${{{exc.args[0]}}}, which is not set in the environment; export it or write the value")
    resources = sections.get("resources")
    if resources is not None and resources.gpu_memory_gb != "auto" and resources.gpu_memory_gb <= 0:
        problems.append(f"resources.gpu_memory_gb: got {resources.gpu_memory_gb!r}; expected auto or a positive number of GB")
    if search is not None:
        if search.metric not in METRICS:
            problems.append(f"search.metric: got {search.metric!r}; expected one of {', '.join(METRICS)}")
        if search.objectives is not None:
            explicit = {"metric", "mode"} & set((raw.get("search") or {}).keys())
            first = next(iter(search.objectives[0].items()), None) if search.objectives else None
            if explicit and first is not None and (("metric" in explicit and search.metric != first[0]) or ("mode" in explicit and search.mode != first[1])):
                problems.append(
                    f"search.objectives and search.{'metric' if 'metric' in explicit else 'mode'}: the first objective is {first[0]} ({first[1]}), "
                    f"metric/mode say {search.metric} ({search.mode}); drop metric and mode, or make them the first objective"
                )
            names = []
            for i, objective in enumerate(search.objectives):
                if len(objective) != 1:
                    problems.append(f"search.objectives[{i}]: got {objective!r}; expected one metric and its direction, e.g. {{eval_loss: min}}")
                    continue
                (metric,) = objective
                if metric not in METRICS:
                    problems.append(f"search.objectives[{i}]: got {metric!r}; expected one of {', '.join(METRICS)}")
                names.append(metric)
            if len(search.objectives) < 2:
                problems.append("search.objectives: give two or more (one objective is search.metric and search.mode)")
            if len(set(names)) != len(names):
                problems.append(f"search.objectives: {names} repeats a metric")
            elif not problems and search.objectives:
                (first, direction), = search.objectives[0].items()
                sections["search"] = search = search.model_copy(update={"metric": first, "mode": direction})
        size = space.size()
        discrete = size if size and all(d.size() is not None for d in space.dims) else None
        algorithm, why = rules.search_algorithm(search.algorithm, len(search.objectives or [search.metric]), discrete, search.num_trials, search.startup,
                                                 search.n_startup_trials)
        if algorithm != search.algorithm:
            sections["search"] = search = search.model_copy(update={"algorithm": algorithm})
        sections["algorithm_reason"] = why
        if search.algorithm == "grid":
            continuous = [d.name for d in space.dims if d.size() is None]
            for d_name in continuous:
                problems.append(f"space.{d_name}: grid search needs discrete dimensions; give choices or a uniform range with a step")
            if not continuous and size and search.num_trials and search.num_trials > size:
                problems.append(f"search.num_trials: {search.num_trials} exceeds the grid's {size} points; give at most {size} (or leave it out)")
        elif search.num_trials is None:
            problems.append("search.num_trials: required for tpe and random search; expected a positive integer")
        if train is not None and search.scheduler.type != "none":
            sched = search.scheduler
            if sched.grace_period and sched.grace_period > train.max_steps:
                problems.append(f"search.scheduler.grace_period: {sched.grace_period} steps is beyond train.max_steps {train.max_steps}")
            if sched.max_t and sched.max_t > train.max_steps:
                problems.append(f"search.scheduler.max_t: {sched.max_t} steps is beyond train.max_steps {train.max_steps}")
        if search.warm_start is not None:
            folder = (base / Path(search.warm_start).expanduser()).resolve()
            if not (folder / "sweep.json").is_file():
                problems.append(f"search.warm_start: {folder} is not a sweep folder (no sweep.json); expected a folder made by `python -m sweep run`")
            else:
                sections["search"] = search = search.model_copy(update={"warm_start": str(folder)})
        points = []
        for i, point in enumerate(search.points_to_evaluate):
            points.append(space.encode(point, f"search.points_to_evaluate[{i}]", problems))
        sections["study_points"] = tuple(points)

    if problems:
        raise ConfigError(label, problems)
    return SweepConfig(
        name=name,
        model=sections["model"],
        data=sections["data"],
        train=sections["train"],
        search=sections["search"],
        space=space,
        resources=sections["resources"],
        tracking=_resolve_tracking(sections["tracking"], base),
        source=source,
        source_text=text,
        overrides=overrides,
        study_points=sections.get("study_points", ()),
        algorithm_reason=sections.get("algorithm_reason", "as configured"),
        results_dir_given=sections["tracking"].results_dir,
    )


def _resolve_tracking(tracking: TrackingSection, base: Path) -> TrackingSection:
    """Every local store made absolute, once, here: the results folder (default ./sweeps in the
    directory the command runs in; given in the file, relative to the file's folder) and a relative
    sqlite path in a store URL (relative to the current directory, as MLflow and Optuna read it).
    Ray workers run in folders of their own: what they are handed must not depend on theirs."""
    folder = Path(tracking.results_dir).expanduser() if tracking.results_dir else Path.cwd() / "sweeps"
    updates: dict[str, Any] = {"results_dir": str((base / folder).resolve() if tracking.results_dir else folder.resolve())}
    for key in ("mlflow_uri", "optuna_storage"):
        url = getattr(tracking, key)
        if url and url.startswith("sqlite:///") and not url.startswith("sqlite:////") and "${" not in url:
            updates[key] = "sqlite:///" + str((Path.cwd() / url.removeprefix("sqlite:///")).resolve())
    return tracking.model_copy(update=updates)

