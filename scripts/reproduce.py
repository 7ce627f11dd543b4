"""Execute every notebook headless into outputs/ and write outputs/report.md.

Used by `make reproduce`. Each notebook runs in its own kernel (nbclient), in the
notebooks/ folder, so relative paths behave as in Jupyter. Figures the notebooks save
land in outputs/figures/ (they use ``adjoint_lib.paths.figure_dir()``).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "outputs"


def main() -> int:
    notebooks = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
    OUT.mkdir(exist_ok=True)
    if not notebooks:
        print("reproduce: no notebooks yet in notebooks/ - nothing to execute.")
        (OUT / "report.md").write_text("# Reproduction report\n\nNo notebooks yet.\n")
        return 0
    os.environ.setdefault("ADJOINTDPM_OUTPUTS", str(OUT))
    rows, failed = [], 0
    for path in notebooks:
        print(f"reproduce: executing {path.name} ...", flush=True)
        nb = nbformat.read(path, as_version=4)
        start = time.perf_counter()
        status = "ok"
        try:
            NotebookClient(nb, timeout=1800, kernel_name="python3",
                           resources={"metadata": {"path": str(path.parent)}}).execute()
        except Exception as exc:  # report and continue with the other notebooks
            status = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            failed += 1
        seconds = time.perf_counter() - start
        nbformat.write(nb, OUT / path.name)
        rows.append((path.name, status, seconds))
        print(f"reproduce: {path.name}: {status} ({seconds:.0f} s)", flush=True)
    lines = ["# Reproduction report", "", "| notebook | status | seconds |", "|---|---|---|"]
    lines += [f"| {n} | {s} | {t:.0f} |" for n, s, t in rows]
    for res in sorted(OUT.rglob("*.json")):
        lines += ["", f"## {res.relative_to(OUT)}", "", "```json",
                  json.dumps(json.loads(res.read_text()), indent=1)[:4000], "```"]
    (OUT / "report.md").write_text("\n".join(lines) + "\n")
    print(f"reproduce: report written to {OUT / 'report.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
