"""``python -m sglite demo``: the main job, on the embedded default model (SmolLM2-135M-Instruct).

1. Extraction: a program reads short bios and answers with a ``Person`` (name, age, city) under the
   pydantic model's JSON schema; the demo scores every field against labels it holds
   (``examples/labelled_bios.jsonl``).
2. Classification: ``select`` picks ``positive`` or ``negative`` for short reviews
   (``examples/labelled_sentiment.jsonl``); the demo prints the accuracy.
3. The radix cache statistics: how many prompt tokens were served from cache (the system prompt is
   shared by every request).

The programs, the labelled data and the scoring live here so that the quality tests
(``tests/test_real_model.py``) and ``benchmarks/extraction_quality.py`` measure exactly what the demo shows.

    >>> fields_correct({"name": "Ada Lovelace", "age": 36, "city": "London"},
    ...                {"name": "Ada Lovelace", "age": 36, "city": "london"})
    3
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field

import sglite as sgl

DATA_DIR = Path(__file__).resolve().parent / "examples"
EXTRACTION_SYSTEM = (
    "Extract the person's name, age and city from the text. "
    'Answer with a JSON object with the keys "name", "age" and "city".'
)
SENTIMENT_SYSTEM = "Is the sentiment of this review positive or negative? Answer with one word."
FIELDS = ("name", "age", "city")


class Person(BaseModel):
    name: str = Field(max_length=40)
    age: int = Field(ge=0, le=130)
    city: str = Field(max_length=40)


def load_labelled(name: str) -> list[dict]:
    """Rows of ``examples/<name>.jsonl`` (``labelled_bios``: text, name, age, city; ``labelled_sentiment``: text, label)."""
    with open(DATA_DIR / f"{name}.jsonl", encoding="utf-8") as rows:
        return [json.loads(line) for line in rows if line.strip()]


def field_correct(got: object, want: str | int) -> bool:
    """An integer must be equal; a string equal after trimming, ignoring case."""
    if isinstance(want, int):
        return isinstance(got, int) and not isinstance(got, bool) and got == want
    return isinstance(got, str) and got.strip().lower() == want.lower()


def fields_correct(answer: dict | None, label: dict) -> int:
    """How many of name, age, city ``answer`` gets right."""
    if not isinstance(answer, dict):
        return 0
    return sum(field_correct(answer.get(key), label[key]) for key in FIELDS)


def parse_answer(text: str) -> dict | None:
    """The first JSON object in ``text`` (free-form answers wrap it in prose or code fences), or None."""
    start = text.find("{")
    while start != -1:
        try:
            value, _ = json.JSONDecoder().raw_decode(text[start:])
            return value if isinstance(value, dict) else None
        except ValueError:
            start = text.find("{", start + 1)
    return None


@sgl.function
def extract_person(s, text, constrained=True):
    s += sgl.system(EXTRACTION_SYSTEM)
    s += sgl.user(text)
    if constrained:
        s += sgl.assistant(sgl.gen("person", json_schema=Person, max_tokens=64, temperature=0))
    else:
        s += sgl.assistant(sgl.gen("person", max_tokens=96, temperature=0))


@sgl.function
def classify_sentiment(s, text):
    s += sgl.system(SENTIMENT_SYSTEM)
    s += sgl.user(text)
    s += sgl.assistant(sgl.select("label", choices=["positive", "negative"]))


def _marks(answer: dict | None, label: dict) -> str:
    if not isinstance(answer, dict):
        return "invalid"
    return " ".join(f"{key}{'✓' if field_correct(answer.get(key), label[key]) else '✗'}" for key in FIELDS)


@dataclass(frozen=True)
class DemoReport:
    """What one demo run measured."""

    fields_correct: int
    fields_total: int
    valid_objects: int
    sentiment_correct: int
    sentiment_total: int
    prompt_tokens: int
    cached_tokens: int


def run_demo(runtime: sgl.Runtime) -> DemoReport:
    """Run the extraction and the classification on ``runtime``, print what they did, return the scores."""
    bios = load_labelled("labelled_bios")
    start = time.perf_counter()
    states = extract_person.run_batch([{"text": bio["text"]} for bio in bios], backend=runtime, progress_bar=True)
    elapsed = time.perf_counter() - start
    print(f"\n== extraction: {len(bios)} bios -> Person(name, age, city), JSON-schema constrained, {elapsed:.1f}s ==")
    correct = valid = 0
    for bio, state in zip(bios, states):
        person = Person.model_validate_json(state["person"])  # the constraint guarantees it parses
        valid += 1
        answer = person.model_dump()
        correct += fields_correct(answer, bio)
        print(f"- {bio['text'][:44]:<44} -> {json.dumps(answer, ensure_ascii=False):<58} {_marks(answer, bio)}")
    total = len(FIELDS) * len(bios)
    print(f"valid Person objects: {valid}/{len(bios)}; fields correct: {correct}/{total} ({correct / total:.0%})")

    reviews = load_labelled("labelled_sentiment")
    start = time.perf_counter()
    labels = classify_sentiment.run_batch([{"text": r["text"]} for r in reviews], backend=runtime)
    elapsed = time.perf_counter() - start
    right = sum(state["label"] == review["label"] for state, review in zip(labels, reviews))
    print(f"\n== select: sentiment of {len(reviews)} reviews, {elapsed:.1f}s ==")
    for review, state in list(zip(reviews, labels))[:6]:
        mark = "✓" if state["label"] == review["label"] else "✗"
        print(f"- {review['text'][:56]:<56} -> {state['label']:<8} {mark}")
    print(f"... accuracy: {right}/{len(reviews)} ({right / len(reviews):.0%})")

    stats = runtime.engine.get_stats()
    prompt, hit = stats["prompt_tokens_total"], stats["cache_hit_tokens_total"]
    print("\n== radix cache ==")
    print(f"prompt tokens: {prompt}, served from cache: {hit} ({hit / max(prompt, 1):.0%}), "
          f"computed: {stats['prefill_tokens_computed']}")
    print(f"tokens generated: {stats['generation_tokens_total']}, model forward calls: {stats['forward_calls']}")
    return DemoReport(correct, total, valid, right, len(reviews), prompt, hit)


def main_demo(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sglite demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a model directory, .gguf file or cached hub id "
                        "(default: $SGLITE_MODEL, else the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)

    if args.model is None:
        print("loading the embedded default model SmolLM2-135M-Instruct (the first run converts its GGUF once)...")
    start = time.perf_counter()
    runtime = sgl.Runtime(args.model, device=args.device)  # None: $SGLITE_MODEL, else the embedded default
    print(f"loaded {runtime.model_path} in {time.perf_counter() - start:.1f}s")
    try:
        run_demo(runtime)
        return 0
    finally:
        runtime.shutdown()


if __name__ == "__main__":
    raise SystemExit(main_demo())
