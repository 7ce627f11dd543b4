"""The command line: ``python -m adjoint_lib.bench --model toy2d --device cpu [--quick] ...``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ..cli import (add_output_arguments, int_at_least, nonnegative_float, nonnegative_int, output_path,
                   positive_float, positive_int)
from ..paths import outputs_dir
from .gradients import MODES
from .problems import MODELS
from .results import format_table
from .runner import run_benchmark, run_tag

DESCRIPTION = "Benchmarks: memory, wall time, eps evaluations and gradient accuracy of every gradient mode."


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the benchmark, print its table; returns the results."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m adjoint_lib.bench", description=DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=MODELS, default="toy2d")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda:0, ...)")
    ap.add_argument("--quick", action="store_true", help="reduced grid, in-process: a smoke test (< 2 minutes on CPU for each model)")
    ap.add_argument("--steps", type=positive_int, nargs="+", help="sampling steps N (default 5 10 20 50 100)")
    ap.add_argument("--modes", nargs="+", choices=list(MODES), help="gradient modes (default: all)")
    ap.add_argument("--tols", type=positive_float, nargs="+", help="dopri5 tolerances profiled (rtol = atol)")
    ap.add_argument("--order", type=int, choices=(1, 2, 3), default=2,
                    help="solver order of the library modes (default 2)")
    ap.add_argument("--batch", type=positive_int, help="batch size (default per model)")
    ap.add_argument("--guidance", type=nonnegative_float, help="classifier-free guidance scale (default per model)")
    ap.add_argument("--size", choices=("full", "reduced", "tiny"),
                    help="sd-arch size (default: tiny with --quick, else full on cuda, reduced on cpu)")
    ap.add_argument("--repeats", type=int_at_least(3), default=3, help="timed gradients per configuration (median; >= 3)")
    ap.add_argument("--ref-steps", type=int_at_least(2),
                    help="steps of the converged checkpoint reference (default 500; checked against half)")
    ap.add_argument("--sweep-steps", type=positive_int, nargs="+", help="N of the order-2 adjoint accuracy sweep")
    ap.add_argument("--sweep-tols", type=positive_float, nargs="+", help="dopri5 tolerances of the accuracy sweep")
    ap.add_argument("--threads", type=positive_int, help="torch threads (default 1 on CPU: oversubscribed "
                    "OpenMP pools on a loaded machine are 10x slower)")
    ap.add_argument("--isolate", choices=("process", "none"),
                    help="fresh subprocess per configuration (default) or in-process (default with --quick)")
    add_output_arguments(ap, "outputs/bench", "output folder; results go to <out>/<model>_<device>/")
    ap.add_argument("--resume", action="store_true", help="reuse finished configurations of an identical earlier run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--weights", help="mini: MiniSD folder to load (default data/mini)")
    ap.add_argument("--drop-time-freqs", type=nonnegative_int, default=0, metavar="K",
                    help="mini/sd-arch: zero the time-embedding input of the K fastest timestep "
                         "frequencies (a diagnostic model whose eps is smooth in t)")
    ap.add_argument("--acceptance", type=Path, help="thresholds of the checks (default data/bench/acceptance.json)")
    ap.add_argument("--no-plots", action="store_true")
    a = ap.parse_args(argv)
    tag = run_tag(a.model, a.device, a.drop_time_freqs)
    out = output_path(a, lambda: outputs_dir("bench"))
    res = run_benchmark(model=a.model, device=a.device, quick=a.quick, steps=a.steps, modes=a.modes,
                        tols=a.tols, order=a.order, batch=a.batch, guidance=a.guidance, size=a.size,
                        repeats=a.repeats, ref_steps=a.ref_steps, sweep_steps=a.sweep_steps,
                        sweep_tols=a.sweep_tols, threads=a.threads, isolate=a.isolate, out=out,
                        resume=a.resume, seed=a.seed, dtype=a.dtype, plots=not a.no_plots,
                        command="python -m adjoint_lib.bench " + " ".join(argv), weights=a.weights,
                        drop_time_freqs=a.drop_time_freqs, acceptance=a.acceptance)
    print(format_table(res))
    print(f"wrote {out / tag}/results.json" + ("" if a.no_plots else " and PNGs"))
    return res
