"""The JSON Schema of a space file: generated from the pydantic sections, committed beside the
shipped space files (search_spaces/space.schema.json), printed by `python -m sweep schema`, and
named by the first line of every shipped space file, for editors (yaml-language-server)."""

from __future__ import annotations

import json

import pytest

from sweep.cli import main
from sweep.config import parse_yaml
from sweep.config.json_schema import MODELINE, SCHEMA_FILE, schema_text, space_file_schema
from tests.conftest import ROOT

SHIPPED = sorted((ROOT / "search_spaces").glob("*.yaml"))


def test_the_committed_schema_is_the_generated_one() -> None:
    assert SCHEMA_FILE == ROOT / "search_spaces" / "space.schema.json"
    assert SCHEMA_FILE.read_text() == schema_text(), "stale: regenerate it with  python -m sweep schema > search_spaces/space.schema.json"


def test_the_schema_command_prints_it(capsys: pytest.CaptureFixture) -> None:
    assert main(["schema"]) == 0
    assert capsys.readouterr().out == SCHEMA_FILE.read_text()


def test_every_shipped_space_file_names_the_schema_on_its_first_line() -> None:
    assert {f.name for f in SHIPPED} >= {"demo.yaml", "gemma3-1b-lora.yaml", "gemma3-12b-qlora.yaml"}
    for f in SHIPPED:
        first = f.read_text().splitlines()[0]
        assert first.startswith(MODELINE), f"{f.name}: its first line is {first!r}"
        assert (f.parent / first.removeprefix(MODELINE)).resolve() == SCHEMA_FILE, f.name  # relative to the space file


def test_the_schema_accepts_the_shipped_files_and_catches_mistakes() -> None:
    jsonschema = pytest.importorskip("jsonschema")  # Ray's dependency; the schema itself needs nothing

    schema = space_file_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    check = jsonschema.Draft202012Validator(schema)
    for f in SHIPPED:
        assert [e.message for e in check.iter_errors(parse_yaml(f.read_text(), str(f)))] == [], f.name
    demo = parse_yaml((ROOT / "search_spaces" / "demo.yaml").read_text(), "demo.yaml")
    demo["train"]["max_stepz"] = 10
    demo["space"]["lora_r"] = {"uniform": [4]}
    demo["space"]["lora_alpha"] = {"ratio_of": "target_modules", "choices": [1]}
    demo["search"]["time_budget"] = "8 hours"
    demo["resources"]["cohort"] = 0
    wrong = sorted("/".join(map(str, e.absolute_path)) for e in check.iter_errors(demo))
    assert wrong == ["resources/cohort", "search/time_budget", "space/lora_alpha", "space/lora_r", "train"], wrong
    for good in ({"time_budget": "1h30m"}, {"time_budget": 90}):
        assert not list(check.iter_errors({**demo, "train": {}, "space": {"lora_r": [8]}, "resources": {}, "search": {**demo["search"], **good}}))


def test_descriptions_come_from_the_sections() -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    train = schema["$defs"]["TrainSection"]["properties"]
    assert train["lora_r"]["description"] == "LoRA rank, 1..4096"
    assert schema["properties"]["space"]["properties"]["lora_r"]["description"] == "searched: LoRA rank, 1..4096"
    assert train["gradient_checkpointing"]["anyOf"][1]["enum"] == ["auto", "on", "off"]  # what a file may hold, not the normalised bool
    assert schema["required"] == ["name", "model", "data", "search", "space"] and schema["additionalProperties"] is False
