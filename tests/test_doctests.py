"""Every docstring example in the package runs and is true (``doctest``, as ``--doctest-modules`` would).

The repository root is the package, so pytest's own ``--doctest-modules`` would import each module a
second time under the checkout's directory name; here every module is imported as ``sglite.*`` once.
Lines that need a model or a server are marked ``# doctest: +SKIP`` in the docstring itself.
"""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("radix", "constraints", "runtime", "lang", "srt")


def package_modules() -> list[str]:
    names = ["sglite"]
    for layer_dir in PACKAGE_DIRS:
        for path in sorted((ROOT / layer_dir).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            names.append(".".join(("sglite", *(parts[:-1] if parts[-1] == "__init__" else parts))))
    return names + ["sglite.demo", "sglite.__main__"]


@pytest.mark.parametrize("name", package_modules())
def test_docstring_examples_are_true(name: str):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    for test in finder.find(module, name):
        if test.examples:
            runner.run(test, out=report.append)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, "".join(report)


def test_a_false_example_fails():
    # The harness itself must be able to fail.
    def documented() -> None:
        """
        >>> 1 + 1
        3
        """

    runner = doctest.DocTestRunner()
    for test in doctest.DocTestFinder().find(documented, "documented", globs={}):
        runner.run(test, out=lambda _: None)
    assert runner.summarize(verbose=False).failed == 1
