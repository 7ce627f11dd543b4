"""Paper tasks 1 (effect -> token embedding) and 3 (adversarial initial noise): the sd code path
end to end on tiny random components, the mini path for a couple of iterations, bad input."""
from __future__ import annotations

import os
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from adjoint_lib.tasks import adversarial as adv
from adjoint_lib.tasks import build_tiny_sd, load_sd
from adjoint_lib.tasks import effect_embedding as ee

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_tiny_sd()


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


# ---------------------------------------------------------------------- task 1, sd path
def test_effect_sd_tiny_end_to_end_and_textual_inversion_round_trip(tiny, tmp_path) -> None:
    from safetensors.torch import load_file

    cfg = ee.default_config("sd", steps=3, iterations=2, n_train=2, n_transfer=2, guidance_scale=2.0, lr=0.05)
    vocab_before = len(tiny.tokenizer)
    metrics, art = ee.run(tiny, cfg, out_dir=tmp_path, progress=False)
    res = art["result"]
    assert len(tiny.tokenizer) == vocab_before  # the original model is untouched
    assert all(torch.isfinite(torch.tensor(x)) for x in res.losses) and len(res.losses) == 2
    # the gradient reached the token vector through sampler and text encoder, and moved it
    assert torch.isfinite(res.grad0).all() and float(res.grad0.norm()) > 0
    assert not torch.allclose(res.vector, res.init_vector)
    # diffusers' textual-inversion format: {token: (1, D)}
    state = load_file(str(tmp_path / ee.EMBEDS_FILE))
    assert list(state) == [cfg.token] and state[cfg.token].shape == (1, res.vector.numel())
    assert torch.allclose(state[cfg.token][0], res.vector)
    # loaded back by pipeline.load_textual_inversion, the plain prompt reproduces the images
    loaded, token = ee.load_embedding(tiny, tmp_path)
    assert token == cfg.token and token in loaded.tokenizer.get_vocab() and token not in tiny.tokenizer.get_vocab()
    row = loaded.text_encoder.get_input_embeddings().weight[loaded.tokenizer.convert_tokens_to_ids(token)]
    assert torch.allclose(row, res.vector)
    assert metrics["reload_max_abs_diff"] < 1e-5
    assert metrics["mse_start"] > 0 and torch.isfinite(torch.tensor(metrics["mse_end"]))


def test_effect_gradient_modes_agree_on_tiny(tiny) -> None:
    """First-iteration gradients w.r.t. the token vector: checkpointing is exact (= backprop);
    the adjoint ODE's gradient approaches it as the steps get finer (cosine 0.85 at 4 steps,
    0.97 at 8, 0.995 at 16 on this random model)."""
    cfg = ee.default_config("sd", steps=16, n_train=2, guidance_scale=2.0)
    pairs = ee.make_pairs(tiny, cfg, 2)
    x_T = tiny.noise(pairs.seeds)
    targets = ee.render(tiny, pairs.target_prompts, x_T, cfg)
    tok, tid = ee.add_token(tiny, cfg.token, cfg.init_word)
    prompts = pairs.with_token(cfg.token)
    grads = {}
    for mode in ("adjoint", "checkpoint", "backprop"):
        v = ee.embedding_row(tok, tid).requires_grad_(True)
        ee.effect_loss(tok, prompts, x_T, targets, tid, v, cfg, grad=mode).backward()
        grads[mode] = v.grad
    assert torch.allclose(grads["checkpoint"], grads["backprop"], rtol=1e-3, atol=1e-9)
    assert _cos(grads["adjoint"], grads["checkpoint"]) > 0.98


# ---------------------------------------------------------------------- task 3, sd path
def test_adversarial_sd_tiny_end_to_end(tiny) -> None:
    cfg = adv.default_config("sd", steps=3, n_pairs=2, max_candidates=2, batch_size=2, iterations=2,
                             guidance_scale=2.0, delta=0.2, lr=0.05)
    metrics, art = adv.run(tiny, cfg, progress=False)
    res = art["result"]
    assert metrics["n_pairs"] == 2 and metrics["auditee"] == "tiny ResNet"
    assert torch.isfinite(res.grad0).all() and float(res.grad0.norm()) > 0  # reached the noise
    moved = (res.x_adv - res.x_T).abs()
    assert float(moved.amax()) <= cfg.delta + 1e-6  # inside the L-inf ball
    assert bool((moved.flatten(1).amax(1) > 0)[~res.success].all())  # unfooled pairs did move
    for k in ("success_rate", "random_success_rate", "judge_keeps_label_random"):
        assert 0.0 <= metrics[k] <= 1.0


def test_imagenet_classifier_wrapper_preprocesses_and_differentiates() -> None:
    clf = adv.tiny_classifier(num_labels=5, size=32)
    x = torch.rand(2, 3, 16, 16, requires_grad=True) * 2 - 1
    x.retain_grad()
    logits = clf(x)
    assert logits.shape == (2, 5)
    logits[:, 0].sum().backward()
    assert float(x.grad.abs().sum()) > 0
    # normalisation: a mid-gray image becomes (0.5 - mean) / std before the network
    seen = {}

    def grab(module, args, kwargs):
        seen["x"] = kwargs["pixel_values"]

    clf.model.register_forward_pre_hook(grab, with_kwargs=True)
    clf(torch.zeros(1, 3, 8, 8))
    expect = (0.5 - torch.tensor(adv.IMAGENET_MEAN)) / torch.tensor(adv.IMAGENET_STD)
    assert seen["x"].shape == (1, 3, 32, 32)
    assert torch.allclose(seen["x"][0, :, 5, 5], expect, atol=1e-5)


