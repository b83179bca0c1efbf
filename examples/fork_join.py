"""Fork/join: expand several tips in parallel, then summarize them.

``s.fork(n)`` copies the state; the copies run at once (the engine batches them) and share
the prefix computed once. ``join`` waits for them; their variables are then readable.

    python examples/fork_join.py [--model PATH]
"""

from __future__ import annotations

import argparse

import sglite as sgl


@sgl.function
def tip_suggestion(s, topic, num_tips=3):
    s += f"Here are {num_tips} short tips for {topic}.\n"
    for i in range(num_tips):
        s += f"{i + 1}." + sgl.gen(f"tip_{i}", max_tokens=12, stop=["\n", "."]) + "\n"

    forks = s.fork(num_tips)
    for i, f in enumerate(forks):
        f += f"Now, expand tip {i + 1} into a paragraph:\n" + sgl.gen("detail", max_tokens=32, stop="\n\n")
    forks.join()

    s += "Tips and details:\n"
    for i, f in enumerate(forks):
        s += f"{i + 1}. {s[f'tip_{i}'].strip()}: {f['detail'].strip()}\n"
    s += "In summary," + sgl.gen("summary", max_tokens=24)
    return [f.get_meta_info("detail")["cached_tokens"] for f in forks]


def main(argv: list[str] | None = None) -> sgl.ProgramState:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model path (default: $SGLITE_MODEL, else the embedded SmolLM2-135M-Instruct)")
    args = parser.parse_args(argv)

    with sgl.Runtime(args.model) as runtime:
        state = tip_suggestion.run(topic="staying healthy", backend=runtime, temperature=0)
        print(state.text())
        print("prompt tokens served from cache, per branch:", state.ret_value)
        return state


if __name__ == "__main__":
    main()
