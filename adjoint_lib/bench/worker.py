"""``python -m adjoint_lib.bench.worker <job.json>``: run one benchmark job in this fresh process
and write its result to the job's ``result_path`` (started by
:func:`~adjoint_lib.bench.jobs.run_isolated`)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

from ..io import write_json
from .jobs import PACKAGE_PARENT, job_key, run_job


def main(argv: Sequence[str] | None = None) -> None:
    """Read the job file named by the one argument, run it, write its result."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        raise SystemExit("usage: python -m adjoint_lib.bench.worker <job.json>")
    job = json.loads(Path(argv[0]).read_text())
    expected = job.get("package_parent")
    if expected is not None and Path(expected).resolve() != PACKAGE_PARENT:
        raise SystemExit(f"the worker imported adjoint_lib from {PACKAGE_PARENT}, the job was made by the "
                         f"one in {expected}: start the worker in {expected}")
    write_json(job["result_path"], dict(run_job(job), key=job_key(job)), indent=None)


if __name__ == "__main__":
    main()
