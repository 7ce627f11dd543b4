"""Paper task 2 (stylization by LoRA fine-tuning): Gram loss math, style references and bad
inputs, the sd path end to end on tiny random components, the mini path for one iteration."""
import dataclasses
import math

import pytest
import torch

from adjoint_lib.paths import data_dir
from adjoint_lib.tasks import stylize as S

HAS_MINI = data_dir("mini", "unet").is_dir() and data_dir("mini", "judges").is_dir()
HAS_TOKENIZER = data_dir("mini", "tokenizer").is_dir()


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: these models are tiny, and on a loaded 2-core machine more threads
    oversubscribe the cores (tens of times slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------ Gram matrix and loss
def test_gram_matrix_is_mean_outer_product_and_ignores_positions():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    gram = S.gram_matrix(feats)
    assert gram.shape == (2, 3, 3)
    explicit = torch.zeros(2, 3, 3, dtype=torch.float64)
    for b in range(2):
        for i in range(4):
            for j in range(5):
                v = feats[b, :, i, j]
                explicit[b] += torch.outer(v, v)
    assert torch.allclose(gram, explicit / 20)
    assert torch.allclose(gram, gram.transpose(1, 2))
    perm = torch.randperm(20, generator=g)
    shuffled = feats.flatten(2)[:, :, perm].reshape(2, 3, 4, 5)
    assert torch.allclose(S.gram_matrix(shuffled), gram)  # where a feature fires is forgotten
    with pytest.raises(ValueError, match="B, C, H, W"):
        S.gram_matrix(feats[0])


def test_style_loss_is_zero_on_the_reference_and_normalized():
    feat = S.SequentialTaps(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                                torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU()),
                            taps=(1, 3), style_layers=(0, 1), content_layers=(1,))
    ref = S.make_style_reference("checker", 16, 4)
    loss = S.StyleLoss(feat, ref, content_weight=2.0)
    total, style, content = loss(ref.repeat(2, 1, 1, 1), ref.repeat(2, 1, 1, 1))
    assert torch.allclose(style, torch.zeros(2), atol=1e-6) and torch.allclose(content, torch.zeros(2), atol=1e-6)
    # a texture with other statistics: each layer's term is |G - G_ref|^2 / |G_ref|^2
    other = S.make_style_reference("dots", 16, 4, colors=((0, 0, 1), (1, 1, 1)))
    _, s, _ = loss(other, None)
    fo, fr = feat(other), feat(ref)
    manual = sum(float((S.gram_matrix(fo[i]) - S.gram_matrix(fr[i])).pow(2).sum() / S.gram_matrix(fr[i]).pow(2).sum())
                 for i in (0, 1)) / 2
    assert math.isclose(float(s), manual, rel_tol=1e-5) and float(s) > 0.01
    # content term: relative distance of the content layer to the base image's
    t2, s2, c2 = loss(other, ref)
    expected_c = float((fo[1] - fr[1]).pow(2).sum() / fr[1].pow(2).sum())
    assert math.isclose(float(c2), expected_c, rel_tol=1e-5)
    assert math.isclose(float(t2), float(s2) + 2.0 * expected_c, rel_tol=1e-5)


# ------------------------------------------------------------------ references, bad input
def test_shipped_reference_is_the_procedural_texture(tmp_path):
    ref = S.make_style_reference()
    assert ref.shape == (1, 3, 16, 16) and ref.min() >= -1 and ref.max() <= 1
    # two colors, neither of them one of MiniSD's
    assert len({tuple(p) for p in ref[0].flatten(1).T.tolist()}) == 2
    shipped = S.load_style_image(S.default_style_path("mini"))
    assert (shipped - ref).abs().max() < 2.5 / 255
    S.save_style_image(S.make_style_reference("dots", 12, 4), tmp_path / "d.png")
    back = S.load_style_image(tmp_path / "d.png", size=24)
    assert back.shape == (1, 3, 24, 24)
    assert S.load_style_image(S.default_style_path("sd")).shape == (1, 3, 128, 128)


def test_bad_style_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found.*make_style_reference"):
        S.load_style_image(tmp_path / "missing.png")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty file"):
        S.load_style_image(empty)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        S.load_style_image(junk)
    with pytest.raises(ValueError, match=r"\(1, 3, H, W\)"):
        S.as_style_image(torch.zeros(2, 3, 4, 4), "mini")
    with pytest.raises(ValueError, match="kind"):
        S.make_style_reference("plaid")
    # the config check names the field, and the command refuses before loading any model
    with pytest.raises(ValueError, match="style: style image .* not found"):
        S.run(None, S.default_config("mini", style=str(tmp_path / "missing.png")))
    with pytest.raises(SystemExit):
        S.main(["--profile", "sd", "--model-id", "no/such-model", "--style", str(empty)])
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights"):
        S.load_lora(torch.nn.Linear(1, 1), tmp_path)


