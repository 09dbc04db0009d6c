"""How the engine picks its attention implementation, and says why: every branch of the choice.

The GPU branches run here on CPU by passing `platform="gpu"` and the real Triton kernels in Pallas
interpret mode (so the probe really runs them), or kernels broken on purpose."""

import functools
import logging

import pytest

import jpaged_kernels
from jpaged.engine.attention import ProbeShape, probe_kernels, select_attention
from jpaged.models import AttentionFns
from jpaged_kernels import reference

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")

SMOLLM2 = ProbeShape(num_heads=9, num_kv_heads=3, head_dim=64, dtype="float32", page_size=16)
INTERPRETED_TRITON = AttentionFns(
    functools.partial(jpaged_kernels.paged_attention, interpret=True),
    functools.partial(jpaged_kernels.ragged_paged_attention, interpret=True))


def ignores_layer(fn):
    """A kernel with a bug the old probe could not see: it always reads layer 0."""
    def wrong(q, k, v, *args, layer=None, **kwargs):
        return fn(q, k[0], v[0], *args, **kwargs)
    return wrong


def raises(*args, **kwargs):
    raise NotImplementedError("Mosaic lowering rule for gather not implemented")


BROKEN = {
    "wrong answer": AttentionFns(ignores_layer(reference.paged_attention),
                                 ignores_layer(reference.ragged_paged_attention)),
    "lowering error": AttentionFns(raises, raises),
}


def test_auto_on_cpu_takes_the_reference_and_says_why(caplog, monkeypatch):
    monkeypatch.delenv("JPAGED_ATTENTION", raising=False)
    with caplog.at_level(logging.INFO, logger="jpaged"):
        choice = select_attention(None, SMOLLM2)
    assert choice.name == "reference" and "no GPU (platform cpu)" in choice.reason
    assert choice.fns.paged_attention is reference.paged_attention
    assert "attention backend: reference (no GPU (platform cpu)" in caplog.text


def test_environment_variable_is_read_when_nothing_is_passed(monkeypatch):
    monkeypatch.setenv("JPAGED_ATTENTION", "reference")
    choice = select_attention(None, SMOLLM2)
    assert (choice.name, choice.reason) == ("reference", "requested")
    monkeypatch.setenv("JPAGED_ATTENTION", "nonsense")
    with pytest.raises(ValueError, match="attention_backend='nonsense' is not one of"):
        select_attention(None, SMOLLM2)


def test_explicit_triton_without_a_gpu_raises():
    with pytest.raises(ValueError, match="attention_backend='triton' needs a GPU, but the device "
                                         "is cpu; use 'auto' or 'reference'"):
        select_attention("triton", SMOLLM2)


def test_mosaic_is_refused_clearly():
    with pytest.raises(ValueError, match="'mosaic': the Mosaic GPU kernel is not available"):
        select_attention("mosaic", SMOLLM2)


@pytest.mark.parametrize("requested", ["auto", "triton"])
def test_working_kernels_pass_the_probe_and_are_chosen(requested, caplog):
    with caplog.at_level(logging.INFO, logger="jpaged"):
        choice = select_attention(requested, SMOLLM2, platform="gpu",
                                  triton_fns=INTERPRETED_TRITON)
    assert choice.name == "triton" and choice.fns is INTERPRETED_TRITON
    assert choice.reason == ("GPU detected" if requested == "auto" else "requested")
    assert f"attention backend: triton ({choice.reason})" in caplog.text


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_auto_falls_back_with_a_warning_naming_the_failure(broken, caplog):
    with caplog.at_level(logging.WARNING, logger="jpaged"):
        choice = select_attention("auto", SMOLLM2, platform="gpu", triton_fns=BROKEN[broken])
    assert (choice.name, choice.reason) == ("reference", "Triton kernels unavailable")
    assert choice.fns.paged_attention is reference.paged_attention
    expected = "differs from the reference" if broken == "wrong answer" else "NotImplementedError"
    assert "failed on this GPU" in caplog.text and expected in caplog.text
    assert "falling back to the reference attention" in caplog.text


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_explicit_triton_raises_with_the_reason(broken):
    expected = "differs from the reference" if broken == "wrong answer" else \
        "NotImplementedError: Mosaic lowering rule"
    with pytest.raises(RuntimeError, match=f"attention_backend='triton' cannot be used: .*{expected}"):
        select_attention("triton", SMOLLM2, platform="gpu", triton_fns=BROKEN[broken])


def test_probe_uses_the_models_shapes_dtype_and_window():
    """The probe calls the kernels as the model will: a kernel that only breaks for this model's
    shape (here: any sliding window) fails the probe for that model and passes for others."""
    def no_window(fn):
        def checked(*args, sliding_window=None, **kwargs):
            if sliding_window is not None:
                raise ValueError(f"sliding_window={sliding_window} unsupported")
            return fn(*args, **kwargs)
        return checked

    fns = AttentionFns(no_window(reference.paged_attention),
                       no_window(reference.ragged_paged_attention))
    probe_kernels(fns, SMOLLM2)
    mistral = ProbeShape(num_heads=8, num_kv_heads=2, head_dim=32, dtype="bfloat16",
                         page_size=8, sliding_window=24)
    with pytest.raises(ValueError, match="sliding_window=24 unsupported"):
        probe_kernels(fns, mistral)
