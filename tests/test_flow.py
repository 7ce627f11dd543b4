"""Flow matching (rectified flow): the FlowSchedule, the velocity adapter for a tiny random
SD3 transformer, sampling from pure noise, and gradients (float64, one thread)."""
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

import adjoint_lib
from adjoint_lib import FlowSchedule, GaussianSchedule, VPSchedule
from adjoint_lib.models import FlowEps, GaussianEps, sample_flow

pytestmark = pytest.mark.usefixtures("one_thread")


def make_tiny_sd3(dtype=torch.float64, seed=0):
    """A ~12k-parameter SD3Transformer2DModel (one joint block), random weights."""
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                  pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8)
    return model.to(dtype).eval()


def sd3_inputs(dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    # x_T, (prompt_embeds, pooled, negative_embeds, negative_pooled), a target for the loss
    return r(2, 4, 8, 8), (r(1, 5, 16), r(1, 8), r(1, 5, 16), r(1, 8)), r(2, 4, 8, 8)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------- schedule
def test_flow_schedule_path_and_inverses():
    s = FlowSchedule.from_diffusers(FlowMatchEulerDiscreteScheduler(shift=3.0))
    assert s.shift == 3.0 and s.t_max == 1000.0
    t = torch.linspace(1.0, 999.0, 2001, dtype=torch.float64)
    assert torch.allclose(s.alpha(t) + s.sigma(t), torch.ones_like(t))  # not alpha^2 + sigma^2 = 1
    assert torch.allclose(s.sigma(t), t / 1000)
    assert torch.allclose(s.rho(t), s.sigma(t) / s.alpha(t))
    assert torch.allclose(s.lambda_(t), torch.log(s.alpha(t) / s.sigma(t)))
    assert (s.lambda_(t).diff() < 0).all()
    assert (s.t_of_rho(s.rho(t)) - t).abs().max() < 1e-9
    assert (s.t_of_lambda(s.lambda_(t)) - t).abs().max() < 1e-9
    assert torch.allclose(s.alpha_of_rho(s.rho(t)), s.alpha(t))  # the flow's alpha(rho), not 1/sqrt(1+rho^2)
    assert not torch.allclose(VPSchedule.alpha_of_rho(s.rho(t)), s.alpha(t))
    # the ends: alpha = 0, rho = inf at pure noise; rho = 0 at data
    ends = torch.tensor([1000.0, 0.0], dtype=torch.float64)
    assert s.alpha(ends).tolist() == [0.0, 1.0] and s.rho(ends).tolist() == [math.inf, 0.0]
    assert s.alpha_of_rho(torch.tensor(math.inf)).item() == 0.0
    assert s.t_of_rho(torch.tensor([math.inf, 0.0], dtype=torch.float64)).tolist() == [1000.0, 0.0]
    assert s.rho_end == 0.0
    assert s.alpha(torch.tensor([300.0], dtype=torch.float32)).dtype == torch.float32


def test_flow_schedule_refuses_bad_input():
    s = FlowSchedule()
    with pytest.raises(ValueError, match="rho contains NaN"):
        s.t_of_rho(torch.tensor([1.0, math.nan]))
    with pytest.raises(ValueError, match="rho must be >= 0"):
        s.t_of_rho(torch.tensor([-0.5]))
    with pytest.raises(ValueError, match="t contains NaN"):
        s.alpha(torch.tensor([math.nan]))
    with pytest.raises(ValueError, match="spacing"):
        s.timesteps(10, "karras")
    with pytest.raises(ValueError, match="lambda is infinite at t_start"):
        s.timesteps(10, "logsnr")  # from alpha = 0
    with pytest.raises(ValueError, match="shift"):
        FlowSchedule(shift=0.0)
    with pytest.raises(ValueError, match="invert_sigmas"):
        FlowSchedule.from_diffusers(FlowMatchEulerDiscreteScheduler(invert_sigmas=True))


def test_from_diffusers_dispatches_on_the_scheduler():
    flow, ddim = FlowMatchEulerDiscreteScheduler(), DDIMScheduler()
    assert isinstance(GaussianSchedule.from_diffusers(flow), FlowSchedule)
    assert isinstance(GaussianSchedule.from_diffusers(ddim), VPSchedule)
    with pytest.raises(TypeError, match="FlowSchedule"):
        VPSchedule.from_diffusers(flow)
    with pytest.raises(TypeError, match="VPSchedule"):
        FlowSchedule.from_diffusers(ddim)
    dpm_flow = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
    assert isinstance(GaussianSchedule.from_diffusers(dpm_flow), FlowSchedule)  # it has alphas_cumprod, but samples a flow
    assert FlowSchedule.from_diffusers(dpm_flow).shift == 3.0
    with pytest.raises(TypeError, match="FlowSchedule"):
        VPSchedule.from_diffusers(dpm_flow)


def test_shift_spacing_is_the_schedulers_grid():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(12)
    s = FlowSchedule.from_diffusers(sched)
    ours = s.timesteps(11, "shift", t_end=float(sched.timesteps[-1]))
    assert torch.allclose(ours, sched.timesteps.double(), rtol=1e-6, atol=1e-4)
    lin = s.timesteps(10, "time", t_start=990.0, t_end=10.0)
    assert torch.allclose(lin.diff(), torch.full((10,), -98.0, dtype=torch.float64))


def test_grid_uses_the_schedules_alpha():
    s = FlowSchedule()
    grid = adjoint_lib.make_grid(s, steps=6, spacing="time", t_start=900.0)
    for i, r in enumerate(grid.rho):
        assert grid.alpha(i) == pytest.approx(1.0 / (1.0 + r), rel=1e-12)
    assert grid.rho[-1] == 0.0 and grid.alpha(grid.steps) == 1.0
    assert math.isfinite(grid.lam_end) and grid.lam_end == pytest.approx(math.log(999.0))
    with pytest.raises(ValueError, match="alpha = 0"):
        adjoint_lib.make_grid(s, steps=6, spacing="time")
    with pytest.raises(ValueError, match="sample_flow"):
        adjoint_lib.make_grid(s, timesteps=[1000.0, 500.0])


# ----------------------------------------------------------------------------- closed form
def test_gaussian_data_closed_form_on_the_flow_path():
    """x_0 ~ N(m, s_d^2 I) on x_s = (1 - s) x_0 + s eps: eps = s (x - (1-s) m) / ((1-s)^2 s_d^2 + s^2) and the
    ODE keeps (x - (1-s) m) / sqrt((1-s)^2 s_d^2 + s^2) constant, so from s = 1: x_0 = m + s_d x_T."""
    s = FlowSchedule()
    model = GaussianEps(s, mu=0.3, s=0.5)
    x_T = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = model.flow(x_T, s.t_max, 0.0)
    assert torch.allclose(exact, 0.3 + 0.5 * x_T)
    # from pure noise (first step in data-prediction form): orders 1 and 2 converge, uniform grid in s
    for order, min_slope in [(1, 0.9), (2, 1.8)]:
        errs = [(sample_flow(model, x_T, schedule=s, steps=n, order=order, spacing="time") - exact).abs().max().item()
                for n in (10, 20, 40)]
        assert -np.polyfit(np.log([10, 20, 40]), np.log(errs), 1)[0] >= min_slope, errs
    # inside the path on a logSNR grid: orders 1-3 at their order
    t_end = 1.0
    exact_in = model.flow(x_T, 999.0, float(s.rho(torch.tensor(t_end, dtype=torch.float64))))
    for order in (1, 2, 3):
        errs = [(adjoint_lib.sample(model, x_T, schedule=s, steps=n, order=order, t_start=999.0, t_end=t_end)
                 - exact_in).abs().max().item() for n in (20, 40, 80)]
        assert -np.polyfit(np.log([20, 40, 80]), np.log(errs), 1)[0] >= 0.9 * order, (order, errs)


def test_sample_flow_needs_a_data_prediction():
    s = FlowSchedule()
    model = GaussianEps(s)
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="data_prediction"):
        sample_flow(lambda x, t, c: model(x, t, c), x, schedule=s, steps=4, spacing="time")
    with pytest.raises(ValueError, match="sample_flow"):
        adjoint_lib.sample(model, x, schedule=s, steps=4, spacing="time")
    # a grid that starts inside the path goes to sample() whole
    a = sample_flow(model, x, schedule=s, steps=4, spacing="time", t_start=950.0)
    b = adjoint_lib.sample(model, x, schedule=s, steps=4, spacing="time", t_start=950.0)
    assert torch.equal(a, b)
    # one step from pure noise lands on the data prediction
    one = sample_flow(model, x, schedule=s, steps=1, spacing="time")
    assert torch.allclose(one, model.data_prediction(x, torch.full((2,), 1000.0, dtype=torch.float64)))


