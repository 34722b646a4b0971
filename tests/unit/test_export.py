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
