"""The reproduction report (adjoint_lib.report, adjoint_lib.reproduce): two small notebooks built here and executed for real (nbclient, python3
kernel), one failing, one with checked claims, a figure and headline metrics."""
import base64
import io
import json
import os
import re
import time

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from adjoint_lib import report, reproduce
from adjoint_lib.paths import ROOT


def _cell(source, stored=None):
    """A code cell whose committed output is ``stored`` (printed text), as a committed notebook has it."""
    c = new_code_cell(source)
    if stored is not None:
        c.execution_count = 1
        c.outputs = [new_output("stream", name="stdout", text=stored)]
    return c


def _write(path, cells):
    nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                            "language": "python"}})
    nbformat.write(nb, str(path))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Build both notebooks and benchmark files, run the command once; the exit code and the output folder."""
    src, out = tmp_path_factory.mktemp("nb"), tmp_path_factory.mktemp("out")
    failing = _write(src / "01_fails.ipynb", [
        new_markdown_cell("A notebook that fails in its third cell."),
        _cell('print("before the failure")'),
        _cell('# NBVAL_CHECK_OUTPUT\nraise ValueError("deliberate failure for the test")', "x\n"),
        _cell('# NBVAL_CHECK_OUTPUT\nprint("never reached")', "never reached\n"),
    ])
    claims = _write(src / "02_claims.ipynb", [
        _cell("import matplotlib.pyplot as plt\nfrom adjoint_lib.report import headline"),
        _cell('# NBVAL_CHECK_OUTPUT\nprint("two is even:", 2 % 2 == 0)', "two is even: True   \n"),  # trailing blanks
        _cell('# NBVAL_CHECK_OUTPUT\nprint("three is even:", 3 % 2 == 0)', "three is even: True\n"),
        _cell('fig, ax = plt.subplots(figsize=(2, 1.5))\nax.plot([0, 1], [0, 1])\nax.set_title("a line")\nplt.show()'),
        _cell('headline("toy task", "accuracy", 0.9, ">= 0.8", 0.9 >= 0.8)\n'
              'headline("toy task", "loss", 0.5, "<= 0.1", 0.5 <= 0.1)'),
    ])
    # benchmark results: one written "during" the run, one stale, one malformed; a cache file to ignore
    future, past = time.time() + 3600, time.time() - 3600
    live, stale, bad, cache = (out / "bench" / d for d in ("live/toy2d_cpu", "old/toy2d_cpu", "bad/x", "live/toy2d_cpu/_jobs"))
    for folder, checks in ((live, {"live_check": {"value": 1.25, "criterion": "<= 2.5", "passed": True}}),
                           (stale, {"stale_check": {"value": 9.0, "criterion": "<= 2.5", "passed": False}}),
                           (cache, {"cache_check": {"value": 1.0, "criterion": "-", "passed": True}})):
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps({"meta": {"device_name": "CPU: test"}, "checks": checks}))
    bad.mkdir(parents=True)
    (bad / "results.json").write_text('{"checks": {"truncated"')
    for folder, t in ((live, future), (stale, past), (bad, future), (cache, future)):
        os.utime(folder / "results.json", (t, t))
    with pytest.warns(RuntimeWarning, match="unreadable benchmark results"):
        code = reproduce.main(["--notebooks", str(failing), str(claims), "--out", str(out), "--timeout", "120"])
    return code, out


def test_exit_code_is_nonzero_when_a_notebook_fails(run):
    code, _ = run
    assert code == 1


def test_status_table_names_the_failed_cell_and_its_error(run):
    _, out = run
    md = (out / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| 01_fails |"))
    assert "**failed**" in row and "In [2]" in row and "ValueError: deliberate failure for the test" in row
    row = next(line for line in md.splitlines() if line.startswith("| 02_claims |"))
    assert "| ok |" in row and "1/2 hold, 1 fail" in row and "1/2 met" in row
    assert "**Not reproduced (exit code 1).**" in md and "1 of 2 notebooks ran (01_fails did not)" in md


def test_claims_compared_with_the_committed_outputs(run):
    _, out = run
    md = (out / "report.md").read_text()
    verdicts = {m[1]: m[2] for m in re.findall(r"^\| In \[(\d+)\] \| `([^`]*)` \| (.*?) \|$", md, re.MULTILINE)}
    assert verdicts["two is even: True"] == "holds"               # trailing whitespace ignored
    assert verdicts["three is even: False"] == "**does not hold**"
    assert verdicts["(no output)"] == "**not run**"                  # after the failing cell
    assert "-three is even: True\n+three is even: False" in md      # the diff committed -> this run


def test_figure_embedded_as_data_uri_and_file(run):
    from PIL import Image

    _, out = run
    page = (out / "report.html").read_text()
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(uris) == 1
    assert Image.open(io.BytesIO(base64.b64decode(uris[0]))).size[0] > 50
    assert "<table>" in page and "report_files/" not in page
    assert "](report_files/02_claims_1.png)" in (out / "report.md").read_text()
    assert (out / "report_files" / "02_claims_1.png").read_bytes() == base64.b64decode(uris[0])


def test_headline_metrics_table(run):
    _, out = run
    md = (out / "report.md").read_text()
    assert "| toy task | accuracy | 0.9 | >= 0.8 | met | 02_claims |" in md
    assert "| toy task | loss | 0.5 | <= 0.1 | **missed** | 02_claims |" in md


def test_benchmark_checks_only_from_this_run_and_shipped(run):
    _, out = run
    md = (out / "report.md").read_text()
    assert "toy2d_cpu (this run)" in md and "| live_check | <= 2.5 |" in md
    assert "stale_check" not in md and "cache_check" not in md
    shipped = [p.parent.name for p in (ROOT / "data" / "bench").glob("*/results.json")]
    assert all(name in md for name in shipped)


def test_executed_notebooks_exported(run):
    _, out = run
    for stem in ("01_fails", "02_claims"):
        nb = nbformat.read(out / "notebooks" / f"{stem}.ipynb", as_version=4)
        assert nb.cells[1].outputs, stem
        assert "<html" in (out / "notebooks" / f"{stem}.html").read_text()
    assert "deliberate failure for the test" in (out / "notebooks" / "01_fails.html").read_text()
    assert "toy task | accuracy = 0.9 (target &gt;= 0.8): met" in (out / "notebooks" / "02_claims.html").read_text()


def test_report_is_lean(run):
    _, out = run
    assert len((out / "report.md").read_text().splitlines()) < 80


def test_claims_compare_like_nbval():
    """Streams merge by name, stderr counts, trailing whitespace does not; unrun reference cells are skipped."""
    def nb(*outputs, count=1):
        c = new_code_cell("# NBVAL_CHECK_OUTPUT\nprint()")
        c.outputs, c.execution_count = list(outputs), count
        return {"cells": [c]}

    out = lambda text, name="stdout": new_output("stream", name=name, text=text)  # noqa: E731
    [c] = report.checked_claims(nb(out("a\nb\n")), nb(out("a\n"), out("b  \n")))
    assert c.verdict == "holds"
    [c] = report.checked_claims(nb(out("a\n")), nb(out("a\n"), out("warning\n", "stderr")))
    assert c.verdict == "does not hold"
    [c] = report.checked_claims(nb(out("progress 100%\na\n")), nb(out("progress 50%\rprogress 100%\nab\x08\n")))
    assert c.verdict == "holds"                                   # \r and backspace resolved
    [c] = report.checked_claims(nb(out("a\n"), count=None), nb(out("b\n")))
    assert c.verdict == "no stored output"


def test_select_notebooks():
    assert [p.name for p in reproduce.select_notebooks(["01"])] == ["01_probability_flow_ode.ipynb"]
    assert len(reproduce.select_notebooks(None)) == len(list((ROOT / "notebooks").glob("[0-9]*.ipynb")))
    with pytest.raises(SystemExit, match="--notebooks 99"):
        reproduce.select_notebooks(["99"])
    with pytest.raises(SystemExit, match="no such notebook file"):
        reproduce.select_notebooks(["missing.ipynb"])


def test_timed_out_cell_is_named(tmp_path):
    nb = _write(tmp_path / "03_slow.ipynb", [_cell("x = 1"), _cell("import time\ntime.sleep(60)")])
    run = reproduce.run_notebook(nb, tmp_path / "out", timeout=2)
    assert run.status == "timed out" and run.error == "In [2] (`import time`): still running after 2 s (--timeout)"
    assert report.exit_code([run]) == 1


def test_unreadable_notebook_is_a_failure_not_a_crash(tmp_path):
    bad = tmp_path / "04_bad.ipynb"
    bad.write_text("{not json")
    run = reproduce.run_notebook(bad, tmp_path / "out")
    assert run.status == "failed" and "cannot read" in run.error
