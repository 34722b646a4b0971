"""`python -m sweep estimate`: predicted peak GPU memory for a space's corners, or for every trial
of a finished sweep beside what it measured."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from core.contract import PEAK_VRAM_GB, TAG_TRIAL, is_sweep_trial, trial_label
from sweep.config import HYPERPARAMS, SweepConfig
from sweep.readback.estimate import GB, ModelProfile, corners, estimate, trial_shape

Write = Callable[[str], None]


def load_profile(cfg: SweepConfig) -> ModelProfile:
    """The model's parameter counts, from its config alone (meta device: no weights are loaded).
    Building the model costs seconds (torch, transformers): the counts are kept in the cache folder
    (LORA_SWEEP_CACHE, ~/.cache/lora-sweep), keyed by the model's config.json, so `run` (which
    plans with them) leaves them for `estimate`, and each estimate after the first is quick."""
    from trainable.model import meta_model, profile_model

    path = _profile_path(cfg)
    if path is not None and path.is_file():
        try:
            return _profile_from_json(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError):
            pass  # written by another version: made again
    profile = profile_model(meta_model(cfg.model.id, cfg.model.revision))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(profile)))
        os.replace(tmp, path)  # whole or not at all: several processes may write it
    return profile


PROFILE_VERSION = 1  # of what the cached counts hold (core.estimate.ModelProfile)


def _profile_path(cfg: SweepConfig) -> Path | None:
    """Where the model's counts are cached: by the content of its config.json (a local folder's, or
    the hub cache's copy); None when there is none here yet (the slow path loads it)."""
    from trainable.model import resolve_model_path
    from trainable.tiny import cache_root

    path = Path(resolve_model_path(cfg.model.id)) / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(cfg.model.id, "config.json", revision=cfg.model.revision)
        except Exception:  # noqa: BLE001 - not a hub id, or no cache: no cached counts
            return None
        if not isinstance(found, str):
            return None
        path = Path(found)
    digest = hashlib.sha256(path.read_bytes() + f"v{PROFILE_VERSION}".encode()).hexdigest()[:24]
    return cache_root() / "profiles" / f"{digest}.json"


def _profile_from_json(data: dict[str, Any]) -> ModelProfile:
    from core.estimate import TextShape

    return ModelProfile(**{**data, "text": TextShape(**data["text"]), "linears": {k: tuple(v) for k, v in data["linears"].items()}})


def local_gpu_bytes() -> int | None:
    """One GPU's memory here, None without one. A Linux machine without an NVIDIA or AMD driver has
    none: said without importing torch (seconds)."""
    if sys.platform == "linux" and not any(Path(p).exists() for p in ("/proc/driver/nvidia/version", "/dev/kfd")):
        return None
    try:
        import torch

        return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    except Exception:  # no usable CUDA runtime
        return None


def _row(cfg: SweepConfig, profile: ModelProfile, hyper: dict, device_bytes: float | None) -> dict[str, Any]:
    shape = trial_shape(
        hyper, cfg.data.max_seq_len, profile.text, cfg.model.embeddings, device_bytes, cfg.train.attn_implementation, cfg.train.loss
    )
    result = estimate(profile, shape)
    targets = hyper["target_modules"]
    return {
        "method": shape.method,
        "r": shape.lora_r,
        "targets": targets if isinstance(targets, str) else "+".join(targets),
        "batch": f"{hyper['batch'][0]}x{hyper['batch'][1]}",
        "ckpt": "on" if shape.checkpointing else "off",
        "dropout": shape.lora_dropout,
        "optimizer": shape.optimizer,
        "estimate_gb": result.gb,
        "parts": {k: v / GB for k, v in result.parts.items()},
    }


def _table(rows: list[dict], device_bytes: float | None, write: Write, measured: bool = False) -> None:
    """The rows aligned; a sweep's trials (`measured`) begin with the trial's label."""
    head = f"{'trial':<5} " if measured else ""
    head += f"{'method':<6} {'r':>4} {'targets':<22} {'batch':>6} {'ckpt':>4} {'dropout':>7} {'optimizer':<16} {'estimate GB':>11}"
    head += f" {'measured GB':>11} {'error':>7}" if measured else ""
    head += "  fits" if device_bytes else ""
    write(head)
    write("-" * len(head))
    for r in rows:
        line = f"{r['trial']:<5} " if measured else ""
        line += f"{r['method']:<6} {r['r']:>4} {r['targets']:<22} {r['batch']:>6} {r['ckpt']:>4} {r['dropout']:>7.3g} {r['optimizer']:<16} {r['estimate_gb']:>11.2f}"
        if measured:
            m = r.get("measured_gb")
            line += f" {m:>11.2f} {r['estimate_gb'] / m - 1:>+7.1%}" if m else f" {'-':>11} {'-':>7}"
        if device_bytes:
            line += "  yes" if r["estimate_gb"] * GB <= device_bytes else "  NO"
        write(line)


def estimate_space(cfg: SweepConfig, profile: ModelProfile, device_bytes: float | None, write: Write = print) -> list[dict]:
    fixed = {k: getattr(cfg.train, k) for k in HYPERPARAMS}
    rows = sorted((_row(cfg, profile, hyper, device_bytes) for hyper in corners(cfg.space, fixed)), key=lambda r: r["estimate_gb"])
    gpu = f"{device_bytes / GB:.3g} GB GPU" if device_bytes else "no GPU memory given (--gpu-memory GB)"
    write(f"{cfg.model.id}: {len(rows)} corners of the space, seq {cfg.data.max_seq_len}, {gpu}")
    _table(rows, device_bytes, write)
    return rows


def estimate_sweep(sweep_dir: Path, device_bytes: float | None, write: Write = print) -> list[dict]:
    """Each trial of a finished sweep: its estimate, and the peak it measured (MLflow)."""
    from sweep.folder import SweepFolder

    folder = SweepFolder(sweep_dir)
    cfg = folder.config
    profile = load_profile(cfg)
    fixed = {k: getattr(cfg.train, k) for k in HYPERPARAMS}
    study = folder.trials()
    peaks = {r.data.tags.get(TAG_TRIAL): r.data.metrics.get(PEAK_VRAM_GB) for r in folder.children()}
    rows = []
    for trial in study.trials:
        if not is_sweep_trial(trial):
            continue
        hyper = {**fixed, **cfg.space.decode(trial.params, cfg.fixed_hyperparams)}
        row = {"trial": trial_label(trial.number), **_row(cfg, profile, hyper, device_bytes)}
        row["measured_gb"] = peaks.get(row["trial"])
        rows.append(row)
    write(f"{sweep_dir.name}: {len(rows)} trials, estimate against measured peak allocated (peak_vram_gb)")
    _table(rows, device_bytes, write, measured=True)
    return rows
