"""The package's public names: each one reachable as ``charlstm.<name>``, loaded on first use."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import charlstm


def printed_by(script: str) -> list[str]:
    """The words a Python script prints, run in a fresh interpreter (nothing loaded yet)."""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


@pytest.mark.parametrize("name", charlstm.__all__)
def test_every_public_name_is_the_object_its_module_defines(name):
    value = getattr(charlstm, name)
    module = charlstm._MODULE_OF.get(name)
    if module is not None:
        assert value is getattr(importlib.import_module(module), name)
    assert name in dir(charlstm)


def test_public_names_are_exactly_the_lazy_ones_and_the_packages_own():
    assert sorted(charlstm.__all__) == sorted(
        [*charlstm._MODULE_OF, "__version__", "evaluate", "load"]
    )


def test_type_checkers_see_the_same_names_from_the_same_modules():
    # The `if TYPE_CHECKING:` imports are what editors and type checkers read; the runtime map
    # must name the same objects.
    tree = ast.parse(Path(charlstm.__file__).read_text(encoding="utf-8"))
    block = next(
        node for node in tree.body
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
    )  # fmt: skip
    imported = {
        alias.name: node.module
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert imported == charlstm._MODULE_OF


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="module 'charlstm' has no attribute 'trian'"):
        charlstm.trian  # noqa: B018


def test_importing_the_package_and_its_configuration_does_not_load_torch():
    probe = (
        "import sys, charlstm\n"
        "config = charlstm.RunConfig().with_overrides({'hidden_dim': 64}).validate()\n"
        "print('torch' in sys.modules, config.model.hidden_dim)\n"
        "charlstm.train\n"
        "print('torch' in sys.modules)\n"
    )
    assert printed_by(probe) == ["False", "64", "True"]


@pytest.mark.parametrize("name", charlstm.__all__)
def test_no_public_name_is_also_a_submodule(name):
    # Importing a submodule binds its name on the package: a namesake would replace the
    # function of that name (charlstm.train once did).
    assert importlib.util.find_spec(f"charlstm.{name}") is None
