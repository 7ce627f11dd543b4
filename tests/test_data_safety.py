"""Data safety of the training, evaluation and benchmark commands: they write to outputs/
(data/ only with --out ... --force, checked before any compute), every write is atomic,
bench --resume re-runs unreadable cache entries, and bad numbers are argparse errors that
name the flag."""
from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from adjoint_lib import bench, cli, toy2d
from adjoint_lib.paths import ROOT, data_dir

train_mod = importlib.import_module("adjoint_lib.models.mini.train")
judges_mod = importlib.import_module("adjoint_lib.models.mini.judges")
evaluate_mod = importlib.import_module("adjoint_lib.models.mini.evaluate")
bench_cli = importlib.import_module("adjoint_lib.bench.cli")

# command -> (module, the function its main() calls first for the heavy work)
COMMANDS = {"train": (train_mod, "train"), "judges": (judges_mod, "train_judges"),
            "evaluate": (evaluate_mod, "load"), "toy2d": (toy2d, "train_toy"),
            "bench": (bench_cli, "run_benchmark")}


MODEL_PARTS = ("tokenizer", "text_encoder", "unet", "scheduler")  # MiniSD's save_pretrained folders


class Computed(Exception):
    """Raised by the stubbed compute functions: the command got past its checks."""


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("ADJOINTDPM_OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.delenv("ADJOINTDPM_DATA", raising=False)
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def no_compute(monkeypatch):
    """Replace each command's compute entry point by one that raises :class:`Computed`."""
    def boom(*args, **kwargs):
        raise Computed
    for module, name in COMMANDS.values():
        monkeypatch.setattr(module, name, boom)


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _stamps(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file: a cheap change detector for polling."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _git_status_data() -> str | None:
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        return None
    return subprocess.run(["git", "status", "--porcelain", "--", "data/"], cwd=ROOT,
                          capture_output=True, text=True).stdout


# ------------------------------------------------------------------ outputs/, not data/
@pytest.mark.parametrize("command,argv,written", [
    ("train", ["--steps", "1", "--batch-size", "2"],
     ["mini/unet/diffusion_pytorch_model.safetensors", "mini/tokenizer/vocab.json", "mini/samples.png",
      "mini/train_metrics.json"]),
    ("judges", ["--steps", "1"], ["mini/judges/digit.safetensors", "mini/judges/judges_metrics.json"]),
    ("evaluate", ["--n", "1"], ["mini/eval_metrics.json"]),
    ("toy2d", ["--steps", "2", "--batch", "8", "--hidden", "8", "--depth", "1"],
     ["toy2d/ring.safetensors", "toy2d/ring.json"]),
])
def test_commands_write_to_outputs_and_leave_data_untouched(tmp_path, command, argv, written):
    before, status = _files(data_dir()), _git_status_data()
    COMMANDS[command][0].main(argv)
    assert _files(data_dir()) == before
    if status is not None:
        assert _git_status_data() == status
    out = tmp_path / "outputs"
    for name in written:
        assert (out / name).is_file(), name
    assert not [p for p in out.rglob(".*")], "temporary files left behind"
    if command == "train":
        assert not (out / "mini" / "checkpoint").exists()


OUT_IN_DATA = {"train": ["--out", "data/mini"], "judges": ["--out", "data/mini/judges"],
               "evaluate": ["--out", "data/mini/eval_metrics.json"], "toy2d": ["--out", "data/toy2d/ring"],
               "bench": ["--out", "data/bench"]}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_out_in_data_needs_force_and_is_refused_before_compute(no_compute, command):
    main = COMMANDS[command][0].main
    argv = [a if not a.startswith("data/") else str(ROOT / a) for a in OUT_IN_DATA[command]]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert "--force" in str(exc.value.code) and exc.value.code != 0
    with pytest.raises(Computed):  # with --force the command gets to its work
        main(argv + ["--force"])


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_unwritable_out_fails_before_compute(tmp_path, no_compute, command):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    target = blocker / ("eval.json" if command == "evaluate" else "sub")
    with pytest.raises(SystemExit) as exc:
        COMMANDS[command][0].main(["--out", str(target)])
    assert "--out" in str(exc.value.code)
    assert blocker.read_text() == "not a folder"


# ------------------------------------------------------------------ argparse validation
@pytest.mark.parametrize("command,flag,value", [
    ("train", "--steps", "0"), ("train", "--batch-size", "0"), ("train", "--lr", "0"),
    ("train", "--threads", "0"), ("train", "--text-encoder-lr-scale", "-1"),
    ("judges", "--steps", "0"),
    ("evaluate", "--n", "0"), ("evaluate", "--guidance-scale", "nan"),
    ("toy2d", "--steps", "0"), ("toy2d", "--batch", "0"), ("toy2d", "--lr", "inf"),
    ("toy2d", "--hidden", "0"), ("toy2d", "--p-uncond", "1.5"),
    ("bench", "--steps", "0"), ("bench", "--batch", "0"), ("bench", "--repeats", "2"),
    ("bench", "--ref-steps", "1"), ("bench", "--tols", "0"), ("bench", "--threads", "0"),
    ("bench", "--sweep-steps", "-3"), ("bench", "--guidance", "nan"), ("bench", "--order", "4"),
])
def test_bad_numbers_are_argparse_errors_naming_the_flag(capsys, no_compute, command, flag, value):
    with pytest.raises(SystemExit) as exc:
        COMMANDS[command][0].main([flag, value])
    assert exc.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


@pytest.mark.parametrize("parse,good,bad", [
    (cli.positive_int, {"1": 1, "12": 12}, ["0", "-1", "1.5", "x", ""]),
    (cli.nonnegative_int, {"0": 0}, ["-1"]),
    (cli.int_at_least(3), {"3": 3}, ["2"]),
    (cli.positive_float, {"1e-3": 1e-3}, ["0", "-1", "nan", "inf"]),
    (cli.nonnegative_float, {"0": 0.0}, ["-0.1", "nan"]),
    (cli.finite_float, {"-2.5": -2.5}, ["nan", "-inf", "inf", "x"]),
    (cli.probability, {"0": 0.0, "1": 1.0}, ["1.01", "-0.01", "nan"]),
])
def test_cli_types(parse, good, bad):
    for text, value in good.items():
        assert parse(text) == value
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match="must be"):
            parse(text)


# ------------------------------------------------------------------ interrupted writes
def _tiny_minisd():
    cfg = train_mod.TrainConfig(unet_channels=(8, 16), attention_heads=2, text_hidden=16, text_layers=1)
    tokenizer = train_mod.build_tokenizer()
    return (tokenizer, *train_mod.build_models(tokenizer, cfg))


def test_failed_model_save_leaves_the_previous_model(tmp_path, monkeypatch):
    """An exception in the middle of save_model (after two of four components) changes nothing."""
    tokenizer, text_encoder, unet, scheduler = _tiny_minisd()
    train_mod.save_model(tmp_path, tokenizer, text_encoder, unet, scheduler)
    before = _files(tmp_path)
    with torch.no_grad():
        for p in list(text_encoder.parameters()) + list(unet.parameters()):
            p.add_(1.0)

    def fail(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(unet, "save_pretrained", fail)
    with pytest.raises(KeyboardInterrupt):
        train_mod.save_model(tmp_path, tokenizer, text_encoder, unet, scheduler)
    assert _files(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(MODEL_PARTS)


def _interrupting_save_file(monkeypatch, after: int = 0):
    """Make ``safetensors.torch.save_file`` write ``after`` files normally, then half a file
    and raise KeyboardInterrupt (a Ctrl-C in the middle of a write)."""
    import safetensors.torch

    real, calls = safetensors.torch.save_file, []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) <= after:
            return real(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(b"\0" * 10)
        raise KeyboardInterrupt
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def test_interrupted_judges_save_leaves_the_previous_judges(tmp_path, monkeypatch):
    judges = judges_mod.Judges(judges_mod.AuditeeCNN(), judges_mod.DigitJudgeMLP(), judges_mod.StyleCNN())
    judges_mod.save_judges(judges, tmp_path)
    before = _files(tmp_path)
    with torch.no_grad():
        for net in (judges.auditee, judges.digit, judges.style):
            for p in net.parameters():
                p.add_(1.0)
    _interrupting_save_file(monkeypatch, after=1)
    with pytest.raises(KeyboardInterrupt):
        judges_mod.save_judges(judges, tmp_path)
    assert _files(tmp_path) == before


def test_interrupted_toy_save_leaves_the_previous_model(tmp_path, monkeypatch):
    model, log = toy2d.train_toy("moons", steps=2, batch=8, hidden=8, depth=1, progress=False)
    toy2d.save_toy(model, log, tmp_path / "moons")
    before = _files(tmp_path)
    _interrupting_save_file(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        toy2d.save_toy(model, dict(log, seed=1), tmp_path / "moons")
    assert _files(tmp_path) == before
    assert toy2d.load_toy(path=tmp_path / "moons")[0].cond_dim == 2


def test_ctrl_c_during_training_leaves_the_target_model(tmp_path):
    """SIGINT to `mini.train --out <folder with a model>` once its first checkpoint is written:
    the model in the folder stays byte-identical."""
    target = tmp_path / "model"
    target.mkdir()
    for part in MODEL_PARTS:
        shutil.copytree(data_dir("mini", part), target / part)
    before, stamps = _files(target), _stamps(target)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg")
    proc = subprocess.Popen([sys.executable, "-m", "adjoint_lib.models.mini.train", "--steps", "50",
                             "--batch-size", "2", "--out", str(target)], env=env, cwd=str(ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            now = _stamps(target)
            changed = {k.split("/")[0] for k in stamps if now.get(k) != stamps[k]}
            if (target / "checkpoint" / "step.json").exists() or changed == set(MODEL_PARTS):
                break  # a checkpoint is complete (in checkpoint/, or over the target)
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and b"KeyboardInterrupt" in err
    assert {k: v for k, v in _files(target).items() if not k.startswith("checkpoint")} == before
    assert not [p for p in target.rglob(".*")], "temporary files left behind"


# ------------------------------------------------------------------ bench --resume
@pytest.mark.filterwarnings("ignore:the adjoint's backsolve lost the trajectory")
def test_bench_resume_reruns_unreadable_cache_entries(tmp_path, monkeypatch):
    """A truncated job result (JSON) and a truncated gradient file (.pt) are re-run, the
    intact entry is reused."""
    ran = []
    real = bench.run_job

    def run_job(job):
        ran.append(job["name"])
        return real(job)
    monkeypatch.setattr(bench.runner, "run_job", run_job)
    kw = dict(model="toy2d", quick=True, modes=["checkpoint"], steps=[2], batch=8, ref_steps=4,
              sweep_steps=[2], isolate="none", out=tmp_path / "bench", plots=False, progress=False)
    first = bench.run_benchmark(**kw)
    assert sorted(ran) == ["checkpoint_N2", "reference_N4", "sweep_adjoint"]
    jobs = next((tmp_path / "outputs" / "bench" / "_jobs").iterdir())
    result = jobs / "checkpoint_N2.result.json"
    result.write_text(result.read_text()[: len(result.read_text()) // 2])
    grads = jobs / "reference_N4_order2.grads.pt"
    grads.write_bytes(grads.read_bytes()[:100])
    ran.clear()
    with pytest.warns(RuntimeWarning, match="unreadable"):
        again = bench.run_benchmark(**kw, resume=True)
    assert sorted(ran) == ["checkpoint_N2", "reference_N4"]
    assert again["profiles"][0]["status"] == "ok"
    assert again["profiles"][0]["nfe_forward"] == first["profiles"][0]["nfe_forward"]
    ran.clear()
    bench.run_benchmark(**kw, resume=True)  # everything readable now: nothing re-runs
    assert ran == []


def test_interrupted_gradient_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "g.grads.pt"
    bench.save_grads({"x_T": torch.ones(3)}, str(path))
    before = path.read_bytes()

    def save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"\0" * 10)
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(KeyboardInterrupt):
        bench.save_grads({"x_T": torch.zeros(3)}, str(path))
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]


# ------------------------------------------------------------------ ADJOINTDPM_DATA
def test_data_root_override(tmp_path, monkeypatch):
    """$ADJOINTDPM_DATA moves the shipped data (what loaders read and check_out protects)."""
    copy = tmp_path / "shipped"
    (copy / "toy2d").mkdir(parents=True)
    model, log = toy2d.train_toy("moons", steps=2, batch=8, hidden=8, depth=1, progress=False)
    toy2d.save_toy(model, log, copy / "toy2d" / "moons")
    monkeypatch.setenv("ADJOINTDPM_DATA", str(copy))
    assert data_dir("toy2d") == copy / "toy2d"
    loaded, _ = toy2d.load_toy("moons")
    assert loaded.cond_dim == 2 and toy2d.training_log("moons")["steps"] == 2
    with pytest.raises(SystemExit, match="--force"):
        toy2d.main(["--out", str(copy / "toy2d" / "ring")])
