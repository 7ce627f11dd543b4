"""The SD-tasks GPU benchmark's command, run at toy size on the CPU: every task takes its
iterations under the precision policy and the results file records memory, time per iteration
and finite, non-zero gradients; shipped data/ is refused without --force."""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from adjoint_lib import bench_sd_tasks as B

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tiny_run_writes_every_task(tmp_path) -> None:
    B.main(["--size", "tiny", "--device", "cpu", "--steps", "3", "--out", str(tmp_path)])
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["size"] == "tiny" and r["device"] == "cpu" and r["vae_dtype"] == "float32"
    assert set(r["tasks"]) == set(B.TASKS)
    for name, t in r["tasks"].items():
        assert "error" not in t, name
        assert t["grad_finite"] and t["grad_nonzero"], name
        assert t["iterations"] == 2 and t["steps"] == 3 and t["seconds_per_iteration"] > 0
        assert t["peak_memory_bytes"] is None  # CUDA only
    # the paper's settings where the run does not override them
    assert r["tasks"]["effect_embedding"]["lr"] == 0.05 and r["tasks"]["effect_embedding"]["guidance_scale"] == 7.5
    assert (r["tasks"]["adversarial"]["lr"], r["tasks"]["adversarial"]["delta"]) == (0.01, 0.1)
    assert r["tasks"]["adversarial"]["linf"] <= 0.1 + 1e-6


def test_refuses_shipped_data_without_force() -> None:
    from adjoint_lib.paths import data_dir

    with pytest.raises(SystemExit, match="--force"):
        B.main(["--size", "tiny", "--out", str(data_dir("bench", "sd-tasks_should_not_exist"))])
    assert not data_dir("bench", "sd-tasks_should_not_exist").exists()
