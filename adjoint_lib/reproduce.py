"""``make reproduce``: execute the notebooks headless, one kernel each, and write the report.

::

    python scripts/reproduce.py [--notebooks 01 03 ...] [--out outputs] [--timeout S]

Each notebook runs in a fresh kernel (nbclient) in its own folder, with ``ADJOINTDPM_OUTPUTS=<out>``,
this checkout's ``adjoint_lib`` first on the path and matplotlib's inline backend. It is saved executed
to ``<out>/notebooks/<name>.ipynb`` and exported to ``<out>/notebooks/<name>.html`` (nbconvert); a
failing cell stops that notebook only. Then :func:`adjoint_lib.report.write_report` writes
``<out>/report.md`` and ``<out>/report.html``. Exit code: :func:`adjoint_lib.report.exit_code`.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from .io import atomic_path, check_out, write_text
from .paths import ROOT
from .report import (CHECK_MARKER, NotebookRun, benchmark_checks, checked_claims, exit_code, gathered_metrics,
                     key_figures, machine, strip_ansi, write_report)


# =========================================================================== running notebooks
def _cell_error(nb: dict, index: int | None, exc: BaseException, timed_out_after: int | None = None) -> str:
    """``In [k] (`first source line`): Name: message`` for the cell (``nb["cells"][index]``) that
    stopped the notebook; for a cell stopped by the time limit, the limit."""
    what = f"{getattr(exc, 'ename', type(exc).__name__)}: {getattr(exc, 'evalue', None) or exc}"
    if timed_out_after is not None:
        what = f"still running after {timed_out_after} s (--timeout)"
    elif index is not None:
        for out in nb["cells"][index].get("outputs", []):
            if out.get("output_type") == "error":
                what = f"{out.get('ename')}: {out.get('evalue')}"
    what = strip_ansi(what).strip().splitlines()[0][:300] if what.strip() else type(exc).__name__
    if index is None:
        return what
    src = next((ln.strip() for ln in nb["cells"][index].get("source", "").splitlines()
                if ln.strip() and ln.strip() != CHECK_MARKER), "")
    k = sum(c.get("cell_type") == "code" for c in nb["cells"][:index + 1])
    return f"In [{k}] (`{src[:70]}`): {what}"


def kernel_env(out: str | os.PathLike) -> dict[str, str]:
    """The notebooks' environment: this one, with outputs under ``out``, this checkout's
    ``adjoint_lib`` first on the path and matplotlib's inline backend (figures become outputs)."""
    env = {**os.environ, "ADJOINTDPM_OUTPUTS": str(Path(out).resolve()),
           "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    return env


def run_notebook(path: str | os.PathLike, out: str | os.PathLike, timeout: int = 1800,
                 kernel_name: str = "python3") -> NotebookRun:
    """Execute ``path`` (stored outputs cleared first) in a fresh kernel, save and export it under
    ``<out>/notebooks/`` and read its claims, figures and metrics. Never raises for a failing cell."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError

    path, out = Path(path), Path(out)
    try:
        committed = nbformat.read(path, as_version=4)
    except Exception as exc:  # an unreadable notebook is reported like a failed one
        return NotebookRun(path.stem, "failed", 0.0, f"cannot read {path}: {type(exc).__name__}: {exc}"[:300])
    nb = copy.deepcopy(committed)
    for c in nb.cells:
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    started: list[int] = []
    client = NotebookClient(nb, timeout=timeout, kernel_name=kernel_name,
                            resources={"metadata": {"path": str(path.parent)}},
                            on_cell_start=lambda cell, cell_index: started.append(cell_index))
    status, error, t0 = "ok", None, time.perf_counter()
    try:
        client.execute(env=kernel_env(out))
    except Exception as exc:  # the report says which cell failed; the other notebooks still run
        timed_out = isinstance(exc, CellTimeoutError)
        status = "timed out" if timed_out else "failed"
        error = _cell_error(nb, started[-1] if started else None, exc, timeout if timed_out else None)
    run = NotebookRun(path.stem, status, time.perf_counter() - t0, error, checked_claims(committed, nb),
                      key_figures(nb), gathered_metrics(nb))
    run.exported = export(nb, out / "notebooks", path.stem)
    return run


def export(nb: Any, folder: str | os.PathLike, stem: str) -> dict[str, Path]:
    """Write ``nb`` to ``<folder>/<stem>.ipynb`` and ``.html`` (nbconvert's HTMLExporter), atomically."""
    import nbformat
    from nbconvert import HTMLExporter

    folder = Path(folder)
    files = {"ipynb": folder / f"{stem}.ipynb", "html": folder / f"{stem}.html"}
    with atomic_path(files["ipynb"]) as tmp:
        nbformat.write(nb, str(tmp))
    try:
        body, _ = HTMLExporter().from_notebook_node(nb)
        write_text(files["html"], body)
    except Exception as exc:  # the report is still written without this notebook's HTML
        warnings.warn(f"{stem}: HTML export failed: {type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)
        del files["html"]
    return files


# =========================================================================== the command
def select_notebooks(items: Sequence[str] | None, folder: str | os.PathLike | None = None) -> list[Path]:
    """Notebooks to run: every ``NN_*.ipynb`` in ``folder`` (default ``notebooks/``), or those whose
    number or name prefix is in ``items``; an item that is a path to an ``.ipynb`` file is taken as is."""
    folder = Path(folder) if folder is not None else ROOT / "notebooks"
    available = sorted(folder.glob("[0-9]*.ipynb"))
    if not items:
        return available
    chosen = []
    for item in items:
        if item.endswith(".ipynb"):
            if not Path(item).is_file():
                raise SystemExit(f"--notebooks {item}: no such notebook file")
            chosen.append(Path(item))
            continue
        match = [p for p in available if p.name.startswith(item)]
        if not match:
            raise SystemExit(f"--notebooks {item}: no notebook in {folder} starts with {item!r}; "
                             f"choose from {', '.join(p.name[:2] for p in available)}")
        chosen += match
    return list(dict.fromkeys(chosen))


def reproduce(notebooks: Sequence[str | os.PathLike], out: str | os.PathLike = "outputs", timeout: int = 1800,
              kernel_name: str = "python3", command: str = "", log: Callable[[str], None] = print) -> int:
    """Run ``notebooks`` one after the other, write the report under ``out``; return the exit code."""
    out = check_out(Path(out))
    since, t0 = time.time(), time.perf_counter()
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    runs = []
    for k, path in enumerate(map(Path, notebooks), 1):
        log(f"reproduce [{k}/{len(notebooks)}] {path.name} ...")
        run = run_notebook(path, out, timeout, kernel_name)
        n_hold = sum(c.verdict == "holds" for c in run.claims)
        log(f"reproduce [{k}/{len(notebooks)}] {path.name}: {run.status} in {run.seconds:.0f} s, "
            f"{n_hold}/{len(run.claims)} checked claims hold" + (f"; {run.error}" if run.error else ""))
        runs.append(run)
    info = {**machine(), "date": date, "total_seconds": time.perf_counter() - t0, "command": command}
    md, page = write_report(runs, out, info, benchmark_checks(out, since))
    code = exit_code(runs)
    log(f"reproduce: report in {md} and {page}; exit code {code}")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of ``scripts/reproduce.py``."""
    p = argparse.ArgumentParser(description="Execute the notebooks headless and write <out>/report.md and "
                                            "report.html (exit code 1 when a notebook fails or a claim does not hold).")
    p.add_argument("--notebooks", nargs="+", metavar="NN", default=None,
                   help="numbers (or name prefixes, or .ipynb paths) of the notebooks to run, e.g. 01 03 (default: all)")
    p.add_argument("--out", default=str(ROOT / "outputs"), help="output folder (default: outputs/)")
    p.add_argument("--timeout", type=int, default=1800, metavar="S",
                   help="seconds one cell may run before it counts as failed (default 1800)")
    p.add_argument("--kernel", default="python3", help="Jupyter kernel name (default python3)")
    a = p.parse_args(argv)
    if a.timeout <= 0:
        raise SystemExit(f"--timeout must be a positive number of seconds, got {a.timeout}")
    notebooks = select_notebooks(a.notebooks)
    if not notebooks:
        raise SystemExit("no notebooks to run in notebooks/")
    command = "python scripts/reproduce.py " + " ".join(argv if argv is not None else sys.argv[1:])
    return reproduce(notebooks, a.out, a.timeout, a.kernel, command.strip())
