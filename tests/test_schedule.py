import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from adjoint_lib import VPSchedule

SCHEDULERS = [
    DDPMScheduler(beta_schedule="linear"),
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    DDIMScheduler(beta_schedule="squaredcos_cap_v2", set_alpha_to_one=False),
]


@pytest.mark.parametrize("sched", SCHEDULERS, ids=["linear", "scaled_linear", "cosine"])
def test_round_trips_and_monotone(sched):
    s = VPSchedule.from_diffusers(sched)
    t = torch.linspace(0, 999, 4001, dtype=torch.float64)
    lam = s.lambda_(t)
    assert (lam[1:] < lam[:-1]).all(), "lambda must be strictly decreasing"
    assert (s.t_of_lambda(lam) - t).abs().max() < 1e-4
    assert (s.t_of_rho(s.rho(t)) - t).abs().max() < 1e-4
    n = torch.arange(1000, dtype=torch.float64)
    assert (s.alpha(n) ** 2 - sched.alphas_cumprod.double()).abs().max() < 1e-6
    assert torch.allclose(s.alpha(t) ** 2 + s.sigma(t) ** 2, torch.ones_like(t))
    assert torch.allclose(s.rho(t), s.sigma(t) / s.alpha(t))
    assert torch.allclose(VPSchedule.alpha_of_rho(s.rho(t)), s.alpha(t))


def test_final_alpha_recorded():
    assert VPSchedule.from_diffusers(DDIMScheduler(set_alpha_to_one=True)).rho_end == 0.0
    sched = DDIMScheduler(set_alpha_to_one=False)
    s = VPSchedule.from_diffusers(sched)
    assert s.final_alpha_cumprod == pytest.approx(float(sched.alphas_cumprod[0]))
    assert s.rho_end == pytest.approx(float(s.rho(torch.tensor(0.0))))
    assert VPSchedule.from_diffusers(DPMSolverMultistepScheduler()).rho_end == 0.0
    dpm_min = DPMSolverMultistepScheduler(final_sigmas_type="sigma_min")
    assert VPSchedule.from_diffusers(dpm_min).rho_end > 0


def test_float_dtypes_and_grid():
    s = VPSchedule.from_diffusers(DDPMScheduler())
    assert s.alpha(torch.tensor([3.5], dtype=torch.float32)).dtype == torch.float32
    assert s.alpha(torch.tensor([3.5], dtype=torch.float64)).dtype == torch.float64
    for spacing in ("logsnr", "time", "quadratic"):
        ts = s.timesteps(10, spacing)
        assert ts.shape == (11,) and float(ts[0]) == 999 and float(ts[-1]) == 0 and (ts[1:] < ts[:-1]).all()
    lam = s.lambda_(s.timesteps(10, "logsnr"))
    assert torch.allclose(lam.diff(), lam.diff()[0].expand(10), rtol=1e-6)


def test_bad_input():
    with pytest.raises(ValueError):
        VPSchedule.from_alphas_cumprod(torch.tensor([0.5, 0.9]))
    with pytest.raises(ValueError):
        VPSchedule.from_diffusers(DDPMScheduler()).timesteps(0)
    with pytest.raises(ValueError):
        VPSchedule.from_diffusers(DDPMScheduler()).timesteps(10, "cosine")


def test_inverse_maps_refuse_nan_and_negative_rho():
    from diffusers import DDPMScheduler

    s = VPSchedule.from_diffusers(DDPMScheduler())
    with pytest.raises(ValueError, match="rho contains NaN"):
        s.t_of_rho(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="rho must be >= 0"):
        s.t_of_rho(-0.5)
    with pytest.raises(ValueError, match="lambda contains NaN"):
        s.t_of_lambda(float("nan"))
    with pytest.raises(ValueError, match="t contains NaN"):
        s.alpha(torch.tensor(float("nan")))
    assert float(s.t_of_rho(0.0)) == s.t_min  # rho = 0 is clean data


def test_schedule_follows_the_device_of_t():
    """Tables move to t's device (a CUDA t against CPU tables made searchsorted fail); checked
    on the meta device, which needs no GPU."""
    from diffusers import DDPMScheduler

    s = VPSchedule.from_diffusers(DDPMScheduler())
    t = torch.tensor([10.0, 500.0], dtype=torch.float64)
    assert s.alpha(t.to("meta")).device.type == "meta"
    assert s.sigma(t.to("meta")).device.type == "meta"