# ----------------------------------------------------------------------------- SD3 adapter
def test_flow_eps_adapter_formulas():
    tr = make_tiny_sd3()
    s = FlowSchedule()
    x, (e, p, ne, npool), _ = sd3_inputs()
    t = torch.tensor([300.0, 800.0], dtype=torch.float64)
    v_c = tr(hidden_states=x, timestep=t, encoder_hidden_states=e.expand(2, -1, -1),
             pooled_projections=p.expand(2, -1), return_dict=False)[0]
    v_u = tr(hidden_states=x, timestep=t, encoder_hidden_states=ne.expand(2, -1, -1),
             pooled_projections=npool.expand(2, -1), return_dict=False)[0]
    sv = (t / 1000).view(-1, 1, 1, 1)
    plain = FlowEps(tr, s)
    assert torch.allclose(plain(x, t, (e, p)), x + (1 - sv) * v_c)
    assert torch.allclose(plain.data_prediction(x, t, (e, p)), x - sv * v_c)
    guided = FlowEps(tr, s, guidance_scale=5.0)
    assert torch.allclose(guided.velocity(x, t, (e, p, ne, npool)), v_u + 5.0 * (v_c - v_u), atol=1e-12)
    with pytest.raises(ValueError, match="negative_pooled"):
        guided(x, t, (e, p))
    with pytest.raises(TypeError, match="FlowSchedule"):
        FlowEps(tr, VPSchedule.from_diffusers(DDIMScheduler()))


