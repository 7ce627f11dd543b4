"""The benchmark figures read cleanly: legends outside the axes, every series named and drawn
in its own style, out-of-memory configurations marked, labelled axes and titles, dpi >= 90."""
import copy

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from adjoint_lib import bench  # noqa: E402
from adjoint_lib.paths import data_dir  # noqa: E402


@pytest.fixture(scope="module")
def gpu_results():
    """The shipped GPU run: its backprop at N = 50 ran out of memory."""
    res = bench.load_results(data_dir("bench", "sd-arch_cuda", "results.json"))
    assert any(p["status"] == "oom" for p in res["profiles"]), "the shipped GPU run has no out-of-memory row"
    return res


@pytest.fixture(scope="module")
def toy_results():
    return bench.load_results(data_dir("bench", "toy2d_cpu", "results.json"))


def _series(ax):
    return [ln for ln in ax.get_lines() if len(ln.get_xdata()) and not ln.get_label().startswith("_")]


def test_out_of_memory_points_are_marked(gpu_results):
    figs = bench.plot_results(gpu_results, which=("memory", "time"))
    for fig in figs.values():
        for ax in fig.axes:
            texts = [t.get_text() for t in ax.texts]
            assert "out of memory" in texts, f"{ax.get_title()!r}: out-of-memory point not labelled"
            marks = [ln for ln in ax.get_lines() if ln.get_marker() == "x" and list(ln.get_xdata()) == [50]]
            assert marks, f"{ax.get_title()!r}: no 'x' marker at N = 50"
    plt.close("all")


def test_legends_sit_outside_the_axes(toy_results):
    figs = bench.plot_results(toy_results)
    for name, fig in figs.items():
        fig.canvas.draw()
        legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
        assert legends, f"{name}: no legend"
        for ax in fig.axes:
            box = ax.get_window_extent()
            for leg in legends:
                lb = leg.get_window_extent()
                overlap = min(lb.x1, box.x1) - max(lb.x0, box.x0) > 1 and min(lb.y1, box.y1) - max(lb.y0, box.y0) > 1
                assert not overlap, f"{name}: the legend covers the axes {ax.get_title()!r}"
    plt.close("all")


def test_every_series_is_named_styled_and_every_axes_labelled(toy_results):
    figs = bench.plot_results(toy_results)
    for name, fig in figs.items():
        assert fig.dpi >= 90, f"{name}: dpi {fig.dpi} < 90"
        assert any(ax.get_ylabel() for ax in fig.axes), f"{name}: no y label"
        for ax in fig.axes:
            assert ax.get_title() and ax.get_xlabel(), f"{name}: an axes lacks a title or x label"
            lines = [ln for ln in _series(ax) if ln.get_marker() not in ("None", None, "")]
            styles = [(ln.get_color(), ln.get_marker(), ln.get_linestyle()) for ln in lines]
            assert len(set(styles)) == len(styles), f"{name}: two series drawn alike"
        if name in ("memory", "time"):  # modes that coincide must differ in marker and line style, not only colour
            shapes = [(ln.get_marker(), ln.get_linestyle()) for ln in _series(fig.axes[0])
                      if ln.get_marker() not in ("None", None, "")]
            assert len(set(shapes)) == len(shapes), f"{name}: two series share marker and line style"
    plt.close("all")


def test_labels_name_series_for_what_they_are(gpu_results):
    res = copy.deepcopy(gpu_results)
    for p in res["profiles"]:
        p["mode"] = {"adjoint": "adjoint-cont", "adjoint-cache": "adjoint-cont-cache"}.get(p["mode"], p["mode"])
    lbl = "adjoint, continuous scheme (cached trajectory)"
    fig = bench.plot_results(res, which=("memory",), labels={"adjoint-cont-cache": lbl})["memory"]
    names = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert lbl in names and "adjoint, continuous scheme (backsolve)" in names, names
    assert "adjoint (backsolve)" not in names, "a continuous-scheme series labelled as the default adjoint"
    plt.close("all")