# ------------------------------------------------------------------ sd path on tiny components
@pytest.fixture
def tiny_sd():
    if not HAS_TOKENIZER:
        pytest.skip("data/mini/tokenizer not shipped yet")
    from adjoint_lib.tasks.common import build_tiny_sd
    return build_tiny_sd()


def test_sd_path_end_to_end_tiny(tiny_sd, tmp_path):
    cfg = S.StylizeConfig(iterations=2, batch_size=2, steps=3, lr=1e-2, train_pairs=4)
    m, art = S.run(tiny_sd, dataclasses.replace(cfg, held_out=2), features=S.tiny_hf_features(), out_dir=tmp_path)
    for k in ("style_loss_before", "style_loss_after", "content_loss_after"):
        assert math.isfinite(m[k]), k
    res = art["result"]
    assert [h["iteration"] for h in res.history] == [0, 1]
    assert all(math.isfinite(h["loss"]) for h in res.history)
    # the adjoint delivered a LoRA gradient (B starts at zero, so dL/dB carries it)
    assert res.first_grad.numel() == m["lora_params"] > 0
    assert torch.isfinite(res.first_grad).all() and res.first_grad.abs().max() > 0
    # the adapter moved, and saved/loaded in diffusers' format it gives the same images
    assert any(p.abs().max() > 0 for p in res.params[1::2])
    assert (tmp_path / S.LORA_WEIGHT_NAME).is_file()
    assert m["lora_roundtrip_max_abs_diff"] < 1e-5
    assert (art["after"] - art["before"]).abs().max() > 0


def test_lora_gradient_adjoint_matches_checkpoint_tiny(tiny_sd):
    """LoRA weight gradients from the adjoint agree with the exact discrete ones."""
    params = S.add_lora(tiny_sd.unet, "g", rank=2, seed=0)
    with torch.no_grad():
        for p in params:
            p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    loss_fn = S.StyleLoss(S.tiny_hf_features(), S.make_style_reference(size=32, period=8))
    cond = tiny_sd.encode(["a red seven on black", "a blue two on white"]).detach()
    x_T = tiny_sd.noise([1, 2])
    grads = {}
    for mode in ("adjoint", "checkpoint"):
        for p in params:
            p.grad = None
        images = tiny_sd.generate(x_T, cond, steps=24, order=2, grad=mode, params=params, guidance_scale=1.0)
        loss_fn(images)[0].mean().backward()
        grads[mode] = torch.cat([p.grad.flatten() for p in params])
    assert grads["adjoint"].abs().max() > 0
    # the ODE's gradient vs the discrete sampler's: 0.995 at 24 steps (0.94 at 12)
    assert S.gradient_cosine(grads["adjoint"], grads["checkpoint"]) > 0.98
    # the base model is back when the adapters are off
    with S.base_model(tiny_sd.unet):
        base = tiny_sd.generate(x_T, cond, steps=3)
    tiny_sd.unet.delete_adapters("g")
    assert torch.allclose(base, tiny_sd.generate(x_T, cond, steps=3), atol=1e-6)


def test_save_load_roundtrip_with_conv_and_attention_targets(tiny_sd, tmp_path):
    """Every adapter tensor survives the diffusers-format file (attention *and* conv targets)."""
    from peft.utils import get_peft_model_state_dict

    params = S.add_lora(tiny_sd.unet, "a", rank=2, seed=0)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05)
    S.save_lora(tiny_sd.unet, tmp_path, "a")
    S.load_lora(tiny_sd.unet, tmp_path, "b")
    sa = get_peft_model_state_dict(tiny_sd.unet, adapter_name="a")
    sb = get_peft_model_state_dict(tiny_sd.unet, adapter_name="b")
    assert len(sa) == len(sb) == len(params)
    assert any(".conv1." in k for k in sa) and any(".to_q." in k for k in sa)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert tiny_sd.unet.active_adapters() == ["b"]


# ------------------------------------------------------------------ mini path
@pytest.mark.skipif(not HAS_MINI, reason="MiniSD (data/mini) not shipped yet")
def test_mini_path_one_iteration(tmp_path):
    from adjoint_lib.tasks.common import load_mini

    tm = load_mini()
    feats = S.mini_features(tm)
    assert [f.shape[1:] for f in feats(torch.zeros(1, 3, 16, 16))] == [(32, 16, 16), (32, 16, 16), (64, 8, 8),
                                                                        (64, 8, 8), (128,)]
    assert feats.style_layers == (0, 1, 2) and feats.content_layers == (4,)
    cfg = S.StylizeConfig(iterations=1, batch_size=2, steps=3, train_pairs=2)
    m, art = S.run(tm, dataclasses.replace(cfg, held_out=2), out_dir=tmp_path)
    assert 0.0 <= m["judge_acc_after"] <= 1.0 and math.isfinite(m["style_loss_after"])
    assert art["result"].first_grad.abs().max() > 0
    assert m["lora_roundtrip_max_abs_diff"] < 1e-5
    assert art["reference"].shape == (1, 3, 16, 16)
