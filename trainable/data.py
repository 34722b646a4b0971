"""JSONL / JSON / Parquet files or hub datasets -> tokenized, packed, loss-masked rows.

Rows are either chat (`{"messages": [{"role": ..., "content": ...}, ...]}`) or prompt/completion
(`{"prompt": ..., "completion": ...}`, rendered as one user turn and one assistant turn). Each
example is rendered with the chat template and tokenized once; loss is on assistant tokens only,
including the end-of-turn token that teaches the model to stop. Every sequence starts with exactly
one BOS whether the template writes it or the tokenizer would add it.

Tokenization happens once per sweep, in the driver, and is cached on disk keyed by the tokenizer,
the chat template, max_seq_len, packing and the data itself; trials only read the cache.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from core.schema import DataSection

FORMAT_VERSION = 3  # 3: stats name the truncated and dropped examples
IGNORE = -100
ROLES = ("system", "user", "assistant")
MAX_LISTED = 20


class DataError(Exception):
    """The data cannot be used; `problems` names each file/line (or hub row) and what is wrong."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = problems[:MAX_LISTED]
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        super().__init__("data: " + str(len(problems)) + " problem(s)\n" + "\n".join(f"  - {p}" for p in shown) + more)


class HubDataUnreachable(DataError):
    """A hub dataset that cannot be read here: the hub is unreachable (the run went offline:
    sweep.engine.sweep.work_offline) and the dataset is not in the HF cache."""

    def __init__(self, source: str, split: str, reason: str):
        self.source, self.split, self.reason = source, split, reason
        super().__init__([f"{source}: cannot load split {split!r}: the hub is unreachable and it is not in the HF cache ({reason})"])


# ----------------------------------------------------------------------------------------------
# reading rows


def is_local(source: str) -> bool:
    return Path(source).is_absolute() and Path(source).exists()


def read_rows(source: str, split: str) -> list[tuple[str, Any]]:
    """(where, row) pairs; `where` says 'file line N' or 'hub-id[split] row N' for error messages."""
    if not is_local(source):
        import datasets

        from huggingface_hub import constants

        try:
            ds = datasets.load_dataset(source, split=split)
        except Exception as exc:  # the hub / datasets error text is the useful part
            if constants.HF_HUB_OFFLINE:  # from the cache only, and it is not there
                raise HubDataUnreachable(source, split, (str(exc).splitlines() or [type(exc).__name__])[0][:300]) from None
            raise DataError([f"{source}: cannot load split {split!r} from the hub: {exc}"]) from None
        return [(f"{source}[{split}] row {i}", row) for i, row in enumerate(ds)]
    path = Path(source)
    if path.suffix == ".parquet":
        import datasets

        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
        return [(f"{path} row {i}", row) for i, row in enumerate(ds)]
    text = _utf8_text(path)
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError([f"{path} line {exc.lineno}: not valid JSON: {exc.msg}"]) from None
        except (ValueError, RecursionError) as exc:  # a 5000-digit number, nesting deeper than Python's stack
            raise DataError([f"{path}: not usable JSON: {_json_limit(exc)}"]) from None
        return [(f"{path} item {i}", row) for i, row in enumerate(rows)]
    out, problems = [], []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((f"{path} line {n}", json.loads(line)))
        except json.JSONDecodeError as exc:
            problems.append(f"{path} line {n}: not valid JSON ({exc.msg} at column {exc.colno})")
        except (ValueError, RecursionError) as exc:
            problems.append(f"{path} line {n}: not usable JSON: {_json_limit(exc)}")
    if problems:
        raise DataError(problems)
    if not out:
        raise DataError([f"{path}: no rows"])
    return out


