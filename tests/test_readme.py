"""The README is a short product page whose example runs as written."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_is_short():
    assert len(README.splitlines()) <= 150


def test_readme_example_runs_as_written(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "README has no python example"
    code = blocks[0] + "\nassert x_T.grad is not None and text_emb.grad is not None\n" \
                       "assert all(p.grad is not None for p in weights)\nprint('ok')\n"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def test_readme_links_exist():
    for link in re.findall(r"\]\(((?:docs|data)/[^)#]+)\)", README):
        assert (ROOT / link).exists(), link
