"""`python -m sweep train`: one configuration trained to completion on the tiny model, recorded as
any sweep's trial (an MLflow parent and one child run, the study, a Tune folder named t000_...),
its adapter in the folder as `best --export` writes one (tests/unit/test_export.py: the loaders stop at the turn's end)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sweep.cli import main
from tests.conftest import MINIMAL, write_space
from tests.e2e.conftest import mlflow_runs, study_trials

pytestmark = pytest.mark.e2e


def test_train_one_configuration(tmp_path: Path, ray_cluster: None, capsys: pytest.CaptureFixture) -> None:
    body = MINIMAL.replace("  lora_r: [4, 8]\n", "  lora_r: [4, 8]\n  learning_rate: {loguniform: [1.0e-4, 1.0e-2]}\n")
    space = write_space(tmp_path, body + f"tracking: {{results_dir: {tmp_path / 'out'}}}\n")
    folder = tmp_path / "out" / "one"

    assert main(["train", str(space), "train.lora_r=8"]) == 2  # learning_rate is still searched
    assert "space.learning_rate: searched" in capsys.readouterr().err and not (tmp_path / "out").exists()

    code = main(["train", str(space), "train.lora_r=8", "train.learning_rate=5.0e-3", "train.max_steps=6", "--sweep-dir", str(folder)])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert f"with its tokenizer, chat template and a generation config that stops at <eos> (1), <end_of_turn> (6)): {folder / 'adapter'}" in out

    meta = json.loads((folder / "sweep.json").read_text())
    assert meta["command"] == "train" and meta["state"] == "finished" and meta["num_trials"] == 1
    assert "space.lora_r=[8]" in meta["overrides"] and "search.num_trials=1" in meta["overrides"]  # what `resume` reloads

    parent, (child,) = mlflow_runs(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}", "t")
    assert child.data.tags["trial"] == "t000" and child.data.tags["trial_status"] == "completed"
    assert child.data.params["lora_r"] == "8" and float(child.data.params["learning_rate"]) == pytest.approx(5e-3)
    assert child.data.tags["last_step"] == "6" and child.data.metrics["eval_loss"] > 0
    (trial,) = study_trials(folder)
    assert trial.state.name == "COMPLETE" and trial.value == pytest.approx(child.data.metrics["eval_loss"])
    assert (folder / "trials" / "t000").is_dir() and trial.user_attrs["ray_trial_id"]  # its checkpoints, under its label

    adapter = folder / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and (adapter / "adapter_model.safetensors").is_file() and (adapter / "tokenizer_config.json").is_file()
    # the format of `best --export`: no pickle, the chat template, a generation config that stops at the turn's end, base/
    assert not (adapter / "adapter_model.bin").exists() and (adapter / "chat_template.jinja").is_file()
    assert config["base_model_name_or_path"] == str((folder / "base").resolve())
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import GenerationConfig

    assert GenerationConfig.from_pretrained(adapter).eos_token_id == [1, 6]  # <eos>, <end_of_turn>
    model = AutoPeftModelForCausalLM.from_pretrained(str(adapter)).eval()
    assert model.generation_config.eos_token_id == [1, 6]  # what AutoPeft generates with: it stops at the turn's end
    trained = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert trained and any(p.abs().sum() > 0 for p in trained)  # B starts at zero: these were trained
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[2, 10, 11, 12]])).logits).all()

    assert main(["resume", str(folder)]) == 2 and "finished already" in capsys.readouterr().err