def _utf8_text(path: Path) -> str:
    """The file as text; DataError naming every line that is not UTF-8 (a latin-1 or cp1252 export,
    a binary file), rather than a bare UnicodeDecodeError."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    problems = []
    for n, line in enumerate(raw.split(b"\n"), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append(f"{path} line {n}: byte 0x{line[exc.start]:02x} at column {exc.start + 1} is not UTF-8; "
                            "data files must be UTF-8 text: fix the line, or convert the file (e.g. iconv -f cp1252 -t utf-8 IN > OUT)")  # fmt: skip
    raise DataError(problems)


def _json_limit(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc).splitlines()[0][:200]


def _content_text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(c, dict) for c in content):
        texts = [c.get("text") for c in content if c.get("type") == "text"]
        if all(isinstance(t, str) for t in texts) and len(texts) == len(content):
            return "".join(texts)
    return None


def to_messages(row: Any) -> list[dict[str, str]] | str:
    """A row as a list of {role, content} messages, or the reason it cannot be one."""
    if not isinstance(row, dict):
        return f"expected an object, got {type(row).__name__}"
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty list of {role, content}"
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                return f"messages[{i}]: role must be one of {', '.join(ROLES)} (got {m.get('role') if isinstance(m, dict) else m!r})"
            text = _content_text(m.get("content"))
            if text is None:
                return f"messages[{i}]: content must be a string or a list of {{type: text, text}} parts"
            out.append({"role": m["role"], "content": text})
        if not any(m["role"] == "assistant" for m in out):
            return "no assistant message: nothing to learn from this row"
        return out
    if "prompt" in row or "completion" in row:
        prompt, completion = row.get("prompt"), row.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            return "'prompt' and 'completion' must both be strings"
        if not completion.strip():
            return "'completion' is empty: nothing to learn from this row"
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    return f"expected {{'messages': [...]}} or {{'prompt': ..., 'completion': ...}}; got keys {sorted(row)}"


# ----------------------------------------------------------------------------------------------
# tokenizing one example


def _render(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer: Any, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of every assistant reply (end-of-turn included).

    Found by rendering growing prefixes of the conversation: the generation prompt ends where the
    reply starts; the turn's render ends after its end-of-turn marker (trailing whitespace aside).
    """
    if not tokenizer.chat_template:
        # No template: plain prompt + completion + EOS (only for single-turn rows).
        if [m["role"] for m in messages] != ["user", "assistant"]:
            raise ValueError("the tokenizer has no chat template; set model.chat_template_from to render chats")
        prompt, reply = messages[0]["content"], messages[1]["content"] + (tokenizer.eos_token or "")
        return prompt + reply, [(len(prompt), len(prompt) + len(reply))]
    text = _render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        turn = _render(tokenizer, messages[: i + 1])
        if not (turn.startswith(prefix) and text.startswith(turn)):
            raise ValueError("the chat template does not render conversations prefix by prefix; cannot locate assistant replies")
        end = len(turn.rstrip())
        spans.append((len(prefix), end))
    return text, spans


def encode(tokenizer: Any, messages: list[dict], max_seq_len: int) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated) with exactly one leading BOS and loss on assistant tokens."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    labels = [IGNORE] * len(ids)
    for k, (start, _end) in enumerate(offsets):
        if any(s <= start < e for s, e in spans):
            labels[k] = ids[k]
    bos = tokenizer.bos_token_id
    if bos is not None:
        # The template may write BOS and the tokenizer may add one: keep exactly one.
        while len(ids) > 1 and ids[0] == bos and ids[1] == bos:
            ids, labels = ids[1:], labels[1:]
        if not ids or ids[0] != bos:
            ids, labels = [bos] + ids, [IGNORE] + labels
        labels[0] = IGNORE
    truncated = len(ids) > max_seq_len
    return ids[:max_seq_len], labels[:max_seq_len], truncated


# ----------------------------------------------------------------------------------------------
# packing and caching


