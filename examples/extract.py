"""Structured extraction for batch jobs: one JSON record per input row.

    python -m sglite run examples/extract.py:extract --input examples/extract_rows.jsonl --output out.jsonl
    python examples/extract.py [--model PATH]      # a few rows, printed

Each input row is ``{"text": "..."}``; each output row holds the extracted ``contact`` (a JSON
string following ``Contact``'s schema) and the program's return value (the parsed record).
"""

from __future__ import annotations

import argparse

from pydantic import BaseModel, Field

import sglite as sgl


class Contact(BaseModel):
    name: str = Field(max_length=32)
    email: str = Field(max_length=48)
    company: str = Field(max_length=32)


@sgl.function
def extract(s, text):
    s += sgl.system("Extract the contact details from the text as JSON.")
    s += sgl.user(text)
    s += sgl.assistant(sgl.gen("contact", json_schema=Contact, max_tokens=128, temperature=0))
    return Contact.model_validate_json(s["contact"]).model_dump()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model path (default: $SGLITE_MODEL, else the embedded SmolLM2-135M-Instruct)")
    args = parser.parse_args(argv)

    rows = [
        "Reach Ada Lovelace at ada@analytical.org, Analytical Engines Ltd.",
        "Contact: Grace Hopper (grace@navy.mil), US Navy",
    ]
    with sgl.Runtime(args.model) as runtime:
        records = [state.ret_value for state in extract.run_batch([{"text": r} for r in rows], backend=runtime)]
    for record in records:
        print(record)
    return records


if __name__ == "__main__":
    main()
