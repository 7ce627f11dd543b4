"""Jobs: one measurement (a profiled gradient, the reference gradient, an accuracy sweep) as a
JSON-able dict, run in this process (:func:`run_job`) or in a fresh one (:func:`run_isolated`,
``python -m adjoint_lib.bench.worker job.json``), with its result and gradients cached on disk
under a key of its settings (:func:`job_key`) for ``--resume``."""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ..adjoint import SampleStats
from ..io import atomic_path, write_json
from ..memory import PeakRSS, SavedTensorMeter, cuda_peak, pin_malloc
from .gradients import grad_errors, gradient
from .problems import Problem, build_problem

Tensor = torch.Tensor

# The folder holding the adjoint_lib package: a worker process started there imports this copy.
PACKAGE_PARENT = Path(__file__).resolve().parents[2]
# Fields of a job that say where its files go, not what it computes (left out of its key).
PATH_FIELDS = ("grads_path", "ref_path", "result_path", "package_parent")


def save_grads(g: dict[str, Tensor], path: str | None) -> None:
    """Save the gradients ``g`` (float32, CPU) to ``path`` atomically; nothing when ``path`` is None."""
    if path:
        with atomic_path(path, suffix=".pt") as tmp:
            torch.save({k: v.float().cpu() for k, v in g.items()}, tmp)


def readable_grads(path: str) -> bool:
    """Whether the gradient file ``path`` opens (a truncated or corrupt one warns; memory-mapped,
    so checking a large file reads little of it)."""
    try:
        torch.load(path, mmap=True, weights_only=True)
        return True
    except FileNotFoundError:
        return False
    except Exception as exc:  # noqa: BLE001 - any unreadable file is re-computed
        warnings.warn(f"ignoring unreadable bench cache file {path}: {type(exc).__name__}: {exc}",
                      RuntimeWarning, stacklevel=2)
        return False


def is_oom(e: BaseException) -> bool:
    """Whether ``e`` says that memory ran out (CPU ``MemoryError`` or CUDA out of memory)."""
    return isinstance(e, MemoryError) or "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError"


_PROBLEM_CACHE: dict[str, Problem] = {}


