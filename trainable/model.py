"""Load a causal LM and its tokenizer, quantize it for QLoRA, and wrap it with a LoRA adapter.

Gemma 3 rules from the seed live here: the chat template may come from the instruct model while
the base model's tokenizer is kept (`chat_template_from`); LoRA targets are named presets of the
projection layers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sweep.config import TINY_MODEL, TrainSection

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
PRESETS: dict[str, tuple[str, ...]] = {"attention": ATTENTION, "mlp": MLP, "all-linear": ATTENTION + MLP}


def resolve_model_path(model_id: str) -> str:
    """tiny-gemma3 -> its locally built folder; anything else is passed to from_pretrained as is."""
    if model_id == TINY_MODEL:
        from trainable.tiny import ensure_tiny

        return str(ensure_tiny())
    return model_id


def target_names(target_modules: str | tuple[str, ...]) -> tuple[str, ...]:
    return PRESETS[target_modules] if isinstance(target_modules, str) else tuple(target_modules)


def load_tokenizer(model_id: str, chat_template_from: str | None = None, revision: str | None = None) -> Any:
    """The base model's tokenizer; with `chat_template_from`, the instruct model's chat template.

    The seed's rule for instruction-tuning a -pt model: keep the base tokenizer (its vocabulary and
    special tokens), take only the template from the -it model.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model_id), revision=revision)
    if chat_template_from:
        source = AutoTokenizer.from_pretrained(resolve_model_path(chat_template_from))
        if not source.chat_template:
            raise ValueError(f"model.chat_template_from: {chat_template_from} has no chat template")
        tokenizer.chat_template = source.chat_template
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def linear_module_names(model_id: str, revision: str | None = None) -> set[str]:
    """Leaf names of the model's nn.Linear layers, from its config alone (meta device, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(resolve_model_path(model_id), revision=revision)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def check_targets(model_id: str, choices: list[str | tuple[str, ...]], revision: str | None = None) -> list[str]:
    """Problems with target module choices for this model (empty when all match)."""
    available = linear_module_names(model_id, revision) - {"lm_head"}
    problems = []
    for choice in choices:
        missing = [n for n in target_names(choice) if n not in available]
        if missing:
            label = choice if isinstance(choice, str) else "[" + ", ".join(choice) + "]"
            problems.append(
                f"target_modules {label}: no linear layer named {', '.join(missing)} in {model_id}; "
                f"its linear layers are: {', '.join(sorted(available))}"
            )
    return problems


@dataclass
class LoadedModel:
    model: Any  # a peft.PeftModel
    device: Any  # torch.device
    dtype: Any  # compute dtype
    info: dict[str, Any]  # derived params for MLflow: trainable_params, quantization, ...


def pick_device_and_dtype(requested: str) -> tuple[Any, Any]:
    """CUDA when the trial was given a GPU; bf16 where the GPU supports it, else fp32 (CPU: fp32)."""
    import torch

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if requested != "auto":
        return device, getattr(torch, requested)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return device, torch.bfloat16
    return device, torch.float32


def load_model(model_id: str, train: TrainSection, revision: str | None = None) -> LoadedModel:
    """The base model (4-bit NF4 for QLoRA) with a fresh LoRA adapter built from `train`'s values."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device, dtype = pick_device_and_dtype(train.dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": train.attn_implementation, "revision": revision}
    if train.method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(model_id), **kwargs)
    if train.method != "qlora":
        model.to(device)
    model.config.use_cache = False
    for param in model.parameters():
        param.requires_grad_(False)
    if train.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input grads and works with frozen embeddings.
        # Newer transformers 5.x renamed the method (and its keyword); older 5.x only has the old one.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    lora = LoraConfig(
        r=train.lora_r,
        lora_alpha=train.lora_alpha,
        lora_dropout=train.lora_dropout,
        target_modules=list(target_names(train.target_modules)),
        bias="none",
        task_type="CAUSAL_LM",
    )
    # The adapter's initial weights depend only on the seed, never on what ran before.
    torch.manual_seed(train.seed)
    model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    info = {
        "trainable_params": trainable,
        "total_params": total,
        "quantization": "nf4-double-quant" if train.method == "qlora" else "none",
        "compute_dtype": str(dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "lora_targets": ",".join(target_names(train.target_modules)),
        "model_class": type(model.get_base_model()).__name__,
    }
    return LoadedModel(model=model, device=device, dtype=dtype, info=info)


def adapter_state(model: Any) -> dict[str, Any]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def load_adapter_state(model: Any, state: dict[str, Any]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if re.search(r"lora_", k)]
    if unexpected:
        raise RuntimeError(f"checkpoint holds adapter weights this model lacks: {unexpected[:5]}")
