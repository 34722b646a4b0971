"""Load a causal LM (4-bit NF4 for QLoRA) and its tokenizer; its LoRA targets and embedding policy.

Gemma 3 rules from the seed live here:
- the chat template may come from the instruct model while the base model's tokenizer is kept
  (`chat_template_from`);
- LoRA goes on the language model only: Gemma 3 4B+ checkpoints are
  Gemma3ForConditionalGeneration, whose SigLIP vision tower also has q/k/v projections;
- the embedding policy (`model.embeddings`): `full` trains embed_tokens (the seed's
  modules_to_save), `new_tokens` only the rows of the chat template's special tokens, `frozen`
  none; Gemma 3 ties lm_head to embed_tokens, and every policy keeps that tie.
"""

from __future__ import annotations

import re
from typing import Any

from core import rules
from core.estimate import ModelProfile, TextShape, layer_activation_bytes
from core.rules import target_names
from core.schema import TINY_MODELS, TrainSection

# auto: a template token whose embedding row is this much shorter than the median row, or points
# where the mean row points, was never (or hardly) updated in pre-training.
UNTRAINED_NORM_RATIO = 0.1
UNTRAINED_MEAN_COSINE = 0.99


def resolve_model_path(model_id: str) -> str:
    """tiny-gemma3[-vision] -> its locally built folder; anything else goes to from_pretrained as is."""
    if model_id in TINY_MODELS:
        from trainable.tiny import ensure_tiny

        return str(ensure_tiny(model_id))
    return model_id


def load_tokenizer(model_id: str, chat_template_from: str | None = None, revision: str | None = None, local_files_only: bool = False) -> Any:
    """The base model's tokenizer; with `chat_template_from`, the instruct model's chat template.

    The seed's rule for instruction-tuning a -pt model: keep the base tokenizer (its vocabulary and
    special tokens), take only the template from the -it model. `local_files_only`: from local
    folders and the HF cache only, never the hub (where it is known to be unreachable).
    """
    from transformers import AutoTokenizer

    # Never run code shipped with a checkpoint: a space file names models, it must not execute them.
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model_id), revision=revision, trust_remote_code=False, local_files_only=local_files_only)
    if chat_template_from:
        source = AutoTokenizer.from_pretrained(resolve_model_path(chat_template_from), trust_remote_code=False, local_files_only=local_files_only)
        if not source.chat_template:
            raise ValueError(f"model.chat_template_from: {chat_template_from} has no chat template")
        tokenizer.chat_template = source.chat_template
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ----------------------------------------------------------------------------------------------
# where LoRA goes


def decoder_prefix(model: Any) -> str:
    """Module path of the text decoder: 'model' (Gemma3ForCausalLM), 'model.language_model' (4B+)."""
    decoder = model.get_decoder()
    for name, module in model.named_modules():
        if module is decoder:
            return name
    raise ValueError(f"{type(model).__name__}: cannot find its text decoder")


def language_linear_names(model: Any) -> set[str]:
    """Leaf names of the nn.Linear layers inside the text decoder (never a vision tower)."""
    import torch

    prefix = decoder_prefix(model) + "."
    return {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith(prefix)
    }


def lora_target_pattern(model: Any, target_modules: str | tuple[str, ...]) -> str:
    """A PEFT target regex that matches the named projections inside the text decoder only."""
    names = "|".join(re.escape(n) for n in target_names(target_modules))
    return rf"^{re.escape(decoder_prefix(model))}\..*\.({names})$"


def meta_model(model_id: str, revision: str | None = None, local_files_only: bool = False) -> Any:
    """The model built from its config on the meta device: its structure, without weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(resolve_model_path(model_id), revision=revision, trust_remote_code=False, local_files_only=local_files_only)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def profile_model(model: Any) -> Any:
    """A ModelProfile (core.estimate) from a model, typically built on the meta device."""
    import torch

    prefix = decoder_prefix(model) + "."
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    linears: dict[str, list[int]] = {}
    counted: set[int] = set()
    vision_linear = vision_other = other = 0
    for name, module in model.named_modules():
        if module is embed or module is head:
            continue
        params = [p for p in module.parameters(recurse=False) if id(p) not in counted]
        counted.update(id(p) for p in params)
        n = sum(p.numel() for p in params)
        inside = name.startswith(prefix)
        if isinstance(module, torch.nn.Linear) and inside:
            leaf = name.rsplit(".", 1)[-1]
            entry = linears.setdefault(leaf, [module.in_features, module.out_features, 0])
            entry[2] += 1
            other += n - module.in_features * module.out_features  # biases
        elif isinstance(module, torch.nn.Linear):
            vision_linear += n
        elif inside:
            other += n
        else:
            vision_other += n
    tied = head is not None and head.weight is embed.weight
    return ModelProfile(
        text=TextShape.from_config(model.config),
        linears={k: (v[0], v[1], v[2]) for k, v in linears.items()},
        embedding_params=embed.weight.numel(),
        tied=tied,
        other_params=other,
        vision_linear_params=vision_linear,
        vision_other_params=vision_other,
    )


def check_targets(model_id: str, choices: list[str | tuple[str, ...]], revision: str | None = None, local_files_only: bool = False) -> list[str]:
    """Problems with target module choices for this model's language model (empty when all match)."""
    available = language_linear_names(meta_model(model_id, revision, local_files_only))
    problems = []
    for choice in choices:
        missing = [n for n in target_names(choice) if n not in available]
        if missing:
            label = choice if isinstance(choice, str) else "[" + ", ".join(choice) + "]"
            problems.append(
                f"target_modules {label}: no linear layer named {', '.join(missing)} in {model_id}'s language model; "
                f"its linear layers are: {', '.join(sorted(available))}"
            )
    return problems


