"""The committed notebooks are clean to read and to validate anywhere: no stored progress bars,
no machine paths, no bulky widget state, checked cells that print claims rather than raw floats."""
import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9]*.ipynb"))
MACHINE_PATH = re.compile(r"(/work/|/tmp/|/home/|/root/|/Users/|[A-Z]:\\\\Users)")
PROGRESS_BAR = re.compile(r"\d+%\|")  # tqdm's text bar, e.g. "  0%|          | 0/20"
FLOAT = re.compile(r"\d\.\d|\de[-+]?\d")
CLAIM = re.compile(r"(True|False)\W*$")


def _texts(cell):
    for out in cell.get("outputs", []):
        if "text" in out:
            yield "".join(out["text"])
        for mime, data in out.get("data", {}).items():
            if mime.startswith("text/") or mime.endswith("json"):
                yield data if isinstance(data, str) else json.dumps(data)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_outputs_are_clean(path):
    nb = json.loads(path.read_text())
    assert len(json.dumps(nb["metadata"].get("widgets", {}))) < 4000, "strip the stored widget state"
    for i, cell in enumerate(nb["cells"]):
        for out in cell.get("outputs", []):
            assert "application/vnd.jupyter.widget-view+json" not in out.get("data", {}), \
                f"cell {i}: a stored widget (progress bar?); execute with TQDM_DISABLE=1"
        for text in _texts(cell):
            assert not PROGRESS_BAR.search(text), f"cell {i}: stored progress bar"
            assert not MACHINE_PATH.search(text), f"cell {i}: machine path in the output"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_checked_cells_print_claims_not_floats(path):
    """A checked cell's output must hold on any CPU: each line is a claim ending in True/False
    (its text may name tolerances) or carries no computed float; numbers read from committed
    files are exempt when the cell says so with `# shipped`."""
    nb = json.loads(path.read_text())
    for i, cell in enumerate(nb["cells"]):
        src = "".join(cell["source"])
        checked = any(line.strip() == "# NBVAL_CHECK_OUTPUT" for line in src.splitlines())
        if cell["cell_type"] != "code" or not checked or "# shipped" in src:
            continue
        for text in _texts(cell):
            bad = [ln for ln in text.splitlines() if FLOAT.search(ln) and not CLAIM.search(ln)]
            assert not bad, f"cell {i} prints raw floats: {bad[:2]}; print a claim instead"


COURSE = [p for p in NOTEBOOKS if p.name[:2] in {"01", "02", "03", "04", "05", "06", "08"}]


@pytest.mark.parametrize("path", COURSE, ids=lambda p: p.name)
def test_exercises_have_checks_and_hidden_solutions(path):
    """At least two exercises, each with a check cell and a solution hidden by default whose own
    check is validated by nbval."""
    cells = json.loads(path.read_text())["cells"]
    solutions = [c for c in cells if "solution" in c.get("metadata", {}).get("tags", [])]
    assert len(solutions) >= 2, "fewer than two exercises with solutions"
    for c in solutions:
        src = "".join(c["source"])
        assert c["metadata"].get("jupyter", {}).get("source_hidden"), "solution not hidden"
        assert "# NBVAL_CHECK_OUTPUT" in src and "check(" in src, "solution does not check itself"
        assert "correct" in "".join("".join(o.get("text", "")) for o in c.get("outputs", [])), "stored solution not correct"
    checks = [c for c in cells if c["cell_type"] == "code" and "check(" in "".join(c["source"])
              and "solution" not in c.get("metadata", {}).get("tags", [])]
    assert len(checks) >= len(solutions), "an exercise without a check cell for the student"
