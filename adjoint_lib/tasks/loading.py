"""Loading Stable Diffusion and the metric networks where users are: a hub id (online, or from
the local cache when ``HF_HUB_OFFLINE=1``), a local diffusers folder, or a single-file
checkpoint (``.safetensors`` / ``.ckpt``), each overridable by flag or environment variable.

Precision policy at task level: the UNet and the text encoder run in ``dtype`` (``"auto"``:
bfloat16 on a GPU that supports it, else float16 on CUDA, float32 on the CPU); the VAE stays in
float32 (its decoder overflows float16 at 512x512 and SDXL's does at any size); text embeddings,
images and losses are float32, so :func:`adjoint_lib.sample` keeps its state and gradients in
float32 whatever the networks' dtype.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

#: Stable Diffusion 1.5's maintained copy on the Hub (``runwayml/...`` was withdrawn in 2024).
SD_MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD_MODEL_ENV = "ADJOINTDPM_SD_MODEL"
TINY = "tiny"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# recent diffusers rename ``torch_dtype`` to ``dtype``; older ones know only the former
warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)


def is_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids the hub (the Makefile and CI set it; Colab does not)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() not in ("0", "", "false", "no", "off")


def sd_model_id(model_id: str | None = None) -> str:
    """``model_id``, else ``$ADJOINTDPM_SD_MODEL``, else :data:`SD_MODEL_ID`."""
    return model_id or os.environ.get(SD_MODEL_ENV) or SD_MODEL_ID


def metric_model_id(model_id: str | None, env: str, default: str) -> str:
    """A metric network's id: ``model_id``, else ``$env``, else ``default``."""
    return model_id or os.environ.get(env) or default


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, else ``cuda`` when available, else ``cpu``."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The networks' dtype: ``"auto"``/``None`` is bfloat16 on a CUDA GPU that supports it,
    float16 on other CUDA GPUs, float32 elsewhere; or one of ``float32|float16|bfloat16``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


class LoadError(RuntimeError):
    """A model or metric network could not be loaded; the message says what to do."""


def load_failure(what: str, model_id: str, tried: str, exc: BaseException, *, flag: str, env: str) -> LoadError:
    """One short paragraph: what was tried, why it failed, and the three ways out."""
    first = (str(exc).strip().splitlines() or [""])[0]
    first = first if len(first) <= 200 else first[:197] + "..."
    return LoadError(
        f"could not load {what} {model_id!r}; tried {tried} ({type(exc).__name__}: {first}). "
        f"Ways out: (1) go online once (unset HF_HUB_OFFLINE; `huggingface-cli login` if the repository "
        f"is gated) so it is downloaded into the cache; (2) pass a local folder or file with {flag} or "
        f"${env}; (3) run the CPU profile instead: --profile mini.")


def download_size(info: Any, folders: tuple[str, ...] = ()) -> int:
    """Bytes of the ``.safetensors`` weights (non-variant) and configs listed in a hub
    repository's ``model_info``, in ``folders`` when given."""
    total = 0
    for s in info.siblings or []:
        name = s.rfilename
        if folders and name.split("/")[0] not in folders:
            continue
        weights = name.endswith(".safetensors") and name.count(".") == 1
        if weights or name.endswith((".json", ".txt")):
            total += s.size or 0
    return total


def hub_source(model_id: str, what: str, folders: tuple[str, ...] = ()) -> tuple[bool, str]:
    """Where ``from_pretrained`` should read ``model_id``: ``(local_files_only, description)``.

    A local folder, or ``HF_HUB_OFFLINE=1``: local files only. Otherwise the hub is asked for
    the repository's listing first (10 s timeout): when it answers, the size of the download is
    printed; when it does not (no network, unknown or gated repository), only the local cache is
    read, so a failure is reported at once instead of after minutes of retries."""
    if Path(model_id).is_dir():
        return True, "local folder"
    if is_offline():
        return True, "hub id, local cache only (offline: HF_HUB_OFFLINE=1)"
    try:
        from huggingface_hub import model_info

        info = model_info(model_id, files_metadata=True, timeout=10)
    except Exception as exc:  # noqa: BLE001 (network, unknown or gated repository: try the cache)
        return True, f"hub id; the hub did not answer ({type(exc).__name__}), so the local cache only"
    size = download_size(info, folders)
    if size:
        print(f"{what} {model_id!r}: about {size / 2**30:.1f} GiB from the Hugging Face Hub "
              "(once; later runs read the local cache)", flush=True)
    return False, "hub id"


def freeze(*modules: torch.nn.Module | None) -> None:
    """The module in eval mode with every parameter frozen."""
    for m in modules:
        if m is not None:
            m.eval().requires_grad_(False)


def pipeline_dtypes(dtype: torch.dtype) -> torch.dtype | dict[str, torch.dtype]:
    """``torch_dtype`` for ``from_pretrained``: the VAE read in float32 straight from its file (not
    rounded through half precision first) where diffusers takes a per-component dict (>= 0.33)."""
    import diffusers
    from packaging.version import Version

    if dtype == torch.float32 or Version(diffusers.__version__) < Version("0.33"):
        return dtype
    return {"default": dtype, "vae": torch.float32}


def load_pipeline(model_id: str, dtype: torch.dtype) -> Any:
    """A diffusers text-to-image pipeline (SD 1.x/2.x or SDXL) from a hub id, a local folder or a
    single-file checkpoint, without the safety checker. Raises :func:`load_failure`'s error."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    path = Path(model_id)
    tried = "StableDiffusionPipeline.from_single_file (single-file checkpoint)"
    try:
        if path.suffix in SINGLE_FILE_SUFFIXES:
            if not path.is_file():
                raise FileNotFoundError(f"no such checkpoint file: {path}")
            return StableDiffusionPipeline.from_single_file(str(path), torch_dtype=dtype, safety_checker=None,
                                                           local_files_only=is_offline())
        local_only, source = hub_source(model_id, "Stable Diffusion", ("unet", "vae", "text_encoder",
                                                                      "text_encoder_2", "tokenizer", "tokenizer_2",
                                                                      "scheduler"))
        tried = f"DiffusionPipeline.from_pretrained ({source})"
        return DiffusionPipeline.from_pretrained(model_id, torch_dtype=pipeline_dtypes(dtype), safety_checker=None,
                                                 local_files_only=local_only)
    except Exception as exc:  # noqa: BLE001 (hub, file-format and config errors: one clear message)
        raise load_failure("Stable Diffusion", model_id, tried, exc, flag="--model-id", env=SD_MODEL_ENV) from exc


def load_hf(cls: Callable[..., Any], model_id: str, what: str, *, flag: str, env: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(model_id)`` for a ``transformers`` metric network (see
    :func:`hub_source`), with :func:`load_failure`'s message on any failure."""
    name = getattr(cls, "__name__", str(cls))
    tried = f"{name}.from_pretrained"
    try:
        local_only, source = hub_source(model_id, what)
        tried = f"{name}.from_pretrained ({source})"
        return cls.from_pretrained(model_id, local_files_only=local_only, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise load_failure(what, model_id, tried, exc, flag=flag, env=env) from exc
