"""The host control plane is standard library + NumPy: importing it must not import jax."""

import subprocess
import sys


def test_importing_jpaged_core_does_not_import_jax():
    code = ("import sys, jpaged, jpaged.core.block_manager, jpaged.core.scheduler, "
            "jpaged.core.sequence, jpaged.core.structured, jpaged.sampling_params, jpaged.outputs; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_public_names_still_import_from_jpaged():
    from jpaged import LLM, CompletionOutput, Logprob, RequestOutput, SamplingParams
    assert LLM.__module__ == "jpaged.entrypoints.llm"
    assert {SamplingParams.__name__, RequestOutput.__name__, CompletionOutput.__name__,
            Logprob.__name__} == {"SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"}
