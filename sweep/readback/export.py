"""`python -m sweep best DIR [--where "peak_vram_gb<=20, method==qlora"] [--export PATH [--merge] [--log-model]]`:
the winning trial, its full config as a ready-to-run space file, and an export ready for inference:
its adapter in PEFT format (optionally merged into the base model) with the tokenizer, a
generation config that stops at the end of a chat turn, and a model card (README.md) saying where
it came from, how it was trained and how to load it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import yaml

from core.contract import EVAL_LOSS, ROW_METRICS
from sweep.folder.checks import quote
from sweep.config import SEARCHABLE, SweepConfig
from sweep.readback.results import check_where, choose, open_sweep, parse_where, value_of
from sweep.config.secrets import redact
from sweep.folder import say_mlflow, trial_checkpoint
from sweep.readback.adapter import END_OF_TURN, merge as merge_adapter, stop_token_ids, write_adapter  # noqa: F401  (END_OF_TURN, stop_token_ids: the export's words)
from core.contract import finite

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


def export_adapter(cfg: SweepConfig, checkpoint: Path, out: Path, merge: bool) -> dict[str, Any]:
    """The adapter folder ready for inference under `out` (sweep.readback.adapter: the adapter in
    safetensors, the tokenizer and chat template, a generation config that stops at the end of a
    turn, and base/ where the base's own files would not), and with `merge` the merged model."""
    written = write_adapter(cfg, checkpoint, out)
    if merge:
        written["merged"] = str(merge_adapter(cfg, Path(written["adapter"]), out / "merged"))
    return written


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value).replace("|", "\\|")


def _table(head: tuple[str, str], rows: list[tuple[str, Any]]) -> str:
    lines = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    return "\n".join(lines + [f"| {k} | {_cell(v)} |" for k, v in rows])


def load_snippet(cfg: SweepConfig, hyper: dict[str, Any], adapter: str) -> str:
    """Python that loads the exported adapter the way the trial trained it: QLoRA on a 4-bit NF4
    base (bitsandbytes, a CUDA GPU), LoRA on a bf16 base; then a chat turn, stopping at its end."""
    from trainable.model import resolve_model_path

    base = resolve_model_path(cfg.model.id)
    revision = f", revision={json.dumps(cfg.model.revision)}" if cfg.model.revision else ""
    if hyper["method"] == "qlora":
        imports = "from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, GenerationConfig"
        load = (
            "# QLoRA: the adapter was trained on a 4-bit NF4 base; load the base the same way (bitsandbytes, a CUDA GPU)\n"
            "quantization = BitsAndBytesConfig(\n"
            '    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16,\n'
            ")\n"
            f'base = AutoModelForCausalLM.from_pretrained({json.dumps(base)}{revision}, quantization_config=quantization, device_map="auto")\n'
        )
    else:
        imports = "from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig"
        load = (
            "# LoRA: the adapter was trained on an unquantised base; load it in bf16\n"
            f'base = AutoModelForCausalLM.from_pretrained({json.dumps(base)}{revision}, dtype=torch.bfloat16, device_map="auto")\n'
        )
    return (
        "import torch\n"
        "from peft import PeftModel\n"
        f"{imports}\n\n"
        f"ADAPTER = {json.dumps(adapter)}\n"
        f"{load}"
        "model = PeftModel.from_pretrained(base, ADAPTER).eval()\n"
        "tokenizer = AutoTokenizer.from_pretrained(ADAPTER)  # the base tokenizer with the chat template it was trained with\n"
        "generation = GenerationConfig.from_pretrained(ADAPTER, max_new_tokens=64)  # stops at <end_of_turn> as well as <eos>\n\n"
        'messages = [{"role": "user", "content": "Hello!"}]\n'
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", return_dict=True).to(model.device)\n"
        "with torch.no_grad():\n"
        "    out = model.generate(**inputs, generation_config=generation)\n"
        'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))\n'
    )


