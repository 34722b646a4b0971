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
from core.contract import finite

END_OF_TURN = "<end_of_turn>"  # Gemma's chat format ends each turn with it, not with <eos>

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


def stop_token_ids(tokenizer: Any, also: Any = None) -> list[int]:
    """The token ids generation stops at: the tokenizer's eos, `<end_of_turn>` where the vocabulary
    has it (a Gemma chat reply ends there; the model learned to write it, never <eos>), and any
    eos ids `also` (the base model's generation config) names."""
    ids: list[int] = []
    for value in (also, tokenizer.eos_token_id, tokenizer.get_vocab().get(END_OF_TURN)):
        for i in value if isinstance(value, list | tuple) else [value]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def export_adapter(cfg: SweepConfig, checkpoint: Path, out: Path, merge: bool) -> dict[str, Any]:
    """The adapter in PEFT format (and the merged model) under `out`, each with the tokenizer and a
    generation config that stops at `<end_of_turn>` as well as the tokenizer's eos."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GenerationConfig

    from trainable.model import load_tokenizer, pick_device_and_dtype, resolve_model_path

    _, dtype = pick_device_and_dtype(cfg.train.dtype)
    # An unquantised base even for QLoRA: merging into 4-bit weights would round the adapter away.
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model.id), dtype=dtype, revision=cfg.model.revision, trust_remote_code=False)
    model = PeftModel.from_pretrained(base, str(checkpoint))
    tokenizer = load_tokenizer(cfg.model.id, cfg.model.chat_template_from, cfg.model.revision)
    generation = GenerationConfig.from_dict(base.generation_config.to_dict()) if base.generation_config is not None else GenerationConfig()
    generation.eos_token_id = stop_token_ids(tokenizer, generation.eos_token_id)
    generation.bos_token_id = tokenizer.bos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation._from_model_config = False  # else generate() may rebuild it from the model config, losing <end_of_turn>
    written: dict[str, Any] = {}
    adapter = out / "adapter"
    model.save_pretrained(str(adapter))
    tokenizer.save_pretrained(str(adapter))
    generation.save_pretrained(str(adapter))
    written["adapter"] = str(adapter)
    if merge:
        merged = out / "merged"
        with torch.no_grad():
            full = model.merge_and_unload()
        full.generation_config = generation
        full.save_pretrained(str(merged))
        tokenizer.save_pretrained(str(merged))
        written["merged"] = str(merged)
    written["eos_token_id"] = generation.eos_token_id
    written["eos_tokens"] = tokenizer.convert_ids_to_tokens(generation.eos_token_id)
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
            f"`adapter/` holds the adapter (PEFT format), the tokenizer and `generation_config.json`, whose `eos_token_id` "
            f"is {eos}: generation stops at {stops}, so a chat reply ends at its turn's end."
            + (" `merged/` holds the base model with the adapter merged in (unquantised), loadable without PEFT." if written.get("merged") else ""),
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


def log_export(client: Any, run_id: str, export: Path) -> str:
    """The export folder as artifacts of the trial's MLflow run (its status and times unchanged)."""
    client.log_artifacts(run_id, str(export), "export")
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
    cfg, study, result = sweep.cfg, sweep.study, sweep.result
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
    extra = "  ".join(f"{name} {_cell(value_of(row, name))}" for name in dict.fromkeys(n for n, _, _ in constraints) if name != metric)
    write(f"best trial{' with ' + where if where else ''}: {row['label']}  {metric} {row[metric]:.4f}  {extra}  ({row['summary']})")
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
    run_params = dict(sweep.client.get_run(row["run_id"]).data.params)
    card = model_card(cfg, folder, row, space, run_params, written, command, sweep.meta.get("mlflow_uri", ""), where)
    (export / "README.md").write_text(card)
    if written.get("adapter"):
        (Path(written["adapter"]) / "README.md").write_text(card)  # in place of PEFT's blank template: the folder one uploads
    written["model_card"] = str(export / "README.md")
    (export / "export.json").write_text(json.dumps({"trial": row["label"], "sweep": cfg.name, "sweep_dir": str(folder), "run_id": row["run_id"],
                                                    metric: row[metric], **written}, indent=2))  # fmt: skip
    if log_model:
        written["mlflow_artifacts"] = log_export(sweep.client, row["run_id"], export)
    for kind in ("space", "adapter", "merged", "model_card", "checkpoint", "mlflow_artifacts"):
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
