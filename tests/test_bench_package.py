"""The benchmark package around the measurements: acceptance thresholds read from their file,
shipped results that still load and re-check, the worker process importing the caller's copy of
the library, an import that pulls in no model or training code, and the names notebooks use."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from adjoint_lib import bench
from adjoint_lib.bench import acceptance, worker
from adjoint_lib.paths import ROOT, data_dir

SHIPPED = sorted(p for p in data_dir("bench").glob("*/results.json"))


def _profile(mode: str, steps: int, peak: int, saved: int, time_s: float, cos: float = 1.0) -> dict:
    err = {k: dict(rel=0.0, cos=cos) for k in ("x_T", "cond", "weights")}
    return dict(mode=mode, steps=steps, status="ok", peak_bytes=peak, saved_peak_bytes=saved, time_s=time_s,
                cpu_time_s=time_s, errors=dict(vs_discrete=dict(err, max_rel=0.0)))


def _results(adjoint_growth: float) -> dict:
    profiles = [_profile("adjoint", 10, 1000, 100, 1.0), _profile("adjoint", 100, int(1000 * adjoint_growth), 100, 1.0),
                _profile("adjoint", 20, 1000, 100, 2.0, cos=0.9995), _profile("backprop", 20, 5000, 500, 1.0),
                _profile("backprop", 10, 1000, 100, 1.0), _profile("backprop", 100, 9000, 1000, 1.0)]
    return dict(config=dict(order=2), profiles=profiles,
                nfe_to_accuracy=dict(max_rel=dict(ratio_dopri5_over_adjoint=6.0)))


def test_checks_take_their_thresholds_from_the_file(tmp_path):
    res = _results(adjoint_growth=1.1)
    checks = bench.evaluate_checks(res)
    assert {k: c["passed"] for k, c in checks.items()} == {
        "adjoint_peak_memory_N100_over_N10": True, "backprop_peak_memory_N100_over_N10": True,
        "adjoint_time_over_backprop_N20": True, "adjoint_order2_N20_cosine_x_T_vs_discrete": True,
        "nfe_to_1e-2_dopri5_over_adjoint": True}
    assert checks["adjoint_peak_memory_N100_over_N10"]["criterion"] == "within 15% (0.85 .. 1.15)"
    assert bench.evaluate_checks(_results(adjoint_growth=1.2))["adjoint_peak_memory_N100_over_N10"]["passed"] is False
    spec = json.loads(acceptance.acceptance_path().read_text())
    spec["checks"]["adjoint_peak_memory_N100_over_N10"] = {"target": 1.0, "tolerance": 0.05}
    spec["checks"]["adjoint_time_over_backprop_N20"] = {"max": 1.5}
    del spec["checks"]["nfe_to_1e-2_dopri5_over_adjoint"]
    (tmp_path / "strict.json").write_text(json.dumps(spec))
    strict = bench.evaluate_checks(res, tmp_path / "strict.json")
    assert strict["adjoint_peak_memory_N100_over_N10"]["passed"] is False
    assert strict["adjoint_time_over_backprop_N20"] == dict(value=2.0, metric="median wall time", cpu_time_ratio=2.0,
                                                            criterion="<= 1.5", passed=False)
    assert "nfe_to_1e-2_dopri5_over_adjoint" not in strict
    with pytest.warns(RuntimeWarning, match="no benchmark acceptance thresholds"):
        assert bench.evaluate_checks(res, tmp_path / "missing.json") == {}
    with pytest.raises(ValueError, match="'min', 'max' or 'target'"):
        acceptance.judge(1.0, {"below": 2})


@pytest.mark.parametrize("path", SHIPPED, ids=[p.parent.name for p in SHIPPED])
def test_shipped_results_load_and_recheck_the_same(path):
    """Every shipped results.json loads, prints, and its stored checks are what the thresholds
    file gives for its numbers."""
    res = bench.load_results(path)
    assert bench.format_table(res).count("\n") >= len(res["profiles"])
    assert bench.evaluate_checks(res) == res["checks"]


def test_load_results_default_is_the_shipped_file():
    assert bench.load_results(model="toy2d", device="cpu") == json.loads(
        data_dir("bench", "toy2d_cpu", "results.json").read_text())


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ADJOINTDPM_DATA")}
    return dict(env, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def test_worker_runs_the_callers_copy_of_the_library(tmp_path):
    """A copy of the package (as an install would be) with no data next to it, imported while
    PYTHONPATH names the checkout: the fresh process runs the copy (the toy falls back to random
    weights there), not the checkout."""
    site = tmp_path / "site"
    shutil.copytree(ROOT / "adjoint_lib", site / "adjoint_lib", ignore=shutil.ignore_patterns("__pycache__"))
    job = dict(problem=dict(model="toy2d", device="cpu", batch=8, guidance=None, size=None, seed=0,
                            dtype="float32", weights=None, drop_time_freqs=0),
               threads=1, order=2, kind="profile", mode="checkpoint", steps=2, repeats=3, name="ck2")
    script = ("import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[3]); "
              "import adjoint_lib.bench.jobs as j; assert Path(j.__file__).is_relative_to(sys.argv[3]), j.__file__; "
              "r = j.run_isolated(json.loads(sys.argv[1]), Path(sys.argv[2])); print(json.dumps(r))")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(_clean_env(), PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(job), str(tmp_path), str(site)], cwd=elsewhere,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["status"] == "ok", r
    assert r["problem_info"]["weights"].startswith("random"), r["problem_info"]["weights"]
    assert (tmp_path / "ck2.result.json").is_file()


def test_worker_refuses_a_job_of_another_copy(tmp_path):
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps(dict(package_parent=str(tmp_path), result_path=str(tmp_path / "r.json"))))
    with pytest.raises(SystemExit, match="start the worker in"):
        worker.main([str(spec)])
    with pytest.raises(SystemExit, match="usage"):
        worker.main([])
    assert not (tmp_path / "r.json").exists()


def test_importing_bench_loads_no_model_or_training_code():
    code = ("import sys, adjoint_lib.bench; print(sorted(m for m in sys.modules if m.startswith("
            "('adjoint_lib.models', 'adjoint_lib.toy2d', 'adjoint_lib.baselines', 'diffusers', 'transformers', "
            "'torchdiffeq', 'matplotlib'))))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(_clean_env(), PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("notebook", ["03_toy_2d.ipynb", "07_benchmarks.ipynb"])
def test_names_the_notebooks_use_exist(notebook):
    cells = json.loads((ROOT / "notebooks" / notebook).read_text())["cells"]
    source = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    names = set(re.findall(r"\bbench\.([A-Za-z_]\w*)", source))
    assert all(hasattr(bench, n) for n in names), sorted(n for n in names if not hasattr(bench, n))
    for module, name in re.findall(r"from (adjoint_lib[\w.]*) import (\w+)", source):
        assert hasattr(__import__(module, fromlist=[name]), name), (module, name)


def test_job_keys_follow_the_problem_not_the_file_paths():
    jobs = bench.plan_jobs(dict(problem=dict(model="mini", drop_time_freqs=0), threads=1, order=2),
                           modes=["adjoint"], steps=[5], tols=[], repeats=3, ref_steps=10, sweep_steps=[5],
                           sweep_tols=[], sweep_continuous=False, nfe_cap=10)
    other = [dict(j, problem=dict(j["problem"], drop_time_freqs=2)) for j in jobs]
    assert [j["name"] for j in jobs] == ["adjoint_N5", "checkpoint_N5", "reference_N10", "sweep_adjoint"]
    assert all(bench.job_key(a) != bench.job_key(b) for a, b in zip(jobs, other))
    assert bench.job_key(dict(jobs[0], grads_path="x", result_path="y", package_parent="z")) == bench.job_key(jobs[0])
