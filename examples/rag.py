"""Retrieval-augmented QA over a shared context: retrieve once, ask many questions.

The retrieved passages form a long common prefix; every question's program reuses its KV
from the radix cache, so only the question itself is computed per call.

    python examples/rag.py [--model PATH]
"""

from __future__ import annotations

import argparse
import re

import sglite as sgl

DOCUMENTS = [
    "The Eiffel Tower was completed in 1889 for the World's Fair in Paris. It is 330 metres tall.",
    "The Great Wall of China stretches over 21,000 kilometres and was built over many centuries.",
    "Mount Everest, at 8,849 metres, is the highest mountain above sea level, on the Nepal-China border.",
    "The Amazon rainforest covers much of the Amazon basin and produces about 20% of the world's oxygen.",
    "The Colosseum in Rome could hold between 50,000 and 80,000 spectators in the first century.",
]

QUESTIONS = [
    "How tall is the Eiffel Tower?",
    "When was the Eiffel Tower completed?",
    "How long is the Great Wall?",
    "Where is Mount Everest?",
]


def retrieve(query: str, documents: list[str], k: int = 3) -> list[str]:
    """Rank documents by shared words with the query (a stand-in for a vector store)."""
    words = set(re.findall(r"\w+", query.lower()))
    return sorted(documents, key=lambda d: -len(words & set(re.findall(r"\w+", d.lower()))))[:k]


@sgl.function
def answer_with_context(s, context, question):
    s += sgl.system("Answer using only the context. Say 'unknown' if it is not there.")
    s += sgl.user("Context:\n" + context + "\n\nQuestion: " + question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=24, stop="\n"))
    s += sgl.user("Is the answer supported by the context?")
    s += sgl.assistant(sgl.select("supported", choices=["yes", "no"]))


def main(argv: list[str] | None = None) -> list[sgl.ProgramState]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model path (default: $SGLITE_MODEL, else the embedded SmolLM2-135M-Instruct)")
    args = parser.parse_args(argv)

    # One retrieval for the whole topic keeps the context identical, hence cacheable.
    context = "\n".join(retrieve(" ".join(QUESTIONS), DOCUMENTS))
    with sgl.Runtime(args.model) as runtime:
        states = answer_with_context.run_batch(
            [{"context": context, "question": q} for q in QUESTIONS], backend=runtime, temperature=0
        )
        for question, state in zip(QUESTIONS, states):
            meta = state.get_meta_info("answer")
            print(f"{question} -> {state['answer'].strip()!r} (supported: {state['supported']}; "
                  f"{meta['cached_tokens']}/{meta['prompt_tokens']} prompt tokens cached)")
        return states


if __name__ == "__main__":
    main()
