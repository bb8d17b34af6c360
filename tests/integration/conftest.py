"""Fixtures shared by the integration tests."""

from __future__ import annotations

import pytest

from engine.package import ModelPackage, load_package
from tests.helpers import tiny_package


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> ModelPackage:
    """A tiny real ONNX package (32×32 input), made once per test module; a module may define its own."""
    d = tmp_path_factory.mktemp("pkg") / "tiny"
    tiny_package(d, input_size=(32, 32))
    return load_package(d)
