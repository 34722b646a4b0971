"""`python -m sweep best DIR [--where "peak_vram_gb<=20"] [--export PATH] [--merge]`: the winning
trial, its full config as a ready-to-run space file, its adapter in PEFT format (optionally merged
into the base model), and the command that trains it to completion."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import yaml

from sweep.checks import quote
from sweep.config import SEARCHABLE, SweepConfig
from sweep.results import choose, open_sweep, parse_where
from sweep.sweepdir import latest_checkpoint, say_mlflow

Write = Callable[[str], None]


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def winner_space(cfg: SweepConfig, row: dict[str, Any]) -> dict[str, Any]:
    """A space file that trains exactly the winning configuration: every hyperparameter fixed in
    `train`, one of them kept as a one-choice dimension (a space file needs one), no scheduler."""
    hyper = {k: _plain(getattr(cfg.train, k)) for k in SEARCHABLE}
    hyper.update({k: _plain(v) for k, v in row["config"].items() if k in SEARCHABLE})
    kept = cfg.space.names[0] if cfg.space.names and cfg.space.names[0] in SEARCHABLE else "learning_rate"
    train = {k: _plain(v) for k, v in cfg.train.model_dump().items() if k not in SEARCHABLE}
    train.update({k: v for k, v in hyper.items() if k != kept})
    model = {k: v for k, v in cfg.model.model_dump().items() if v is not None}
    data = {k: v for k, v in cfg.data.model_dump().items() if v is not None}
    return {
        "name": f"{cfg.name}-{row['label']}",
        "model": model,
        "data": data,
        "train": train,
        "search": {"algorithm": "grid", "scheduler": {"type": "none"}},
        "space": {kept: [hyper[kept]]},
        "resources": cfg.resources.model_dump(),
        "tracking": {"experiment": f"{cfg.experiment}-best"},
    }


def export_adapter(cfg: SweepConfig, checkpoint: Path, out: Path, merge: bool) -> dict[str, str]:
    """The adapter in PEFT format (and the merged model) under `out`, with the tokenizer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainable.model import load_tokenizer, pick_device_and_dtype, resolve_model_path

    _, dtype = pick_device_and_dtype(cfg.train.dtype)
    # An unquantised base even for QLoRA: merging into 4-bit weights would round the adapter away.
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model.id), dtype=dtype, revision=cfg.model.revision, trust_remote_code=False)
    model = PeftModel.from_pretrained(base, str(checkpoint))
    tokenizer = load_tokenizer(cfg.model.id, cfg.model.chat_template_from, cfg.model.revision)
    written = {}
    adapter = out / "adapter"
    model.save_pretrained(str(adapter))
    tokenizer.save_pretrained(str(adapter))
    written["adapter"] = str(adapter)
    if merge:
        merged = out / "merged"
        with torch.no_grad():
            full = model.merge_and_unload()
        full.save_pretrained(str(merged))
        tokenizer.save_pretrained(str(merged))
        written["merged"] = str(merged)
    return written


def best(folder: Path, where: str | None, export: Path | None, merge: bool, write: Write = print, info: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Print (and with `export`, write out) the best trial under `where`; its row, or None.
    `info`, when given, is filled with what `best --json` prints."""
    folder = Path(folder).resolve()
    constraints = parse_where(where)
    sweep = open_sweep(folder)
    cfg, study, result = sweep.cfg, sweep.study, sweep.result
    info = {} if info is None else info
    info.update(folder=str(folder), name=cfg.name, metric=cfg.search.metric, mode=cfg.search.mode, where=where, counts=result.counts,
                best=None, mlflow=sweep.mlflow_links)  # fmt: skip
    if cfg.multi_objective:
        info["pareto"] = [_brief(r, cfg) for r in result.pareto]
    if cfg.multi_objective:
        names = [m for m, _ in cfg.objectives]
        write(f"Pareto set ({', '.join(f'{m} {d}' for m, d in cfg.objectives)}):")
        for r in result.pareto:
            write(f"  {r['label']}  " + "  ".join(f"{m} {r[m]:.4g}" for m in names) + f"  ({r['summary']})")
    row = choose(result.trials, cfg, constraints)
    if row is None:
        rule = f" with {where}" if where else ""
        write(f"no completed trial{rule}; {len(result.trials)} trials: " + ", ".join(f"{n} {s}" for s, n in result.counts.items()))
        say_mlflow(sweep.mlflow_links, write)
        return None
    metric = cfg.search.metric
    extra = "  ".join(f"{m} {row[m]:.4g}" for m, _, _ in constraints if m != metric)
    write(f"best trial{' with ' + where if where else ''}: {row['label']}  {metric} {row[metric]:.4f}  {extra}  ({row['summary']})")
    space = winner_space(cfg, row)
    text = yaml.safe_dump(space, sort_keys=False)
    info["best"] = {**_brief(row, cfg), "config": row["config"], "space": space}
    if export is None:
        write("its config, ready to run:")
        write(text.rstrip())
        write(f"export it (config, adapter):  python -m sweep best {quote(folder)} --export DIR")
        say_mlflow(sweep.mlflow_links, write)
        return row
    export = Path(export).resolve()
    if export.exists() and any(export.iterdir()):
        raise FileExistsError(f"--export {export}: not empty; give a new folder (nothing is overwritten)")
    export.mkdir(parents=True, exist_ok=True)
    (export / "space.yaml").write_text(f"# python -m sweep run {quote(export / 'space.yaml')} train.max_steps=N\n"
                                       f"# {row['label']} of {folder.name}: {metric} {row[metric]:.4f}\n" + text)  # fmt: skip
    ray_trial = study.trials[row["number"]].user_attrs.get("ray_trial_id")
    checkpoint = latest_checkpoint(folder, ray_trial)
    written = {"space": str(export / "space.yaml")}
    if checkpoint is None:
        write(f"{row['label']} left no checkpoint in {folder} (was its folder cleaned up?): only the config is exported")
    else:
        written.update(export_adapter(cfg, Path(checkpoint), export, merge))
        written["checkpoint"] = checkpoint
    command = f"python -m sweep run {quote(export / 'space.yaml')} train.max_steps={cfg.train.max_steps * 5}"
    (export / "README.txt").write_text(
        f"{row['label']} of sweep {folder.name} ({cfg.name}): {metric} {row[metric]:.4f}\n{row['summary']}\n\n"
        f"Train this configuration to completion (pick the number of steps):\n  {command}\n\n"
        "Load the adapter:\n"
        "  from peft import AutoPeftModelForCausalLM\n"
        f"  model = AutoPeftModelForCausalLM.from_pretrained({str(export / 'adapter')!r})\n"
    )
    (export / "export.json").write_text(json.dumps({"trial": row["label"], metric: row[metric], **written}, indent=2))
    for kind, path in written.items():
        write(f"  {kind}: {path}")
    write(f"train it to completion:  {command}")
    say_mlflow(sweep.mlflow_links, write)
    info["export"] = written
    return row


def _brief(row: dict[str, Any], cfg: SweepConfig) -> dict[str, Any]:
    """A trial row as `best --json` shows it: who it is, its objectives, its hyperparameters."""
    from core.contract import ROW_METRICS

    return {"trial": row["label"], "number": row["number"], "status": row["status"], "run_id": row["run_id"], "summary": row["summary"],
            "params": row["params"], **{m: row.get(m) for m in ROW_METRICS}}  # fmt: skip
