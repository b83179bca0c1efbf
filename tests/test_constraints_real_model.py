"""On the real default model, a JSON-schema constraint must not make extraction answers worse.

Forcing a layout the model never writes (compact ``{"age":52}``) turned most ages wrong on
SmolLM2-135M; the default layout (``json.dumps``'s) and the flexible one (the model's own
pretty-printing) must score at least as well as the unconstrained model on labelled bios.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import BaseModel

import sglite

BIOS = [json.loads(line) for line in (Path(__file__).parent / "data" / "bios_grammar.jsonl").read_text().splitlines()]


class Person(BaseModel):
    name: str
    age: int
    city: str


def field(text: str, key: str):
    """A field's value from (possibly unfinished) JSON-ish text, or None."""
    match = re.search(rf'"{key}"\s*:\s*("(?:[^"\\]|\\.)*"|-?\d+)', text)
    return json.loads(match.group(1)) if match else None


@pytest.mark.slow
def test_constrained_extraction_is_at_least_as_accurate_as_free(real_model_path):
    with sglite.Engine(real_model_path, max_total_tokens=4096) as engine:  # grammar_backend="llguidance" (default)
        prompts = [engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": "Extract the person's name, age and city from this text as JSON with keys "
                                         f"name, age, city.\nText: {row['bio']}"}],
            tokenize=False, add_generation_prompt=True) for row in BIOS]
        base = {"temperature": 0, "max_new_tokens": 80}
        runs = {"free": engine.generate(prompts, base)}
        for layout in ("spaced", "flexible"):
            runs[layout] = engine.generate(prompts, {**base, "json_schema": Person, "json_layout": layout})
    correct = {}
    for name, outs in runs.items():
        if name != "free":
            for out in outs:
                Person.model_validate_json(out["text"])  # every constrained output is a valid Person
        correct[name] = {key: sum(field(out["text"], key) == row[key] for out, row in zip(outs, BIOS))
                         for key in ("name", "age", "city")}
    assert correct["free"]["age"] >= len(BIOS) - 2, correct  # the task is within the model's reach
    assert correct["spaced"]["age"] >= correct["free"]["age"], correct
    assert sum(correct["flexible"].values()) >= sum(correct["free"].values()), correct
