"""How the engine picks its attention implementation, and says why."""

import logging

import pytest

from jpaged.engine.attention import select_attention
from jpaged_kernels import reference


def test_auto_on_cpu_takes_the_reference_and_says_why(caplog, monkeypatch):
    monkeypatch.delenv("JPAGED_ATTENTION", raising=False)
    with caplog.at_level(logging.INFO, logger="jpaged"):
        choice = select_attention(None)
    assert choice.name == "reference" and "no GPU (platform cpu)" in choice.reason
    assert choice.fns.paged_attention is reference.paged_attention
    assert "attention backend: reference (no GPU (platform cpu)" in caplog.text


def test_environment_variable_is_read_when_nothing_is_passed(monkeypatch):
    monkeypatch.setenv("JPAGED_ATTENTION", "reference")
    assert (select_attention(None).name, select_attention(None).reason) == ("reference", "requested")
    monkeypatch.setenv("JPAGED_ATTENTION", "nonsense")
    with pytest.raises(ValueError, match="attention_backend='nonsense' is not one of"):
        select_attention(None)


def test_triton_without_a_gpu_falls_back_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="jpaged"):
        choice = select_attention("triton")
    assert choice.name == "reference"
    assert "attention_backend='triton' needs a GPU but the device is cpu" in caplog.text


def test_mosaic_is_refused_clearly():
    with pytest.raises(ValueError, match="'mosaic' is not available in this build"):
        select_attention("mosaic")
