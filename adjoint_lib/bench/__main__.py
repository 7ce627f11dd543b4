"""``python -m adjoint_lib.bench``: see :func:`adjoint_lib.bench.cli.main`."""
from .cli import main

main()
