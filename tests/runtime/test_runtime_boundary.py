"""A tensor reaches its runtime only through the named TensorBackend interface."""

from __future__ import annotations

import ast
from pathlib import Path

import kbus.runtime.tensor as tensor_module
from kbus.runtime.tensor import TensorBackend


def test_tensor_module_calls_no_private_runtime_method() -> None:
    tree = ast.parse(Path(tensor_module.__file__).read_text())
    offenders = [
        f"line {node.lineno}: .runtime.{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and isinstance(node.value, ast.Attribute)
        and node.value.attr in ("runtime", "_backend", "device")
    ]
    assert offenders == []


def test_the_runtime_implements_the_backend_interface() -> None:
    from kbus.runtime import Runtime

    wanted = [name for name in vars(TensorBackend) if not name.startswith("_")]
    assert len(wanted) >= 9
    missing = [name for name in wanted if not callable(getattr(Runtime, name, None))]
    assert missing == []