def test_attack_step_is_normalized_and_clamped() -> None:
    g = torch.randn(3, 4, 5, 5) * torch.tensor([1e-6, 1.0, 1e3]).view(3, 1, 1, 1)
    n = adv.normalized(g)
    assert torch.allclose(n.flatten(1).pow(2).mean(1).sqrt(), torch.ones(3), rtol=1e-5)
    x = torch.zeros(2, 3, 4, 4)
    r = adv.random_perturbation(x, 0.1, seed=0)
    assert torch.allclose(r.abs(), torch.full_like(r, 0.1))


# ---------------------------------------------------------------------- mini path
def test_effect_mini_two_iterations(mini_model, tmp_path) -> None:
    cfg = ee.default_config("mini", steps=3, iterations=2, n_train=2)
    pairs = ee.make_pairs(mini_model, cfg, 2)
    assert all(cfg.effect in t.split() and cfg.effect not in b.split()
               for t, b in zip(pairs.target_prompts, pairs.base_prompts))
    x_T = mini_model.noise(pairs.seeds)
    targets = ee.render(mini_model, pairs.target_prompts, x_T, cfg)
    res = ee.learn_embedding(mini_model, pairs, targets, cfg, progress=False)
    assert len(res.losses) == 2 and all(torch.isfinite(torch.tensor(res.losses)))
    assert float(res.grad0.norm()) > 0 and not torch.allclose(res.vector, res.init_vector)
    # per iteration: 3 forward eps calls, and at least 3 more in the backward pass (the count
    # there depends on how the adjoint integrates, so only its lower bound is fixed here)
    assert 2 * 2 * 3 <= res.nfe <= 2 * 2 * 3 * 3
    # own loader: the token comes back in a copy of the model and reproduces the images
    file = ee.save_embedding(res, tmp_path)
    loaded, token = ee.load_embedding(mini_model, file)
    assert token not in mini_model.tokenizer.get_vocab()
    a = ee.render(res.model, pairs.with_token(token), x_T, cfg, res.token_vectors)
    b = ee.render(loaded, pairs.with_token(token), x_T, cfg)
    assert torch.allclose(a, b, atol=1e-5)
    words = ee.nearest_words(res.model, res.vector, k=3)
    assert len(words) == 3 and all(-1 <= c <= 1 for _, c in words)


def test_adversarial_mini_two_iterations(mini_model) -> None:
    cfg = adv.default_config("mini", steps=3, iterations=2, delta=0.3, lr=0.1)
    auditors = adv.mini_auditors(mini_model)
    prompts = ["a bold red seven on black", "a normal blue two on white"]
    labels = torch.tensor([7, 2])
    x_T = mini_model.noise([1, 2])
    res = adv.attack(mini_model, prompts, x_T, labels, auditors.auditee, cfg, progress=False)
    assert float(res.grad0.norm()) > 0 and res.grad0.shape == x_T.shape
    assert float((res.x_adv - x_T).abs().amax()) <= cfg.delta + 1e-6
    assert bool(((res.x_adv - x_T).abs().flatten(1).amax(1) > 0)[~res.success].all())
    assert res.success.dtype == torch.bool and res.success.shape == (2,)


# ---------------------------------------------------------------------- bad input
def test_unknown_words_on_mini_say_what_to_do(mini_model) -> None:
    cfg = ee.default_config("mini", steps=2, iterations=1, n_train=1)
    bad = ee.EffectPairs(["a bold purple seven on black"], ["a purple seven on black"], [0])
    with pytest.raises(ValueError, match="outside the MiniSD vocabulary.*purple.*Known words"):
        ee.learn_embedding(mini_model, bad, torch.zeros(1, 3, 16, 16), cfg, progress=False)
    with pytest.raises(ValueError, match="purple"):
        adv.attack(mini_model, ["a bold purple seven on black"], mini_model.noise([0]), torch.tensor([7]),
                   mini_model.spec.judges.auditee, adv.default_config("mini", steps=2, iterations=1),
                   progress=False)
    with pytest.raises(ValueError, match="stroke style .* or a color"):
        ee.make_pairs(mini_model, ee.default_config("mini", effect="sparkly"), 2)


def test_unknown_model_id_offline_fails_fast_and_clearly() -> None:
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="offline"):
        load_sd("bogus-org/no-such-model-xyz")
    with pytest.raises(RuntimeError, match="offline"):
        adv.load_imagenet_classifier("bogus-org/no-such-classifier-xyz")
    assert time.perf_counter() - t0 < 30


def test_cli_unknown_model_id_offline_is_a_clear_error_not_a_hang() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "adjoint_lib.tasks.effect_embedding", "--profile", "sd",
                          "--model-id", "bogus-org/no-such-model-xyz"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode != 0 and not out.stdout.strip()
    assert "offline" in out.stderr and "--model-id" in out.stderr and "--profile mini" in out.stderr
    assert time.perf_counter() - t0 < 120
