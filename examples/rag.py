"""Retrieval-augmented QA in one process: embed the documents, retrieve the top-k per question by cosine,
answer with a ``gen`` constrained to cite one of the retrieved documents' ids.

One ``sgl.Runtime`` holds both models: the generator (default: the embedded SmolLM2-135M-Instruct) and
the embedding model beside it (``embedding_model=``; default: the embedded all-MiniLM-L6-v2), so
``runtime.encode`` and the program's ``gen`` share one engine.

    python examples/rag.py [--model PATH] [--embedding-model PATH] [--top-k 2]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

import sglite as sgl

DOCUMENTS = {
    "D1": "The Eiffel Tower was completed in 1889 for the World's Fair in Paris. It is 330 metres tall.",
    "D2": "The Great Wall of China stretches over 21,000 kilometres and was built over many centuries.",
    "D3": "Mount Everest, at 8,849 metres, is the highest mountain above sea level, on the Nepal-China border.",
    "D4": "The Amazon rainforest covers much of the Amazon basin and produces about 20% of the world's oxygen.",
    "D5": "The Colosseum in Rome could hold between 50,000 and 80,000 spectators in the first century.",
    "D6": "Honey never spoils: archaeologists have found edible honey in ancient Egyptian tombs.",
    "D7": "The Python programming language was created by Guido van Rossum and first released in 1991.",
    "D8": "Octopuses have three hearts and blue blood, which carries oxygen with copper instead of iron.",
}

QUESTIONS = [
    "How tall is the Eiffel Tower?",
    "How many people fit in the Colosseum?",
    "Who created Python?",
    "How many hearts does an octopus have?",
]


@dataclass
class Answer:
    question: str
    retrieved: list[str]
    """Ids of the top-k documents, most similar first."""
    answer: str
    cited: str
    """The id the answer cites (always one of ``retrieved``: the regex allows nothing else)."""


def embed(runtime: sgl.Runtime, texts: list[str]) -> np.ndarray:
    """Unit vectors ``[len(texts), dim]`` from the runtime's embedding model."""
    return np.array([out["embedding"] for out in runtime.encode(texts)], dtype=np.float32)


def top_k(query: np.ndarray, documents: np.ndarray, k: int) -> list[int]:
    """Rows of ``documents`` with the highest cosine to ``query`` (vectors are unit length: a dot product)."""
    return np.argsort(-(documents @ query), kind="stable")[:k].tolist()


def citation_regex(ids: list[str]) -> str:
    """An answer sentence, then the citation of one retrieved id: ``... [D3]``."""
    return r"[A-Za-z0-9 ,.'%-]{1,80} \[(" + "|".join(ids) + r")\]"


@sgl.function
def answer_with_sources(s, sources, question):
    s += sgl.system("Answer from the sources in one short sentence, then cite the source id in brackets, like [D1].")
    s += sgl.user("Sources:\n" + sources + "\n\nQuestion: " + question)
    ids = [line[1:].split("]")[0] for line in sources.splitlines()]
    s += sgl.assistant(sgl.gen("answer", max_tokens=40, regex=citation_regex(ids)))


def main(argv: list[str] | None = None) -> list[Answer]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="generation model (default: $SGLITE_MODEL, else the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--embedding-model", default=None, help="embedding model (default: the embedded all-MiniLM-L6-v2)")
    parser.add_argument("--top-k", type=int, default=2, help="documents retrieved per question")
    args = parser.parse_args(argv)
    if args.embedding_model is None:
        from sglite.runtime.loading.default_model import default_embedding_model_path

        args.embedding_model = str(default_embedding_model_path())

    ids = list(DOCUMENTS)
    with sgl.Runtime(args.model, embedding_model=args.embedding_model) as runtime:
        document_vectors = embed(runtime, list(DOCUMENTS.values()))
        question_vectors = embed(runtime, QUESTIONS)
        retrieved = [[ids[i] for i in top_k(q, document_vectors, args.top_k)] for q in question_vectors]
        states = answer_with_sources.run_batch(
            [
                {"sources": "\n".join(f"[{d}] {DOCUMENTS[d]}" for d in hits), "question": question}
                for question, hits in zip(QUESTIONS, retrieved)
            ],
            backend=runtime,
            temperature=0,
        )
    answers = []
    for question, hits, state in zip(QUESTIONS, retrieved, states):
        text = state["answer"]
        answers.append(Answer(question, hits, text, text.rsplit("[", 1)[1].rstrip("]")))
        print(f"{question}\n  retrieved {', '.join(hits)} -> {text}")
    return answers


if __name__ == "__main__":
    main()
