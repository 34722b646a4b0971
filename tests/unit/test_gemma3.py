"""Gemma 3 rules from the fine-tuning recipe the defaults follow: template from the -it model,
exactly one BOS, embedding policies that keep the lm_head tie, LoRA on the language model only
(never the SigLIP tower), optimizers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from sweep.config import DataSection, TrainSection, load_config
from sweep.readback.estimate import TextShape, layer_activation_bytes, wants_checkpointing
from tests.conftest import DEMO_DATA, MINIMAL, write_space
from trainable.cohort import Cohort
from trainable.data import IGNORE, encode, prepare
from trainable.model import check_targets, load_tokenizer, resolve_embeddings, resolve_optimizer, untrained_rows
from trainable.tiny import ensure_tiny

CHAT = [{"role": "user", "content": "Opposite of hot?"}, {"role": "assistant", "content": "The opposite of hot is cold."}]
SOT, EOT = 5, 6  # <start_of_turn>, <end_of_turn> in the tiny vocabulary


@pytest.fixture(scope="module")
def pt_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A '-pt' style checkpoint: the tiny model with no chat template of its own."""
    folder = tmp_path_factory.mktemp("tiny-pt") / "model"
    shutil.copytree(ensure_tiny(), folder)
    tok = load_tokenizer(str(folder))
    tok.chat_template = None
    tok.save_pretrained(folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[int]]:
    section = DataSection(train=str(DEMO_DATA / "train.jsonl"), eval=str(DEMO_DATA / "eval.jsonl"), max_seq_len=128)
    prepared = prepare(section, load_tokenizer("tiny-gemma3"), tmp_path_factory.mktemp("data"), seed=0, log=lambda s: None)
    return str(prepared.folder), list(prepared.stats["template_tokens"].values())


def test_chat_template_from_keeps_the_base_tokenizer(pt_folder: Path) -> None:
    base = load_tokenizer(str(pt_folder))
    assert not base.chat_template
    tok = load_tokenizer(str(pt_folder), chat_template_from="tiny-gemma3")
    assert tok.chat_template == load_tokenizer("tiny-gemma3").chat_template
    assert tok.get_vocab() == base.get_vocab() and tok.bos_token_id == base.bos_token_id
    ids, labels, _ = encode(tok, CHAT, 256)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE]) == "The opposite of hot is cold.<end_of_turn>"
    with pytest.raises(ValueError, match="has no chat template"):
        load_tokenizer("tiny-gemma3", chat_template_from=str(pt_folder))


def test_template_tokens_are_found_in_the_data(data_dir: tuple[str, list[int]]) -> None:
    assert data_dir[1] == [SOT, EOT]


@pytest.mark.parametrize("targets", ["all-linear", ("q_proj", "v_proj"), "attention"])
def test_lora_never_lands_on_the_vision_tower(targets, data_dir: tuple[str, list[int]]) -> None:
    c = Cohort("tiny-gemma3-vision", data_dir[0], TrainSection(), max_seq_len=128)
    assert type(c.model).__name__ == "Gemma3ForConditionalGeneration"
    vision_q = [n for n, _ in c.model.named_modules() if "vision_tower" in n and n.endswith("q_proj")]
    assert vision_q, "the tiny vision model must have a SigLIP tower with q_proj layers"
    modules = list(c.members[c.add(TrainSection(lora_r=4, target_modules=targets))].layers)
    assert modules and not [m for m in modules if "vision" in m or "multi_modal" in m]
    assert all(".language_model.layers." in m for m in modules)
    assert len(modules) == 2 * (7 if targets == "all-linear" else 4 if targets == "attention" else 2)


def test_text_only_gemma3_keeps_working(data_dir: tuple[str, list[int]]) -> None:
    c = Cohort("tiny-gemma3", data_dir[0], TrainSection(), max_seq_len=128)
    assert type(c.model).__name__ == "Gemma3ForCausalLM"
    assert len(c.members[c.add(TrainSection(lora_r=4))].layers) == 14


