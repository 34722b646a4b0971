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
from tests.unit.test_train import ListReporter
from trainable.data import IGNORE, encode, prepare
from trainable.model import check_targets, load_model, load_tokenizer, resolve_embeddings, resolve_optimizer, untrained_rows
from trainable.tiny import ensure_tiny
from trainable.train import TrialSpec, run

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


def _lora_modules(model) -> list[str]:
    return [name for name, _ in model.named_modules() if name.endswith(".lora_A")]


@pytest.mark.parametrize("targets", ["all-linear", ("q_proj", "v_proj"), "attention"])
def test_lora_never_lands_on_the_vision_tower(targets) -> None:
    loaded = load_model("tiny-gemma3-vision", TrainSection(lora_r=4, target_modules=targets))
    base = loaded.model.get_base_model()
    assert type(base).__name__ == "Gemma3ForConditionalGeneration"
    vision_q = [n for n, _ in base.named_modules() if "vision_tower" in n and n.endswith("q_proj")]
    assert vision_q, "the tiny vision model must have a SigLIP tower with q_proj layers"
    modules = _lora_modules(loaded.model)
    assert modules and not [m for m in modules if "vision" in m or "multi_modal" in m]
    assert all(".language_model.layers." in m for m in modules)
    expected = 2 * (7 if targets == "all-linear" else 4 if targets == "attention" else 2)
    assert len(modules) == expected == loaded.info["lora_layers"]


def test_text_only_gemma3_keeps_working() -> None:
    loaded = load_model("tiny-gemma3", TrainSection(lora_r=4))
    assert type(loaded.model.get_base_model()).__name__ == "Gemma3ForCausalLM"
    assert len(_lora_modules(loaded.model)) == 14


def test_explicit_names_are_checked_against_the_language_model_only() -> None:
    assert check_targets("tiny-gemma3-vision", ["all-linear"]) == []
    (problem,) = check_targets("tiny-gemma3-vision", [("q_proj", "fc1")])  # fc1 lives in the SigLIP tower
    assert "no linear layer named fc1 in tiny-gemma3-vision's language model" in problem


def test_a_multimodal_trial_trains(data_dir: tuple[str, list[int]]) -> None:
    train = TrainSection(max_steps=4, eval_every=2, log_every=1, batch=(2, 1), learning_rate=1e-2, lora_r=4)
    reporter = ListReporter()
    last = run(TrialSpec(model_id="tiny-gemma3-vision", revision=None, data_dir=data_dir[0], train=train, max_seq_len=128), reporter)
    assert last["trial_status"] == "completed" and last["eval_loss"] < reporter.reports[0]["eval_loss"] + 1
    assert reporter.reports[0]["derived"]["model_class"] == "Gemma3ForConditionalGeneration"


# ---------------------------------------------------------------------------------------------
# embedding policies


def _train_steps(loaded, steps: int = 3) -> None:
    model = loaded.model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    ids = torch.tensor([[2, SOT, 40, 41, EOT, SOT, 50, 51, 52, EOT]])
    for _ in range(steps):
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("model_id", ["tiny-gemma3", "tiny-gemma3-vision"])
def test_full_trains_one_tied_copy(model_id: str) -> None:
    loaded = load_model(model_id, TrainSection(lora_r=4), embeddings="full", template_ids=[SOT, EOT])
    model = loaded.model
    base = model.get_base_model()
    vocab, hidden = base.get_input_embeddings().weight.shape[0], base.config.get_text_config().hidden_size
    lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    assert loaded.info["trainable_params"] == lora + vocab * hidden  # one copy, not two
    _train_steps(loaded)
    emb = model.get_input_embeddings().modules_to_save["default"].weight
    head = model.get_output_embeddings().modules_to_save["default"].weight
    assert emb.data_ptr() == head.data_ptr()  # still tied after training
    assert loaded.info["embeddings"] == "full" and loaded.info["embedding_rows_trained"] == "all"


@pytest.mark.parametrize("model_id", ["tiny-gemma3", "tiny-gemma3-vision"])
def test_new_tokens_trains_only_template_rows(model_id: str) -> None:
    loaded = load_model(model_id, TrainSection(lora_r=4), embeddings="new_tokens", template_ids=[SOT, EOT])
    model = loaded.model
    hidden = model.get_base_model().config.get_text_config().hidden_size
    lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    assert loaded.info["trainable_params"] == lora + 2 * hidden
    adapter = model.get_input_embeddings().token_adapter
    base_weight = adapter.base_layer.weight.detach().clone()
    _train_steps(loaded)
    with torch.no_grad():
        merged = adapter.get_merged_weights(["default"])
    changed = (merged - base_weight).abs().sum(dim=1).nonzero().flatten().tolist()
    assert changed == [SOT, EOT]  # only the template rows moved
    assert torch.equal(adapter.base_layer.weight, base_weight)  # the 262k-row base is never copied or touched
    head = model.get_output_embeddings()
    assert type(head).__name__ == "TrainableTokensWrapper"  # the tied lm_head sees the same rows
    assert head.token_adapter.tied_adapter is adapter


