"""sample() refuses bad input naming the argument, merges repeated params, names the step of a
non-finite state or gradient, and keeps half-precision networks' gradients from underflowing."""
import math

import pytest
import torch

import adjoint_lib
from adjoint_lib.models import UNetEps

from conftest import make_tiny_unet


def _problem(dtype=torch.float64, seed=0):
    """A linear eps_fn ``eps = tanh(W x) + c`` with weight W and conditioning c."""
    torch.manual_seed(seed)
    W = (0.3 * torch.randn(2, 2, dtype=dtype)).requires_grad_()
    c = (0.1 * torch.randn(1, 2, dtype=dtype)).requires_grad_()
    x_T = torch.randn(4, 2, dtype=dtype, requires_grad=True)

    def eps_fn(x, t, cond):
        return torch.tanh(x @ W.T) + cond

    return eps_fn, x_T, c, W


def _grads(grad, params_of, **kw):
    eps_fn, x_T, c, W = _problem()
    out = adjoint_lib.sample(eps_fn, x_T, c, schedule=_sched(), steps=6, order=2, grad=grad,
                             params=params_of(c, W), **kw)
    (out ** 2).sum().backward()
    return x_T.grad.clone(), c.grad.clone(), W.grad.clone()


def _sched():
    return adjoint_lib.VPSchedule.from_alphas_cumprod(torch.linspace(0.999, 0.01, 1000))


@pytest.mark.parametrize("grad", ["adjoint", "checkpoint", "backprop"])
@pytest.mark.parametrize("extra", [
    pytest.param(lambda c, W: [W, W], id="repeated-param-counts-once"),
    pytest.param(lambda c, W: [W, c], id="cond-also-in-params-gets-its-gradient-once"),
])
def test_params_are_merged_not_double_counted(grad, extra):
    plain = _grads(grad, lambda c, W: [W])
    merged = _grads(grad, extra)
    for a, b in zip(plain, merged):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("grad", [None, "adjoint"])
def test_non_finite_x_T_is_refused_up_front(bad, grad):
    eps_fn, x_T, c, W = _problem()
    x = x_T.detach().clone()
    x[0, 0] = bad
    with pytest.raises(ValueError, match="x_T contains NaN or inf"):
        adjoint_lib.sample(eps_fn, x.requires_grad_(grad is not None), c, schedule=_sched(), steps=4, grad=grad)


def test_non_finite_eps_in_the_forward_pass_names_the_step():
    def eps_fn(x, t, cond):
        return x / (t - t) if float(t[0]) < 500 else x  # inf once t drops below 500

    with pytest.raises(FloatingPointError, match=r"forward pass at step \d"):
        adjoint_lib.sample(eps_fn, torch.randn(2, 2), None, schedule=_sched(), steps=8)


@pytest.mark.parametrize("grad", ["adjoint", "checkpoint"])
def test_non_finite_parameter_gradient_names_the_step(grad):
    """A weight whose vjp is inf at one node (|W| backward through sqrt at 0) is reported."""
    torch.manual_seed(0)
    W = torch.zeros(2, dtype=torch.float64, requires_grad=True)

    def eps_fn(x, t, cond):
        return x + torch.sqrt(W).sum()  # d/dW sqrt(0) = inf

    out = adjoint_lib.sample(eps_fn, torch.randn(3, 2, dtype=torch.float64), None, schedule=_sched(),
                             steps=4, grad=grad, params=[W])
    with pytest.raises(FloatingPointError, match=r"gradient of params\[0\] in the backward pass at step \d"):
        out.sum().backward()


@pytest.mark.parametrize("kw, match", [
    (dict(order=2.0), "order must be the int"),
    (dict(order=True), "order must be the int"),
    (dict(steps=True), "steps must be a positive int"),
    (dict(steps=0), "steps must be a positive int"),
    (dict(steps=3.0), "steps must be a positive int"),
])
def test_steps_and_order_must_be_ints(kw, match):
    eps_fn, x_T, c, W = _problem()
    args = dict(steps=4, order=1)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        adjoint_lib.sample(eps_fn, x_T, c, schedule=_sched(), **args)


def test_params_as_a_bare_tensor_is_refused():
    eps_fn, x_T, c, W = _problem()
    with pytest.raises(TypeError, match="params must be a sequence"):
        adjoint_lib.sample(eps_fn, x_T, c, schedule=_sched(), steps=3, grad="adjoint", params=W)


def _cos(a, b):
    return float((a.double() * b.double()).sum() / (a.double().norm() * b.double().norm()))


