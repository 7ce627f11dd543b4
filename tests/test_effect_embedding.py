"""Paper task 1 (effect -> text embedding) on MiniSD: the shipped settings, prompt pairs and
clear errors. The end-to-end runs (sd-tiny and two mini iterations) are in
``test_tasks_effect_adversarial.py``; the full mini run is notebook 04 and the CLI."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from adjoint_lib.tasks import effect_embedding as ee

pytestmark = pytest.mark.usefixtures("one_thread")


def test_mini_defaults_are_the_measured_setting() -> None:
    cfg = ee.default_config("mini")
    assert (cfg.effect, cfg.lr, cfg.iterations, cfg.n_train, cfg.steps) == ("yellow", 0.05, 30, 8, 10)
    assert cfg.n_transfer >= 50  # the transfer test needs at least 50 unseen pairs
    assert ee.default_config("mini", iterations=3).iterations == 3
    sd = ee.default_config("sd")
    assert sd.effect == ee.SD_EFFECT and sd.lr == 0.05 and sd.steps == 50


@pytest.mark.parametrize("effect", ["yellow", "red", "bold"])
def test_pairs_drop_exactly_the_effect_word(mini_model, effect) -> None:
    from adjoint_lib.models.mini.data import BACKGROUNDS, COLORS, PAIRS

    cfg = ee.default_config("mini", effect=effect)
    train = ee.make_pairs(mini_model, cfg, 16)
    test = ee.make_pairs(mini_model, cfg, 16, split="transfer")
    assert not set(train.seeds) & set(test.seeds)
    for t, b in zip(train.target_prompts + test.target_prompts, train.base_prompts + test.base_prompts):
        tw, bw = t.split(), b.split()
        assert effect in tw and effect not in bw and len(tw) == len(bw) + 1
        assert [w for w in tw if w != effect] == bw
    mini_model.check_prompts(train.target_prompts + train.base_prompts)
    if effect in COLORS:  # only (color, background) pairs MiniSD was trained on
        allowed = {b for c, b in PAIRS if c == effect}
        assert {BACKGROUNDS[i] for i in train.labels.background.tolist()} <= allowed


def test_bad_settings_are_clear_errors(mini_model) -> None:
    cfg = ee.default_config("mini", steps=2, iterations=1, n_train=1)
    pairs = ee.make_pairs(mini_model, cfg, 1)
    targets = torch.zeros(1, 3, 16, 16)
    with pytest.raises(ValueError, match="grad must be"):
        ee.learn_embedding(mini_model, pairs, targets, cfg, grad="bogus", progress=False)
    with pytest.raises(ValueError, match="iterations must be >= 1"):
        ee.learn_embedding(mini_model, pairs, targets, ee.default_config("mini", iterations=0), progress=False)
    with pytest.raises(ValueError, match="already in the tokenizer"):
        ee.add_token(mini_model, "red")
    with pytest.raises(FileNotFoundError, match="save_embedding"):
        ee.load_embedding(mini_model, "/nonexistent/folder")


def test_cli_bad_effect_on_mini_is_a_clear_error() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "adjoint_lib.tasks.effect_embedding", "--profile", "mini",
                          "--effect", "purple", "--threads", "1"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode != 0 and not out.stdout.strip()
    assert "ValueError" in out.stderr and "stroke style" in out.stderr and "purple" in out.stderr
    assert time.perf_counter() - t0 < 120