@pytest.mark.parametrize("model_id", ["tiny-gemma3", "tiny-gemma3-vision"])
def test_copy_free_rows_match_peft(model_id: str) -> None:
    """Our forward for trainable token rows gives PEFT's values and gradients, without the copy."""
    loaded = load_model(model_id, TrainSection(lora_r=4, lora_dropout=0.0), embeddings="new_tokens", template_ids=[SOT, EOT])
    model = loaded.model
    adapter = model.get_input_embeddings().token_adapter
    with torch.no_grad():
        adapter.trainable_tokens_delta["default"].add_(torch.randn_like(adapter.trainable_tokens_delta["default"]))
    ids = torch.tensor([[2, SOT, 40, 41, EOT, SOT, 50, 51, 52, EOT]])

    def loss_and_grad() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model.zero_grad()
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        return out.logits.detach(), out.loss.detach(), adapter.trainable_tokens_delta["default"].grad.clone()

    ours = loss_and_grad()
    layers = [m for m in model.modules() if hasattr(m, "_peft_forward_adapters")]
    assert len(layers) == 2  # the embedding and the tied lm_head
    for m in layers:
        m.forward_adapters = m._peft_forward_adapters
    peft = loss_and_grad()
    for a, b in zip(ours, peft):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_frozen_trains_no_embedding() -> None:
    loaded = load_model("tiny-gemma3", TrainSection(lora_r=4), embeddings="frozen", template_ids=[SOT, EOT])
    trainable = [n for n, p in loaded.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_untrained_rows_are_detected() -> None:
    torch.manual_seed(0)
    weight = torch.randn(1000, 64)
    weight[5] *= 0.01  # never updated and decayed: tiny norm
    weight[6] = weight.mean(dim=0) * 50  # initialised as the mean embedding
    assert untrained_rows(weight, [5, 6, 7]) == [5, 6]
    assert untrained_rows(weight.to(torch.bfloat16), [7, 8]) == []


def test_auto_policy(tmp_path: Path) -> None:
    loaded = load_model("tiny-gemma3", TrainSection(lora_r=4), embeddings="auto", template_ids=[SOT, EOT])
    assert loaded.info["embeddings"] == "frozen" and "look trained" in loaded.info["embeddings_reason"]
    # a base model whose template tokens were never trained: their rows are near zero
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "untrained"
    shutil.copytree(ensure_tiny(), folder)
    weights = load_file(folder / "model.safetensors")
    key = next(k for k in weights if k.endswith("embed_tokens.weight"))
    weights[key][[SOT, EOT]] = 0.0
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    loaded = load_model(str(folder), TrainSection(lora_r=4), embeddings="auto", template_ids=[SOT, EOT])
    assert loaded.info["embeddings"] == "new_tokens"
    assert loaded.info["embeddings_reason"] == "auto: 2 of 2 template tokens look untrained (ids [5, 6])"
    assert resolve_embeddings("new_tokens", loaded.model, []) == ("frozen", "new_tokens requested, but the data uses no special tokens beyond <bos>")


def test_trial_logs_the_policy(data_dir: tuple[str, list[int]]) -> None:
    train = TrainSection(max_steps=2, eval_every=2, log_every=1, batch=(2, 1), lora_r=4)
    reporter = ListReporter()
    spec = TrialSpec(model_id="tiny-gemma3", revision=None, data_dir=data_dir[0], train=train, embeddings="new_tokens", template_ids=tuple(data_dir[1]))
    run(spec, reporter)
    derived = reporter.reports[0]["derived"]
    assert derived["embeddings"] == "new_tokens" and derived["embedding_rows_trained"] == 2 and derived["trainable_params"] > 0


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
    body = MINIMAL.replace("  lora_r: [4, 8]\n", '  gradient_checkpointing: [on, off, auto, "on"]\n')
    with pytest.raises(Exception, match="duplicate choices"):
        load_config(write_space(tmp_path, body))
    body = MINIMAL.replace("  lora_r: [4, 8]\n", "  gradient_checkpointing: [on, auto]\n")
    assert load_config(write_space(tmp_path, body)).space.dims[0].options == (True, "auto")
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