def pack(examples: list[tuple[list[int], list[int]]], max_seq_len: int) -> list[tuple[list[int], list[int], list[int]]]:
    """Greedy packing in order: (input_ids, labels, position_ids) rows of at most max_seq_len tokens.

    Position ids restart at 0 for each example; the model turns that into a block-diagonal causal
    mask (no attention across examples), and each example's first label is ignored, so no example
    is predicted from another.
    """
    rows: list[tuple[list[int], list[int], list[int]]] = []
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    for ex_ids, ex_labels in examples:
        if ids and len(ids) + len(ex_ids) > max_seq_len:
            rows.append((ids, labels, pos))
            ids, labels, pos = [], [], []
        ids = ids + ex_ids
        labels = labels + [IGNORE] + ex_labels[1:]
        pos = pos + list(range(len(ex_ids)))
    if ids:
        rows.append((ids, labels, pos))
    return rows


@dataclass(frozen=True)
class PreparedData:
    folder: Path
    stats: dict[str, Any]


def _fingerprint(source: str, split: str) -> str:
    if is_local(source):
        digest = hashlib.sha256(Path(source).read_bytes()).hexdigest()
        return f"file:{digest}"
    return f"hub:{source}:{split}"


def cache_key(data: DataSection, tokenizer: Any, seed: int) -> str:
    tok = tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer") else repr(tokenizer)
    parts = {
        "format": FORMAT_VERSION,
        "tokenizer": hashlib.sha256(tok.encode()).hexdigest(),
        "template": tokenizer.chat_template,
        "special": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        "max_seq_len": data.max_seq_len,
        "packing": data.packing,
        "train": _fingerprint(data.train, data.split),
        "eval": _fingerprint(data.eval, data.eval_split or data.split) if data.eval else None,
        "eval_fraction": data.eval_fraction,
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _encode_all(tokenizer: Any, rows: list[tuple[str, Any]], max_seq_len: int, desc: str = "tokenizing") -> tuple[list, dict]:
    from tqdm.auto import tqdm

    examples, problems = [], []
    truncated: list[str] = []
    dropped: list[str] = []
    # A progress bar on a terminal for large datasets (silent in logs and for small ones).
    for where, row in tqdm(rows, desc=desc, unit="ex", disable=None if len(rows) >= 2000 else True, leave=False):
        messages = to_messages(row)
        if isinstance(messages, str):
            problems.append(f"{where}: {messages}")
            continue
        try:
            ids, labels, cut = encode(tokenizer, messages, max_seq_len)
        except Exception as exc:  # template errors (e.g. roles not alternating) name the row
            problems.append(f"{where}: cannot render with the chat template: {exc}")
            continue
        if all(label == IGNORE for label in labels):
            dropped.append(where)  # truncation removed every reply token
            continue
        if cut:
            truncated.append(where)
        examples.append((ids, labels))
    if problems:
        raise DataError(problems)
    # The first few places are kept (stats.json) so that the output can name them.
    return examples, {"examples": len(examples), "truncated": len(truncated), "dropped_no_reply_left": len(dropped),
                      "truncated_at": truncated[:MAX_LISTED], "dropped_at": dropped[:MAX_LISTED]}  # fmt: skip


def places(wheres: list[str], total: int) -> str:
    """'f.jsonl lines 3, 7, 9 and 12 more' from ['f.jsonl line 3', ...] (hub rows, json items alike)."""
    groups: dict[tuple[str, str], list[str]] = {}
    for where in wheres:
        prefix, unit, n = where.rsplit(" ", 2)
        groups.setdefault((prefix, unit), []).append(n)
    text = "; ".join(f"{prefix} {unit}{'s' if len(ns) > 1 else ''} {', '.join(ns)}" for (prefix, unit), ns in groups.items())
    return text + (f" and {total - len(wheres)} more" if total > len(wheres) else "")


def notes(stats: dict[str, Any]) -> list[str]:
    """What tokenization did to the data that a user should know: replies cut short or dropped by
    max_seq_len, with the lines where it happened."""
    out = []
    for split in ("train", "eval"):
        s = stats.get(split, {})
        if s.get("truncated"):
            out.append(f"data: {s['truncated']} {split} example(s) longer than data.max_seq_len ({stats['max_seq_len']}) lose the end of their reply "
                       f"({places(s.get('truncated_at', []), s['truncated'])}); raise data.max_seq_len to keep them whole")  # fmt: skip
        if s.get("dropped_no_reply_left"):
            out.append(f"data: {s['dropped_no_reply_left']} {split} example(s) left out: the prompt fills data.max_seq_len ({stats['max_seq_len']}), "
                       f"no reply token is left ({places(s.get('dropped_at', []), s['dropped_no_reply_left'])})")  # fmt: skip
    return out


def template_tokens(tokenizer: Any, examples: list[tuple[list[int], list[int]]]) -> dict[str, int]:
    """Special / added tokens the rendered data uses (e.g. <start_of_turn>, <end_of_turn>): the rows
    the `new_tokens` embedding policy trains. BOS and padding are left out: every base model has
    trained those."""
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    special -= {tokenizer.bos_token_id, tokenizer.pad_token_id}
    used = set()
    for ids, _ in examples:
        used.update(i for i in ids if i in special)
    return {tokenizer.convert_ids_to_tokens(i): i for i in sorted(used)}


def _rows_to_dataset(examples: list, packing: bool, max_seq_len: int, seed: int) -> tuple[Any, dict]:
    import datasets

    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    ordered = [examples[i] for i in order]
    if packing:
        rows = pack(ordered, max_seq_len)
    else:
        rows = [(ids, labels, list(range(len(ids)))) for ids, labels in ordered]
    columns = {
        "input_ids": [r[0] for r in rows],
        "labels": [r[1] for r in rows],
        "position_ids": [r[2] for r in rows],
    }
    tokens = sum(len(r[0]) for r in rows)
    loss_tokens = sum(sum(1 for x in r[1] if x != IGNORE) for r in rows)
    stats = {
        "rows": len(rows),
        "tokens": tokens,
        "loss_tokens": loss_tokens,
        "fill": round(tokens / (len(rows) * max_seq_len), 4) if rows else 0.0,
    }
    return datasets.Dataset.from_dict(columns), stats


def _tokenized(data: DataSection, tokenizer: Any, seed: int, log: Any) -> tuple[tuple[list, dict], tuple[list, dict]]:
    """(train examples, their stats), (eval examples, their stats): the data read and tokenized,
    with every check `run` makes of it (DataError naming each problem)."""
    train_rows = read_rows(data.train, data.split)
    if data.eval:
        eval_rows = read_rows(data.eval, data.eval_split or data.split)
    else:
        order = list(range(len(train_rows)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(train_rows) * (data.eval_fraction or 0.05)))
        if n_eval >= len(train_rows):
            raise DataError([f"{data.train}: {len(train_rows)} rows are too few to hold out {n_eval} for eval"])
        held = set(order[:n_eval])
        eval_rows = [r for i, r in enumerate(train_rows) if i in held]
        train_rows = [r for i, r in enumerate(train_rows) if i not in held]
    log(f"tokenizing {len(train_rows)} train and {len(eval_rows)} eval examples (max_seq_len {data.max_seq_len}) ...")
    train_ex, train_stats = _encode_all(tokenizer, train_rows, data.max_seq_len, "tokenizing train")
    eval_ex, eval_stats = _encode_all(tokenizer, eval_rows, data.max_seq_len, "tokenizing eval")
    for name, ex, ex_stats in (("train", train_ex, train_stats), ("eval", eval_ex, eval_stats)):
        if not ex:
            raise DataError([f"{name}: no usable examples after tokenization: in every one the prompt fills data.max_seq_len ({data.max_seq_len}), "
                             f"leaving no reply token ({places(ex_stats['dropped_at'], ex_stats['dropped_no_reply_left'])}); "
                             "raise data.max_seq_len or shorten those prompts"])  # fmt: skip
    return (train_ex, train_stats), (eval_ex, eval_stats)


def check(data: DataSection, tokenizer: Any, cache_dir: Path, seed: int) -> dict[str, Any]:
    """What `prepare` checks, with nothing written (`validate`): the data's stats (for `notes`), from
    the cached copy when there is one, else the data read and tokenized in memory; DataError as
    prepare's."""
    stats_file = cache_dir / cache_key(data, tokenizer, seed) / "stats.json"
    if stats_file.exists():
        return json.loads(stats_file.read_text())
    (_, train_stats), (_, eval_stats) = _tokenized(data, tokenizer, seed, log=lambda line: None)
    return {"max_seq_len": data.max_seq_len, "packing": data.packing, "train": train_stats, "eval": eval_stats}


def prepare(data: DataSection, tokenizer: Any, cache_dir: Path, seed: int, log: Any = print) -> PreparedData:
    """Tokenize (and pack) train and eval once; later calls with the same inputs reuse the cache."""
    folder = cache_dir / cache_key(data, tokenizer, seed)
    stats_file = folder / "stats.json"
    if stats_file.exists():
        return PreparedData(folder, json.loads(stats_file.read_text()))
    (train_ex, train_stats), (eval_ex, eval_stats) = _tokenized(data, tokenizer, seed, log)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".data-", dir=folder.parent))
    try:
        stats: dict[str, Any] = {
            "max_seq_len": data.max_seq_len,
            "packing": data.packing,
            "template_tokens": template_tokens(tokenizer, train_ex),
        }
        for name, ex, ex_stats in (("train", train_ex, train_stats), ("eval", eval_ex, eval_stats)):
            ds, row_stats = _rows_to_dataset(ex, data.packing, data.max_seq_len, seed)
            ds.save_to_disk(str(tmp / name))
            stats[name] = {**ex_stats, **row_stats}
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
        try:
            tmp.rename(folder)
        except OSError:  # prepared concurrently by another sweep: identical content
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PreparedData(folder, json.loads(stats_file.read_text()))


