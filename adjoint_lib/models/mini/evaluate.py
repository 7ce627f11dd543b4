"""Evaluate MiniSD: ``python -m adjoint_lib.models.mini.evaluate`` prints one JSON line.

Generates ``--n`` images (default 240) from random prompts (digit, style uniform; color
pair uniform over :data:`~.data.PAIRS`), seed ``i`` for image ``i``, with 20 steps of
DPM-Solver order 2 and classifier-free guidance :data:`~adjoint_lib.models.mini.GUIDANCE_SCALE`,
and reports the fraction whose prompted attributes the judges read back, plus timings:

* ``digit_judge_acc`` (target >= 0.90), ``color_acc`` (>= 0.95), ``style_acc`` (>= 0.85),
  and also ``digit_auditee_acc`` and ``background_acc``;
* ``load_seconds`` (<= 2; ``load_seconds_first_call`` includes importing diffusers and
  transformers), ``sample16_seconds``: 16 images at 20 steps (<= 3), and
  ``unet_cfg_batch32_ms_1thread``: one guided UNet evaluation of a batch of 32 on one thread.

The line is also written to ``outputs/mini/eval_metrics.json`` (``--out`` to change; the
shipped ``data/mini/eval_metrics.json`` is replaced only with ``--out ... --force``).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import DATA_DIR, GUIDANCE_SCALE, MiniSD, encode_prompts, eps_fn, generate, initial_noise, load
from .data import Labels, random_labels
from .judges import Judges, judge_metrics
from ...cli import add_output_arguments, nonnegative_float, output_path, positive_int
from ...io import read_json, write_json
from ...paths import outputs_dir

Tensor = torch.Tensor


def targets_met(metrics: dict, targets: dict) -> bool:
    """Whether every metric named in ``targets`` (``{"name": {"at_least" | "at_most": value}}``,
    the model's ``targets.json``) meets its bound."""
    return all((metrics[k] >= b["at_least"]) if "at_least" in b else (metrics[k] <= b["at_most"])
               for k, b in targets.items())


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def timings(model: MiniSD, path: Path | None = None) -> dict[str, float]:
    """Load time, 16 images at 20 steps (current thread count), one guided UNet call on a
    batch of 32 with one thread (medians of a few repeats)."""
    load_s = _median_seconds(lambda: load(path), 3)
    prompts, seeds = random_labels(16, torch.Generator().manual_seed(0)).captions(), list(range(16))
    generate(model, prompts, seeds)  # warm-up
    sample_s = _median_seconds(lambda: generate(model, prompts, seeds), 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            cond = encode_prompts(model.tokenizer, model.text_encoder,
                                  random_labels(32, torch.Generator().manual_seed(1)).captions())
            uncond = encode_prompts(model.tokenizer, model.text_encoder, [""])
        eps = eps_fn(model)
        x, t = initial_noise(range(32)), torch.full((32,), 500.0)
        with torch.no_grad():
            eps(x, t, (cond, uncond))
            unet_s = _median_seconds(lambda: eps(x, t, (cond, uncond)), 9)
    finally:
        torch.set_num_threads(threads)
    return {"load_seconds": round(load_s, 3), "sample16_seconds": round(sample_s, 3),
            "unet_cfg_batch32_ms_1thread": round(1000 * unet_s, 1), "torch_threads": threads}


def evaluate(model: MiniSD, n: int = 240, seed: int = 0, steps: int = 20, order: int = 2,
             guidance_scale: float = GUIDANCE_SCALE, batch_size: int = 48) -> dict[str, float]:
    """Judge metrics of ``n`` generated images from random prompts (seeds ``seed*n + i``)."""
    for name, value in (("n", n), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    labels = random_labels(n, torch.Generator().manual_seed(seed))
    prompts = labels.captions()
    images = torch.cat([
        generate(model, prompts[i:i + batch_size], [seed * n + j for j in range(i, min(n, i + batch_size))],
                 steps=steps, order=order, guidance_scale=guidance_scale)
        for i in range(0, n, batch_size)])
    return {"n": n, "steps": steps, "order": order, "guidance_scale": guidance_scale,
            **judge_metrics(model.judges, images, labels)}


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: evaluate, check the timings, print one JSON line and save it."""
    p = argparse.ArgumentParser(description="Evaluate MiniSD against its targets.")
    p.add_argument("--n", type=positive_int, default=240, help="images generated (default 240)")
    p.add_argument("--guidance-scale", type=nonnegative_float, default=GUIDANCE_SCALE)
    p.add_argument("--path", type=Path, default=DATA_DIR, help="MiniSD folder to load (default data/mini)")
    add_output_arguments(p, "outputs/mini/eval_metrics.json", "JSON file of the metrics")
    p.add_argument("--no-save", action="store_true", help="do not write the metrics file")
    a = p.parse_args(argv)
    if a.out is not None and a.out.suffix != ".json":
        p.error(f"--out must name a .json file, got {str(a.out)!r}")
    out = None if a.no_save else output_path(a, lambda: outputs_dir("mini") / "eval_metrics.json")
    model = load(a.path)
    metrics = {**evaluate(model, n=a.n, guidance_scale=a.guidance_scale), **timings(model, a.path),
               "load_seconds_first_call": round(model.load_seconds, 3)}
    targets = read_json(Path(a.path or DATA_DIR) / "targets.json", what="targets file")
    if targets is not None:
        metrics["targets_met"] = targets_met(metrics, targets)
    if out is not None:
        write_json(out, metrics, indent=None)
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
