"""What `best --export` writes beside the adapter (sweep.readback.export): the stop tokens of the generation
config, the load code of a QLoRA winner vs a LoRA winner, and the model card. No model is loaded
(tests/e2e/test_reporting.py exports a real trial and runs the card's code)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from sweep.config import SEARCHABLE, load_config
from sweep.readback.export import END_OF_TURN, load_snippet, model_card, stop_token_ids, winner_space
from tests.conftest import DEMO_DATA, MINIMAL, write_space

QLORA = MINIMAL.replace("model: {id: tiny-gemma3}", "model: {id: google/gemma-3-12b-pt, revision: abc123, chat_template_from: google/gemma-3-12b-it}").replace(
    "  lora_r: [4, 8]\n", "  lora_r: [4, 8]\n  method: [lora, qlora]\n"
)


def test_generation_stops_at_the_end_of_a_turn_as_well_as_eos() -> None:
    from trainable.tiny import build_tokenizer

    gemma = build_tokenizer()
    end = gemma.convert_tokens_to_ids(END_OF_TURN)
    assert stop_token_ids(gemma) == [gemma.eos_token_id, end]
    assert stop_token_ids(gemma, also=[end, 99]) == [end, 99, gemma.eos_token_id]  # the base's own stop ids kept, none twice
    other = SimpleNamespace(eos_token_id=2, get_vocab=lambda: {"</s>": 2})  # a tokenizer without Gemma's turn token
    assert stop_token_ids(other, also=2) == [2]


def test_a_qlora_winner_loads_on_a_4bit_nf4_base_a_lora_winner_on_bf16(tmp_path: Path) -> None:
    cfg = load_config(write_space(tmp_path, QLORA))
    qlora = load_snippet(cfg, {"method": "qlora"}, "/out/adapter")
    assert 'BitsAndBytesConfig(\n    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16,' in qlora
    assert 'AutoModelForCausalLM.from_pretrained("google/gemma-3-12b-pt", revision="abc123", quantization_config=quantization, device_map="auto")' in qlora
    assert 'PeftModel.from_pretrained(base, ADAPTER)' in qlora and 'ADAPTER = "/out/adapter"' in qlora
    lora = load_snippet(cfg, {"method": "lora"}, "/out/adapter")
    assert "BitsAndBytesConfig" not in lora and 'revision="abc123", dtype=torch.bfloat16' in lora
    for code in (qlora, lora):
        compile(code, "card", "exec")  # valid Python
        assert "GenerationConfig.from_pretrained(ADAPTER" in code and "generation_config=generation" in code


def test_the_model_card_names_the_trial_and_every_hyperparameter(tmp_path: Path) -> None:
    cfg = load_config(write_space(tmp_path, QLORA))
    config = {"lora_r": 8, "method": "qlora"}
    row = {"label": "t007", "number": 7, "run_id": "abc0123", "config": config, "summary": "qlora r8", "step": 4, "eval_loss": 1.23456, "train_loss": 1.5,
           "peak_vram_gb": 9.5, "status": "completed"}  # fmt: skip
    space = winner_space(cfg, row)
    written = {"adapter": "/out/adapter", "eos_token_id": [1, 106], "eos_tokens": ["<eos>", "<end_of_turn>"]}
    card = model_card(cfg, tmp_path / "sweeps" / "t-1", row, space, {"trainable_params": "1234", "lora_r": "8"}, written,
                      "python -m sweep train /out/space.yaml train.max_steps=20", "postgresql://u:secret@db/mlflow", "peak_vram_gb<=20")  # fmt: skip
    assert card.startswith("---\nbase_model: google/gemma-3-12b-pt\nlibrary_name: peft\ntags:\n- lora\n- peft\n- lora-sweep\n- qlora\n---\n")
    for text in ("# t, trial t007: a QLoRA adapter for google/gemma-3-12b-pt", f"Trial **t007** of the sweep **t** (folder `{tmp_path / 'sweeps' / 't-1'}`)",
                 "the best by eval_loss with peak_vram_gb<=20: eval_loss **1.2346** at step 4", "MLflow run: `abc0123`", "postgresql://u:***@db/mlflow",
                 "| revision | abc123 |", "| chat template | from google/gemma-3-12b-it |", "| method | QLoRA (4-bit NF4 base",
                 f"| train | {DEMO_DATA / 'train.jsonl'} |", "| lora_r *searched* | 8 |", "| method *searched* | qlora |", "| batch | [4, 8] |",
                 "| trainable_params | 1234 |", "| peak_vram_gb | 9.5 |", "eos_token_id` is [1, 106]: generation stops at <eos> (1), <end_of_turn> (106)",
                 "BitsAndBytesConfig", "python -m sweep train /out/space.yaml train.max_steps=20"):  # fmt: skip
        assert text in card, text
    assert "secret" not in card
    for name in SEARCHABLE:
        assert f"| {name} " in card, name
    only_config = model_card(cfg, tmp_path, row, space, {}, {}, "python -m sweep run x", "sqlite:///m.db", None)
    assert "t007 left no checkpoint: only its configuration (`space.yaml`) is exported" in only_config


def test_log_model_needs_export(tmp_path: Path) -> None:
    from sweep.readback.export import best

    with pytest.raises(ValueError, match="--log-model: it logs the exported folder; give --export DIR too"):
        best(tmp_path, None, None, False, log_model=True)


# ----------------------------------------------------------------------------------------------
# the adapter folder (sweep.readback.adapter): `best --export` and `train` write the same one, and
# it stops at the end of a turn in the usual loaders, not only in the model card's code


def tiny_checkpoint(folder: Path) -> Path:
    """A trial checkpoint as the cohort writes one (adapter_config.json naming the tiny base's
    folder, adapter_model.safetensors), its lora_B non-zero as after training."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trainable.model import resolve_model_path

    base = resolve_model_path("tiny-gemma3")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.save_pretrained(str(folder))
    return folder


