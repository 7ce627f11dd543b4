"""The task commands' one shape: every field of a task's config dataclass is a ``--flag``,
checked by the argparse type in its metadata (the same check :func:`validate` applies to a
config built in Python), plus the flags every task shares: ``--profile --model-id --mini-path
--device --dtype --threads --out --force``. Output: one line of valid JSON (``null`` for NaN).

    python -m adjoint_lib.tasks.effect_embedding --profile sd --model-id ./my-sd --dtype float16
"""
from __future__ import annotations

import argparse
import dataclasses
import types
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..cli import nonnegative_float, nonnegative_int, positive_float, positive_int
from ..io import check_out, dumps
from ..paths import profile as resolve_profile
from .loading import DTYPES, SD_MODEL_ENV, LoadError

GRAD_MODES = ("adjoint", "checkpoint", "backprop")


# ---------------------------------------------------------------------- checks (argparse types)
# positive_int, nonnegative_int, positive_float, nonnegative_float: adjoint_lib.cli's


def order_int(text: Any) -> int:
    """A solver order: 1, 2 or 3."""
    try:
        v = int(text)
    except (TypeError, ValueError):
        v = None
    if v not in (1, 2, 3):
        raise argparse.ArgumentTypeError(f"must be 1, 2 or 3, got {text!r}")
    return v


def one_of(*choices: str) -> Callable[[Any], str]:
    """A string among ``choices``."""
    def check(text: Any) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(choices)}; got {text!r}")
        return text
    check.__name__ = "one of " + "|".join(choices)
    check.choices = choices  # shown as the flag's metavar
    return check


def setting(default: Any, check: Callable[[Any], Any] | None = None, help: str = "") -> Any:
    """A config field whose CLI flag is checked by ``check`` (``None``: by the field's type)."""
    return dataclasses.field(default=default, metadata={"check": check, "help": help})


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(``int``/``float``/``str``/``tuple``, optional?) of a field annotation (string or type)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    optional = "None" in text
    for name, kind in (("tuple", tuple), ("int", int), ("float", float), ("str", str), ("bool", bool)):
        if text.replace(" ", "").startswith(name):
            return kind, optional
    return str, optional


def field_check(f: dataclasses.Field) -> Callable[[Any], Any]:
    """The check (argparse type) stored in a config field's metadata, or ``None``."""
    check = f.metadata.get("check")
    if check is not None:
        return check
    kind, _ = _base_type(f.type)
    return {int: nonnegative_int, float: nonnegative_float}.get(kind, str)


def validate(cfg: Any) -> Any:
    """Apply each field's check to a config built in Python: ``ValueError`` naming the field."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        kind, optional = _base_type(f.type)
        if value is None and optional or kind in (tuple, bool):
            continue
        try:
            field_check(f)(value)
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"{f.name}: {exc}") from None
    return cfg


# ---------------------------------------------------------------------- the parser
def _metavar(check: Callable[[Any], Any]) -> str | None:
    choices = getattr(check, "choices", None)
    return "{" + ",".join(choices) + "}" if choices else None


def task_parser(description: str, config_cls: type, prog: str | None = None) -> argparse.ArgumentParser:
    """Shared flags plus one ``--some-setting`` per field of ``config_cls`` (unset settings keep
    the profile's defaults)."""
    p = argparse.ArgumentParser(prog=prog, description=description + " Prints one JSON line of metrics.")
    p.add_argument("--profile", choices=("mini", "sd"), default=None,
                   help="default: $ADJOINTDPM_PROFILE, else sd with CUDA, else mini")
    p.add_argument("--model-id", default=None,
                   help=f"sd: hub id, local diffusers folder or .safetensors file (default ${SD_MODEL_ENV}, "
                        "else stable-diffusion-v1-5/stable-diffusion-v1-5; 'tiny': random CI model)")
    p.add_argument("--mini-path", default=None, help="mini: folder of the MiniSD model (default data/mini)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default="auto", type=one_of("auto", *DTYPES), metavar=_metavar(one_of("auto", *DTYPES)),
                   help="networks' precision (auto: bfloat16/float16 on CUDA, float32 on CPU); "
                        "losses, adjoint state and gradients stay float32")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: 1 on mini, whose tiny tensors run fastest on one and give "
                        "the notebooks' numbers; torch's default on sd)")
    p.add_argument("--out", default=None, help="output folder (default outputs/<task>/<profile>)")
    p.add_argument("--force", action="store_true", help="allow --out inside the shipped data/ folder")
    for f in dataclasses.fields(config_cls):  # every setting, e.g. --iterations 30 --lr 0.05
        kind, _ = _base_type(f.type)
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        if kind is tuple:
            p.add_argument(flag, nargs="+", default=None, help=help_)
        else:
            p.add_argument(flag, type=field_check(f), default=None, help=help_, metavar=_metavar(field_check(f)))
    return p


def out_folder(out: str | None, force: bool) -> Path | None:
    """``--out`` checked before any compute: not an existing file, writable, not data/ without --force."""
    if out is None:
        return None
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise SystemExit(f"--out {path} is an existing file; pass a folder")
    check_out(path / "metrics.json", force=force)  # checks the folder ``path`` itself
    return path


def run_cli(module: types.ModuleType, description: str, argv: Sequence[str] | None = None) -> dict:
    """Parse flags, load the model, run ``module.run(model, cfg, out_dir=...)`` and print its
    metrics as one JSON line. ``module`` has ``CONFIG`` (the dataclass), ``default_config``
    and ``run``. Under ``accelerate launch`` every process runs it (:mod:`.distributed`; the
    main process prints)."""
    from . import distributed
    from .common import load_task_model

    config_cls = module.CONFIG
    spec = getattr(module, "__spec__", None)
    prog = f"python -m {spec.name}" if spec is not None else None
    a = task_parser(description, config_cls, prog).parse_args(argv)
    out = out_folder(a.out, a.force)
    name = resolve_profile(a.profile)
    overrides = {f.name: (tuple(v) if isinstance(v, list) else v) for f in dataclasses.fields(config_cls)
                 if (v := getattr(a, f.name, None)) is not None}
    cfg = validate(module.default_config(name, **overrides))
    distributed.setup()  # before the model loads (each process on its own GPU) and the thread count
    if a.threads or name == "mini":
        torch.set_num_threads(a.threads or 1)
    try:
        model = load_task_model(name, a.model_id, device=a.device, dtype=a.dtype, mini_path=a.mini_path)
        metrics = module.run(model, cfg, out_dir=out, progress=False).metrics
    except LoadError as exc:
        raise SystemExit(f"error: {exc}") from None
    if distributed.is_main_process():
        print(dumps(metrics))
    return metrics


__all__ = ["task_parser", "run_cli", "validate", "setting", "positive_int", "nonnegative_int", "positive_float",
           "nonnegative_float", "order_int", "one_of", "GRAD_MODES"]