@pytest.mark.slow
def test_float16_unet_gradients_match_float32_under_a_tiny_loss(sd_schedule):
    """Per-element loss gradients ~1e-7 (an MSE over 512x512 images) through a float16 UNet:
    x_T, embedding and LoRA-weight gradients agree with the float32 model (cosine >= 0.99)."""
    from peft import LoraConfig

    torch.manual_seed(0)
    x_T = torch.randn(2, 2, 8, 8)
    emb = 0.5 * torch.randn(1, 4, 8)
    null = torch.zeros(1, 4, 8)
    weight = 1e-7 * torch.randn(2, 2, 8, 8)
    grads = {}
    for dtype in (torch.float32, torch.float16):
        unet = make_tiny_unet(dtype=torch.float32)
        unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian",
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        unet.to(dtype)
        lora = [p for n, p in unet.named_parameters() if "lora" in n]
        for p in lora:  # trainable adapters stay float32, as peft keeps them
            p.data = p.data.float()
            p.requires_grad_(True)
        x = x_T.clone().requires_grad_()
        e = emb.clone().requires_grad_()
        eps_fn = UNetEps(unet, schedule=sd_schedule, guidance_scale=7.5)
        x0 = adjoint_lib.sample(eps_fn, x, (e, null), schedule=sd_schedule, steps=4, order=2,
                                grad="adjoint", params=lora)
        assert x0.dtype == torch.float32
        (weight * x0).sum().backward()
        grads[dtype] = (x.grad, e.grad, torch.cat([p.grad.flatten() for p in lora]))
    for name, g32, g16 in zip(("x_T", "embedding", "LoRA"), grads[torch.float32], grads[torch.float16]):
        assert g16.dtype == torch.float32, name
        assert bool(torch.isfinite(g16).all()) and float(g16.norm()) > 0, name
        assert _cos(g16, g32) >= 0.99, (name, _cos(g16, g32))


@pytest.mark.parametrize("shortcut, kw, method", [
    ("adjoint", {}, adjoint_lib.Adjoint()),
    ("adjoint", dict(trajectory="cache"), adjoint_lib.Adjoint(trajectory="cache")),
    ("adjoint", dict(scheme="continuous"), adjoint_lib.Adjoint(scheme="continuous")),
    ("checkpoint", {}, adjoint_lib.Checkpoint()),
    ("backprop", {}, adjoint_lib.Backprop()),
])
def test_gradient_method_objects_equal_their_shortcuts(shortcut, kw, method):
    by_string = _grads(shortcut, lambda c, W: [W], **kw)
    by_object = _grads(method, lambda c, W: [W])
    for a, b in zip(by_string, by_object):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kw, match", [
    (dict(grad="checkpoint", scheme="continuous"), "scheme= applies to grad='adjoint' only"),
    (dict(grad="backprop", trajectory="cache"), "trajectory= applies to grad='adjoint' only"),
    (dict(grad=None, trajectory="cache"), "trajectory= applies"),
    (dict(grad=adjoint_lib.Adjoint(), scheme="transpose"), "pass grad=Adjoint"),
    (dict(grad="adjoint", scheme="exact"), r"Adjoint\(scheme=...\) must be one of"),
    (dict(grad="magic"), "grad must be None, one of"),
])
def test_meaningless_gradient_options_raise_naming_the_argument(kw, match):
    eps_fn, x_T, c, W = _problem()
    with pytest.raises(ValueError, match=match):
        adjoint_lib.sample(eps_fn, x_T, c, schedule=_sched(), steps=3, **kw)


def test_a_grid_can_replace_steps():
    eps_fn, x_T, c, W = _problem()
    grid = adjoint_lib.make_grid(_sched(), steps=5, spacing="time")
    a = adjoint_lib.sample(eps_fn, x_T, c, schedule=_sched(), steps=grid, order=2)
    b = adjoint_lib.sample(eps_fn, x_T, c, schedule=_sched(), steps=5, spacing="time", order=2)
    assert torch.equal(a, b)


@pytest.mark.parametrize("grad", ["adjoint", "checkpoint"])
def test_float64_gradients_keep_float64_precision(grad):
    """A float64 problem keeps float64 gradients: checkpoint and the transpose adjoint on the cache
    equal backprop to rounding (1e-12), far below float32's 1e-7."""
    kw = {"trajectory": "cache"} if grad == "adjoint" else {}
    got = _grads(grad, lambda c, W: (W,), **kw)
    ref = _grads("backprop", lambda c, W: (W,))
    for name, g, r in zip(("x_T", "c", "W"), got, ref):
        assert g.dtype == torch.float64, name
        assert float((g - r).norm() / r.norm()) < 1e-12, (name, float((g - r).norm() / r.norm()))

