"""Every notebook starts with the same setup cell (kept once in adjoint_lib.notebook_setup), and
none forces the hub offline itself (offline mode belongs to the Makefile and CI)."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from adjoint_lib.notebook_setup import REPO_URL, SETUP_CELL

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("0*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_first_code_cell_is_the_setup_cell(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0].source == SETUP_CELL, f"{path.name}: paste adjoint_lib.notebook_setup.SETUP_CELL as its first code cell"
    text = "\n".join(c.source for c in code)
    assert "HF_HUB_OFFLINE" not in text, f"{path.name} sets the hub offline itself"
    assert text.count(REPO_URL) == 1 and "runwayml" not in text


def test_setup_cell_runs_outside_colab_and_installs_on_colab(monkeypatch) -> None:
    import subprocess
    import sys
    import types

    calls = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a[0]))
    exec(SETUP_CELL, {})
    assert calls == []  # nothing happens outside Colab
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setattr("os.path.exists", lambda p: False)
    path_before = list(sys.path)
    try:
        exec(SETUP_CELL, {})
    finally:
        sys.path[:] = path_before
    assert calls[0][:2] == ["git", "clone"] and REPO_URL in calls[0]
    assert calls[1][1:5] == ["-m", "pip", "install", "-q"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_apply_installs_the_setup_cell_and_keeps_the_rest(path: Path, tmp_path: Path) -> None:
    from adjoint_lib.notebook_setup import apply

    copy = tmp_path / path.name
    copy.write_text(path.read_text())
    before = [c.source for c in nbformat.read(copy, as_version=4).cells if c.cell_type == "code"]
    apply(copy)
    assert not apply(copy)  # idempotent
    code = [c.source for c in nbformat.read(copy, as_version=4).cells if c.cell_type == "code"]
    assert code[0] == SETUP_CELL and "HF_HUB_OFFLINE" not in "\n".join(code)
    assert code[-len(before) + 1:] == before[1:]  # every later cell untouched
