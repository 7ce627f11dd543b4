"""Data parallelism (adjoint_lib.tasks.distributed): the helpers are the identity in one process,
and two CPU processes under ``accelerate launch`` (gloo) give the one-process results of task 2
(the LoRA after 3 iterations, uneven shares of the batch) and task 3 (the audit's metrics)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adjoint_lib.paths import data_dir
from adjoint_lib.tasks import distributed

ROOT = Path(__file__).resolve().parents[1]
HAS_MINI = data_dir("mini", "unet").is_dir() and data_dir("mini", "judges").is_dir()

# task 2 through stylize.run (its gradient and history), task 3 through its command (run_cli:
# process group, main-process output); one launcher start-up for both
WORKER = """
import sys
import torch
from adjoint_lib.tasks import adversarial, distributed, stylize
from adjoint_lib.tasks.common import load_mini

out = sys.argv[1]
distributed.setup()
torch.set_num_threads(1)
cfg = stylize.default_config("mini", iterations=3, batch_size=3, train_pairs=6, held_out=3, steps=3, rank=2)
metrics, art = stylize.run(load_mini(), cfg, out_dir=out + "/stylize", progress=False)
res = art["result"]
if distributed.is_main_process():
    torch.save({"metrics": metrics, "first_grad": res.first_grad, "history": res.history,
                "params": [p.detach().cpu() for p in res.params]}, out + "/stylize.pt")
adversarial.main(["--profile", "mini", "--n-pairs", "5", "--max-candidates", "10", "--batch-size", "10",
                  "--iterations", "4", "--steps", "3", "--lr", "0.1", "--out", out + "/audit"])
"""


def test_one_process_is_the_identity(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.setup() == 1 and distributed.world_size() == 1 and distributed.rank() == 0
    assert distributed.is_main_process() and distributed.shard(5) == [0, 1, 2, 3, 4]
    x = torch.randn(5, 2)
    assert distributed.gather_rows(x, 5) is x
    assert torch.equal(distributed.map_rows(lambda i: x[i] * 2, 5), x * 2)
    with pytest.raises(ValueError, match="all 5 rows"):
        distributed.gather_rows(x[:3], 5)
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 0.5)
    distributed.all_reduce_grads([p])
    assert torch.equal(p.grad, torch.full((3,), 0.5))
    assert distributed.gather_objects({"a": 1}) == [{"a": 1}] and distributed.broadcast_object(7) == 7


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(tmp_path: Path, name: str, processes: int) -> tuple[list[dict], Path]:
    out = tmp_path / name
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("WORLD_SIZE", None)
    if processes == 1:
        cmd = [sys.executable, str(script), str(out)]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(script), str(out)]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return lines, out


def saved_lora(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "stylize" / "pytorch_lora_weights.safetensors")


def assert_same_metrics(one: dict, two: dict, skip: tuple[str, ...]) -> None:
    assert one.keys() == two.keys()
    for k in one:
        if k in skip:
            continue
        a, b = one[k], two[k]
        if isinstance(a, float):
            assert b is not None and abs(a - b) <= 2e-4, (k, a, b)  # rounded to 4 decimals
        else:
            assert a == b, (k, a, b)


@pytest.mark.skipif(not HAS_MINI, reason="MiniSD (data/mini) not shipped")
@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed's gloo backend is not available in this torch build")
def test_two_processes_give_the_one_process_results(tmp_path) -> None:
    one, out1 = run_worker(tmp_path, "one", 1)
    two, out2 = run_worker(tmp_path, "two", 2)
    assert len(one) == 1 and len(two) == 1  # the audit's metrics line: only the main process prints

    # task 2, a batch of 3 split 2 + 1: the gradient of the global mean loss ...
    s1, s2 = (torch.load(o / "stylize.pt", weights_only=False) for o in (out1, out2))
    g1, g2 = s1["first_grad"], s2["first_grad"]
    assert g1.abs().max() > 0 and float((g1 - g2).abs().max()) < 1e-4 * float(g1.abs().max())
    for h1, h2 in zip(s1["history"], s2["history"], strict=True):
        assert all(abs(h1[k] - h2[k]) < 1e-5 * h1[k] for k in ("loss", "style"))
    # ... and the same LoRA after 3 Adam steps. Not to 1e-5 per element: the batch's float32 rounding
    # differs (2 + 1 images instead of 3), and Adam divides each gradient by its own size, so the few
    # elements whose gradient is near its epsilon (1e-8) move by a visible fraction of lr (measured: 29
    # of 29920 above 1e-5, the largest 6.6e-4); the update as a whole agrees to ~1e-4
    # params alternate A, B per module; B starts at 0, so B is the update
    b1, b2 = (torch.cat([p.flatten() for p in s["params"][1::2]]) for s in (s1, s2))
    assert b1.norm() > 0 and float((b1 - b2).norm() / b1.norm()) < 1e-2
    w1, w2 = saved_lora(out1), saved_lora(out2)  # the file the main process wrote
    assert w1.keys() == w2.keys()
    d = torch.cat([(w1[k] - w2[k]).abs().flatten() for k in w1])
    assert float((d > 1e-5).float().mean()) < 0.01
    # every process held the main process's weights: its share of the reloaded images is unchanged
    assert s2["metrics"]["lora_roundtrip_max_abs_diff"] < 1e-5
    assert_same_metrics(s1["metrics"], s2["metrics"],
                        skip=("train_seconds", "lora_file", "lora_roundtrip_max_abs_diff"))

    # task 3: 5 pairs split 3 + 2, fooled at different iterations (one never): the same audit
    a1 = json.loads((out1 / "audit" / "metrics.json").read_text())
    a2 = json.loads((out2 / "audit" / "metrics.json").read_text())
    assert a1 == one[0] and a2 == two[0]
    assert 0 < a1["n_success"] < a1["n_pairs"] == 5
    assert_same_metrics(a1, a2, skip=("attack_seconds",))