def model_card(cfg: SweepConfig, folder: Path, row: dict[str, Any], space: dict[str, Any], run_params: dict[str, str], written: dict[str, Any],
               command: str, mlflow_uri: str, where: str | None) -> str:  # fmt: skip
    """README.md of an export: what the adapter is, where it came from, how it was trained, how to load it."""
    chosen = {**space["train"], **{k: v[0] for k, v in space["space"].items()}}  # the winner's values (one is the space's one choice)
    hyper = {k: chosen[k] for k in SEARCHABLE}
    searched = set(cfg.space.names)
    settings = {k: v for k, v in space["train"].items() if k not in SEARCHABLE}
    quant = "QLoRA (4-bit NF4 base, double quantization, bf16 compute)" if hyper["method"] == "qlora" else "LoRA (unquantised base)"
    model = cfg.model
    base_note = " (the offline random tiny model lora-sweep builds)" if model.id.startswith("tiny-gemma3") else ""
    metric = cfg.search.metric
    rule = f" with {where}" if where else ""
    results = [(m, row[m]) for m in ROW_METRICS if finite(row.get(m))]
    results.insert(0, ("step", row.get("step")))
    data = cfg.data
    data_rows = [("train", data.train), ("eval", data.eval if data.eval else f"{data.eval_fraction or 0.05:g} of train, held out")]
    if data.split != "train" or data.eval_split:
        data_rows += [("split", data.split), ("eval_split", data.eval_split or data.split)]
    data_rows += [("max_seq_len", data.max_seq_len), ("packing", data.packing)]
    logged = [(k, v) for k, v in sorted(run_params.items()) if k not in hyper and k not in settings and k not in ("gpu_share", "estimated_vram_gb")]
    eos = written.get("eos_token_id")
    adapter = written.get("adapter")
    tags = ["lora", "peft", "lora-sweep"] + (["qlora"] if hyper["method"] == "qlora" else [])
    parts = [
        "---",
        yaml.safe_dump({"base_model": model.id, "library_name": "peft", "tags": tags}, sort_keys=False).strip(),
        "---",
        "",
        f"# {cfg.name}, trial {row['label']}: a {quant.split(' ')[0]} adapter for {model.id}",
        "",
        f"Trial **{row['label']}** of the sweep **{cfg.name}** (folder `{folder}`), the best by {metric}{rule}: "
        f"{EVAL_LOSS} **{row[EVAL_LOSS]:.4f}** at step {row.get('step')}. Trained by lora-sweep; its configuration: {row['summary']}.",
        "",
        f"MLflow run: `{row['run_id']}` (tracking URI `{redact(mlflow_uri)}`; the trial's curves, params and tags).",
        "",
        "## Base model",
        "",
        _table(("", ""), [("model", f"{model.id}{base_note}"), ("revision", model.revision or "none pinned (the default branch at training time)"),
                          ("chat template", f"from {model.chat_template_from}" if model.chat_template_from else "the tokenizer's own"),
                          ("method", quant)]),  # fmt: skip
        "",
        "## Data",
        "",
        _table(("", ""), data_rows),
        "",
        "## Hyperparameters",
        "",
        "Searched ones are marked *searched*; the others were fixed for every trial.",
        "",
        _table(("hyperparameter", "value"), [(k + (" *searched*" if k in searched else ""), v) for k, v in hyper.items()]),
        "",
        _table(("training setting", "value"), list(settings.items())),
        "",
        "Recorded by the trial (its MLflow params):",
        "",
        _table(("param", "value"), logged) if logged else "(none)",
        "",
        "## Results",
        "",
        _table(("metric", "value"), results),
        "",
    ]
    if adapter:
        stops = ", ".join(f"{t} ({i})" for t, i in zip(written["eos_tokens"], eos))
        parts += [
            "## Load it",
            "",
            f"`adapter/` holds the adapter (PEFT format, safetensors), the tokenizer with the chat template it was trained with, and "
            f"`generation_config.json`, whose `eos_token_id` is {eos}: generation stops at {stops}, so a chat reply ends at its turn's end."
            + (" `merged/` holds the base model with the adapter merged in (unquantised), loadable without PEFT." if written.get("merged") else ""),
            "",
        ]
        if written.get("base"):
            parts += [
                f"`adapter_config.json` names `base/` as its base: {model.id}'s config, and its weights linked from where they are on this "
                "machine (not copied), with the tokenizer and generation config above. The usual loaders (`AutoPeftModelForCausalLM`, "
                "`pipeline`) take the generation settings and the pipeline its tokenizer from the base the adapter names, never from "
                f"the adapter's folder, and {model.id}'s own files would not stop at the end of a turn"
                + (" or have this chat template" if model.chat_template_from else "") + ". "
                f"To share the adapter alone (the Hub), set `base_model_name_or_path` in `adapter_config.json` back to `{model.id}` "
                "and generate with `generation_config=GenerationConfig.from_pretrained(ADAPTER)`, as below.",
                "",
            ]
        parts += [
            "In one line (the base as the loaders load it: unquantised):",
            "",
            "```python",
            "from peft import AutoPeftModelForCausalLM",
            f"model = AutoPeftModelForCausalLM.from_pretrained({json.dumps(adapter)})",
            "# or: transformers.pipeline(\"text-generation\", model=" + json.dumps(adapter) + ")",
            "```",
            "",
            "As it was trained" + (" (a 4-bit NF4 base)" if hyper["method"] == "qlora" else "") + ":",
            "",
            "```python",
            load_snippet(cfg, hyper, adapter).rstrip(),
            "```",
            "",
        ]
    else:
        parts += ["## Load it", "", f"{row['label']} left no checkpoint: only its configuration (`space.yaml`) is exported.", ""]
    parts += ["## Train it to completion", "", "```bash", command, "```", ""]
    return "\n".join(parts)


