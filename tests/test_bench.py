"""The benchmark harness: end to end on a tiny toy grid, the memory meters, NFE counting."""
import json

import pytest
import torch

from adjoint_lib.memory import SavedTensorMeter

from adjoint_lib import bench


@pytest.fixture(scope="module")
def toy():
    torch.set_num_threads(1)
    return bench.build_problem("toy2d", batch=64)


def test_quick_bench_end_to_end(tmp_path, monkeypatch):
    """A tiny in-process grid writes results.json with every section, PNGs and a table."""
    monkeypatch.setenv("ADJOINTDPM_OUTPUTS", str(tmp_path / "outputs"))
    res = bench.run_benchmark(model="toy2d", quick=True, steps=[4, 8], batch=32, tols=[1e-1],
                              ref_steps=40, sweep_steps=[4, 8, 16], sweep_tols=[1e-1, 1e-2],
                              isolate="none", out=tmp_path / "bench", progress=False)
    folder = tmp_path / "bench" / "toy2d_cpu"
    on_disk = json.loads((folder / "results.json").read_text())
    assert on_disk["checks"] == json.loads(json.dumps(res["checks"]))
    for key in ("meta", "config", "problem", "reference", "profiles", "sweeps", "nfe_to_accuracy", "checks"):
        assert key in on_disk, key
    for key in ("device", "device_name", "cpu_model", "torch_version", "loadavg_start", "loadavg_end", "date"):
        assert key in on_disk["meta"], key
    for name in ("memory", "time", "grad_error", "nfe_accuracy"):
        png = folder / f"{name}.png"
        assert png.exists() and png.stat().st_size < 200_000
    rows = {(p["mode"], p["steps"] or p["rtol"]): p for p in res["profiles"]}
    assert set(m for m, _ in rows) == set(bench.MODES) - {"adjoint-cont"}  # --quick leaves it out
    for (mode, n), p in rows.items():
        assert p["status"] == "ok"
        assert len(p["times_s"]) == 3 and p["time_s"] > 0
        assert p["peak_bytes"] >= 0 and p["saved_peak_bytes"] > 0
        assert set(p["errors"]["vs_reference"]) >= {"x_T", "cond", "weights", "max_rel"}
        if mode == "checkpoint":
            assert p["errors"]["vs_discrete"]["x_T"]["rel"] == 0.0
        if mode == "backprop":
            assert p["errors"]["vs_discrete"]["x_T"]["rel"] < 1e-4
    assert set(res["sweeps"]) == {"adjoint_order2", "dopri5"}
    assert [p["nfe"] for p in res["sweeps"]["adjoint_order2"]] == [9, 17, 33]  # 2N + 1 (eps at y_N)
    assert res["reference"]["steps"] == 40 and "self_check" in res["reference"]
    table = bench.format_table(res)
    assert "adjoint" in table and "dopri5" in table and "NFE to rel. error" in table


@pytest.mark.parametrize("mode,fwd,bwd", [("adjoint", 6, 7), ("adjoint-cache", 6, 6), ("adjoint-cont", 6, 7),
                                          ("checkpoint", 6, 6), ("backprop", 6, 0)])
def test_nfe_counts(toy, mode, fwd, bwd):
    stats = bench.SampleStats()
    g = bench.gradient(toy, mode, steps=6, stats=stats)
    assert (stats.nfe_forward, stats.nfe_backward) == (fwd, bwd)
    assert g["x_T"].shape == toy.x_T.shape and g["cond"].shape == toy.cond.shape
    assert g["weights"].numel() == toy.info["n_params"]


def test_dopri5_counts_forward_and_backward(toy):
    stats = bench.SampleStats()
    bench.gradient(toy, "dopri5", rtol=1e-1, stats=stats)
    # dopri5: 6 evaluations per step (FSAL) + 1 initial + a few rejected steps, both ways
    assert stats.nfe_forward >= 7 and stats.nfe_backward >= 7


def test_saved_tensor_memory_grows_only_for_backprop(toy):
    """Deterministic memory (autograd saved tensors): constant in N for the adjoint with
    backsolve, linear in N for backprop."""
    peak = {(m, n): bench.saved_tensor_peak(toy, m, n)[0] for m in ("adjoint", "backprop") for n in (4, 16)}
    assert peak["adjoint", 16] == peak["adjoint", 4] > 0
    assert peak["backprop", 16] >= 3.5 * peak["backprop", 4]
    assert peak["backprop", 4] > peak["adjoint", 4]


def test_peak_rss_meter_sees_an_allocation():
    bench.pin_malloc()
    with bench.PeakRSS() as p:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del x
    assert p.peak_bytes >= 48 * 2**20, p.method
    with bench.PeakRSS() as q:
        torch.ones(10).sum()
    assert q.peak_bytes < 16 * 2**20


def test_nfe_to_reach_interpolates_log_log():
    pts = [(10, 1e-1), (100, 1e-3), (1000, 1e-5)]
    r = bench.nfe_to_reach(pts, 1e-2)
    assert r["nfe_first"] == 100 and abs(r["nfe_interp"] - 31.6) < 0.1
    assert bench.nfe_to_reach([(10, 1.0)], 1e-2) is None
    assert bench.nfe_to_reach([(10, 1e-3)], 1e-2)["nfe_interp"] == 10