# ----------------------------------------------------------------------------------------------
# embeddings


def untrained_rows(weight: Any, ids: list[int]) -> list[int]:
    """Which of `ids` have embedding rows that look untrained.

    A row counts as untrained when its norm is under UNTRAINED_NORM_RATIO x the median row norm
    (never updated, or decayed towards zero), or when it points where the mean of all rows points
    (cosine > UNTRAINED_MEAN_COSINE: the usual initialisation of added tokens). Computed in chunks
    so a 262k-row matrix never needs an fp32 copy.
    """
    import torch

    if not ids:
        return []
    norms, total = [], torch.zeros(weight.shape[1], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], 16384):
        chunk = weight[start : start + 16384].float()
        norms.append(chunk.norm(dim=1))
        total += chunk.sum(dim=0)
    norms_all = torch.cat(norms)
    median = norms_all.median()
    mean_row = total / weight.shape[0]
    rows = weight[ids].float()
    short = norms_all[ids] < UNTRAINED_NORM_RATIO * median
    like_mean = torch.nn.functional.cosine_similarity(rows, mean_row[None], dim=1) > UNTRAINED_MEAN_COSINE
    if float(mean_row.norm()) < 1e-6 * float(median):  # a zero-mean matrix says nothing by direction
        like_mean = torch.zeros_like(short)
    return [i for i, flag in zip(ids, (short | like_mean).tolist()) if flag]


def resolve_embeddings(policy: str, model: Any, template_ids: list[int]) -> tuple[str, str]:
    """(policy actually used, why) for `model.embeddings`."""
    if policy == "new_tokens" and not template_ids:
        return "frozen", "new_tokens requested, but the data uses no special tokens beyond <bos>"
    if policy != "auto":
        return policy, "as configured"
    untrained = untrained_rows(model.get_input_embeddings().weight, template_ids)
    if untrained:
        return "new_tokens", f"auto: {len(untrained)} of {len(template_ids)} template tokens look untrained (ids {untrained})"
    if not template_ids:
        return "frozen", "auto: the data uses no special tokens beyond <bos>"
    return "frozen", f"auto: all {len(template_ids)} template tokens look trained"


def _leaf_name(model: Any, target: Any) -> str:
    return next(name.rsplit(".", 1)[-1] for name, module in model.named_modules() if module is target)


def embedding_config(model: Any, policy: str, template_ids: list[int]) -> dict[str, Any]:
    """LoraConfig keywords for an embedding policy, keeping Gemma 3's lm_head <-> embed_tokens tie."""
    if policy == "frozen":
        return {}
    embed = _leaf_name(model, model.get_input_embeddings())
    head = _leaf_name(model, model.get_output_embeddings())
    tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False) or getattr(model.config, "tie_word_embeddings", False))
    if policy == "full":
        # Tied: one trainable copy serves both (the seed's two modules_to_save would untie them and
        # hold two copies of the 262k-row matrix).
        return {"modules_to_save": [embed, head], "ensure_weight_tying": tied}
    # new_tokens: only these rows get a trainable delta; PEFT ties it into a tied lm_head by itself
    # (same indices); an untied lm_head gets its own delta for the same rows.
    indices = {embed: list(template_ids)}
    if not tied:
        indices[head] = list(template_ids)
    return {"trainable_token_indices": indices}


# ----------------------------------------------------------------------------------------------
# loading


def _set_checkpointing(model: Any, on: bool) -> None:
    """Newer transformers 5.x renamed the methods (and keyword); older 5.x only has the old ones."""
    if on:
        # Non-reentrant checkpointing needs no input grads and works with frozen embeddings.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def pick_device_and_dtype(requested: str) -> tuple[Any, Any]:
    """CUDA when the trial was given a GPU; bf16 where the GPU supports it, else fp32 (CPU: fp32)."""
    import torch

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if requested != "auto":
        return device, getattr(torch, requested)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return device, torch.bfloat16
    return device, torch.float32


def resolve_checkpointing(train: TrainSection, config: Any, tokens: int, device: Any) -> bool:
    """on / off as configured; auto: on when the decoder's activations would take over a quarter of
    the GPU (never on a CPU, where memory is not the constraint)."""
    if train.gradient_checkpointing != "auto" or device.type != "cuda":
        return rules.gradient_checkpointing(train.gradient_checkpointing, 0, None)
    import torch

    activations = layer_activation_bytes(TextShape.from_config(config), tokens)
    return rules.gradient_checkpointing("auto", activations, torch.cuda.get_device_properties(device).total_memory)


def resolve_optimizer(train: TrainSection) -> str:
    """The optimizer this trial uses (core.rules decides `auto`)."""
    return rules.optimizer(train.optimizer, train.method)


def _load_base(model_id: str, train: TrainSection, revision: str | None, device: Any, dtype: Any) -> Any:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": train.attn_implementation, "revision": revision, "trust_remote_code": False}
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
    return model
