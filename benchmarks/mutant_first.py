"""A pytest plugin for grading mutants: run first the hidden tests that name the mutated code.

    pytest ... -p benchmarks.mutant_first --mutant-names layer_norm,Value

A mutant is killed by its first failing test (the grade stops there, ``-x``), and the tests most
likely to fail are those that call the function the mutant changed.  Moving them to the front changes
no verdict, only how soon a killed mutant is known: a survivor still runs every test.  Each name is a
word searched in the test's id and source, innermost definition first; a test matching none keeps its
place after those that match.
"""

from __future__ import annotations

import inspect
import re

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--mutant-names", default="", help="names of the mutated function and what encloses it, "
                     "innermost first, comma-separated")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    names = [n for n in config.getoption("--mutant-names").split(",") if n]
    if not names:
        return
    patterns = [re.compile(rf"\b{re.escape(name)}\b") for name in names]

    def rank(item: pytest.Item) -> int:
        try:
            text = item.nodeid + "\n" + inspect.getsource(item.function)
        except (AttributeError, OSError, TypeError):
            text = item.nodeid
        return next((k for k, pattern in enumerate(patterns) if pattern.search(text)), len(patterns))

    items.sort(key=rank)  # stable: the suite's own order within each rank
