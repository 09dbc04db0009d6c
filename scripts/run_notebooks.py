"""Execute the notebooks in notebooks/ top to bottom with nbclient, in a kernel running this Python.

    .venv/bin/python scripts/run_notebooks.py                 # all, full sizes, outputs saved in place
    .venv/bin/python scripts/run_notebooks.py --quick 03      # JPAGED_NOTEBOOK_QUICK=1, names matching "03"
    .venv/bin/python scripts/run_notebooks.py --check         # run, do not write (what CI does)

Each notebook runs with its folder as the working directory and JPAGED_REPO="" (the install cell finds
the checkout). Any cell error (the notebooks end with a cell of assertions) fails the run.
tests/test_notebooks.py uses `execute` from here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
KERNEL_NAME = "jpaged-notebook-python"


def notebooks(patterns: list[str] | None = None) -> list[Path]:
    found = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    return [p for p in found if not patterns or any(s in p.name for s in patterns)]


def _kernelspec_dir() -> str:
    """A Jupyter data dir holding one kernelspec that runs sys.executable (this venv's Python), so a
    system-wide `python3` kernel can never be picked instead."""
    data_dir = Path(tempfile.mkdtemp(prefix="jpaged-kernels-"))
    spec_dir = data_dir / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python (jpaged notebooks)", "language": "python"}))
    return str(data_dir)


def execute(path: Path, quick: bool, timeout: float = 900.0):
    """Run the notebook at `path`; return (the executed NotebookNode, seconds). Raises
    nbclient.exceptions.CellExecutionError on the first failing cell."""
    import nbclient
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    saved_env = dict(os.environ)
    os.environ.update(JPAGED_REPO="", JPAGED_NOTEBOOK_QUICK="1" if quick else "0",
                      JUPYTER_PATH=_kernelspec_dir(), PYDEVD_DISABLE_FILE_VALIDATION="1")
    start = time.perf_counter()
    try:
        client = nbclient.NotebookClient(notebook, timeout=timeout, kernel_name=KERNEL_NAME,
                                         resources={"metadata": {"path": str(path.parent)}})
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
    notebook.metadata.pop("widgets", None)
    notebook.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python",
                                       "name": "python3"}    # what Colab and Jupyter expect
    return notebook, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="substrings of notebook names (default: all)")
    parser.add_argument("--quick", action="store_true", help="JPAGED_NOTEBOOK_QUICK=1")
    parser.add_argument("--check", action="store_true", help="do not write the outputs back")
    args = parser.parse_args()
    import nbformat

    for path in notebooks(args.names):
        notebook, seconds = execute(path, args.quick)
        print(f"{path.name}: ran in {seconds:.1f} s", flush=True)
        if not args.check:
            nbformat.write(notebook, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
