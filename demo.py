"""``python -m sglite demo``: the whole pipeline in one command.

An extraction program (system prompt + document + a JSON-schema-constrained answer) runs over a
batch of documents with ``run_batch``; then a few-shot ``select`` program. The output shows the
validated JSON, the choices' scores, and what the radix cache saved.

Without ``--model`` it runs on the embedded default: a tiny random-weight Llama built offline at first
run (its text is noise, so every valid JSON object below is the constraint's doing). Point it at a
real model with ``--model PATH_OR_HUB_ID`` (a local directory, or a hub id already in the HF cache).
"""

from __future__ import annotations

import argparse
import json
import time

from pydantic import BaseModel, Field

import sglite as sgl


class Person(BaseModel):
    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=120)
    city: str = Field(max_length=24)


DOCS = [
    "Alice Martin, 31, moved to Paris last spring to work as an engineer.",
    "Bob Okafor is 45 and has lived in Lagos all his life.",
    "Chen Wei (27) studies physics in Shanghai.",
    "Dana Kowalski, aged 38, runs a bakery in Krakow.",
    "Elena Rossi, 52, teaches history in Rome.",
    "Farid Haddad is a 29-year-old architect from Beirut.",
    "Greta Lind, 63, retired to a cottage near Uppsala.",
    "Hiro Tanaka, 34, writes software in Osaka.",
]


@sgl.function
def extract(s, doc):
    s += sgl.system("You extract facts about people as JSON.")
    s += sgl.user(doc)
    s += sgl.assistant(sgl.gen("person", json_schema=Person, max_tokens=96, temperature=0))


@sgl.function
def classify(s, doc):
    s += sgl.system("Classify each text as 'work', 'study' or 'other'.")
    s += sgl.user(doc)
    s += sgl.assistant(sgl.select("label", choices=["work", "study", "other"]))


def main_demo(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sglite demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="local path or HF hub id (default: $SGLITE_MODEL, else the embedded tiny model)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)

    if args.model is None:
        print("loading the embedded default model (tiny random Llama, built offline at first run)...")
    runtime = sgl.Runtime(args.model, device=args.device)  # None: $SGLITE_MODEL, else the embedded default
    sgl.set_default_backend(runtime)
    try:
        start = time.perf_counter()
        states = extract.run_batch([{"doc": d} for d in DOCS], progress_bar=True)
        elapsed = time.perf_counter() - start
        print(f"\n== extraction: {len(DOCS)} documents in {elapsed:.2f}s ==")
        valid = 0
        for doc, state in zip(DOCS, states):
            raw = state["person"]
            try:
                person = Person.model_validate_json(raw)
                valid += 1
                shown = json.dumps(person.model_dump(), ensure_ascii=False)
            except ValueError as exc:
                shown = f"INVALID ({exc.__class__.__name__}): {raw!r}"
            meta = state.get_meta_info("person")
            print(f"- {doc[:40]:<40} -> {shown}   [cached {meta.get('cached_tokens', 0)} tokens]")
        print(f"{valid}/{len(DOCS)} outputs validate against the Person schema")

        labels = classify.run_batch([{"doc": d} for d in DOCS[:4]])
        print("\n== select ==")
        for doc, state in zip(DOCS, labels):
            scores = state.get_meta_info("label").get("normalized_prompt_logprobs")
            print(f"- {doc[:40]:<40} -> {state['label']}   scores={scores}")

        stats = runtime.engine.get_stats()
        computed, hit = stats["prefill_tokens_computed"], stats["cache_hit_tokens_total"]
        print("\n== radix cache ==")
        print(f"prompt tokens: {stats['prompt_tokens_total']}, served from cache: {hit}, computed: {computed}")
        print(f"tokens generated: {stats['generation_tokens_total']}, model forward calls: {stats['forward_calls']}")
        return 0 if valid == len(DOCS) else 1
    finally:
        runtime.shutdown()


if __name__ == "__main__":
    raise SystemExit(main_demo())
