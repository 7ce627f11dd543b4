"""The first code cell of every notebook, kept here once (``tests/test_notebook_setup.py``
checks each ``notebooks/0*.ipynb`` against it): on Google Colab it clones the repository
(library and shipped weights) and installs it, leaving the Hugging Face Hub online for the
``sd`` profile; anywhere else it does nothing (offline mode belongs to the Makefile and CI)."""

#: The repository, cloned on Colab (the URL appears nowhere else in the notebooks).
REPO_URL = "https://github.com/adjointdpm-repro/adjointdpm-repro"

SETUP_CELL = f'''\
# Setup, the same in every notebook: on Google Colab, clone the repository (library + shipped
# weights) and install it; the Hugging Face Hub stays online there for the `sd` profile.
# Elsewhere this does nothing (install with `make venv`; the Makefile and CI run offline).
import os, subprocess, sys
REPO_URL = "{REPO_URL}"
if "google.colab" in sys.modules:
    REPO = "/content/adjointdpm-repro"
    if not os.path.exists(REPO):
        subprocess.run(["git", "clone", "-q", "--depth", "1", REPO_URL, REPO], check=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", REPO], check=True)
    sys.path.insert(0, REPO)'''


def apply(path: str) -> bool:
    """Make ``SETUP_CELL`` the first code cell of the notebook at ``path``: a first cell that
    fetches the repository on Colab is split, its Colab block and any ``HF_HUB_OFFLINE`` default
    dropped and the rest (imports, settings) kept as the next cell. Returns whether it changed."""
    import nbformat

    from .io import write_text

    nb = nbformat.read(path, as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    if first.source == SETUP_CELL:
        return False
    lines, keep, in_colab = first.source.split("\n"), [], False
    for line in lines:
        if line.startswith('if "google.colab" in sys.modules'):
            in_colab = True
            continue
        if in_colab and (line.startswith((" ", "\t")) or not line.strip()):
            continue
        in_colab = False
        if "HF_HUB_OFFLINE" in line or line.strip() == "import os, subprocess, sys":
            continue
        keep.append(line)
    rest = "\n".join(keep).strip("\n")
    first.source, first.outputs, first.execution_count = SETUP_CELL, [], None
    if rest:
        nb.cells.insert(nb.cells.index(first) + 1, nbformat.v4.new_code_cell(rest))
    nbformat.validate(nb)
    write_text(path, nbformat.writes(nb) + "\n")
    return True


if __name__ == "__main__":  # python -m adjoint_lib.notebook_setup notebooks/0*.ipynb
    import sys

    for p in sys.argv[1:]:
        print(p, "updated" if apply(p) else "already has the setup cell")
