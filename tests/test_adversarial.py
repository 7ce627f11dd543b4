"""Paper task 3 (adversarial initial noise): the step rules, the profile settings, the sign-step
attack on MiniSD for a couple of iterations, and the CLI's settings flags."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from adjoint_lib.tasks import adversarial as adv

pytestmark = pytest.mark.usefixtures("one_thread")


def test_step_rules() -> None:
    g = torch.randn(3, 2, 4, 4) * torch.tensor([1e-6, 1.0, 1e3]).view(3, 1, 1, 1)
    s = adv.normalized(g, "sign")
    assert torch.equal(s, torch.sign(g))
    l2 = adv.normalized(g, "l2")
    assert torch.allclose(l2, adv.normalized(g))  # "l2" is the default, the paper's step
    assert torch.allclose(l2.flatten(1).pow(2).mean(1).sqrt(), torch.ones(3), rtol=1e-5)
    with pytest.raises(ValueError, match="step"):
        adv.normalized(g, "linf")


def test_profile_settings() -> None:
    sd = adv.default_config("sd")
    assert (sd.delta, sd.lr, sd.iterations, sd.step) == (0.1, 0.01, 30, "l2")  # the official attack
    mini = adv.default_config("mini")
    assert (mini.delta, mini.lr, mini.iterations, mini.step) == (
        adv.MINI_ATTACK["delta"], adv.MINI_ATTACK["lr"], adv.MINI_ATTACK["iterations"], adv.MINI_ATTACK["step"])
    assert mini.n_pairs >= 50
    assert adv.default_config("mini", delta=0.2, step="l2").delta == 0.2


def test_sign_attack_moves_every_entry_by_lr_and_stays_in_the_ball(mini_model) -> None:
    cfg = adv.default_config("mini", steps=3, iterations=1, delta=0.05, lr=0.02, step="sign")
    auditors = adv.mini_auditors(mini_model)
    prompts = ["a bold red seven on black", "a normal blue two on white"]
    x_T = mini_model.noise([1, 2])
    res = adv.attack(mini_model, prompts, x_T, torch.tensor([7, 2]), auditors.auditee, cfg, progress=False)
    d = (res.x_adv - x_T).abs()
    moved = ~res.success  # after one step: pairs not fooled at iteration 0 moved by exactly lr
    assert torch.allclose(d[moved], torch.full_like(d[moved], cfg.lr), atol=1e-6)
    assert res.nfe >= 2 * 3  # at least one gradient: 3 forward + 3 adjoint eps calls (the count is the solver's)
    with pytest.raises(ValueError, match="step"):
        adv.attack(mini_model, prompts, x_T, torch.tensor([7, 2]), auditors.auditee,
                   adv.default_config("mini", step="bogus"), progress=False)


def test_cli_exposes_the_step_rule(capsys) -> None:
    # the CLI turns every AttackConfig field into a flag: --step sign / --delta 0.3 parse
    with pytest.raises(SystemExit):
        adv.main(["--help"])
    out = capsys.readouterr().out
    assert "--step" in out and "--delta" in out and "--lr" in out
