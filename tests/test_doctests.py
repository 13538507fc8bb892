"""The runnable examples in the docstrings of the modules people read first."""

import doctest
import importlib

import pytest

MODULES = ["lightning_kd.features", "lightning_kd.data.indexed", "lightning_kd.terms.base",
           "lightning_kd.methods.distiller"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no example"
    assert result.failed == 0
