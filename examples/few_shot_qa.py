"""Few-shot question answering: a shared few-shot prefix, many questions, one batch.

Every program starts with the same examples, so after the first one the engine serves that
prefix from its radix cache; the printed cache hit rate shows it.

    python examples/few_shot_qa.py                     # the embedded SmolLM2-135M-Instruct
    python examples/few_shot_qa.py --model PATH        # another model (directory, .gguf file or hub id)
"""

from __future__ import annotations

import argparse

import sglite as sgl

EXAMPLES = [
    ("What is the capital of France?", "Paris"),
    ("How many legs does a spider have?", "Eight"),
    ("What color is a ripe banana?", "Yellow"),
]

QUESTIONS = [
    "What is the largest planet in the solar system?",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?",
    "How many continents are there?",
    "What gas do plants absorb?",
    "What is the square root of 81?",
]


@sgl.function
def few_shot_qa(s, question, examples=EXAMPLES):
    s += "Answer each question in a few words.\n\n"
    for q, a in examples:
        s += f"Q: {q}\nA: {a}\n\n"
    s += f"Q: {question}\nA:" + sgl.gen("answer", max_tokens=16, stop="\n")


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model path (default: $SGLITE_MODEL, else the embedded SmolLM2-135M-Instruct)")
    args = parser.parse_args(argv)

    with sgl.Runtime(args.model) as runtime:
        states = few_shot_qa.run_batch([{"question": q} for q in QUESTIONS], backend=runtime, temperature=0)
        for question, state in zip(QUESTIONS, states):
            print(f"{question} -> {state['answer'].strip()!r}")
        prompt = sum(st.get_meta_info("answer")["prompt_tokens"] for st in states)
        cached = sum(st.get_meta_info("answer")["cached_tokens"] for st in states)
        print(f"prompt tokens {prompt}, served from cache {cached} ({cached / prompt:.0%})")
        return [state["answer"] for state in states]


if __name__ == "__main__":
    main()
