"""The JSON Schema of a space file, generated from core.schema's sections: editors complete and check
space.yaml with it (yaml-language-server reads the `# yaml-language-server: $schema=...` line each
shipped file begins with).

    python -m sweep schema > search_spaces/space.schema.json     # regenerate the committed copy

The sections' schemas are pydantic's, with each field's description; `space:` is built here from
the searchable hyperparameters of TrainSection (a dimension's choices are checked with the same
value schema as the fixed value in `train:`). The schema is a help for editing: `validate` stays
the authority (cross-field rules, files that must exist, ratios of ratios).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "search_spaces" / "space.schema.json"
MODELINE = "# yaml-language-server: $schema="  # + the schema's path relative to the space file
DRAFT = "https://json-schema.org/draft/2020-12/schema"
SECTION_HELP = {
    "model": "the base model: hub id, local folder or tiny-gemma3; its chat template; which embeddings train",
    "data": "train and eval data (.jsonl/.json/.parquet or a hub dataset), sequence length, packing",
    "train": "fixed for every trial; the searchable hyperparameters not searched in space take their value here",
    "search": "the search: algorithm, metric or objectives, number of trials, scheduler, time budget",
    "resources": "what each trial asks of the cluster: GPU share (auto: from its memory estimate), CPUs, cohorts",
    "tracking": "where results go: MLflow tracking URI and experiment, Optuna storage, results folder",
}


def space_file_schema() -> dict[str, Any]:
    """The schema of a whole space file, as a plain dict."""
    from pydantic.json_schema import models_json_schema

    from sweep.config import NAME_PATTERN, REQUIRED, SECTIONS, TOP_KEYS

    _, defs = models_json_schema([(cls, "validation") for cls in SECTIONS.values()], ref_template="#/$defs/{model}")
    train_fields = defs["$defs"]["TrainSection"]["properties"]
    properties: dict[str, Any] = {
        "name": {"type": "string", "pattern": f"^{NAME_PATTERN}$", "description": "the sweep's name: letters, digits, '.', '_' or '-' (up to 100)"},
    }
    for key, cls in SECTIONS.items():
        properties[key] = {"$ref": f"#/$defs/{cls.__name__}", "description": SECTION_HELP[key]}
    properties["space"] = _space(train_fields, defs["$defs"])
    properties = {k: properties[k] for k in TOP_KEYS}  # the order of a space file
    return {
        "$schema": DRAFT,
        "title": "lora-sweep space file",
        "description": "A LoRA / QLoRA hyperparameter sweep: python -m sweep validate FILE checks it; python -m sweep run FILE runs it.",
        "type": "object",
        "properties": properties,
        "required": list(REQUIRED),
        "additionalProperties": False,
        "$defs": defs["$defs"],
    }


def schema_text() -> str:
    """The schema as the committed file holds it (stable key order, a final newline)."""
    return json.dumps(space_file_schema(), indent=2, ensure_ascii=False) + "\n"


def _value(field: dict[str, Any]) -> dict[str, Any]:
    """A train field's schema without what belongs to the field rather than to a value."""
    return {k: v for k, v in field.items() if k not in ("default", "title", "description")}


def _closed(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def _space(train_fields: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """`space:`: each searchable hyperparameter, with the dimension forms it accepts (sweep/space.py).
    The forms every numeric one shares (ranges, ratios) go into `defs`."""
    from sweep.config import SEARCHABLE, hyperparam_specs

    specs = hyperparam_specs()
    numeric = [name for name in SEARCHABLE if specs[name].kind in ("int", "float")]
    bounds = {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2, "description": "[low, high], inclusive"}
    step = {"type": "number", "exclusiveMinimum": 0, "description": "a stepped range (grid search needs one)"}
    factors = {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0}, "minItems": 1, "uniqueItems": True}
    ratio_of = {"enum": numeric, "description": "the hyperparameter this one is a multiple of"}
    defs["Range"] = {"description": "a range: {uniform: [low, high]} or {loguniform: [low, high]}, optionally with step", "anyOf": [
        _closed({"uniform": bounds, "step": step}, ["uniform"]),
        _closed({"loguniform": bounds, "step": step}, ["loguniform"]),
    ]}  # fmt: skip
    defs["Ratio"] = {"description": "a multiple of another hyperparameter: {ratio_of: lora_r, choices: [0.5, 1, 2]} or a range of factors", "anyOf": [
        _closed({"ratio_of": ratio_of, "choices": factors}, ["ratio_of", "choices"]),
        _closed({"ratio_of": ratio_of, "uniform": bounds, "step": step}, ["ratio_of", "uniform"]),
        _closed({"ratio_of": ratio_of, "loguniform": bounds, "step": step}, ["ratio_of", "loguniform"]),
    ]}  # fmt: skip
    properties = {}
    for name in SEARCHABLE:
        choices = {"type": "array", "items": _value(train_fields[name]), "minItems": 1, "uniqueItems": True}
        forms: list[dict[str, Any]] = [choices, _closed({"choices": choices}, ["choices"])]
        if name in numeric:
            forms += [{"$ref": "#/$defs/Range"}, {"$ref": "#/$defs/Ratio"}]
        if specs[name].kind == "pair":
            forms.append(_closed({"pairs": choices}, ["pairs"]))
        properties[name] = {"description": f"searched: {train_fields[name].get('description', '')}", "anyOf": forms}
    return {
        "type": "object",
        "description": "the searched hyperparameters: choices [a, b], {uniform: [lo, hi]}, {loguniform: [lo, hi]}, {ratio_of: NAME, choices: [...]}, "
        "{pairs: [[micro, accumulation], ...]}; each one not searched takes its value from train",
        "properties": properties,
        "additionalProperties": False,
        "minProperties": 1,
    }
