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
