"""Strip what must not be committed from executed notebooks: progress-bar widgets and their
text bars, the stored widget state, and this machine's paths in warnings (made relative to the
repository). Used by `make execute` after each run.

    python scripts/clean_notebooks.py notebooks/03_toy_2d.ipynb [...]
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat

ROOT = str(Path(__file__).resolve().parents[1]) + "/"
CELL_FILE = re.compile(r"/tmp/ipykernel_\d+/\d+\.py")

WIDGET = "application/vnd.jupyter.widget-view+json"
BAR = re.compile(r"\d+%\|")


def clean(nb: nbformat.NotebookNode) -> int:
    """Remove progress bars (widget outputs, tqdm text on stderr) and the widget state, and make
    paths in stream outputs relative; return how many outputs were dropped."""
    dropped = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        keep = []
        for out in cell.outputs:
            is_widget = WIDGET in out.get("data", {})
            is_bar = out.get("output_type") == "stream" and out.get("name") == "stderr" and BAR.search(out.get("text", ""))
            if is_widget or is_bar:
                dropped += 1
                continue
            if out.get("output_type") == "stream":
                out["text"] = CELL_FILE.sub("<cell>", out["text"].replace(ROOT, ""))
            keep.append(out)
        cell.outputs = keep
    nb.metadata.pop("widgets", None)
    return dropped


def main(paths: list[str]) -> None:
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        n = clean(nb)
        nbformat.write(nb, path)
        print(f"{path}: {n} progress outputs removed")


if __name__ == "__main__":
    main(sys.argv[1:])