def test_explicit_names_are_checked_against_the_language_model_only() -> None:
    assert check_targets("tiny-gemma3-vision", ["all-linear"]) == []
    (problem,) = check_targets("tiny-gemma3-vision", [("q_proj", "fc1")])  # fc1 lives in the SigLIP tower
    assert "no linear layer named fc1 in tiny-gemma3-vision's language model" in problem


def test_a_multimodal_trial_trains(data_dir: tuple[str, list[int]]) -> None:
    """Gemma3ForConditionalGeneration (a SigLIP tower beside the language model): a trial trains its
    language model's projections only, and learns."""
    train = TrainSection(max_steps=4, eval_every=2, log_every=1, batch=(2, 1), learning_rate=1e-2, lora_r=4)
    c = Cohort("tiny-gemma3-vision", data_dir[0], TrainSection(), max_seq_len=128)
    assert type(c.model).__name__ == "Gemma3ForConditionalGeneration"
    slot = c.add(train)
    before = c.evaluate([slot])[slot]
    while c.running():
        c.step()
    assert c.evaluate([slot])[slot] < before
    assert all(".language_model." in name for name in c.members[slot].layers)  # none in the vision tower


# ---------------------------------------------------------------------------------------------
# embedding policies


def _train_steps(c: Cohort, steps: int = 3) -> None:
    while c.running() and min(m.step for m in c.members.values()) < steps:
        c.step()


@pytest.mark.parametrize("model_id", ["tiny-gemma3", "tiny-gemma3-vision"])
def test_full_trains_one_tied_copy(model_id: str, data_dir: tuple[str, list[int]]) -> None:
    c = Cohort(model_id, data_dir[0], TrainSection(), max_seq_len=128, embeddings="full")
    slot = c.add(TrainSection(lora_r=4, learning_rate=5e-2, batch=(2, 1)))
    member = c.members[slot]
    vocab, hidden = c.model.get_input_embeddings().weight.shape
    lora = sum(p.numel() for lora in member.layers.values() for p in (lora.lora_A, lora.lora_B))
    assert sum(p.numel() for p in member.params) == lora + vocab * hidden  # one copy, not two
    _train_steps(c)
    assert list(member.embedding) == ["embed"] and c.embeddings == "full"  # one trained copy serves lm_head through the tie


@pytest.mark.parametrize("model_id", ["tiny-gemma3", "tiny-gemma3-vision"])
def test_new_tokens_trains_only_template_rows(model_id: str, data_dir: tuple[str, list[int]]) -> None:
    c = Cohort(model_id, data_dir[0], TrainSection(), max_seq_len=128, embeddings="new_tokens", template_ids=(SOT, EOT))
    slot = c.add(TrainSection(lora_r=4, learning_rate=5e-2, batch=(2, 1)))
    member = c.members[slot]
    hidden = c.model.config.get_text_config().hidden_size
    lora = sum(p.numel() for lora in member.layers.values() for p in (lora.lora_A, lora.lora_B))
    assert sum(p.numel() for p in member.params) == lora + 2 * hidden
    base_weight = c.model.get_input_embeddings().weight.detach().clone()
    rows = member.token_rows["embed"].detach().clone()
    _train_steps(c)
    assert not torch.equal(member.token_rows["embed"], rows)  # its two rows moved ...
    assert torch.equal(c.model.get_input_embeddings().weight, base_weight)  # ... the 262k-row base is never copied or touched


def test_frozen_trains_no_embedding(data_dir: tuple[str, list[int]]) -> None:
    c = Cohort("tiny-gemma3", data_dir[0], TrainSection(), max_seq_len=128, embeddings="frozen", template_ids=(SOT, EOT))
    member = c.members[c.add(TrainSection(lora_r=4))]
    assert member.token_rows == {} and member.params == [p for lora in member.layers.values() for p in (lora.lora_A, lora.lora_B)]


def test_untrained_rows_are_detected() -> None:
    torch.manual_seed(0)
    weight = torch.randn(1000, 64)
    weight[5] *= 0.01  # never updated and decayed: tiny norm
    weight[6] = weight.mean(dim=0) * 50  # initialised as the mean embedding
    assert untrained_rows(weight, [5, 6, 7]) == [5, 6]
    assert untrained_rows(weight.to(torch.bfloat16), [7, 8]) == []


