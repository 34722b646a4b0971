"""`python -m sweep train space.yaml [key.path=value ...]`: train one configuration to completion.

No search: a one-trial sweep, so the same trainable, the same MLflow parent and child run, the
same checkpoints, and `python -m sweep resume DIR` (and status, stop, best) work as for any sweep.

Which configuration: the `train:` values, with every searched dimension of `space:` pinned to one
value. A dimension is pinned when it has a single value (`lora_r: [16]`, as `best --export` writes
it) or when an override gives it one: `train.lora_r=16` (for a ratio, the value itself:
`train.lora_alpha=32`). An unpinned dimension is an error naming the override to add: the command
never picks a value you did not choose. A file without `space:` trains its `train:` values.

It becomes ordinary overrides of the file (`space.lora_r=[16]`, `search.num_trials=1`,
`search.scheduler={type: none}`, ...), recorded in sweep.json like any sweep's, so `resume` reloads
exactly this configuration. The sweep's time budget does not apply (to completion means that), unless
the command line gives one (`search.time_budget=2h`). At the end the adapter is written to
SWEEP_DIR/adapter in the format of `best --export` (sweep.readback.adapter).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import yaml

from core.contract import TrialStatus
from sweep.config import SEARCHABLE, ConfigError, SweepConfig, TrainSection, apply_overrides, load_config, parse_yaml
from sweep.config.space import Choice, Ratio

Log = Callable[[str], None]

COMMAND = "train"  # sweep.json's "command" for a folder made by `python -m sweep train`
ADAPTER, BASE = "adapter", "base"  # SWEEP_DIR/adapter, SWEEP_DIR/base: as `best --export` writes them (sweep.readback.adapter)

# A one-trial sweep: its one point (random search over one-value dimensions draws it), nothing
# pruned, nothing queued or warm-started, no cohort, no time budget but the command line's.
ONE_TRIAL = (
    "search.algorithm=random", "search.num_trials=1", "search.scheduler={type: none}", "search.max_concurrent=1",
    "search.points_to_evaluate=[]", "search.warm_start=null", "resources.cohort=1",
)  # fmt: skip
NO_TIME_BUDGET = "search.time_budget=null"


def _flow(value: Any) -> str:
    """A value as one line of YAML (an override's right-hand side)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _with_overrides(path: str | Path, overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """The file's raw mapping with `overrides` applied ({} if it cannot be read: load_config says why)."""
    try:
        raw = parse_yaml(Path(path).read_text(), str(path))
    except (OSError, UnicodeDecodeError, ConfigError):
        return {}
    raw = raw if isinstance(raw, dict) else {}
    apply_overrides(raw, list(overrides), [])
    return raw


def _section(raw: dict[str, Any], key: str) -> dict[str, Any]:
    return raw[key] if isinstance(raw.get(key), dict) else {}


def one_trial_overrides(path: str | Path, overrides: list[str] | tuple[str, ...]) -> list[str]:
    """The user's overrides as those of a one-trial sweep: `train.K=V` for a searched K becomes
    `space.K=[V]`; ONE_TRIAL follows. What cannot be read is left for load_config to report."""
    raw = _with_overrides(path, overrides)
    space = _section(raw, "space")
    out = []
    for item in overrides:
        key, _, text = item.partition("=")
        parts = key.strip().split(".")
        if len(parts) == 2 and parts[0] == "train" and parts[1] in space:
            try:
                out.append(f"space.{parts[1]}={_flow([parse_yaml(text, item)])}")
                continue
            except ConfigError:
                pass  # load_config reports the bad value
        out.append(item)
    if not space and raw:  # a space file needs one dimension: a one-value one of a train value the file leaves at its default
        free = next((k for k in SEARCHABLE if k not in _section(raw, "train")), None)
        if free is not None:
            out.append(f"space.{free}={_flow([_plain(TrainSection.model_fields[free].default)])}")
    budget = [] if any(o.partition("=")[0].strip() == "search.time_budget" for o in overrides) else [NO_TIME_BUDGET]
    return [*out, *budget, *ONE_TRIAL]


def unpinned(path: str | Path, overrides: list[str] | tuple[str, ...]) -> list[str]:
    """Every searched dimension (after `overrides`, as one_trial_overrides makes them) with more than
    one value, and the override that pins it. Dimensions that do not parse are load_config's to report."""
    from sweep.config import hyperparam_specs
    from sweep.config.space import parse_dimension

    specs, problems = hyperparam_specs(), []
    for name, raw_dim in _section(_with_overrides(path, overrides), "space").items():
        d = parse_dimension(str(name), raw_dim, specs, [])
        values = d.factor if isinstance(d, Ratio) else d
        if d is None or (isinstance(values, Choice) and len(values.options) == 1):
            continue
        if isinstance(d, Ratio):
            how = f"the value itself, not the ratio of {d.of}"
        elif isinstance(d, Choice):
            how = f"e.g. train.{d.name}={_flow(_plain(d.options[0]))}"
        else:
            how = f"a value in {d.describe()}"
        problems.append(f"space.{d.name}: searched ({d.describe()}); `train` trains one configuration: pin it with train.{d.name}=VALUE "
                        f"({how}), or give it one value in the file")  # fmt: skip
    return problems


def load_one(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SweepConfig:
    """The space file as a one-trial sweep; ConfigError listing every problem, unpinned dimensions too."""
    derived = one_trial_overrides(path, overrides)
    problems = unpinned(path, derived)
    try:
        cfg = load_config(path, derived)
    except ConfigError as exc:
        raise ConfigError(exc.source, [*exc.problems, *problems]) from None
    if problems:
        raise ConfigError(str(path), problems)
    return cfg


def train_one(cfg: SweepConfig, address: str | None = None, log: Log = print, sweep_dir: Path | None = None) -> str:
    """Train the configuration; its trial's status (completed: its adapter is in SWEEP_DIR/adapter)."""
    from sweep.engine.sweep import run_sweep

    result = run_sweep(cfg, address=address, log=log, sweep_dir=sweep_dir, command=COMMAND)
    return keep_adapter(result, cfg, log)


def exit_code(status: str) -> int:
    """0 when the trial completed, or was stopped on request (resume continues it); 1 when it failed."""
    return 0 if status in (TrialStatus.COMPLETED, TrialStatus.STOPPED) else 1


def keep_adapter(result: Any, cfg: SweepConfig, log: Log = print) -> str:
    """Write the trained adapter as `best --export` writes it (sweep.readback.adapter: SWEEP_DIR/adapter
    in safetensors with the tokenizer, chat template and a generation config that stops at the end
    of a turn; SWEEP_DIR/base where the base's own files would not) once the trial completed;
    return its status. A trial that did not complete says why and how to go on."""
    from sweep.folder.checks import quote
    from sweep.folder import trial_checkpoint

    sweep_dir = Path(result.sweep_dir)
    row = result.trials[0] if result.trials else None
    status = str(row["status"]) if row else str(TrialStatus.STOPPED)
    if status != TrialStatus.COMPLETED:
        resumable = status in (TrialStatus.STOPPED, TrialStatus.RUNNING)
        log(f"the trial did not complete ({status}); " + (f"continue with:  python -m sweep resume {quote(sweep_dir)}" if resumable else "its error is above and in MLflow"))
        return status
    checkpoint = trial_checkpoint(sweep_dir, row["label"], row["trial_id"])
    if checkpoint is None:
        log(f"{row['label']} completed but left no checkpoint in {sweep_dir} (was its folder cleaned up?): no adapter to keep")
        return str(TrialStatus.FAILED)
    from sweep.readback.adapter import write_adapter

    for stale in (ADAPTER, BASE):  # a resumed `train` writes its adapter afresh
        shutil.rmtree(sweep_dir / stale, ignore_errors=True)
    written = write_adapter(cfg, Path(checkpoint), sweep_dir)
    stops = ", ".join(f"{t} ({i})" for t, i in zip(written["eos_tokens"], written["eos_token_id"]))
    log(f"adapter (PEFT format, safetensors, with its tokenizer, chat template and a generation config that stops at {stops}): {written['adapter']}")
    if written.get("base"):
        log(f"  its base: {written['base']} ({cfg.model.id}'s files, linked, with that generation config: the usual loaders take it from the base)")
    log(f"load it:  from peft import AutoPeftModelForCausalLM; model = AutoPeftModelForCausalLM.from_pretrained({written['adapter']!r})")
    return status


def after_resume(folder: Path, result: Any, log: Log = print) -> int:
    """`resume` of a folder made by `train`: keep the adapter as `train` would have; its exit code."""
    from sweep.folder import SweepFolder

    sweep = SweepFolder(folder)
    if sweep.meta.get("command") != COMMAND:
        return 0
    return exit_code(keep_adapter(result, sweep.config, log))
