"""The main job: `jpaged generate` on the default SmolLM2, as a user runs it."""

import re
import subprocess
import sys


def test_jpaged_generate_prints_answers_and_summary():
    proc = subprocess.run(
        [sys.executable, "-m", "jpaged.entrypoints.cli", "generate", "--prompt", "What is the capital of France?",
         "--prompt", "Name a primary color.", "--max-tokens", "16", "--max-model-len", "256",
         "--num-pages", "64"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "### What is the capital of France?" in out and "Paris" in out
    assert re.search(r"2 requests, \d+ prompt tokens, \d+ output tokens", out)
    assert re.search(r"throughput: [\d.]+ output tokens/s", out)
    assert "KV pages used:" in out and "of 63 at peak" in out and "all free again: True" in out
    assert "attention backend: reference" in out
    assert "KV cache: 64 pages x 16 tokens" in proc.stderr          # the engine logs its choices


def test_jpaged_generate_reports_bad_arguments():
    proc = subprocess.run([sys.executable, "-m", "jpaged.entrypoints.cli", "generate", "--max-tokens", "0",
                           "--num-pages", "64", "--max-model-len", "256"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert "jpaged: error: SamplingParams: max_tokens must be at least 1, got 0" in proc.stderr
    assert "Traceback" not in proc.stderr
