"""Shared fixtures: tiny randomly initialized diffusers components (as diffusers' own tests do),
one torch thread, and the shipped MiniSD as the tasks load it."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_tiny_unet(dtype=torch.float64, seed=0, channels=2, size=8, cross_dim=8):
    """A ~10k-parameter UNet2DConditionModel with cross-attention, random weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_dim,
        attention_head_dim=2, norm_num_groups=4)
    return unet.to(dtype).eval()


@pytest.fixture
def tiny_unet():
    return make_tiny_unet()


@pytest.fixture
def sd_schedule():
    """The Stable Diffusion 1.x noise schedule (scaled_linear betas) via DDIM."""
    from diffusers import DDIMScheduler

    import adjoint_lib

    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          clip_sample=False, set_alpha_to_one=False)
    return adjoint_lib.VPSchedule.from_diffusers(sched)


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: one thread is fastest and does not oversubscribe a shared 2-core runner."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def mini_model():
    """The shipped MiniSD (``ADJOINTDPM_MINI_PATH`` overrides ``data/mini``) as a task model."""
    from adjoint_lib.tasks import load_mini

    return load_mini(os.environ.get("ADJOINTDPM_MINI_PATH"))
