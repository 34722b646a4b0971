"""A trained adapter as a folder ready for inference: what `best --export` and `train` both write.

    adapter/   the adapter (PEFT format: adapter_config.json, adapter_model.safetensors), the
               tokenizer with the chat template it was trained with, and generation_config.json,
               whose eos_token_id stops at the end of a chat turn (<end_of_turn>) as well as <eos>
    base/      only when the base model's own files would not stop there or would lack that chat
               template: the base as the adapter loads it (its config, its weights linked from where
               they are, no copy), with the tokenizer and generation config of adapter/

Why base/: the usual loaders take the generation settings from the base model, never from the
adapter's folder. `AutoPeftModelForCausalLM.from_pretrained(adapter)` and
`pipeline("text-generation", model=adapter)` (peft 0.21, transformers 5) load the base named by
adapter_config.json's base_model_name_or_path with its generation_config.json and, for the
pipeline, its tokenizer; a generation_config.json beside the adapter is read only by code that asks
for it (`GenerationConfig.from_pretrained(adapter)`, as the model card does). A base whose
generation config stops at <eos> alone (Gemma 3 pt, the tiny demo model) then runs past the end of
its turn to the length limit. So the adapter names base/ instead, a base that carries the stop
tokens and the template; where the base has both already, adapter/ names the base itself (and
stays shareable on the Hub as it is)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from sweep.config import SweepConfig

END_OF_TURN = "<end_of_turn>"  # Gemma's chat format ends each turn with it, not with <eos>
ADAPTER, BASE = "adapter", "base"
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
LEGACY_WEIGHTS = "adapter_model.bin"  # a lone trial's checkpoint of an earlier version (a pickle): written out as safetensors


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


def base_folder(cfg: SweepConfig) -> Path:
    """The base model's files on this machine: a local folder (the tiny model's, or one given as
    model.id), else the hub snapshot in the cache (fetched if missing, as `run` fetches it)."""
    from trainable.model import resolve_model_path

    path = resolve_model_path(cfg.model.id)
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path, revision=cfg.model.revision, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]))


def base_generation_config(base: Path) -> Any:
    """The base's generation config (its generation_config.json, else the one its model config implies)."""
    from transformers import AutoConfig, GenerationConfig

    try:
        return GenerationConfig.from_pretrained(str(base))
    except OSError:
        return GenerationConfig.from_model_config(AutoConfig.from_pretrained(str(base), trust_remote_code=False))


def generation_config(base_config: Any, tokenizer: Any) -> Any:
    """The base's generation config, stopping at the end of a turn too; bos and pad the tokenizer's."""
    from transformers import GenerationConfig

    generation = GenerationConfig.from_dict(base_config.to_dict())
    generation.eos_token_id = stop_token_ids(tokenizer, base_config.eos_token_id)
    generation.bos_token_id = tokenizer.bos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation._from_model_config = False  # else generate() may rebuild it from the model config, losing <end_of_turn>
    return generation


def _eos_ids(config: Any) -> set[int]:
    eos = config.eos_token_id
    return {int(i) for i in (eos if isinstance(eos, list | tuple) else [eos]) if i is not None}


def write_adapter(cfg: SweepConfig, checkpoint: Path, out: Path) -> dict[str, Any]:
    """out/adapter (and out/base where needed) from a trial's checkpoint; what was written: the
    folders, the stop ids and tokens, the base the adapter names."""
    from trainable.model import load_tokenizer

    checkpoint, adapter = Path(checkpoint), out / ADAPTER
    adapter.mkdir(parents=True, exist_ok=True)
    _copy_weights(checkpoint, adapter)
    tokenizer = load_tokenizer(cfg.model.id, cfg.model.chat_template_from, cfg.model.revision)
    base = base_folder(cfg)
    base_config = base_generation_config(base)
    generation = generation_config(base_config, tokenizer)
    tokenizer.save_pretrained(str(adapter))
    generation.save_pretrained(str(adapter))
    config = json.loads((checkpoint / CONFIG_FILE).read_text())
    written: dict[str, Any] = {"adapter": str(adapter), "eos_token_id": generation.eos_token_id,
                               "eos_tokens": tokenizer.convert_ids_to_tokens(generation.eos_token_id)}  # fmt: skip
    stops_already = set(generation.eos_token_id) <= _eos_ids(base_config)
    if stops_already and not cfg.model.chat_template_from:
        written["base_model"] = config["base_model_name_or_path"]
    else:
        linked = _link_base(base, out / BASE, tokenizer, generation)
        config.update(base_model_name_or_path=str(linked), revision=None)  # base/ is that revision's files already
        written.update(base=str(linked), base_model=str(linked))
    (adapter / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return written


def _copy_weights(checkpoint: Path, adapter: Path) -> None:
    """The checkpoint's adapter weights as adapter_model.safetensors (a legacy pickle converted)."""
    if (checkpoint / WEIGHTS_FILE).is_file():
        shutil.copyfile(checkpoint / WEIGHTS_FILE, adapter / WEIGHTS_FILE)  # not its mode: a checkpoint is private, an export is for sharing
        return
    import torch
    from safetensors.torch import save_file

    state = torch.load(checkpoint / LEGACY_WEIGHTS, map_location="cpu", weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(adapter / WEIGHTS_FILE), metadata={"format": "pt"})


def _link_base(source: Path, target: Path, tokenizer: Any, generation: Any) -> Path:
    """target/: the tokenizer and generation config given, and every other file of the base
    (config, weights) as a link to it: kilobytes, whatever the model's size."""
    target.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(target))
    generation.save_pretrained(str(target))
    for path in sorted(source.iterdir()):
        if path.name.startswith(".") or not path.is_file() or (target / path.name).exists():
            continue
        if path.name == "config.json":  # small, and read by every loader: a copy
            shutil.copy2(path, target / path.name)
        else:
            os.symlink(path.resolve(), target / path.name)
    return target.resolve()


def merge(cfg: SweepConfig, adapter: Path, out: Path, generation: Any = None) -> Path:
    """The base model with the adapter merged in (unquantised, even for QLoRA: merging into 4-bit
    weights would round the adapter away), with the adapter folder's tokenizer and generation config."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from trainable.model import pick_device_and_dtype, resolve_model_path

    _, dtype = pick_device_and_dtype(cfg.train.dtype)
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model.id), dtype=dtype, revision=cfg.model.revision, trust_remote_code=False)
    model = PeftModel.from_pretrained(base, str(adapter))  # the model given: adapter_config's base path is not read
    with torch.no_grad():
        full = model.merge_and_unload()
    full.generation_config = generation or GenerationConfig.from_pretrained(str(adapter))
    full.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(adapter)).save_pretrained(str(out))
    return out
