"""Execute the notebooks headless and write outputs/report.md and outputs/report.html.

``make reproduce`` runs it; ``python scripts/reproduce.py --notebooks 01 03 --timeout 600`` runs a
subset. See :mod:`adjoint_lib.reproduce` (the run) and :mod:`adjoint_lib.report` (what the report shows).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's adjoint_lib

from adjoint_lib.reproduce import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
