"""UNetEps: conditioning batch sizes checked by name, and SDXL's added conditioning (pooled text
embeddings and time_ids via added_cond_kwargs) with gradients to x_T, the embeddings and LoRA
weights, on a tiny SDXL-style UNet (addition_embed_type="text_time")."""
from __future__ import annotations

import pytest
import torch

import adjoint_lib
from adjoint_lib.models import UNetEps

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_sdxl_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=16, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 12,
    ).eval().requires_grad_(False)


def test_cond_batch_sizes_must_be_one_or_b(tiny_unet, sd_schedule) -> None:
    eps = UNetEps(tiny_unet, guidance_scale=2.0)
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    good = (torch.randn(3, 4, 8, dtype=torch.float64), torch.randn(1, 4, 8, dtype=torch.float64))
    assert eps(x, torch.tensor(500.0), good).shape == x.shape
    with pytest.raises(ValueError, match="uncond has batch size 2 but x has 3"):
        eps(x, torch.tensor(500.0), (good[0], torch.randn(2, 4, 8, dtype=torch.float64)))
    with pytest.raises(ValueError, match="cond has batch size 2 but x has 3"):
        UNetEps(tiny_unet)(x, torch.tensor(500.0), torch.randn(2, 4, 8, dtype=torch.float64))


def test_sdxl_unet_without_time_ids_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="time_ids"):
        UNetEps(tiny_sdxl_unet())


def test_sdxl_gradients_reach_noise_embeddings_pooled_and_lora(sd_schedule) -> None:
    from peft import LoraConfig

    unet = tiny_sdxl_unet()
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights=False))
    lora = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in lora:
        p.requires_grad_(True)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    eps = UNetEps(unet, schedule=sd_schedule, guidance_scale=3.0, time_ids=time_ids)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 4, 8, 8, generator=g).requires_grad_(True)
    c = torch.randn(2, 5, 16, generator=g).requires_grad_(True)
    pooled = torch.randn(2, 12, generator=g).requires_grad_(True)
    u, pu = torch.zeros(1, 5, 16), torch.zeros(1, 12)
    grads = {}
    for mode in ("adjoint", "checkpoint"):
        for t in [x_T, c, pooled, *lora]:
            t.grad = None
        x0 = adjoint_lib.sample(eps, x_T, (c, u, pooled, pu), schedule=sd_schedule, steps=12, order=2,
                                grad=mode, params=lora)
        x0.pow(2).mean().backward()
        grads[mode] = [x_T.grad.clone(), c.grad.clone(), pooled.grad.clone(), torch.cat([p.grad.flatten() for p in lora])]
    for name, a, b in zip(("x_T", "cond", "pooled", "lora"), grads["adjoint"], grads["checkpoint"]):
        assert torch.isfinite(a).all() and a.abs().max() > 0, name
        cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        assert cos > 0.95, (name, float(cos))
