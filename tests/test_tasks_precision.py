"""Task-level precision: networks in half precision, text embeddings, VAE, images and losses in
float32, so the gradient of the loss reaches the token vector, x_T and the LoRA tensors finite and
non-zero; the dtype choice per device."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from adjoint_lib.tasks import effect_embedding as ee
from adjoint_lib.tasks import load_sd
from adjoint_lib.tasks.loading import resolve_dtype

pytestmark = pytest.mark.usefixtures("one_thread")


def test_dtype_choice() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32 and resolve_dtype(None, cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16 and resolve_dtype(torch.float16, cpu) == torch.float16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("float8", cpu)


def test_bfloat16_networks_float32_losses_and_gradients() -> None:
    model = load_sd("tiny", device="cpu", dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and next(model.text_encoder.parameters()).dtype == torch.bfloat16
    assert next(model.vae.parameters()).dtype == torch.float32
    cfg = ee.default_config("sd", steps=3, n_train=2, guidance_scale=2.0)
    pairs = ee.make_pairs(model, cfg, 2)
    x_T = model.noise(pairs.seeds)
    targets = ee.render(model, pairs.target_prompts, x_T, cfg)
    assert targets.dtype == torch.float32 and torch.isfinite(targets).all()
    tok, tid = ee.add_token(model, cfg.token, cfg.init_word)
    cond = tok.encode(pairs.with_token(cfg.token))
    assert cond.dtype == torch.float32
    v = ee.embedding_row(tok, tid).requires_grad_(True)
    x = x_T.clone().requires_grad_(True)
    cond = tok.encode(pairs.with_token(cfg.token), token_vectors={tid: v})
    images = tok.generate(x, cond, steps=3, grad="adjoint", guidance_scale=2.0)
    loss = torch.nn.functional.mse_loss(images, targets)
    assert loss.dtype == torch.float32
    loss.backward()
    for g in (v.grad, x.grad):
        assert g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().max() > 0


def test_generate_takes_an_explicit_timestep_grid() -> None:
    model = load_sd("tiny", device="cpu")
    x_T, cond = model.noise([0]), model.encode(["a red seven"])
    a = model.generate(x_T, cond, timesteps=torch.tensor([999.0, 700.0, 400.0, 100.0]), order=1)
    b = model.generate(x_T, cond, steps=4, order=1)
    assert a.shape == b.shape and torch.isfinite(a).all()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_token_gradient_through_a_half_precision_text_encoder_does_not_underflow(dtype) -> None:
    """A loss gradient of ~1e-9 per element (an MSE over many pixels is ~1e-7) rounds to zero
    in float16 when cast directly; carried at unit scale it matches the float32 gradient."""
    grads = {}
    for dt in ("float32", dtype):
        model = load_sd("tiny", device="cpu", dtype=dt)
        model.unet.float()  # isolate the text encoder: only it runs in half precision
        tok, tid = ee.add_token(model, "<effect>", "a")
        v = ee.embedding_row(tok, tid).requires_grad_(True)
        cond = tok.encode(["a red seven <effect>"], token_vectors={tid: v})
        w = torch.randn(cond.shape, generator=torch.Generator().manual_seed(0))
        ((cond * w).sum() * 1e-9).backward()
        grads[dt] = v.grad
    g32, gh = grads["float32"], grads[dtype]
    assert gh.abs().max() > 0 and torch.isfinite(gh).all()
    cos = torch.nn.functional.cosine_similarity(g32, gh, dim=0)
    assert cos > 0.99 and 0.9 < float(gh.norm() / g32.norm()) < 1.1
