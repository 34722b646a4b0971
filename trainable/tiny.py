"""An offline, random, tiny Gemma 3 and a Gemma-format tokenizer, for tests and the demo.

`model.id: tiny-gemma3` resolves to a folder built here once (deterministically: same weights and
vocabulary every time) and then loaded through the normal `from_pretrained` path, so LoRA, QLoRA
and the data pipeline are exercised exactly as with a hub checkpoint. Nothing is downloaded.

The tokenizer mirrors Gemma's: SentencePiece-style BPE with `▁` for spaces and byte fallback (any
text tokenizes), the real special tokens (`<pad>`=0, `<eos>`=1, `<bos>`=2, `<unk>`=3, `<mask>`=4,
`<start_of_turn>`, `<end_of_turn>`, image tokens), a post-processor that prepends `<bos>` as
Gemma's does, and Gemma 3's chat template (which writes `<bos>` itself, hence the double-BOS trap).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

TINY_VERSION = "v1"
SPECIAL_TOKENS = [
    "<pad>", "<eos>", "<bos>", "<unk>", "<mask>",
    "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>",
]  # fmt: skip
VOCAB_SIZE = 1024

# Gemma 3's chat template, as published with the -it checkpoints (system prompt folded into the
# first user turn; the assistant role is called "model").
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = \"\" -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}"
    "{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}"
    "{%- set role = \"model\" -%}"
    "{%- else -%}"
    "{%- set role = message['role'] -%}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}"
    "{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}"
    "{{ item['text'] | trim }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}"
    "{{ raise_exception(\"Invalid content type\") }}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{'<start_of_turn>model\n'}}"
    "{%- endif -%}"
)

# The BPE merges are learned from this text: everyday English, so common words become one or two
# tokens; anything else still tokenizes through the byte fallback.
_CORPUS = """
The quick brown fox jumps over the lazy dog. What is the answer? Give me the opposite of this word.
The opposite of hot is cold, the opposite of big is small, and the opposite of fast is slow.
Which colour is the sky? The sky is blue, the grass is green, snow is white and coal is black.
What is the plural of child? The plural of cat is cats, of box is boxes, of mouse is mice.
How many letters are in this word? Count the letters of apple: apple has five letters.
Tell me a story about a river, a stone, a garden, a window and a rabbit in a castle.
Answer in one short sentence. Please explain why. Thank you! Yes, no, maybe; it is true.
user model system assistant question answer summary translate write read code python data
I am you are he she it we they this that these those here there where when why how who which
one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9 10 100 1000
"""


def cache_root() -> Path:
    return Path(os.environ.get("LORA_SWEEP_CACHE", Path.home() / ".cache" / "lora-sweep"))


def build_tokenizer():
    """A Gemma-format fast tokenizer (transformers object), built in memory."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer_model = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_model.normalizer = normalizers.Replace(" ", "▁")
    trainer_model.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    budget = VOCAB_SIZE - len(SPECIAL_TOKENS) - len(byte_tokens)
    trainer = trainers.BpeTrainer(vocab_size=budget, special_tokens=[], show_progress=False)
    lines = [line for line in _CORPUS.splitlines() if line] * 4
    trainer_model.train_from_iterator(lines, trainer)
    learned = trainer_model.get_vocab()
    merges = [tuple(m) for m in __import__("json").loads(trainer_model.to_str())["model"]["merges"]]

    vocab: dict[str, int] = {}
    for token in SPECIAL_TOKENS + byte_tokens + ["\n", "\n\n", "▁"]:
        vocab.setdefault(token, len(vocab))
    for token, _ in sorted(learned.items(), key=lambda kv: kv[1]):
        if len(vocab) >= VOCAB_SIZE:
            break
        vocab.setdefault(token, len(vocab))
    kept = [m for m in merges if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=kept, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(SPECIAL_TOKENS)
    bos = vocab["<bos>"]
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        additional_special_tokens=SPECIAL_TOKENS[5:],
        padding_side="right",
    )
    hf.chat_template = GEMMA3_CHAT_TEMPLATE
    return hf


def text_config(vocab_size: int):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=32,
        max_position_embeddings=4096,
        sliding_window=128,
        layer_types=["sliding_attention", "full_attention"],
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=True,
        # A wider init than Gemma's 0.02: with frozen random tied embeddings, 0.02 caps the logit
        # range so low that no adapter can make the tiny model confident, and every trial looks alike.
        initializer_range=0.1,
    )


def vision_config(tokenizer):
    """Gemma 3 4B+ layout (Gemma3ForConditionalGeneration): the tiny text model plus a tiny SigLIP tower."""
    from transformers import Gemma3Config, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=28, patch_size=14, vision_use_head=False,
    )  # fmt: skip
    return Gemma3Config(
        text_config=text_config(len(tokenizer)).to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=4,
        boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
        initializer_range=0.1,
        tie_word_embeddings=True,
    )


def build(folder: Path, vision: bool = False) -> None:
    """Write a tiny random Gemma 3 (text-only, or with a vision tower) and its tokenizer (deterministic)."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3ForConditionalGeneration

    tokenizer = build_tokenizer()
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        if vision:
            model = Gemma3ForConditionalGeneration(vision_config(tokenizer))
        else:
            model = Gemma3ForCausalLM(text_config(len(tokenizer)))
    finally:
        torch.random.set_rng_state(state)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def ensure_tiny(name: str = "tiny-gemma3", root: Path | None = None) -> Path:
    """The tiny model's folder, built on first use. Safe when several processes race to build it."""
    if name not in ("tiny-gemma3", "tiny-gemma3-vision"):
        raise ValueError(f"unknown tiny model {name!r}")
    folder = (root or cache_root()) / f"{name}-{TINY_VERSION}"
    if (folder / "config.json").exists() and (folder / "tokenizer.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=folder.parent))
    try:
        build(tmp, vision=name.endswith("-vision"))
        try:
            tmp.rename(folder)
        except OSError:  # another process finished first; theirs is identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