# ----------------------------------------------------------------------------------------------
# batches for the training loop


def load_split(folder: str | Path, split: str) -> Any:
    import datasets

    return datasets.load_from_disk(str(Path(folder) / split)).with_format("numpy")


def collate(rows: dict[str, list], pad_id: int, min_length: int = 0) -> dict[str, Any]:
    """Right-pad rows to the longest (at least `min_length`); the pad tail gets its own positions so
    it is masked off."""
    import torch

    length = max(min_length, *(len(x) for x in rows["input_ids"]))
    n = len(rows["input_ids"])
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((n, length), dtype=torch.long)
    tokens = 0
    for i, (ids, lab, pos) in enumerate(zip(rows["input_ids"], rows["labels"], rows["position_ids"])):
        k = len(ids)
        input_ids[i, :k] = torch.tensor(ids)
        labels[i, :k] = torch.tensor(lab)
        position_ids[i, :k] = torch.tensor(pos)
        position_ids[i, k:] = torch.arange(length - k)
        tokens += k
    from trainable.loss import loss_positions

    loss_index, targets = loss_positions(labels)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "loss_index": loss_index,
        "targets": targets,
        "tokens": tokens,
        "loss_tokens": int(loss_index.numel()),
    }


def row_order(n_rows: int, seed: int, start: int) -> Iterator[int]:
    """Row indices from position `start` of an endless stream of per-epoch shuffles (resumable)."""
    epoch, offset = divmod(start, n_rows)
    while True:
        perm = list(range(n_rows))
        random.Random(seed * 100_003 + epoch).shuffle(perm)
        yield from perm[offset:]
        epoch, offset = epoch + 1, 0


def train_batches(ds: Any, micro_batch: int, seed: int, start_micro_batch: int, pad_id: int) -> Iterator[dict[str, Any]]:
    order = row_order(len(ds), seed, start_micro_batch * micro_batch)
    while True:
        idx = [next(order) for _ in range(micro_batch)]
        yield collate(ds[idx], pad_id)


def eval_batches(ds: Any, batch_size: int, pad_id: int) -> Iterator[dict[str, Any]]:
    for start in range(0, len(ds), batch_size):
        yield collate(ds[start : start + batch_size], pad_id)
