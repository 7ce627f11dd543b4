"""Reading a results dict (``results.json``) and printing it as a text table."""
from __future__ import annotations

import json
from pathlib import Path

from ..paths import data_dir


def _mb(b: float | None) -> str:  # bytes as MiB, "-" for none
    return "-" if b is None else f"{b / 2**20:.1f}"


def format_table(res: dict) -> str:
    """The results as a text table (one row per mode and N / tolerance) plus the checks."""
    m = res["meta"]
    lines = [f"# {m['model']} on {m['device_name']} | torch {m['torch_version']} | {m['date']} | "
             f"load avg {m['loadavg_start']} -> {m.get('loadavg_end')} | {res['problem'].get('description', '')}",
             f"# weights: {res['problem'].get('weights')} | memory: {res['profiles'][0].get('memory_method', '?') if res['profiles'] else '?'}",
             f"{'mode':<14}{'N/tol':>7}{'NFE f/b':>11}{'peak MB':>9}{'saved MB':>9}{'time s':>8}{'cpu s':>8}"
             f"{'rel xT':>9}{'cos xT':>10}{'ref xT':>9}{'ref c':>9}{'ref W':>9}"]
    for p in res["profiles"]:
        n = f"{p['steps']}" if p["steps"] is not None else f"{p['rtol']:g}"
        if p.get("status") != "ok":
            lines.append(f"{p['mode']:<14}{n:>7}  {p.get('status')}: {str(p.get('error', ''))[:60]}")
            continue
        e = p["errors"]
        dsc, ref = e.get("vs_discrete"), e.get("vs_reference")
        f = lambda x: "-" if x is None else f"{x:.2e}"  # noqa: E731
        cos_xt = "-" if dsc is None else "%.6f" % dsc["x_T"]["cos"]
        lines.append(f"{p['mode']:<14}{n:>7}{p['nfe_forward']:>6}/{p['nfe_backward']:<4}"
                     f"{_mb(p['peak_bytes']):>9}{_mb(p['saved_peak_bytes']):>9}{p['time_s']:>8.3f}"
                     f"{p.get('cpu_time_s', float('nan')):>8.3f}"
                     f"{f(dsc['x_T']['rel'] if dsc else None):>9}{cos_xt:>10}"
                     f"{f(ref['x_T']['rel'] if ref else None):>9}{f(ref['cond']['rel'] if ref else None):>9}"
                     f"{f(ref['weights']['rel'] if ref else None):>9}")
    nfe = res.get("nfe_to_accuracy", {})
    for metric in ("max_rel", "x_T"):
        row = nfe.get(metric, {})
        parts = [f"{k}: {v['nfe_interp'] if v else 'not reached'}" for k, v in row.items() if not k.startswith("ratio")]
        lines.append(f"NFE to rel. error {nfe.get('target')} ({metric}): " + ", ".join(parts)
                     + (f", ratio {row['ratio_dopri5_over_adjoint']}x" if "ratio_dopri5_over_adjoint" in row else ""))
    for k, v in res.get("checks", {}).items():
        lines.append(f"check {k}: {v['value']} ({v['criterion']}) {'PASS' if v['passed'] else 'FAIL'}")
    return "\n".join(lines)



def load_results(path: str | Path | None = None, model: str = "toy2d", device: str = "cpu") -> dict:
    """Read a results JSON (default: the shipped ``data/bench/<model>_<device>/results.json``)."""
    path = Path(path) if path is not None else data_dir("bench", f"{model}_{device}", "results.json")
    return json.loads(Path(path).read_text())
