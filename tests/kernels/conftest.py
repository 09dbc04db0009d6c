"""Kernel tests: make the repo importable without an install; compare in full float32."""

import pathlib
import sys

import jax
import pytest

_ROOT = str(pathlib.Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


@pytest.fixture(autouse=True)
def _highest_matmul_precision():
    """On a GPU, XLA's default float32 matmul is TF32 (~1e-3): the reference would miss the 1e-5
    float32 tolerance the kernels (which ask for full float32) are held to."""
    with jax.default_matmul_precision("highest"):
        yield
