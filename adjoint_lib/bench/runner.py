"""The benchmark run: the grid of jobs for a model, run or taken from the cache, and the results
dict (profiles, gradient errors, accuracy sweeps, NFE to a target error, acceptance checks)
written to ``<out>/<run_tag>/results.json``."""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..io import read_json, write_json
from ..paths import ROOT, outputs_dir
from .acceptance import evaluate_checks
from .gradients import MODES, grad_errors
from .jobs import job_key, load_grads, readable_grads, run_isolated, run_job
from .plots import plot_results
from .problems import DEFAULTS, MODELS

# gradient error (largest relative error of x_T, cond, weights) the accuracy sweeps aim at
TARGET_ERROR = 1e-2


def machine_meta(device: str, threads: int) -> dict:
    """Where a run happens: device, CPU / GPU name, thread count, library versions, date, load, commit."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import diffusers
    import torchdiffeq
    meta = dict(device=device, cpu_model=cpu, cpu_count=os.cpu_count(), torch_threads=threads,
                torch_version=torch.__version__, diffusers_version=diffusers.__version__,
                torchdiffeq_version=getattr(torchdiffeq, "__version__", "?"),
                python_version=platform.python_version(), platform=platform.platform(),
                date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                loadavg_start=[round(x, 2) for x in os.getloadavg()])
    if device.startswith("cuda"):
        meta["gpu_name"] = torch.cuda.get_device_name(torch.device(device))
        meta["cuda_version"] = torch.version.cuda
        meta["device_name"] = meta["gpu_name"]
    else:
        meta["device_name"] = f"CPU: {cpu} ({threads} thread{'s' if threads > 1 else ''})"
    try:
        meta["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                            capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    return meta


def run_tag(model: str, device: str, drop_time_freqs: int = 0) -> str:
    """Results folder name: ``<model>[-drop<k>]_<device type>``, e.g. ``mini_cpu``."""
    return f"{model}{f'-drop{drop_time_freqs}' if drop_time_freqs else ''}_{device.split(':')[0]}"


def plan_jobs(base: dict, *, modes: Sequence[str], steps: Sequence[int], tols: Sequence[float],
              repeats: int, ref_steps: int, sweep_steps: Sequence[int], sweep_tols: Sequence[float],
              sweep_continuous: bool, nfe_cap: int) -> list[dict]:
    """The jobs of one run, each ``base`` (problem, threads, order) plus its own fields: a profile
    per mode and N (dopri5: per tolerance; checkpoint always, the errors need it), the reference,
    the order-2 adjoint sweep (and the continuous scheme's, with ``sweep_continuous``), the
    dopri5 sweep."""
    jobs: list[dict] = []
    for mode in modes:
        if mode == "dopri5":
            jobs += [dict(base, kind="profile", mode=mode, rtol=t, repeats=repeats, name=f"dopri5_tol{t:g}")
                     for t in tols]
        else:
            for n in steps:
                jobs.append(dict(base, kind="profile", mode=mode, steps=n, repeats=repeats, name=f"{mode}_N{n}"))
    if "checkpoint" not in modes:  # the exact discrete gradients are needed for the errors
        jobs += [dict(base, kind="profile", mode="checkpoint", steps=n, repeats=repeats, name=f"checkpoint_N{n}")
                 for n in steps]
    jobs.append(dict(base, kind="reference", steps=ref_steps, name=f"reference_N{ref_steps}"))
    for mode in ["adjoint"] + (["adjoint-cont"] if sweep_continuous and "adjoint-cont" in modes else []):
        jobs.append(dict(base, kind="sweep-adjoint", mode=mode, values=sweep_steps, target=TARGET_ERROR,
                         name=f"sweep_{mode}"))
    if "dopri5" in modes:
        jobs.append(dict(base, kind="sweep-dopri5", values=sweep_tols, target=TARGET_ERROR,
                         nfe_cap=nfe_cap, name="sweep_dopri5"))
    return jobs


def run_benchmark(model: str = "toy2d", device: str = "cpu", quick: bool = False,
                  steps: Sequence[int] | None = None, modes: Sequence[str] | None = None,
                  tols: Sequence[float] | None = None, order: int = 2, batch: int | None = None,
                  guidance: float | None = None, size: str | None = None, repeats: int = 3,
                  ref_steps: int | None = None, sweep_steps: Sequence[int] | None = None,
                  sweep_tols: Sequence[float] | None = None, threads: int | None = None,
                  isolate: str | None = None, out: str | Path | None = None, resume: bool = False,
                  seed: int = 0, dtype: str = "float32", plots: bool = True,
                  progress: bool = True, command: str | None = None,
                  weights: str | Path | None = None, drop_time_freqs: int = 0,
                  acceptance: str | Path | None = None) -> dict:
    """Run the benchmark and write ``<out>/<run_tag>/results.json`` (+ PNGs), e.g. ``mini_cpu``.

    ``isolate="process"`` (default for the full grid) runs each configuration in a fresh
    subprocess; ``"none"`` (default with ``quick``) runs everything in this process (same
    meters; the RSS numbers are then less independent). ``resume`` reuses job results of an
    earlier run with identical settings (cached under ``outputs/bench/_jobs``); a cache entry
    that cannot be read (truncated JSON or gradient file) is re-run, with a warning.
    ``acceptance``: the thresholds file of the checks (default ``data/bench/acceptance.json``,
    :func:`~adjoint_lib.bench.acceptance.evaluate_checks`). Every file is written to a temporary name and moved into place.
    Returns the results dict.
    """
    from tqdm.auto import tqdm

    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
    if repeats < 3:
        raise ValueError("repeats must be at least 3 (the wall time is a median)")
    d = dict(DEFAULTS[model])
    if quick:
        d.update(d["quick"])
    # --quick leaves out the continuous scheme's rows (and sd-arch's dopri5); ask with modes=
    modes = list(modes or d.get("modes") or [m for m in MODES if not (quick and m == "adjoint-cont")])
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown modes {bad}; choose from {list(MODES)}")
    steps = sorted(set(steps or d["steps"]))
    tols = sorted(set(tols or d["tols"]), reverse=True)
    ref_steps = ref_steps or d["ref_steps"]
    sweep_steps = sorted(set(sweep_steps or d["sweep_steps"]))
    sweep_tols = sorted(set(sweep_tols or d["sweep_tols"]), reverse=True)
    threads = threads or (1 if device == "cpu" else max(1, torch.get_num_threads()))
    isolate = isolate or ("none" if quick else "process")
    if isolate not in ("process", "none"):
        raise ValueError(f"isolate must be 'process' or 'none', got {isolate!r}")
    batch = batch or d["batch"]
    size = size or d.get("size")
    problem_cfg = dict(model=model, device=device, batch=batch, guidance=guidance, size=size,
                       seed=seed, dtype=dtype, weights=None if weights is None else str(weights),
                       drop_time_freqs=int(drop_time_freqs))
    tag = run_tag(model, device, drop_time_freqs)
    out_dir = Path(out) if out is not None else outputs_dir("bench")
    out_dir = out_dir / tag
    out_dir.mkdir(parents=True, exist_ok=True)
    run_hash = hashlib.sha1(json.dumps([problem_cfg, order, threads, repeats], sort_keys=True).encode()).hexdigest()[:8]
    job_dir = outputs_dir("bench", "_jobs", f"{tag}_{run_hash}").resolve()
    meta = machine_meta(device, threads)
    meta.update(model=model, quick=quick, isolation=isolate, command=command)

    jobs = plan_jobs(dict(problem=problem_cfg, threads=threads, order=order), modes=modes, steps=steps,
                     tols=tols, repeats=repeats, ref_steps=ref_steps, sweep_steps=sweep_steps,
                     sweep_tols=sweep_tols, sweep_continuous=not quick, nfe_cap=d["nfe_cap"])

    results: dict[str, dict] = {}
    t_start = time.perf_counter()
    ref_path = job_dir / f"reference_N{ref_steps}_order{order}.grads.pt"
    bar = tqdm(jobs, desc=f"bench {tag}", disable=not progress)
    for job in bar:
        bar.set_postfix_str(job["name"])
        job["key"] = job_key(job)
        job["grads_path"] = str(job_dir / f"{job['name']}.grads.pt") if job["kind"] in ("profile", "reference") else None
        if job["kind"] == "reference":
            job["grads_path"] = str(ref_path)
        if job["kind"].startswith("sweep"):
            job["ref_path"] = str(ref_path)
        cached = job_dir / f"{job['name']}.result.json"
        if resume:
            r = read_json(cached, what="bench cache entry")
            if isinstance(r, dict) and r.get("key") == job["key"] and r.get("status") == "ok" and \
                    (job["grads_path"] is None or readable_grads(job["grads_path"])):
                results[job["name"]] = r
                continue
        t0 = time.perf_counter()
        r = run_isolated(job, job_dir) if isolate == "process" else run_job(job)
        r.update(key=job["key"], job_seconds=round(time.perf_counter() - t0, 2))
        write_json(cached, r, indent=None)
        results[job["name"]] = r
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    meta["total_seconds"] = round(time.perf_counter() - t_start, 1)
    res = _assemble(results, jobs, meta, acceptance, dict(
        steps=steps, modes=modes, tols=tols, order=order, repeats=repeats, ref_steps=ref_steps,
        sweep_steps=sweep_steps, sweep_tols=sweep_tols, target_error=TARGET_ERROR, seed=seed,
        dtype=dtype, batch=batch, loss="|x_0 - target|^2 / B", nfe_cap=d["nfe_cap"]))
    write_json(out_dir / "results.json", res)
    if plots:
        plot_results(res, out_dir)
    return res


def nfe_to_reach(points: Sequence[tuple[float, float]], target: float = TARGET_ERROR) -> dict | None:
    """Eps evaluations needed to reach error ``target`` from ``(nfe, error)`` points sorted by
    nfe: the first point at or below the target, and a log-log interpolation between it and
    the point before. ``None`` if never reached."""
    pts = sorted((n, e) for n, e in points if e is not None and e == e and n > 0)
    for i, (n, e) in enumerate(pts):
        if e <= target:
            interp = float(n)
            if i > 0 and pts[i - 1][1] > target and e > 0:
                (n0, e0), (n1, e1) = pts[i - 1], (n, e)
                s = (math.log(target) - math.log(e0)) / (math.log(e1) - math.log(e0))
                interp = math.exp(math.log(n0) + s * (math.log(n1) - math.log(n0)))
            return dict(nfe_first=int(n), nfe_interp=round(interp, 1), error_at_first=e)
    return None


def _assemble(results: dict, jobs: list[dict], meta: dict, acceptance: str | Path | None, config: dict) -> dict:
    ref_job = next(j for j in jobs if j["kind"] == "reference")
    ref = load_grads(ref_job["grads_path"])
    reference = dict(results.get(ref_job["name"], {}))
    reference.pop("problem_info", None)
    profiles = []
    info = {}
    for job in jobs:
        if job["kind"] != "profile":
            continue
        r = dict(results[job["name"]])
        info = r.pop("problem_info", info)
        r.update(label=MODES[job["mode"]]["label"], mode=job["mode"], steps=job.get("steps"), rtol=job.get("rtol"))
        errs: dict[str, Any] = {}
        if r["status"] == "ok":
            g = load_grads(job["grads_path"])
            if job["mode"] != "dopri5":
                disc = next((j for j in jobs if j["kind"] == "profile" and j["mode"] == "checkpoint"
                             and j["steps"] == job["steps"]), None)
                gd = load_grads(disc["grads_path"]) if disc else None
                if gd is not None:
                    errs["vs_discrete"] = grad_errors(g, gd)
            if ref is not None:
                errs["vs_reference"] = grad_errors(g, ref)
        r["errors"] = errs
        profiles.append(r)
    sweeps = {}
    for job in jobs:
        if job["kind"].startswith("sweep") and results.get(job["name"], {}).get("status") == "ok":
            name = "dopri5" if job["kind"] == "sweep-dopri5" else f"{job['mode']}_order{config['order']}"
            sweeps[name] = results[job["name"]]["points"]
    res = dict(meta=meta, config=config, problem=info, reference=reference, profiles=profiles,
               sweeps=sweeps)
    res["nfe_to_accuracy"] = _nfe_summary(sweeps, config)
    res["checks"] = evaluate_checks(res, acceptance)
    return res


def _nfe_summary(sweeps: dict, config: dict) -> dict:
    out: dict[str, Any] = dict(target=config["target_error"])
    for metric in ("max_rel", "x_T", "cond", "weights"):
        row = {}
        for name, pts in sweeps.items():
            xy = [(p["nfe"], p["errors"][metric] if metric == "max_rel" else p["errors"][metric]["rel"])
                  for p in pts if "errors" in p]
            row[name] = nfe_to_reach(xy, config["target_error"])
        for name in sweeps:
            if name != "dopri5" and row.get("dopri5") and row[name]:
                key = "ratio_dopri5_over_" + name.split("_order")[0].replace("-", "_")
                row[key] = round(row["dopri5"]["nfe_interp"] / row[name]["nfe_interp"], 2)
        out[metric] = row
    return out
