"""Real-size Gemma 3 checkpoints with random weights, for GPU benchmarks.

The published architectures (1B Gemma3ForCausalLM; 4B/12B Gemma3ForConditionalGeneration with the
SigLIP so400m tower) are built in bf16 on the GPU and saved with the tiny Gemma-format tokenizer
(its token ids are valid in the real vocabulary); throughput and memory do not depend on the
weights' values. They then load through the normal path (`from_pretrained`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# The published Gemma 3 text shapes; 4B and 12B are Gemma3ForConditionalGeneration (SigLIP tower).
ARCH = {
    "1b": {"multimodal": False, "hidden_size": 1152, "num_hidden_layers": 26, "num_attention_heads": 4, "num_key_value_heads": 1,
           "head_dim": 256, "vocab_size": 262144, "intermediate_size": 6912, "sliding_window": 512, "method": "lora"},
    "4b": {"multimodal": True, "hidden_size": 2560, "num_hidden_layers": 34, "num_attention_heads": 8, "num_key_value_heads": 4,
           "head_dim": 256, "vocab_size": 262208, "intermediate_size": 10240, "sliding_window": 1024, "method": "lora"},
    "12b": {"multimodal": True, "hidden_size": 3840, "num_hidden_layers": 48, "num_attention_heads": 16, "num_key_value_heads": 8,
            "head_dim": 256, "vocab_size": 262208, "intermediate_size": 15360, "sliding_window": 1024, "method": "qlora"},
}  # fmt: skip


def build_checkpoint(size: str, folder: Path) -> float:
    """Random weights, real architecture, saved like a hub checkpoint. Returns seconds taken."""
    import torch
    from transformers import Gemma3Config, Gemma3ForCausalLM, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    from trainable.tiny import build_tokenizer

    started = time.perf_counter()
    arch = {k: v for k, v in ARCH[size].items() if k not in ("multimodal", "method")}
    text = Gemma3TextConfig(**arch, query_pre_attn_scalar=256, max_position_embeddings=32768, tie_word_embeddings=True)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        if ARCH[size]["multimodal"]:
            vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                                        image_size=896, patch_size=14, vision_use_head=False)  # fmt: skip
            config = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=256)
            model = Gemma3ForConditionalGeneration(config)
        else:
            model = Gemma3ForCausalLM(text)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return time.perf_counter() - started


def prepare_data(folder: Path, cache: Path) -> tuple[str, list[int]]:
    from sweep.config import DataSection
    from trainable.data import prepare
    from trainable.model import load_tokenizer

    demo = ROOT / "search_spaces" / "data" / "demo"
    section = DataSection(train=str(demo / "train.jsonl"), eval=str(demo / "eval.jsonl"), max_seq_len=1024, packing=True)
    prepared = prepare(section, load_tokenizer(str(folder)), cache, seed=0, log=lambda s: None)
    return str(prepared.folder), list(prepared.stats["template_tokens"].values())


def load_frozen_base(model_dir: str, method: str) -> Any:
    """The base as the HF Trainer rows load it (bf16 on CUDA, fp32 on a CPU, sdpa; NF4 with double
    quantisation for qlora), every parameter frozen."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": "sdpa"}
    if method == "qlora":
        kwargs.update(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype),
                      device_map={"": 0 if cuda else "cpu"})  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if method != "qlora" and cuda:
        model.to("cuda")
    for param in model.parameters():
        param.requires_grad_(False)
    return model

