"""notebooks/quickstart.ipynb runs top to bottom, shows pictures and writes nothing into the checkout.

The notebook is executed in a fresh kernel (this interpreter, via ipykernel) whose working
directory is an empty temporary folder and whose ``TMPDIR`` is another one, so the run folder
the notebook makes with ``tempfile.mkdtemp()`` can be found and checked, and the pytest temporary
folder takes it away afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip(
    "nbformat", reason="the notebook test needs nbformat (pip install -e '.[test]')"
)
nbclient = pytest.importorskip(
    "nbclient", reason="the notebook test needs nbclient (pip install -e '.[test]')"
)
pytest.importorskip(
    "ipykernel",
    reason="the notebook test needs ipykernel to start a Python kernel (pip install -e '.[test]')",
)
pytest.importorskip(
    "matplotlib", reason="the notebook plots with matplotlib (pip install -e '.[test]')"
)
pytest.importorskip(
    "geopandas",
    reason="the notebook reads nuclei.parquet with geopandas (pip install -e '.[test]')",
)

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


def _listing(folder: Path) -> set[str]:
    """Names in ``folder`` (not recursive), ignored files included."""
    return {p.name for p in folder.iterdir()}


def _git_status() -> str | None:
    """``git status --porcelain`` of the checkout (untracked files listed one by one); None outside git."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=all"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def _images(nb: dict) -> int:
    """Number of PNG images the cells displayed."""
    return sum(
        1
        for cell in nb.cells
        if cell.cell_type == "code"
        for o in cell.get("outputs", [])
        if o.get("output_type") in ("display_data", "execute_result")
        and "image/png" in o.get("data", {})
    )


@pytest.mark.slow
def test_quickstart_notebook_runs_shows_images_and_leaves_the_checkout_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    committed = nbformat.read(NOTEBOOK, as_version=4)
    # kept without outputs: a small repository and clean diffs
    assert all(
        not c.get("outputs") and c.get("execution_count") is None
        for c in committed.cells
        if c.cell_type == "code"
    )

    cwd = tmp_path / "cwd"
    tmp = tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    # the kernel inherits the environment: this checkout's code, temporary files under tmp/
    monkeypatch.setenv(
        "PYTHONPATH",
        os.pathsep.join(
            [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        ),
    )
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    before_git, before_root, before_nb = _git_status(), _listing(REPO), _listing(NOTEBOOK.parent)

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        allow_errors=False,
        resources={"metadata": {"path": str(cwd)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error

    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code_cells)
    errors = [o for c in code_cells for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    assert _images(nb) >= 2, (
        "expected the overlay, the density map and the per-region plots as images"
    )

    # the kernel ran this interpreter and this checkout's code
    probe = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell(
                "import sys, json, wsi_nuclei; print(json.dumps([sys.executable, wsi_nuclei.__file__]))"
            )
        ]
    )
    nbclient.NotebookClient(
        probe, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    ).execute()
    exe, pkg = json.loads(probe.cells[0].outputs[0]["text"])
    assert Path(exe).resolve() == Path(sys.executable).resolve()
    assert Path(pkg).resolve().is_relative_to(REPO)

    # everything went into one mkdtemp() folder: the slide and a complete run
    assert sorted(os.listdir(cwd)) == []
    made = [p for p in tmp.iterdir() if p.name.startswith("wsi-nuclei-quickstart-")]
    assert len(made) == 1, sorted(os.listdir(tmp))
    run_dir = made[0] / "results"
    for name in ("nuclei.parquet", "summary.json", "summary.csv", "run.json", "report.html"):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["region_name"] for r in summary["regions"]] == ["Left half", "Right half"]
    assert summary["slide"]["n_nuclei"] > 0
    assert (
        json.loads((run_dir / "run.json").read_text())["model"]["name"] != "classic"
    )  # the bundled model

    # nothing new in the checkout
    assert _listing(REPO) == before_root
    assert _listing(NOTEBOOK.parent) == before_nb
    assert _git_status() == before_git
