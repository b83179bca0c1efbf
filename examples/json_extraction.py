"""JSON extraction with a pydantic model: the output is constrained to the model's schema,
so it always parses, whatever the model.

    python examples/json_extraction.py [--model PATH]
"""

from __future__ import annotations

import argparse
from typing import Literal

from pydantic import BaseModel, Field

import sglite as sgl


class Order(BaseModel):
    item: str = Field(max_length=24)
    quantity: int = Field(ge=1, le=100)
    priority: Literal["low", "normal", "urgent"]


MESSAGES = [
    "Hi, please send 3 boxes of blue pens, no rush.",
    "URGENT: we need 40 chairs for tomorrow's event!",
]


@sgl.function
def extract_order(s, message):
    s += sgl.system("Extract the order from the customer's message as JSON.")
    s += sgl.user(message)
    s += sgl.assistant(sgl.gen("order", json_schema=Order, max_tokens=96))


def main(argv: list[str] | None = None) -> list[Order]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model path (default: $SGLITE_MODEL, else the embedded SmolLM2-135M-Instruct)")
    args = parser.parse_args(argv)

    with sgl.Runtime(args.model) as runtime:
        orders = []
        for state in extract_order.run_batch([{"message": m} for m in MESSAGES], backend=runtime, temperature=0):
            order = Order.model_validate_json(state["order"])  # cannot fail: the output followed the schema
            print(repr(order))
            orders.append(order)
        return orders


if __name__ == "__main__":
    main()
