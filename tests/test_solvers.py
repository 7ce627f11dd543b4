import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

import adjoint_lib
from adjoint_lib import phi_integrals, ei_weights
from adjoint_lib.models import GaussianEps, UNetEps


def test_phi_integrals_against_quadrature():
    for rho_a, rho_b in [(2.0, 1.5), (5.0, 0.3), (1.0, 0.999), (0.2, 0.9)]:
        h = math.log(rho_a / rho_b)
        lam = np.linspace(0.0, h, 200001) - math.log(rho_a)  # lambda from lambda_a to lambda_b
        rho = np.exp(-lam)
        for m, phi in enumerate(phi_integrals(rho_a, rho_b, 3)):
            f = (lam - lam[0]) ** m
            quad = np.sum(0.5 * (f[1:] + f[:-1]) * np.diff(rho))
            assert phi == pytest.approx(quad, rel=1e-6, abs=1e-12)
    assert phi_integrals(3.0, 0.0, 3) == [-3.0, -3.0, -6.0]


def test_ei_weights_exact_for_polynomials():
    lams, ra, rb = [0.1, -0.3, -0.6], math.exp(-0.1), math.exp(-0.5)
    w = ei_weights(lams, ra, rb)
    phi = phi_integrals(ra, rb, 3)
    for m in range(3):  # integrates (lambda - lambda_0)^m exactly
        assert sum(wj * (lj - lams[0]) ** m for wj, lj in zip(w, lams)) == pytest.approx(phi[m], rel=1e-10)


def test_order1_is_diffusers_ddim(tiny_unet):
    """Euler in rho on a DDIM grid == the diffusers DDIM loop (eta=0)."""
    unet = tiny_unet.float()
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    sched.set_timesteps(12)
    torch.manual_seed(1)
    x_T, emb = torch.randn(2, 2, 8, 8), torch.randn(2, 4, 8)
    x = x_T.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t, encoder_hidden_states=emb).sample, t, x, eta=0.0).prev_sample
    ours = adjoint_lib.sample(UNetEps(unet), x_T, emb, schedule=adjoint_lib.VPSchedule.from_diffusers(sched),
                              timesteps=sched.timesteps, order=1)
    assert ((ours - x).norm() / x.norm()).item() < 1e-5


def test_float_timesteps_end_where_scheduler_ends():
    sched = DDIMScheduler(set_alpha_to_one=False)
    s = adjoint_lib.VPSchedule.from_diffusers(sched)
    grid = adjoint_lib.make_grid(s, timesteps=[900.5, 500.25, 100.75])
    assert grid.rho[-1] == pytest.approx(s.rho_end) and grid.rho[-1] > 0
    assert float(grid.t[1]) == 500.25
    model = GaussianEps(s, mu=0.2, s=0.5)
    x_T = torch.randn(3, 4, dtype=torch.float64)
    ts = s.timesteps(200, "logsnr", t_end=0.5)[:-1]  # float timesteps, ending at t=0.5
    x0 = adjoint_lib.sample(model, x_T, schedule=s, timesteps=ts, order=3)
    err_end = (x0 - model.flow(x_T, 999.0, s.rho_end)).abs().max()
    err_last_t = (x0 - model.flow(x_T, 999.0, float(s.rho(ts[-1])))).abs().max()
    assert err_end < 1e-5 and err_last_t > 10 * err_end, (err_end, err_last_t)


@pytest.mark.parametrize("order,min_slope", [(1, 0.8), (2, 1.6), (3, 2.4)])
def test_convergence_order_on_gaussian(order, min_slope):
    """logSNR-uniform grid, float64: error vs. the exact flow falls like steps^-order."""
    s = adjoint_lib.VPSchedule.from_diffusers(DDPMScheduler(beta_schedule="linear"))
    model = GaussianEps(s, mu=0.3, s=0.5)
    torch.manual_seed(0)
    x_T = torch.randn(8, 3, dtype=torch.float64)
    exact = model.flow(x_T, s.t_max, float(s.rho(torch.tensor(0.0, dtype=torch.float64))))
    steps = [10, 20, 40, 80]
    errs = [(adjoint_lib.sample(model, x_T, schedule=s, steps=n, order=order) - exact).abs().max().item()
            for n in steps]
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert slope >= min_slope, (errs, slope)


def test_v_prediction_adapter(tiny_unet):
    s = adjoint_lib.VPSchedule.from_diffusers(DDPMScheduler())
    wrap_v = UNetEps(tiny_unet, schedule=s, prediction_type="v_prediction")
    x, t, emb = torch.randn(2, 2, 8, 8, dtype=torch.float64), torch.tensor([300.0, 700.0], dtype=torch.float64), torch.randn(2, 4, 8, dtype=torch.float64)
    v = tiny_unet(x, t, encoder_hidden_states=emb).sample
    a, sg = s.alpha(t).view(-1, 1, 1, 1), s.sigma(t).view(-1, 1, 1, 1)
    assert torch.allclose(wrap_v(x, t, emb), a * v + sg * x)
    with pytest.raises(ValueError):
        UNetEps(tiny_unet, prediction_type="v_prediction")


def test_sample_bad_input():
    s = adjoint_lib.VPSchedule.from_diffusers(DDPMScheduler())
    model = GaussianEps(s)
    x = torch.randn(2, 3)
    for kwargs in [dict(steps=5, order=4), dict(steps=5, grad="magic"), dict(), dict(steps=5, timesteps=[5.0]),
                   dict(timesteps=[3.0, 8.0]), dict(steps=5, trajectory="disk"),
                   dict(steps=5, grad="adjoint", scheme="exact")]:
        with pytest.raises(ValueError):
            adjoint_lib.sample(model, x, schedule=s, **kwargs)
    with pytest.raises(ValueError, match="shaped like x"):
        adjoint_lib.sample(lambda x, t, c: x[:, :1], x, schedule=s, steps=3)


def test_exp_moments_against_quadrature_and_the_two_weight_families_agree():
    """One quadrature serves both: the moments match numerical integration for c < 0, c = 0,
    small and large |c h|, and ei_weights(lambdas, rho_a, rho_b) = -rho_a lambda_weights(c=1)."""
    from adjoint_lib.solvers import exp_moments, lambda_weights

    for h, c in [(0.7, 0.0), (0.3, 1e-3), (1.5, 1.0), (-0.8, 1.0), (2.0, -3.0), (0.05, 5.0), (3.0, 0.9)]:
        s = np.linspace(0.0, h, 400001)
        for m, mom in enumerate(exp_moments(h, c, 3)):
            quad = np.trapezoid(np.exp(-c * s) * s ** m, s)
            assert abs(mom - quad) <= 1e-8 * max(1.0, abs(quad)), (h, c, m)
    assert exp_moments(math.inf, 2.0, 3) == [0.5, 0.25, 0.25]
    lams, ra = [0.3, 0.0, -0.4], math.exp(-0.3)
    for rb in (math.exp(-0.9), math.exp(-0.31)):
        w_ei = ei_weights(lams, ra, rb)
        w_lam = lambda_weights(lams, -math.log(rb), c=1.0)
        assert np.allclose(w_ei, [-ra * w for w in w_lam], rtol=1e-12, atol=1e-15)
