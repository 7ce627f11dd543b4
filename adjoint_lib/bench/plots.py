"""Figures of a results dict: memory, time and gradient error against N, and accuracy against
eps evaluations (adjoint vs dopri5).

Every series has its own colour, marker and line style (so series that coincide, such as the
adjoint with and without a cached trajectory, stay visible), legends sit outside the axes,
and configurations that ran out of memory are marked at the top of the axes."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..io import atomic_path
from .gradients import COMPONENTS, MODES

# mode -> line style; a large open marker under a small filled one keeps both visible when equal
_STYLES = {
    "adjoint": dict(color="C0", marker="o", ls="-", ms=10, mfc="none", mew=1.5),
    "adjoint-cache": dict(color="C1", marker="s", ls="--", ms=5),
    "adjoint-cont": dict(color="C5", marker="^", ls="-.", ms=9, mfc="none", mew=1.5),
    "checkpoint": dict(color="C2", marker="D", ls="-", ms=5),
    "backprop": dict(color="C3", marker="v", ls=(0, (5, 1.5, 1, 1.5, 1, 1.5)), ms=7),  # dotted: CPU time
    "dopri5": dict(color="C4", marker="P", ls="-", ms=7),
}
_EXTRA_STYLES = (dict(color="C6", marker="x", ls="--", ms=7, mew=1.5),
                 dict(color="C8", marker="*", ls=":", ms=8))
_LEGEND = dict(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=9, borderaxespad=0.0)
PLOTS = ("memory", "time", "grad_error", "nfe_accuracy")


def _series(res: dict, mode: str, fn: Callable[[dict], float | None]) -> tuple[list, list]:
    xs, ys = [], []
    for p in res["profiles"]:
        if p["mode"] == mode and p.get("status") == "ok":
            y = fn(p)
            if y is not None and y == y:
                xs.append(p["steps"] if p["steps"] is not None else p["nfe_forward"])
                ys.append(y)
    return xs, ys


def _failed(res: dict, mode: str) -> list:
    """The N (dopri5: None) of the configurations of ``mode`` that ran out of memory."""
    return [p["steps"] for p in res["profiles"]
            if p["mode"] == mode and p.get("status") == "oom" and p["steps"] is not None]


def plot_results(res: dict, out_dir: str | Path | None = None, dpi: int = 100,
                 which: Sequence[str] = PLOTS, labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Figures from a results dict: ``memory`` (peak memory and saved tensors vs N), ``time``,
    ``grad_error`` (relative error vs N per gradient) and ``nfe_accuracy`` (error vs eps
    evaluations, adjoint vs dopri5), or the subset ``which``. ``labels`` names series by mode
    (default: :data:`MODES`' labels; a mode missing from both is named by its key). Saved as
    ``<out_dir>/<name>.png`` when ``out_dir`` is given. Returns ``{name: Figure}``."""
    bad = [w for w in which if w not in PLOTS]
    if bad:
        raise ValueError(f"unknown plots {bad}; choose from {PLOTS}")
    import matplotlib
    if out_dir is not None and matplotlib.get_backend().lower().startswith("qt"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    def _ticks(ax):  # plain-text tick labels (mathtext layout is slow); 1-2-5 on short ranges
        for axis, lim in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            span = math.log10(max(lim) / max(min(lim), 1e-300))
            subs = (1.0, 2.0, 5.0) if span < 2.5 else (1.0,)
            axis.set_major_locator(LogLocator(base=10, subs=subs, numticks=8))
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(NullFormatter())

    m = res["meta"]
    where = f"{m['model']}, {m['device_name']}"
    present = list(dict.fromkeys(p["mode"] for p in res["profiles"]))
    modes = [mo for mo in MODES if mo in present] + [mo for mo in present if mo not in MODES]
    extra = iter(_EXTRA_STYLES * len(modes))
    styles = {mo: _STYLES.get(mo) or next(extra) for mo in modes}
    names = {mo: (labels or {}).get(mo) or MODES.get(mo, {}).get("label", mo) for mo in modes}
    ctx = dict(res=res, modes=modes, styles=styles, names=names, where=where, ticks=_ticks,
               xlabel="sampling steps N\n(dopri5: forward eps evaluations)")
    makers = {"memory": _plot_memory, "time": _plot_time, "grad_error": _plot_grad_error, "nfe_accuracy": _plot_nfe}
    figs = {}
    with plt.rc_context({"figure.dpi": dpi, "font.size": 10}):
        for name in PLOTS:
            if name in which:
                figs[name] = makers[name](plt, **ctx)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, f in figs.items():
            with atomic_path(out_dir / f"{name}.png", suffix=".png") as tmp:
                f.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight")
    return figs


def _mark_out_of_memory(ax, xs: list, style: dict) -> None:
    """An "x" at the top of the axes above each N that ran out of memory, labelled."""
    from matplotlib.transforms import blended_transform_factory
    top = blended_transform_factory(ax.transData, ax.transAxes)
    for x in xs:
        ax.plot([x], [0.93], transform=top, marker="x", ms=11, mew=2.5, color=style["color"], ls="none",
                clip_on=False)
        ax.annotate("out of memory", (x, 0.93), xycoords=top, xytext=(-8, 0), textcoords="offset points",
                    ha="right", va="center", fontsize=9, color=style["color"])


def _mark_all_out_of_memory(ax, res, modes, styles) -> None:
    """Mark every mode's out-of-memory configurations (with headroom above the data for the
    marks) and add one legend entry for them."""
    if not any(_failed(res, mo) for mo in modes):
        return
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi * 2.5 if ax.get_yscale() == "log" else hi + 0.3 * (hi - lo))
    for mo in modes:
        _mark_out_of_memory(ax, _failed(res, mo), styles[mo])
    ax.plot([], [], "kx", ms=9, mew=2, ls="none", label="x at the top: out of memory")


