"""LoRA adapters on a diffusers UNet for weight gradients through :func:`adjoint_lib.sample`:
add one (peft ``LoraConfig`` via ``unet.add_adapter``; float32 tensors also on a half-precision
UNet), switch between adapters and the base model, and save/load them in diffusers' LoRA format
(``pytorch_lora_weights.safetensors``, what ``pipe.load_lora_weights`` reads), written atomically."""
from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

Tensor = torch.Tensor

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def add_lora(unet: nn.Module, adapter_name: str = "style", rank: int = 4, alpha: float | None = None,
             target_modules: Sequence[str] = LORA_TARGETS, seed: int = 0) -> list[Tensor]:
    """Add a peft LoRA adapter (``unet.add_adapter``) to the UNet's attention projections and
    ResNet convolutions, make it the active one, and return its trainable tensors (float32,
    also on a half-precision UNet). ``B`` starts at zero,
    so the adapted UNet starts as the base model. Replaces an adapter of the same name."""
    from peft import LoraConfig

    if adapter_name in (getattr(unet, "peft_config", None) or {}):
        unet.delete_adapters(adapter_name)
    cfg = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, init_lora_weights=True,
                     target_modules=list(target_modules))
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # "multiple adapters in the model": intended
        warnings.filterwarnings("ignore", message=".*peft_config.*")
        unet.add_adapter(cfg, adapter_name=adapter_name)
    return lora_parameters(unet, adapter_name)


def lora_parameters(unet: nn.Module, adapter_name: str) -> list[Tensor]:
    """The adapter's tensors, set to require grad (the base weights stay frozen)."""
    params = [p for n, p in unet.named_parameters() if "lora_" in n and n.endswith(f".{adapter_name}.weight")]
    if not params:
        raise ValueError(f"the UNet has no LoRA adapter named {adapter_name!r}")
    for p in params:
        if p.dtype != torch.float32:  # half-precision UNet: adapters (and their gradients) in float32;
            p.data = p.data.float()   # peft casts the layer input to the adapter's dtype and back
        p.requires_grad_(True)
    return params


def activate(unet: nn.Module, adapter_name: str | None) -> None:
    """Use only ``adapter_name`` (``None``: the base model, all adapters off)."""
    if not getattr(unet, "_hf_peft_config_loaded", False):
        if adapter_name is None:
            return
        raise ValueError(f"the UNet has no adapters (wanted {adapter_name!r})")
    if adapter_name is None:
        unet.disable_adapters()
    else:
        unet.enable_adapters()
        unet.set_adapter(adapter_name)


@contextlib.contextmanager
def base_model(unet: nn.Module) -> Iterator[None]:
    """Inside: the UNet without its adapters (the pre-fine-tuning model)."""
    loaded = getattr(unet, "_hf_peft_config_loaded", False)
    if loaded:
        unet.disable_adapters()
    try:
        yield
    finally:
        if loaded:
            unet.enable_adapters()


def save_lora(unet: nn.Module, directory: str | Path, adapter_name: str = "style") -> Path:
    """Save the adapter in diffusers' LoRA format: ``<directory>/pytorch_lora_weights.safetensors``
    with ``unet.``-prefixed keys (what ``StableDiffusionPipeline.load_lora_weights`` reads),
    plus the peft config as metadata; written beside its target and moved into place."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin  # StableDiffusionPipeline's saver
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    converted = convert_state_dict_to_diffusers(state)
    # diffusers' converter renames only attention projections (to_q.lora.down, ...); its
    # loader decides from the *first* key whether to convert back, so a mixed dict (conv
    # targets keep peft's lora_A/lora_B) would load half the adapter. Keep one naming.
    if all(".lora_A." not in k and ".lora_B." not in k for k in converted):
        state = converted
    state = {k: v.detach().float().contiguous().cpu() for k, v in state.items()}
    meta = unet.peft_config[adapter_name].to_dict()
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
    target = Path(directory) / LORA_WEIGHT_NAME
    if Path(directory).exists() and not Path(directory).is_dir():
        raise NotADirectoryError(f"cannot save the LoRA into {str(directory)!r}: it is a file, not a folder")
    Path(directory).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".lora.", dir=directory) as tmp:
        StableDiffusionLoraLoaderMixin.save_lora_weights(tmp, unet_lora_layers=state, weight_name=LORA_WEIGHT_NAME,
                                                         unet_lora_adapter_metadata=meta)
        written = Path(tmp) / LORA_WEIGHT_NAME
        if not written.is_file():
            raise OSError(f"diffusers did not write {LORA_WEIGHT_NAME} into {str(directory)!r}")
        os.replace(written, target)
    return target


def load_lora(unet: nn.Module, directory: str | Path, adapter_name: str = "style_loaded") -> None:
    """Load an adapter saved by :func:`save_lora` (or any diffusers-format SD LoRA) into
    ``unet`` (``unet.load_lora_adapter``) and make it the active one. On a full pipeline
    ``pipe.load_lora_weights(directory)`` does the same."""
    path = Path(directory)
    if not (path / LORA_WEIGHT_NAME).is_file():
        raise FileNotFoundError(f"no {LORA_WEIGHT_NAME} in {str(path)!r}: save one with save_lora()")
    if adapter_name in (getattr(unet, "peft_config", None) or {}):
        unet.delete_adapters(adapter_name)
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # other adapters' keys are reported "missing": expected
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*peft_config.*")
            unet.load_lora_adapter(str(path), weight_name=LORA_WEIGHT_NAME, prefix="unet",
                                   adapter_name=adapter_name, local_files_only=True)
    finally:
        dlogging.set_verbosity(level)
    for p in lora_parameters(unet, adapter_name):  # float32 like add_lora's (half-precision UNets)
        p.requires_grad_(False)
    activate(unet, adapter_name)