def test_order1_is_diffusers_flow_match_euler():
    """Order 1 on the scheduler's own timesteps (from s = 1, shift 3, guidance) == diffusers' loop."""
    tr = make_tiny_sd3(torch.float32)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    x_T, (e, p, ne, npool), _ = sd3_inputs(torch.float32)
    w = 4.0
    x = x_T.clone()
    with torch.no_grad():
        for t in sched.timesteps:  # StableDiffusion3Pipeline's loop
            out = tr(hidden_states=torch.cat([x, x]), timestep=t.expand(4),
                     encoder_hidden_states=torch.cat([ne, ne, e, e]), pooled_projections=torch.cat([npool, npool, p, p]),
                     return_dict=False)[0]
            v_u, v_c = out.chunk(2)
            x = sched.step(v_u + w * (v_c - v_u), t, x, return_dict=False)[0]
    stats = adjoint_lib.SampleStats()
    ours = sample_flow(FlowEps(tr, FlowSchedule.from_diffusers(sched), guidance_scale=w), x_T, (e, p, ne, npool),
                       schedule=FlowSchedule.from_diffusers(sched), timesteps=sched.timesteps, order=1, stats=stats)
    assert rel(ours, x) < 1e-5
    assert stats.nfe_forward == 10 and stats.steps == 10


def _sd3_gradients(tr, steps, order, **mode):
    s = FlowSchedule(shift=3.0)
    x_T, (e, p, ne, npool), target = sd3_inputs()
    x, e, p = x_T.requires_grad_(), e.requires_grad_(), p.requires_grad_()
    params = list(tr.parameters())
    for q in params:
        q.grad = None
    out = sample_flow(FlowEps(tr, s, guidance_scale=3.0), x, (e, p, ne, npool), schedule=s, steps=steps, order=order,
                      params=params, **mode)
    ((out - target) ** 2).sum().backward()
    return [x.grad, e.grad, p.grad, torch.cat([q.grad.flatten() for q in params])]


def test_checkpoint_equals_backprop_sd3():
    tr = make_tiny_sd3()
    for order in (1, 2):
        ck = _sd3_gradients(tr, 6, order, grad="checkpoint")
        bp = _sd3_gradients(tr, 6, order, grad="backprop")
        for a, b in zip(ck, bp):
            assert b.norm() > 0 and rel(a, b) < 1e-6


def test_adjoint_matches_the_discrete_gradient_sd3():
    """Default adjoint (transpose scheme, backsolve), 50 steps of order 2: cosine >= 0.999 with checkpoint
    for x_T, the text embeddings, the pooled embedding and the weights."""
    tr = make_tiny_sd3()
    ck = _sd3_gradients(tr, 50, 2, grad="checkpoint")
    ad = _sd3_gradients(tr, 50, 2, grad="adjoint")
    coarse = _sd3_gradients(tr, 4, 2, grad="checkpoint")
    for a, b, c in zip(ad, ck, coarse):
        cos = ((a * b).sum() / (a.norm() * b.norm())).item()
        assert cos >= 0.999, cos
        assert rel(a, b) < 0.5 * rel(c, b)  # closer to its own sampler's gradient than a 4-step sampler's


