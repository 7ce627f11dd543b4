"""The 2-D toy: deterministic data, training, shipped weights, the two optimization loops."""
import copy

import pytest
import torch

import adjoint_lib
from adjoint_lib import toy2d
from adjoint_lib.models import ToyEps


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("kind", ["ring", "moons"])
def test_data_deterministic(kind):
    x1, l1 = toy2d.make_data(300, kind, seed=3)
    x2, l2 = toy2d.make_data(300, kind, seed=3)
    x3, _ = toy2d.make_data(300, kind, seed=4)
    assert x1.shape == (300, 2) and x1.dtype == torch.float32
    assert torch.equal(x1, x2) and torch.equal(l1, l2) and not torch.equal(x1, x3)
    assert set(l1.tolist()) == set(range(toy2d.KINDS[kind]))
    assert x1.abs().max() < 3.0
    if kind == "ring":  # every point is near its own class centre
        assert (toy2d.nearest_mode(x1) == l1).all()
        assert toy2d.mode_fraction(x1) > 0.95
    with pytest.raises(ValueError, match="kind"):
        toy2d.make_data(10, "spiral")


def test_training_lowers_the_loss():
    model, log = toy2d.train_toy("ring", steps=60, batch=128, hidden=32, depth=2, log_every=15, progress=False)
    assert len(log["loss"]) == 4
    assert log["loss"][-1] < 0.8 * log["loss"][0]
    assert log["config"] == dict(kind="ring", cond_dim=8, hidden=32, depth=2, t_dim=16)
    assert not model.training


def test_save_load_roundtrip(tmp_path):
    model, log = toy2d.train_toy("moons", steps=3, batch=16, hidden=16, depth=1, progress=False)
    path = toy2d.save_toy(model, log, tmp_path / "moons")
    loaded, schedule = toy2d.load_toy(path=tmp_path / "moons")
    x, t, c = torch.randn(5, 2), torch.full((5,), 500.0), toy2d.one_hot(torch.tensor([0, 1, 0, 1, 1]), 2)
    assert torch.equal(loaded(x, t, c), model(x, t, c))
    assert toy2d.training_log(path=tmp_path / "moons")["config"]["kind"] == "moons"
    assert isinstance(schedule, adjoint_lib.VPSchedule)
    with pytest.raises(FileNotFoundError, match="python -m adjoint_lib.toy2d"):
        toy2d.load_toy(path=tmp_path / "missing")


def test_shipped_model_samples_its_classes():
    model, schedule = toy2d.load_toy(dtype=torch.float64)
    assert isinstance(model, ToyEps) and model.cond_dim == 8
    assert sum(p.numel() for p in model.parameters()) < 100_000
    labels = torch.arange(64) % 8
    x_T = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x0 = adjoint_lib.sample(model, x_T, toy2d.one_hot(labels, 8, torch.float64), schedule=schedule, steps=10, order=2)
    assert (toy2d.nearest_mode(x0) == labels).float().mean() > 0.95
    assert toy2d.mode_fraction(x0) > 0.9


def test_optimize_noise_reaches_the_region():
    model, schedule = toy2d.load_toy(dtype=torch.float64)
    x_T = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    loss = toy2d.region_loss(toy2d.ring_centers()[0].tolist(), 0.3)
    x_opt, losses = toy2d.optimize_noise(model, schedule, x_T, torch.zeros(1, 8, dtype=torch.float64), loss,
                                         iters=15, lr=0.2, steps=6, progress=False)
    assert len(losses) == 16 and losses[-1] < 0.3 * losses[0]
    assert not x_opt.requires_grad and x_opt.shape == x_T.shape


def test_finetune_moves_the_distribution():
    base, schedule = toy2d.load_toy()
    model = copy.deepcopy(base)
    cond = torch.zeros(1, 8)
    x_T = torch.randn(256, 2, generator=torch.Generator().manual_seed(5))

    def mean_x():
        with torch.no_grad():
            return adjoint_lib.sample(model, x_T, cond, schedule=schedule, steps=8, order=2)[:, 0].mean().item()

    before = mean_x()
    loss = toy2d.shift_loss(base, schedule, [0.75, 0.0], cond, steps=8)
    losses = toy2d.finetune(model, schedule, loss, iters=12, batch=64, lr=1.5e-3, steps=8, cond=cond, progress=False)
    assert len(losses) == 12
    assert mean_x() > before + 0.3
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3])
    assert all(not p.requires_grad or p.grad is not None for p in model.parameters())
    # the base model is untouched
    assert all(torch.equal(p, q) for p, q in zip(base.parameters(), toy2d.load_toy()[0].parameters()))
