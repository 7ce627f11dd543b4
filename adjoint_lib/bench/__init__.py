"""Benchmarks: memory, wall time, eps evaluations and gradient accuracy of every gradient mode.

::

    python -m adjoint_lib.bench --model toy2d --device cpu            # full grid
    python -m adjoint_lib.bench --model mini --device cpu --quick     # smoke-test grid
    python -m adjoint_lib.bench --model sd-arch --device cuda         # SD 1.x UNet, random weights

What is measured, how, and how to read the results: ``adjoint_lib/bench/README.md``. From Python,
:func:`run_benchmark` runs a grid and returns its results dict; :func:`load_results`,
:func:`format_table` and :func:`plot_results` read one (e.g. the shipped
``data/bench/*/results.json``).

Modules, one concern each: :mod:`.problems` (the gradient problems), :mod:`.gradients` (one
gradient per mode, its errors), :mod:`.diagnostics` (eps along t), :mod:`.jobs` (one measurement,
in this process or a fresh one, and its cache), :mod:`.runner` (the grid and the results dict),
:mod:`.acceptance` (checks against ``data/bench/acceptance.json``), :mod:`.results` and
:mod:`.plots` (reading and showing results), :mod:`.cli`. The memory meters live in
:mod:`adjoint_lib.memory`.
"""
from ..adjoint import SampleStats
from ..memory import PeakRSS, SavedTensorMeter, cuda_peak, pin_malloc
from .acceptance import evaluate_checks, load_thresholds
from .cli import main
from .diagnostics import eps_along_t, eps_roughness, weight_slice
from .gradients import COMPONENTS, MODES, grad_errors, gradient, saved_tensor_peak
from .jobs import job_key, load_grads, readable_grads, run_isolated, run_job, save_grads
from .plots import PLOTS, plot_results
from .problems import DEFAULTS, MODELS, GuidedToyEps, Problem, build_problem, drop_time_frequencies, sd_unet_config
from .results import format_table, load_results
from .runner import TARGET_ERROR, machine_meta, nfe_to_reach, plan_jobs, run_benchmark, run_tag

__all__ = ["SampleStats", "PeakRSS", "SavedTensorMeter", "cuda_peak", "pin_malloc", "evaluate_checks",
           "load_thresholds", "main", "eps_along_t", "eps_roughness", "weight_slice", "COMPONENTS", "MODES",
           "grad_errors", "gradient", "saved_tensor_peak", "job_key", "load_grads", "readable_grads",
           "run_isolated", "run_job", "save_grads", "PLOTS", "plot_results", "DEFAULTS", "MODELS",
           "GuidedToyEps", "Problem", "build_problem", "drop_time_frequencies", "sd_unet_config",
           "format_table", "load_results", "TARGET_ERROR", "machine_meta", "nfe_to_reach", "plan_jobs",
           "run_benchmark", "run_tag"]
