"""Every example runs on the real default model (SmolLM2-135M-Instruct), and the tour notebook executes cell by cell."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves annotations through the module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_few_shot_qa_reuses_the_shared_prefix(real_model_path, capsys):
    example = load_example("few_shot_qa")
    answers = example.main(["--model", real_model_path])
    assert len(answers) == len(example.QUESTIONS) and all(isinstance(a, str) for a in answers)
    prompt, cached = map(int, re.search(r"prompt tokens (\d+), served from cache (\d+)", capsys.readouterr().out).groups())
    # All but the first question reuse the few-shot examples: most prompt tokens come from the cache.
    assert cached > prompt / 2, (prompt, cached)


@pytest.mark.slow
def test_json_extraction_always_parses(real_model_path):
    orders = load_example("json_extraction").main(["--model", real_model_path])
    assert len(orders) == 2 and all(1 <= o.quantity <= 100 for o in orders)


@pytest.mark.slow
def test_fork_join_branches_hit_the_cache(real_model_path):
    state = load_example("fork_join").main(["--model", real_model_path])
    assert state["summary"] and all(cached > 0 for cached in state.ret_value)


@pytest.mark.slow
def test_rag_retrieves_by_embedding_and_cites_a_retrieved_id(real_model_path):
    example = load_example("rag")
    answers = example.main(["--model", real_model_path])
    assert [a.retrieved[0] for a in answers] == ["D1", "D5", "D7", "D8"]  # each question's own document first
    for a in answers:
        assert len(a.retrieved) == 2 and a.cited in a.retrieved
        assert re.fullmatch(example.citation_regex(a.retrieved), a.answer), a.answer


@pytest.mark.slow
def test_extract_returns_records(real_model_path, monkeypatch):
    monkeypatch.setenv("SGLITE_MODEL", real_model_path)  # the examples' default model
    records = load_example("extract").main([])
    assert [sorted(r) for r in records] == [["company", "email", "name"]] * 2


@pytest.mark.slow
def test_tour_notebook_executes(real_model_path):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(EXAMPLES / "tour.ipynb", as_version=4)
    os.environ["SGLITE_MODEL"] = real_model_path  # inherited by the kernel
    try:
        NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(EXAMPLES)}}).execute()
    finally:
        del os.environ["SGLITE_MODEL"]
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    html = [out["data"]["text/html"] for out in outputs if "text/html" in out.get("data", {})]
    assert any('title="answer"' in h for h in html)  # a state rendered with its variables highlighted


@pytest.mark.slow
def test_demo_main_job_extracts_and_classifies_correctly(real_model_path, capsys):
    import sglite as sgl
    from sglite.demo import load_labelled, run_demo

    with sgl.Runtime(real_model_path) as runtime:
        report = run_demo(runtime)
    assert report.valid_objects == len(load_labelled("labelled_bios"))
    assert report.fields_correct >= 0.8 * report.fields_total
    assert report.sentiment_correct >= 0.8 * report.sentiment_total
    assert report.cached_tokens > report.prompt_tokens / 3  # the shared system prompts come from the cache