def _problem_for(job: dict) -> Problem:
    key = json.dumps(job["problem"], sort_keys=True)
    if key not in _PROBLEM_CACHE:
        _PROBLEM_CACHE.clear()
        _PROBLEM_CACHE[key] = build_problem(**job["problem"])
    return _PROBLEM_CACHE[key]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_job(job: dict) -> dict:
    """Run one job (``kind``: ``profile``, ``reference``, ``sweep-adjoint``, ``sweep-dopri5``)
    in this process and return its result dict."""
    torch.set_num_threads(job["threads"])
    pin_malloc()
    problem = _problem_for(job)
    device = job["problem"]["device"]
    kind, order = job["kind"], job["order"]
    res: dict[str, Any] = dict(kind=kind, status="ok")
    try:
        if kind == "profile":
            mode, steps, rtol = job["mode"], job.get("steps"), job.get("rtol")
            # warm-up: a small gradient of the same mode (libraries, kernels, thread pools)
            gradient(problem, mode, min(steps, 2) if steps else None, order, 1e-1 if rtol else None)
            stats = SampleStats()
            with SavedTensorMeter() as meter:
                if device.startswith("cuda"):
                    with cuda_peak(torch.device(device)) as peak:
                        g = gradient(problem, mode, steps, order, rtol, stats)
                    peak_bytes, baseline, method = peak["peak_bytes"], peak["baseline_bytes"], peak["method"]
                else:
                    with PeakRSS() as peak:
                        g = gradient(problem, mode, steps, order, rtol, stats)
                    peak_bytes, baseline, method = peak.peak_bytes, peak.baseline_bytes, peak.method
            save_grads(g, job.get("grads_path"))
            del g
            times, cpu_times = [], []
            for _ in range(job["repeats"]):
                _sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                gradient(problem, mode, steps, order, rtol)
                _sync(device)
                times.append(time.perf_counter() - t0)
                cpu_times.append(time.process_time() - c0)
            res.update(mode=mode, steps=steps, rtol=rtol, order=order,
                       nfe_forward=stats.nfe_forward, nfe_backward=stats.nfe_backward,
                       peak_bytes=int(peak_bytes), baseline_bytes=int(baseline), memory_method=method,
                       saved_peak_bytes=int(meter.peak_bytes), saved_count=int(meter.count),
                       time_s=statistics.median(times), times_s=times,
                       cpu_time_s=statistics.median(cpu_times), cpu_times_s=cpu_times)
        elif kind == "reference":
            steps = job["steps"]
            stats = SampleStats()
            g = gradient(problem, "checkpoint", steps, order, stats=stats)
            save_grads(g, job.get("grads_path"))
            half = gradient(problem, "checkpoint", steps // 2, order)
            res.update(mode="checkpoint", steps=steps, order=order, nfe_forward=stats.nfe_forward,
                       nfe_backward=stats.nfe_backward,
                       self_check=dict(steps=steps // 2, errors=grad_errors(half, g)))
        elif kind in ("sweep-adjoint", "sweep-dopri5"):
            ref = torch.load(job["ref_path"])
            points = []
            below = 0
            for v in job["values"]:
                stats = SampleStats()
                t0 = time.perf_counter()
                try:
                    if kind == "sweep-adjoint":
                        g = gradient(problem, job.get("mode", "adjoint"), v, order, stats=stats)
                    else:
                        g = gradient(problem, "dopri5", rtol=v, stats=stats)
                except AssertionError as e:  # torchdiffeq: underflow in dt / max steps
                    points.append(dict(value=v, status=f"failed: {e}"))
                    break
                err = grad_errors(g, ref)
                points.append(dict(value=v, nfe_forward=stats.nfe_forward, nfe_backward=stats.nfe_backward,
                                   nfe=stats.nfe_forward + stats.nfe_backward,
                                   seconds=time.perf_counter() - t0, errors=err))
                below = below + 1 if err["max_rel"] <= job["target"] else 0
                if kind == "sweep-dopri5" and (below >= 2 or stats.nfe_forward + stats.nfe_backward > job["nfe_cap"]):
                    break
            res.update(points=points)
        else:
            raise ValueError(f"unknown job kind {kind!r}")
    except Exception as e:  # noqa: BLE001 - recorded, the benchmark goes on
        if not is_oom(e):
            raise
        res.update(status="oom", error=str(e).splitlines()[0][:300])
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    res["problem_info"] = problem.info
    return res


def job_key(job: dict) -> str:
    """A hash of what the job computes (its settings, not its file paths): the cache key."""
    core = {k: v for k, v in job.items() if k not in PATH_FIELDS}
    return hashlib.sha1(json.dumps(core, sort_keys=True).encode()).hexdigest()[:12]


def load_grads(path: str | None) -> dict[str, Tensor] | None:
    """The gradients saved at ``path`` by :func:`save_grads`, or None when there are none."""
    return torch.load(path) if path and Path(path).exists() else None


def run_isolated(job: dict, job_dir: Path) -> dict:
    """Run a job in a fresh Python process, ``python -m adjoint_lib.bench.worker <job.json>``
    started in the folder that holds this ``adjoint_lib`` (so the worker imports the same copy,
    from a checkout or an installed package). A crash is returned as ``status`` ``"failed"``
    (``"oom"`` when the process was killed) with the end of its output."""
    spec = job_dir / f"{job['name']}.job.json"
    job = dict(job, result_path=str((job_dir / f"{job['name']}.result.json").resolve()),
               package_parent=str(PACKAGE_PARENT))
    write_json(spec, job, indent=None)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg",
               OMP_NUM_THREADS=str(job["threads"]), MKL_NUM_THREADS=str(job["threads"]),
               MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    env.pop("PYTHONSAFEPATH", None)  # the worker's own folder must come first on its sys.path
    proc = subprocess.run([sys.executable, "-m", "adjoint_lib.bench.worker", str(Path(spec).resolve())],
                          env=env, capture_output=True, text=True, cwd=str(PACKAGE_PARENT))
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-2000:]
        killed = proc.returncode in (-9, 137)
        return dict(kind=job["kind"], status="oom" if killed else "failed", returncode=proc.returncode,
                    error=tail, mode=job.get("mode"), steps=job.get("steps"), rtol=job.get("rtol"))
    return json.loads(Path(job["result_path"]).read_text())