def test_isolated_job_in_subprocess(tmp_path):
    """One configuration in a fresh process (the CPU memory protocol), via the --worker CLI."""
    job = dict(problem=dict(model="toy2d", device="cpu", batch=16, guidance=None, size=None, seed=0,
                            dtype="float32"),
               threads=1, order=2, kind="profile", mode="backprop", steps=5, repeats=3, name="bp5",
               grads_path=str(tmp_path / "bp5.grads.pt"))
    r = bench.run_isolated(job, tmp_path)
    assert r["status"] == "ok", r
    assert (r["nfe_forward"], r["nfe_backward"]) == (5, 0)
    assert r["saved_peak_bytes"] > 0 and r["memory_method"]
    assert set(torch.load(job["grads_path"])) == {"x_T", "cond", "weights"}


def test_sd_arch_tiny_profile_keeps_the_architecture():
    """The --quick sd-arch profile: SD 1.x block structure, 77x768 conditioning, 8x8 latents."""
    torch.set_num_threads(1)
    p = bench.build_problem("sd-arch", size="tiny")
    net = p.eps_fn.unet
    assert [type(b).__name__ for b in net.down_blocks] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert net.config.cross_attention_dim == 768 and p.info["size"] == "tiny"
    assert p.x_T.shape == (1, 4, 8, 8) and p.cond.shape == (1, 77, 768)
    stats = bench.SampleStats()
    g = bench.gradient(p, "checkpoint", steps=2, stats=stats)
    assert (stats.nfe_forward, stats.nfe_backward) == (2, 2)
    assert all(torch.isfinite(v).all() and v.abs().sum() > 0 for v in g.values())
    assert bench.DEFAULTS["sd-arch"]["quick"]["size"] == "tiny"


def test_bad_arguments():
    with pytest.raises(ValueError, match="model must be"):
        bench.build_problem("nope")
    with pytest.raises(ValueError, match="repeats"):
        bench.run_benchmark(repeats=2)
    with pytest.raises(ValueError, match="unknown modes"):
        bench.run_benchmark(modes=["adjoint", "magic"])
    with pytest.raises(ValueError, match="size"):
        bench.sd_unet_config("huge")


def test_meter_frees_graphs_kept_by_retain_graph():
    """torchdiffeq's adjoint calls autograd.grad(..., retain_graph=True) and drops the graph;
    ops that save their output (softmax) must not be kept alive by the meter."""
    x = torch.randn(4096, requires_grad=True)
    w = torch.randn(4096)
    with SavedTensorMeter() as meter:
        for _ in range(5):
            y = torch.softmax(x, 0).exp()
            torch.autograd.grad((y * w).sum(), x, retain_graph=True)
            del y
    assert meter.alive_bytes == 0 and meter.peak_bytes > 0


def test_eps_roughness_tells_smooth_from_oscillating_time_dependence():
    """eps = 0.1 x cos(t/200) + a sin(t) c: the second difference per h^2 is the same at
    every spacing without the 1-rad-per-timestep term (a = 0) and grows as h shrinks with it;
    for the smooth part it matches the analytic second derivative."""
    from adjoint_lib.toy2d import toy_schedule

    def problem(a):
        def eps_fn(x, t, c):
            t = t.to(x.dtype)[:, None]
            return 0.1 * x * torch.cos(t / 200) + a * torch.sin(t) * c
        x_T = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        return bench.Problem(eps_fn, toy_schedule(), x_T, torch.ones(16, 2, dtype=torch.float64), None,
                             [], torch.zeros_like(x_T))

    smooth = bench.eps_roughness(problem(0.0), 300.0, (0.5, 4.0, 16.0))
    assert max(smooth.values()) / min(smooth.values()) < 1.01
    e = bench.eps_along_t(problem(0.0), 300.0, [0.0])[0]  # = 0.1 x cos(1.5): d2/dt2 = -e / 200^2
    assert abs(smooth[0.5] / float(e.pow(2).mean().sqrt() / 200 ** 2) - 1) < 1e-3
    wiggly = bench.eps_roughness(problem(1e-3), 300.0, (0.5, 4.0, 16.0))
    assert wiggly[0.5] > 10 * wiggly[16.0]
    with pytest.raises(ValueError, match="t_center"):
        bench.eps_along_t(problem(0.0), 2000.0, [0.0])


def test_dropping_the_fastest_time_frequencies_smooths_minisd():
    """MiniSD's eps oscillates in t (period ~2 pi timesteps); without its two fastest timestep
    features it is smooth, and the time-embedding weights reading them get exactly zero gradient."""
    torch.set_num_threads(1)
    ratio = {}
    for k in (0, 2):
        p = bench.build_problem("mini", batch=2, drop_time_freqs=k)
        r = bench.eps_roughness(p, 100.0, (0.25, 16.0))
        ratio[k] = r[0.25] / r[16.0]
    assert ratio[0] > 20 and ratio[2] < 3, ratio
    assert p.info["drop_time_freqs"] == [0, 1, 8, 9]
    g = bench.gradient(p, "checkpoint", steps=3)
    w = p.eps_fn.unet.time_embedding.linear_1.weight
    gw = g["weights"][bench.weight_slice(p.eps_fn.unet, "time_embedding.linear_1.weight")].view(w.shape)
    assert gw[:, [0, 1, 8, 9]].abs().max() == 0 and gw[:, [2, 3]].abs().max() > 0
    with pytest.raises(ValueError, match="drop_time_freqs"):
        bench.build_problem("toy2d", drop_time_freqs=1)
    with pytest.raises(ValueError, match="drop_time_freqs"):
        bench.drop_time_frequencies(p.eps_fn.unet, 9)