def _plot_memory(plt, res, modes, styles, names, where, ticks, xlabel):
    m = res["meta"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for mo in modes:
        for ax, key in zip(axes, ("peak_bytes", "saved_peak_bytes")):
            xs, ys = _series(res, mo, lambda p: p[key] / 2**20)
            ax.plot(xs, ys, **styles[mo], label=names[mo])
    mem_kind = "peak GPU memory" if m["device"].startswith("cuda") else "peak RSS"
    axes[0].set(xscale="log", yscale="log", xlabel=xlabel, ylabel=f"{mem_kind} above baseline (MiB)",
                title=f"Memory of one gradient ({mem_kind})")
    axes[1].set(xscale="log", yscale="log", xlabel=xlabel, ylabel="saved-for-backward peak (MiB)",
                title="Autograd saved tensors (deterministic)")
    for ax in axes:
        _mark_all_out_of_memory(ax, res, modes, styles)
        ticks(ax)
    axes[1].legend(**_LEGEND)
    fig.suptitle(where, fontsize=10)
    fig.tight_layout()
    return fig


def _plot_time(plt, res, modes, styles, names, where, ticks, xlabel):
    m = res["meta"]
    cpu = not m["device"].startswith("cuda")
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for mo in modes:
        xs, ys = _series(res, mo, lambda p: p["time_s"])
        ax.plot(xs, ys, **styles[mo], label=names[mo])
        if cpu:
            xs, ys = _series(res, mo, lambda p: p.get("cpu_time_s"))
            ax.plot(xs, ys, ":", color=styles[mo]["color"], alpha=0.7)
    if cpu:
        ax.plot([], [], "k:", label="dotted: CPU time of the process")
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="time per gradient (s, median)",
           title=f"Time of one gradient\n{where}, load {m['loadavg_start'][0]}")
    ax.title.set_fontsize(10)
    _mark_all_out_of_memory(ax, res, modes, styles)
    ticks(ax)
    ax.legend(**_LEGEND)
    fig.tight_layout()
    return fig


def _plot_grad_error(plt, res, modes, styles, names, where, ticks, xlabel):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), sharey=True)
    for ax, comp in zip(axes, COMPONENTS):
        for mo in modes:
            xs, ys = _series(res, mo, lambda p: p["errors"].get("vs_reference", {}).get(comp, {}).get("rel"))
            ax.plot(xs, ys, **styles[mo], label=f"{names[mo]} vs reference")
            if mo == "checkpoint":  # the exact discrete gradient itself
                continue
            xs, ys = _series(res, mo, lambda p: p["errors"].get("vs_discrete", {}).get(comp, {}).get("rel"))
            xs, ys = [x for x, y in zip(xs, ys) if y > 1e-7], [y for y in ys if y > 1e-7]
            if ys:  # (equal to the exact discrete gradient to rounding: not drawn)
                ax.plot(xs, ys, color=styles[mo]["color"], marker=styles[mo]["marker"], ms=5, ls=(0, (2, 2)),
                        alpha=0.6, label=f"{names[mo]} vs exact discrete")
        ax.set(xscale="log", yscale="log", xlabel=xlabel, title=f"gradient w.r.t. {comp}")
        ticks(ax)
    axes[0].set_ylabel("relative error")
    axes[-1].legend(**_LEGEND)
    fig.suptitle(f"Gradient error against the reference (checkpoint, {res['config']['ref_steps']} steps) "
                 f"and against the exact discrete gradient (checkpoint, same N) - {where}", fontsize=10)
    fig.tight_layout()
    return fig


def _plot_nfe(plt, res, modes, styles, names, where, ticks, xlabel):
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for name, pts in res.get("sweeps", {}).items():
        ok = [p for p in pts if "errors" in p]
        mode = name.split("_order")[0]
        style = styles.get(mode) or _STYLES.get(mode) or _EXTRA_STYLES[0]
        if mode == "dopri5":
            lbl = f"{names.get(mode, MODES['dopri5']['label'])} (rtol = "
        else:
            lbl = f"{names.get(mode) or MODES.get(mode, {}).get('label', mode)}, order 2 (N = "
        ax.plot([p["nfe"] for p in ok], [p["errors"]["max_rel"] for p in ok], **style,
                label=lbl + ", ".join(f"{p['value']:g}" for p in ok[:1]) + " .. "
                + ", ".join(f"{p['value']:g}" for p in ok[-1:]) + ")")
    target = res["config"]["target_error"]
    ax.axhline(target, color="k", lw=0.8, ls=":", label=f"target relative error {target:g}")
    ax.set(xscale="log", yscale="log", xlabel="eps evaluations per gradient (forward + backward)",
           ylabel="gradient error (max rel. of x_T, c, W)", title=f"Accuracy vs cost\n{where}")
    ax.title.set_fontsize(10)
    ax.legend(**_LEGEND)
    ticks(ax)
    fig.tight_layout()
    return fig