def log_export(folder: Any, client: Any, run_id: str, export: Path) -> str:
    """The export folder as artifacts of the trial's MLflow run (its status and times unchanged);
    not base/, whose links would upload the base model's weights. `folder`: the SweepFolder."""
    from sweep.readback.adapter import BASE

    for path in sorted(export.iterdir()):
        if path.name == BASE:
            continue
        folder.log_artifacts(client, run_id, path, f"export/{path.name}" if path.is_dir() else "export")
    return f"runs:/{run_id}/export"


def best(folder: Path, where: str | None, export: Path | None, merge: bool, write: Write = print, info: dict[str, Any] | None = None,
         log_model: bool = False) -> dict[str, Any] | None:  # fmt: skip
    """Print (and with `export`, write out) the best trial under `where`; its row, or None.
    `info`, when given, is filled with what `best --json` prints. `log_model` also logs the export
    to the trial's MLflow run."""
    folder = Path(folder).resolve()
    constraints = parse_where(where)
    if log_model and export is None:
        raise ValueError("--log-model: it logs the exported folder; give --export DIR too")
    sweep = open_sweep(folder)
    cfg, result = sweep.cfg, sweep.result
    check_where(constraints, result.trials)
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
    extra = "".join(f"  {name} {_cell(value_of(row, name))}" for name in dict.fromkeys(n for n, _, _ in constraints) if name != metric)
    write(f"best trial{' with ' + where if where else ''}: {row['label']}  {metric} {row[metric]:.4f}{extra}  ({row['summary']})")  # as `run` and `status` write it
    space = winner_space(cfg, row)
    text = yaml.safe_dump(space, sort_keys=False)
    info["best"] = {**_brief(row, cfg), "config": row["config"], "space": space}
    if export is None:
        write("its config, ready to run:")
        write(text.rstrip())
        write(f"export it (adapter, tokenizer, generation config, model card):  python -m sweep best {quote(folder)} --export DIR")
        say_mlflow(sweep.mlflow_links, write)
        return row
    export = Path(export).resolve()
    if export.exists() and any(export.iterdir()):
        raise FileExistsError(f"--export {export}: not empty; give a new folder (nothing is overwritten)")
    export.mkdir(parents=True, exist_ok=True)
    (export / "space.yaml").write_text(f"# python -m sweep train {quote(export / 'space.yaml')} train.max_steps=N\n"
                                       f"# {row['label']} of {folder.name}: {metric} {row[metric]:.4f}\n" + text)  # fmt: skip
    checkpoint = trial_checkpoint(folder, row["label"], row.get("trial_id"), write)
    written: dict[str, Any] = {"space": str(export / "space.yaml")}
    if checkpoint is None:
        write(f"{row['label']} left no checkpoint in {folder} (was its folder cleaned up?): only the config is exported")
    else:
        written.update(export_adapter(cfg, Path(checkpoint), export, merge))
        written["checkpoint"] = checkpoint
    command = f"python -m sweep train {quote(export / 'space.yaml')} train.max_steps={cfg.train.max_steps * 5}"
    run_params = next((dict(r.data.params) for r in sweep.runs if r.info.run_id == row["run_id"]), {})
    card = model_card(cfg, folder, row, space, run_params, written, command, sweep.folder.recorded_uri("mlflow_uri"), where)
    (export / "README.md").write_text(card)
    if written.get("adapter"):
        (Path(written["adapter"]) / "README.md").write_text(card)  # in place of PEFT's blank template: the folder one uploads
    written["model_card"] = str(export / "README.md")
    (export / "export.json").write_text(json.dumps({"trial": row["label"], "sweep": cfg.name, "sweep_dir": str(folder), "run_id": row["run_id"],
                                                    metric: row[metric], **written}, indent=2))  # fmt: skip
    if log_model:
        written["mlflow_artifacts"] = log_export(sweep.folder, sweep.client, row["run_id"], export)
    for kind in ("space", "adapter", "base", "merged", "model_card", "checkpoint", "mlflow_artifacts"):
        if kind in written:
            write(f"  {kind}: {written[kind]}")
    if "eos_token_id" in written:
        write(f"  generation stops at: {', '.join(f'{t} ({i})' for t, i in zip(written['eos_tokens'], written['eos_token_id']))}")
    write(f"train it to completion:  {command}")
    say_mlflow(sweep.mlflow_links, write)
    info["export"] = written
    return row


def _brief(row: dict[str, Any], cfg: SweepConfig) -> dict[str, Any]:
    """A trial row as `best --json` shows it: who it is, its objectives, its hyperparameters."""
    from core.contract import ROW_METRICS

    return {"trial": row["label"], "number": row["number"], "status": row["status"], "run_id": row["run_id"], "summary": row["summary"],
            "params": row["params"], **{m: row.get(m) for m in ROW_METRICS}}  # fmt: skip