def test_auto_policy(tmp_path: Path, data_dir: tuple[str, list[int]]) -> None:
    c = Cohort("tiny-gemma3", data_dir[0], TrainSection(), max_seq_len=128, embeddings="auto", template_ids=(SOT, EOT))
    assert c.embeddings == "frozen" and "look trained" in c.embeddings_reason
    # a base model whose template tokens were never trained: their rows are near zero
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "untrained"
    shutil.copytree(ensure_tiny(), folder)
    weights = load_file(folder / "model.safetensors")
    key = next(k for k in weights if k.endswith("embed_tokens.weight"))
    weights[key][[SOT, EOT]] = 0.0
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    c = Cohort(str(folder), data_dir[0], TrainSection(), max_seq_len=128, embeddings="auto", template_ids=(SOT, EOT))
    assert c.embeddings == "new_tokens"
    assert c.embeddings_reason == "auto: 2 of 2 template tokens look untrained (ids [5, 6])"
    assert resolve_embeddings("new_tokens", c.model, []) == ("frozen", "new_tokens requested, but the data uses no special tokens beyond <bos>")


# ---------------------------------------------------------------------------------------------
# optimizers and memory switches


def test_optimizer_auto_follows_the_method() -> None:
    assert resolve_optimizer(TrainSection(method="qlora")) == "paged_adamw_8bit"
    assert resolve_optimizer(TrainSection(method="lora")) == "adamw"
    assert resolve_optimizer(TrainSection(method="qlora", optimizer="adamw_8bit")) == "adamw_8bit"


def test_switches_are_fixed_or_searchable(tmp_path: Path) -> None:
    body = MINIMAL.replace("train: {max_steps: 4", "train: {gradient_checkpointing: off, max_steps: 4").replace(
        "  lora_r: [4, 8]\n", "  optimizer: [adamw, adamw_8bit, paged_adamw_8bit]\n"
    )
    cfg = load_config(write_space(tmp_path, body))
    assert cfg.train.gradient_checkpointing is False and cfg.space.dims[0].options == ("adamw", "adamw_8bit", "paged_adamw_8bit")
    body = MINIMAL.replace("  lora_r: [4, 8]\n", '  optimizer: [adamw, adamw_8bit, "adamw"]\n')
    with pytest.raises(Exception, match="duplicate choices"):
        load_config(write_space(tmp_path, body))
    # a worker decides checkpointing for all the trials it trains together: searching it is refused
    body = MINIMAL.replace("  lora_r: [4, 8]\n", "  gradient_checkpointing: [on, auto]\n")
    with pytest.raises(Exception, match=r"space.gradient_checkpointing: not searchable: train.gradient_checkpointing is decided once per worker"):
        load_config(write_space(tmp_path, body))
    body = MINIMAL.replace("model: {id: tiny-gemma3}", "model: {id: tiny-gemma3, embeddings: some}")
    with pytest.raises(Exception, match="model.embeddings: Input should be 'auto', 'full', 'new_tokens' or 'frozen'"):
        load_config(write_space(tmp_path, body))


def test_checkpointing_auto_rule() -> None:
    gemma_1b = TextShape(hidden=1152, intermediate=6912, layers=26, heads=4, kv_heads=1, head_dim=256, vocab=262144)
    gemma_12b = TextShape(hidden=3840, intermediate=15360, layers=48, heads=16, kv_heads=8, head_dim=256, vocab=262208)
    assert 1.5e9 < layer_activation_bytes(gemma_1b, 1024) < 2.5e9
    h200, a100_40 = 141 * 2**30, 40 * 2**30
    assert not wants_checkpointing(gemma_1b, 1024, a100_40)
    assert wants_checkpointing(gemma_1b, 8 * 1024, a100_40)
    assert not wants_checkpointing(gemma_12b, 1024, h200) and wants_checkpointing(gemma_12b, 8 * 1024, h200)