# ----------------------------------------------------------------------------- the 2-D flow toy
def test_flow2d_shipped_weights_sample_the_ring():
    from adjoint_lib import flow2d, toy2d

    eps_fn, schedule = flow2d.load_flow()
    assert isinstance(eps_fn, FlowEps) and isinstance(schedule, FlowSchedule)
    x_T = torch.randn(400, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x0 = sample_flow(eps_fn, x_T, toy2d.one_hot(torch.arange(400) % 8, 8), schedule=schedule, steps=10, order=2)
    assert (toy2d.nearest_mode(x0) == torch.arange(400) % 8).double().mean() > 0.95
    assert toy2d.mode_fraction(x0) > 0.8


def test_flow2d_cli_writes_outputs_and_guards_data(tmp_path):
    from adjoint_lib import flow2d

    with pytest.raises(SystemExit, match="--force"):
        flow2d.main(["--out", str(flow2d.data_dir("flow2d")), "--steps", "2"])
    flow2d.main(["--out", str(tmp_path), "--steps", "3", "--batch", "16", "--kind", "moons"])
    eps_fn, _ = flow2d.load_flow("moons", folder=tmp_path)
    assert flow2d.training_log("moons", folder=tmp_path)["steps"] == 3
    assert eps_fn(torch.zeros(3, 2), torch.full((3,), 500.0), torch.zeros(1, 2)).shape == (3, 2)


# ----------------------------------------------------------------------------- FLUX
def make_tiny_flux(dtype=torch.float64, seed=0):
    """A tiny FluxTransformer2DModel (one double and one single block, distilled guidance), random weights."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                   guidance_embeds=True, axes_dims_rope=(4, 4, 8))
    return model.to(dtype).eval()


def test_order1_is_the_flux_pipeline_loop():
    """FluxPipeline's loop (packed latents, position ids, timestep s, distilled guidance 3.5, true CFG 2,
    dynamic shift) == sample_flow at order 1 on the scheduler's timesteps."""
    from adjoint_lib.models.flow import _flux_image_ids, _flux_pack, _flux_unpack

    tr = make_tiny_flux(torch.float32)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 8, 8), mu=0.8)
    g = torch.Generator().manual_seed(1)
    x_T, e, p, ne, npool = (torch.randn(*shape, generator=g) for shape in [(2, 4, 8, 8), (1, 6, 32), (1, 32), (1, 6, 32), (1, 32)])
    w, distilled = 2.0, 3.5
    lat, ids, txt_ids = _flux_pack(x_T), _flux_image_ids(8, 8, x_T), torch.zeros(6, 3)
    with torch.no_grad():
        for t in sched.timesteps:
            common = dict(hidden_states=lat, timestep=t.expand(2) / 1000, guidance=torch.full((2,), distilled),
                          txt_ids=txt_ids, img_ids=ids, return_dict=False)
            v_c = tr(pooled_projections=p.expand(2, -1), encoder_hidden_states=e.expand(2, -1, -1), **common)[0]
            v_u = tr(pooled_projections=npool.expand(2, -1), encoder_hidden_states=ne.expand(2, -1, -1), **common)[0]
            lat = sched.step(v_u + w * (v_c - v_u), t, lat, return_dict=False)[0]
    s = FlowSchedule.from_diffusers(sched)
    ours = sample_flow(FlowEps(tr, s, guidance_scale=w, flux_guidance=distilled), x_T, (e, p, ne, npool), schedule=s,
                       timesteps=sched.timesteps, order=1)
    assert rel(ours, _flux_unpack(lat, 8, 8)) < 1e-5
    with pytest.raises(ValueError, match="flux_guidance"):
        FlowEps(tr, s)


def test_checkpoint_equals_backprop_flux():
    tr = make_tiny_flux()
    s = FlowSchedule(shift=3.0)
    g = torch.Generator().manual_seed(2)
    x_T, e, p, target = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in [(2, 4, 8, 8), (1, 6, 32), (1, 32), (2, 4, 8, 8)])
    params = list(tr.parameters())
    out = {}
    for mode in ("checkpoint", "backprop"):
        x, ee, pp = x_T.clone().requires_grad_(), e.clone().requires_grad_(), p.clone().requires_grad_()
        for q in params:
            q.grad = None
        x0 = sample_flow(FlowEps(tr, s, flux_guidance=3.5), x, (ee, pp), schedule=s, steps=5, order=2, grad=mode, params=params)
        ((x0 - target) ** 2).sum().backward()
        out[mode] = [x.grad, ee.grad, pp.grad, torch.cat([q.grad.flatten() for q in params])]
    for a, b in zip(out["checkpoint"], out["backprop"]):
        assert b.norm() > 0 and rel(a, b) < 1e-6


def test_flow2d_cli_validates_flags_and_protects_shipped_data(capsys):
    from adjoint_lib import flow2d

    with pytest.raises(SystemExit) as e:
        flow2d.main(["--steps", "0"])
    assert e.value.code == 2 and "--steps" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--force"):
        flow2d.main(["--out", "data/flow2d", "--steps", "1"])
