"""Data: rows -> chat-templated, loss-masked, BOS-exact, packed, cached."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from sweep.config import DataSection
from trainable import data
from trainable.data import IGNORE, DataError, encode, pack, prepare, read_rows, to_messages
from trainable.tiny import build_tokenizer

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the opposite of hot?"},
    {"role": "assistant", "content": "The opposite of hot is cold."},
    {"role": "user", "content": "And of big?"},
    {"role": "assistant", "content": "Small."},
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def replies(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    """Decode each run of loss-carrying tokens."""
    runs, current = [], []
    for i, label in zip(ids, labels):
        if label != IGNORE:
            assert label == i
            current.append(i)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_exactly_one_bos_when_template_writes_it_and_tokenizer_adds_it(tokenizer) -> None:
    assert tokenizer.chat_template.startswith("{{ bos_token }}")
    assert tokenizer("x").input_ids[0] == tokenizer.bos_token_id  # the tokenizer adds one too
    ids, labels, _ = encode(tokenizer, CHAT, 512)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert labels[0] == IGNORE


def test_exactly_one_bos_when_template_does_not_write_it(tokenizer) -> None:
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = tok.chat_template.replace("{{ bos_token }}", "")
    assert not tok.apply_chat_template(CHAT, tokenize=False).startswith("<bos>")
    ids, _, _ = encode(tok, CHAT, 512)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids == encode(tokenizer, CHAT, 512)[0]


def test_loss_only_on_replies_including_end_of_turn(tokenizer) -> None:
    ids, labels, truncated = encode(tokenizer, CHAT, 512)
    assert not truncated
    assert replies(tokenizer, ids, labels) == ["The opposite of hot is cold.<end_of_turn>", "Small.<end_of_turn>"]
    eot = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    eot_positions = [k for k, i in enumerate(ids) if i == eot]
    assert len(eot_positions) == 4  # two user turns + two replies
    carrying = [k for k in eot_positions if labels[k] != IGNORE]
    assert len(carrying) == 2  # only the replies' end-of-turn teaches the model to stop
    text_without_loss = tokenizer.decode([i for i, label in zip(ids, labels) if label == IGNORE])
    assert "<start_of_turn>model\n" in text_without_loss  # the generation prompt carries no loss
    assert "What is the opposite of hot?" in text_without_loss


def test_prompt_completion_rows_render_as_one_exchange(tokenizer) -> None:
    messages = to_messages({"prompt": "Plural of cat?", "completion": "Cats."})
    assert messages == [{"role": "user", "content": "Plural of cat?"}, {"role": "assistant", "content": "Cats."}]
    ids, labels, _ = encode(tokenizer, messages, 512)
    assert replies(tokenizer, ids, labels) == ["Cats.<end_of_turn>"]


def test_without_a_chat_template_prompt_completion_is_concatenated(tokenizer) -> None:
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    ids, labels, _ = encode(tok, [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}], 64)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert replies(tok, ids, labels) == ["4<eos>"]
    with pytest.raises(ValueError, match="set model.chat_template_from"):
        encode(tok, CHAT, 64)


def test_truncation(tokenizer) -> None:
    ids, labels, truncated = encode(tokenizer, CHAT, 20)
    assert truncated and len(ids) == len(labels) == 20


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"text": "hi"}, "expected {'messages': [...]} or {'prompt': ..., 'completion': ...}; got keys ['text']"),
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0]: role must be one of system, user, assistant (got 'bot')"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0]: content must be a string"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
        ({"prompt": "x", "completion": 1}, "'prompt' and 'completion' must both be strings"),
        ({"prompt": "x", "completion": " "}, "'completion' is empty"),
        (["a"], "expected an object, got list"),
    ],
)
def test_bad_rows(row: object, reason: str) -> None:
    assert reason in to_messages(row)


def test_multimodal_style_text_parts_are_accepted() -> None:
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, {"role": "assistant", "content": "yo"}]}
    assert to_messages(row)[0] == {"role": "user", "content": "hi"}


def test_errors_name_file_and_line(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "train.jsonl"
    good = json.dumps({"prompt": "a", "completion": "b"})
    path.write_text("\n".join([good, "{not json", good, json.dumps({"text": "x"}), ""]) + "\n")
    with pytest.raises(DataError) as info:
        read_rows(str(path), "train")
    assert info.value.problems == [f"{path} line 2: not valid JSON (Expecting property name enclosed in double quotes at column 2)"]
    path.write_text("\n".join([good, json.dumps({"text": "x"}), json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]})]))
    section = DataSection(train=str(path), eval_fraction=0.3, max_seq_len=64)
    with pytest.raises(DataError) as info:
        prepare(section, tokenizer, tmp_path / "cache", seed=0)
    text = str(info.value)
    assert f"{path} line 2: expected {{'messages'" in text
    assert f"{path} line 3: cannot render with the chat template: Conversation roles must alternate" in text


def test_pack_keeps_examples_apart() -> None:
    a = ([2, 10, 11, 12], [IGNORE, IGNORE, 11, 12])
    b = ([2, 20, 21], [IGNORE, 20, 21])
    c = ([2, 30, 31, 32, 33], [IGNORE, IGNORE, IGNORE, 32, 33])
    rows = pack([a, b, c], max_seq_len=8)
    assert [r[0] for r in rows] == [[2, 10, 11, 12, 2, 20, 21], [2, 30, 31, 32, 33]]
    assert rows[0][2] == [0, 1, 2, 3, 0, 1, 2]  # positions restart: block-diagonal attention
    assert rows[0][1][4] == IGNORE  # no example's first token is predicted from the previous one


def test_prepare_caches_and_splits(tmp_path: Path, tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) for i in range(40)))
    section = DataSection(train=str(path), eval_fraction=0.25, max_seq_len=64, packing=True)
    first = prepare(section, tokenizer, tmp_path / "cache", seed=0)
    assert first.stats["train"]["examples"] == 30 and first.stats["eval"]["examples"] == 10
    assert first.stats["train"]["rows"] < 30  # packed
    train, evalset = data.load_split(first.folder, "train"), data.load_split(first.folder, "eval")
    train_tokens = {tuple(x) for x in train["input_ids"]}
    assert not train_tokens & {tuple(x) for x in evalset["input_ids"]}

    monkeypatch.setattr(data, "read_rows", lambda *a: pytest.fail("the cache was not used"))
    again = prepare(section, tokenizer, tmp_path / "cache", seed=0)
    assert again.folder == first.folder
    monkeypatch.undo()
    longer = prepare(section.model_copy(update={"max_seq_len": 128}), tokenizer, tmp_path / "cache", seed=0)
    assert longer.folder != first.folder
    unpacked = prepare(section.model_copy(update={"packing": False}), tokenizer, tmp_path / "cache", seed=0)
    assert unpacked.stats["train"]["rows"] == 30


def test_parquet_rows(tmp_path: Path) -> None:
    import datasets

    path = tmp_path / "rows.parquet"
    datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}]).to_parquet(str(path))
    assert read_rows(str(path), "train") == [(f"{path} row 0", {"prompt": "a", "completion": "b"})]


def test_batches_resume_where_they_left_off() -> None:
    order = data.row_order(10, seed=3, start=0)
    stream = [next(order) for _ in range(35)]
    assert sorted(stream[:10]) == list(range(10)) and stream[:10] != stream[10:20]
    resumed = data.row_order(10, seed=3, start=17)
    assert [next(resumed) for _ in range(18)] == stream[17:35]


def test_collate_pads_as_a_separate_sequence() -> None:
    rows = {"input_ids": [[2, 5, 6], [2, 7]], "labels": [[IGNORE, 5, 6], [IGNORE, 7]], "position_ids": [[0, 1, 2], [0, 1]]}
    batch = data.collate(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[2, 5, 6], [2, 7, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 5, 6], [IGNORE, 7, IGNORE]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]
    assert batch["tokens"] == 5 and batch["loss_tokens"] == 3


def test_bytes_that_are_not_utf8_name_the_file_and_lines(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    good = json.dumps({"prompt": "a", "completion": "b"}).encode()
    path.write_bytes(b"\n".join([good, b'{"prompt": "caf\xe9", "completion": "b"}', good, b'{"prompt": "\xff", "completion": "x"}']) + b"\n")
    with pytest.raises(DataError) as info:
        read_rows(str(path), "train")
    assert [p.split(";")[0] for p in info.value.problems] == [
        f"{path} line 2: byte 0xe9 at column 16 is not UTF-8",
        f"{path} line 4: byte 0xff at column 13 is not UTF-8",
    ]
    assert "iconv" in info.value.problems[0]


def test_json_beyond_pythons_limits_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + '{"prompt": ' + "9" * 5000 + "}\n" + "[" * 50_000 + "\n")
    with pytest.raises(DataError) as info:
        read_rows(str(path), "train")
    assert info.value.problems[0].startswith(f"{path} line 2: not usable JSON: Exceeds the limit (4300 digits)")
    assert info.value.problems[1] == f"{path} line 3: not usable JSON: nested too deeply"


def test_prompts_longer_than_max_seq_len_are_named(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "train.jsonl"
    long = " ".join(["word"] * 200)
    path.write_text("\n".join(json.dumps({"prompt": long, "completion": "yes"}) for _ in range(4)) + "\n")
    section = DataSection(train=str(path), eval=str(path), max_seq_len=32)
    with pytest.raises(DataError) as info:
        prepare(section, tokenizer, tmp_path / "cache", seed=0)
    (problem,) = info.value.problems
    assert problem.startswith("train: no usable examples after tokenization: in every one the prompt fills data.max_seq_len (32)")
    assert f"({path} lines 1, 2, 3, 4)" in problem and "raise data.max_seq_len" in problem


def test_truncated_and_dropped_replies_are_reported_with_their_lines(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "train.jsonl"
    rows = [{"prompt": "q", "completion": "a"}, {"prompt": "q", "completion": " ".join(["long"] * 100)}, {"prompt": " ".join(["p"] * 100), "completion": "a"}]
    path.write_text("\n".join(json.dumps(r) for r in rows * 2) + "\n")
    prepared = prepare(DataSection(train=str(path), eval=str(path), max_seq_len=48), tokenizer, tmp_path / "cache", seed=0)
    assert prepared.stats["train"]["truncated"] == 2 and prepared.stats["train"]["dropped_no_reply_left"] == 2
    notes = data.notes(prepared.stats)
    assert notes[0] == (f"data: 2 train example(s) longer than data.max_seq_len (48) lose the end of their reply ({path} lines 2, 5); "
                        "raise data.max_seq_len to keep them whole")  # fmt: skip
    assert notes[1] == f"data: 2 train example(s) left out: the prompt fills data.max_seq_len (48), no reply token is left ({path} lines 3, 6)"
    assert len(notes) == 4  # eval reads the same file
    assert data.places([f"{path} line {n}" for n in range(1, 21)], 25).endswith("19, 20 and 5 more")