class EndTurnAt:
    """A logits processor that makes the model write <end_of_turn> as its `at`-th new token."""

    def __init__(self, prompt_length: int, end: int, at: int = 3):
        self.prompt_length, self.end, self.at = prompt_length, end, at

    def __call__(self, input_ids, scores):  # type: ignore[no-untyped-def]
        import torch

        if input_ids.shape[1] - self.prompt_length == self.at - 1:
            scores = torch.full_like(scores, -float("inf"))
            scores[:, self.end] = 0.0
        return scores


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    from sweep.readback.adapter import write_adapter

    base = tmp_path_factory.mktemp("adapter")
    cfg = load_config(write_space(base, MINIMAL))
    written = write_adapter(cfg, tiny_checkpoint(base / "checkpoint"), base / "out")
    return base / "out", written


def test_the_adapter_folder_is_safetensors_with_tokenizer_template_and_generation_config(adapter_dir: tuple[Path, dict]) -> None:
    import json

    from transformers import AutoTokenizer, GenerationConfig

    out, written = adapter_dir
    adapter = out / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "adapter_model.bin").exists()  # no pickle
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    assert "<start_of_turn>" in tokenizer.chat_template and GenerationConfig.from_pretrained(adapter).eos_token_id == [tokenizer.eos_token_id, end]
    # the tiny base stops at <eos> alone: the adapter names base/, the base with the stop tokens, its weights linked
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == written["base"] == str((out / "base").resolve())
    assert (out / "base" / "model.safetensors").is_symlink() and GenerationConfig.from_pretrained(out / "base").eos_token_id == [tokenizer.eos_token_id, end]


def test_the_usual_loaders_stop_at_the_end_of_a_turn(adapter_dir: tuple[Path, dict]) -> None:
    """AutoPeftModelForCausalLM, pipeline and the model card's code each end the reply at the
    <end_of_turn> the model writes (here forced as its third token), not at max_new_tokens."""
    import torch
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessorList, pipeline

    from trainable.model import resolve_model_path

    out, _ = adapter_dir
    adapter = str(out / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    messages = [{"role": "user", "content": "Hello!"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    length = inputs["input_ids"].shape[1]
    force = LogitsProcessorList([EndTurnAt(length, end)])

    model = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()
    with torch.no_grad():
        new = model.generate(**inputs, max_new_tokens=30, do_sample=False, logits_processor=force)[0, length:].tolist()
    assert new[-1] == end and len(new) == 3, new

    pipe = pipeline("text-generation", model=adapter)
    assert pipe.tokenizer.chat_template == tokenizer.chat_template  # the pipeline's tokenizer renders the trained chat format
    reply = pipe(messages, max_new_tokens=30, do_sample=False, logits_processor=force, return_full_text=False)[0]["generated_text"]
    assert len(pipe.tokenizer(reply, add_special_tokens=False)["input_ids"]) <= 3, reply

    card = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-gemma3")), adapter).eval()  # the card's way
    with torch.no_grad():
        new = card.generate(**inputs, generation_config=GenerationConfig.from_pretrained(adapter, max_new_tokens=30, do_sample=False), logits_processor=force)
    assert new[0, length:].tolist()[-1] == end and new.shape[1] - length == 3


def test_a_base_that_stops_at_the_turn_already_is_named_as_it_is(tmp_path: Path) -> None:
    """No base/ where the base's own generation config has the stop tokens (and the chat template
    is its own): the adapter names the base itself, shareable as it is."""
    import json
    import shutil

    from transformers import GenerationConfig

    from sweep.readback.adapter import write_adapter
    from trainable.model import resolve_model_path

    base = tmp_path / "gemma-it"
    shutil.copytree(resolve_model_path("tiny-gemma3"), base)
    from trainable.tiny import build_tokenizer

    gemma = build_tokenizer()
    GenerationConfig(bos_token_id=2, eos_token_id=[gemma.eos_token_id, gemma.convert_tokens_to_ids(END_OF_TURN)], pad_token_id=0).save_pretrained(base)
    cfg = load_config(write_space(tmp_path, MINIMAL.replace("model: {id: tiny-gemma3}", f"model: {{id: {base}}}")))
    written = write_adapter(cfg, tiny_checkpoint(tmp_path / "checkpoint"), tmp_path / "out")
    assert "base" not in written and not (tmp_path / "out" / "base").exists()
    assert json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == written["base_model"]
