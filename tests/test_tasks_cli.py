"""The three task commands on the ``sd`` path with local files only: a tiny random Stable
Diffusion pipeline saved with ``save_pretrained`` (``--model-id <folder>``) and tiny random
metric networks saved the same way; valid JSON out, exports that diffusers' own loaders read,
flags checked before any compute, load failures that say what to do."""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from adjoint_lib.tasks import adversarial as adv
from adjoint_lib.tasks import effect_embedding as ee
from adjoint_lib.tasks import stylize as st
from adjoint_lib.tasks.common import tiny_resnet_config, tiny_sd_components
from adjoint_lib.tasks.loading import LoadError

pytestmark = pytest.mark.usefixtures("one_thread")


def strict_json(text: str) -> dict:
    """JSON that refuses NaN/Infinity (what json.loads would otherwise accept)."""
    def bad(name):
        raise ValueError(f"not valid JSON: {name}")
    return json.loads(text, parse_constant=bad)


@pytest.fixture(scope="module")
def local_files(tmp_path_factory):
    """A tiny SD pipeline folder and tiny classifier / feature-network folders."""
    from diffusers import StableDiffusionPipeline
    from transformers import ResNetForImageClassification, ResNetModel

    root = tmp_path_factory.mktemp("local")
    pipe = StableDiffusionPipeline(**tiny_sd_components(0), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(root / "sd")
    torch.manual_seed(1)
    ResNetForImageClassification(tiny_resnet_config(num_labels=10)).save_pretrained(root / "clf")
    ResNetModel(tiny_resnet_config(hidden_act="relu")).save_pretrained(root / "feat")
    return root


SD = ["--profile", "sd", "--device", "cpu", "--dtype", "float32", "--guidance-scale", "2", "--steps", "2"]


def test_effect_cli_on_a_local_sd_folder_and_textual_inversion_loads_in_diffusers(local_files, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    ee.main(SD + ["--model-id", str(local_files / "sd"), "--iterations", "2", "--n-train", "1",
                  "--n-transfer", "1", "--out", str(tmp_path)])
    m = strict_json(capsys.readouterr().out)
    assert m["profile"] == "sd" and m["iterations"] == 2 and m["reload_max_abs_diff"] < 1e-5
    vec = load_file(str(tmp_path / ee.EMBEDS_FILE))["<effect>"]
    pipe = StableDiffusionPipeline.from_pretrained(local_files / "sd", local_files_only=True)
    pipe.load_textual_inversion(str(tmp_path / ee.EMBEDS_FILE))
    tid = pipe.tokenizer.convert_tokens_to_ids("<effect>")
    assert torch.allclose(pipe.text_encoder.get_input_embeddings().weight[tid], vec[0])
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # written atomically


def test_stylize_cli_with_a_local_feature_network_and_lora_loads_in_diffusers(local_files, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    st.main(SD + ["--model-id", str(local_files / "sd"), "--feature-model", str(local_files / "feat"),
                  "--iterations", "1", "--batch-size", "1", "--train-pairs", "2", "--held-out", "1",
                  "--lr", "0.01", "--rank", "2", "--out", str(tmp_path)])
    m = strict_json(capsys.readouterr().out)
    assert m["iterations"] == 1 and m["lr"] == 0.01 and m["rank"] == 2 and m["n_held_out"] == 1
    assert m["lora_roundtrip_max_abs_diff"] < 1e-5
    pipe = StableDiffusionPipeline.from_pretrained(local_files / "sd", local_files_only=True)
    pipe.load_lora_weights(str(tmp_path), weight_name=st.LORA_WEIGHT_NAME, adapter_name="style")
    assert "style" in pipe.unet.peft_config


def test_adversarial_cli_with_local_classifiers(local_files, tmp_path, capsys):
    clf = str(local_files / "clf")
    adv.main(SD + ["--model-id", str(local_files / "sd"), "--auditee", clf, "--judge", clf,
                   "--labels-from", "auditee", "--n-pairs", "1", "--max-candidates", "2", "--batch-size", "2",
                   "--iterations", "1", "--out", str(tmp_path)])
    m = strict_json(capsys.readouterr().out)
    assert m["auditee"] == clf and m["n_pairs"] == 1 and (tmp_path / "metrics.json").is_file()
    assert strict_json((tmp_path / "metrics.json").read_text()) == m


def test_nothing_fooled_gives_null_not_nan(capsys):
    adv.main(["--profile", "sd", "--model-id", "tiny", "--steps", "2", "--guidance-scale", "2", "--n-pairs", "1",
              "--max-candidates", "1", "--batch-size", "1", "--iterations", "1", "--delta", "1e-9", "--lr", "1e-9"])
    m = strict_json(capsys.readouterr().out)
    assert m["success_rate"] == 0.0 and m["judge_keeps_label"] is None and m["mean_iterations_to_success"] is None


# ---------------------------------------------------------------------- flags checked first
@pytest.mark.parametrize("module, flag, value", [
    (ee, "--n-train", "0"), (ee, "--batch-size", "0"), (ee, "--lr", "nan"), (ee, "--iterations", "-1"),
    (adv, "--delta", "nan"), (adv, "--delta", "0"), (adv, "--n-pairs", "0"), (adv, "--lr", "inf"),
    (adv, "--step", "linf"), (st, "--held-out", "0"), (st, "--batch-size", "0"), (st, "--train-pairs", "0"),
    (st, "--rank", "0"), (ee, "--order", "4"), (ee, "--dtype", "float8"), (ee, "--threads", "0"),
])
def test_bad_settings_are_refused_naming_the_flag(module, flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        module.main(["--profile", "mini", flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and value in err


def test_configs_built_in_python_are_checked_too(mini_model):
    with pytest.raises(ValueError, match="n_train"):
        ee.run(mini_model, ee.default_config("mini", n_train=0))
    with pytest.raises(ValueError, match="delta"):
        adv.run(mini_model, adv.default_config("mini", delta=float("nan")))


def test_out_is_checked_before_any_compute(tmp_path, capsys):
    afile = tmp_path / "existing.txt"
    afile.write_text("keep me")
    with pytest.raises(SystemExit, match="existing file"):
        st.main(["--profile", "mini", "--out", str(afile)])
    assert afile.read_text() == "keep me"
    from adjoint_lib.paths import data_dir
    with pytest.raises(SystemExit, match="--force"):
        ee.main(["--profile", "mini", "--out", str(data_dir("effect_test_should_not_exist"))])
    assert not data_dir("effect_test_should_not_exist").exists()


def test_failed_loads_say_what_was_tried_and_the_ways_out(tmp_path, local_files):
    from adjoint_lib.tasks import load_sd

    with pytest.raises(LoadError) as e:
        load_sd("bogus-org/no-such-model-xyz")
    msg = str(e.value)
    assert "HF_HUB_OFFLINE=1" in msg and "--model-id" in msg and "$ADJOINTDPM_SD_MODEL" in msg and "--profile mini" in msg
    assert len(msg) < 900
    with pytest.raises(LoadError, match="from_single_file"):
        load_sd(str(tmp_path / "missing.safetensors"))
    with pytest.raises(LoadError, match="--feature-model"):
        st.hf_features(str(tmp_path / "no-such-folder-or-id"))
    with pytest.raises(LoadError, match="--judge"):
        adv.auditors_for(load_sd("tiny"), str(local_files / "clf"), "bogus-org/no-such-judge")


def test_model_id_and_metric_networks_follow_the_environment(monkeypatch, local_files):
    from adjoint_lib.tasks import load_sd
    from adjoint_lib.tasks.loading import SD_MODEL_ID, sd_model_id

    assert SD_MODEL_ID == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    monkeypatch.setenv("ADJOINTDPM_SD_MODEL", str(local_files / "sd"))
    assert sd_model_id() == str(local_files / "sd")
    model = load_sd(device="cpu")
    assert model.profile == "sd" and model.latent_shape == (4, 8, 8) and model.spec.pipe is not None
    monkeypatch.setenv("ADJOINTDPM_FEATURE_MODEL", str(local_files / "feat"))
    assert isinstance(st.default_features(model), st.HFFeatures)


def test_download_size_is_announced_and_an_unreachable_hub_fails_fast(monkeypatch, capsys):
    """Online, the weights (non-variant safetensors) and configs of the needed folders are summed
    and printed before the download; when the hub does not answer, only the local cache is read
    and the failure comes at once, with the ways out."""
    import time
    import types

    import huggingface_hub

    from adjoint_lib.tasks import load_sd, loading

    files = {"unet/diffusion_pytorch_model.safetensors": 3_000_000_000,
             "unet/diffusion_pytorch_model.fp16.safetensors": 1_500_000_000, "unet/config.json": 1_000,
             "vae/diffusion_pytorch_model.safetensors": 300_000_000, "v1-5-pruned.safetensors": 7_000_000_000,
             "safety_checker/model.safetensors": 1_000_000_000}
    info = types.SimpleNamespace(siblings=[types.SimpleNamespace(rfilename=k, size=v) for k, v in files.items()])
    assert loading.download_size(info, ("unet", "vae")) == 3_300_001_000
    monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, **k: info)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert loading.hub_source("org/model", "Stable Diffusion", ("unet", "vae")) == (False, "hub id")
    assert "3.1 GiB" in capsys.readouterr().out

    def unreachable(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    t0 = time.perf_counter()
    with pytest.raises(LoadError, match="did not answer \\(ConnectionError\\).*--profile mini"):
        load_sd("bogus-org/no-such-model-xyz")
    assert time.perf_counter() - t0 < 30
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert loading.hub_source("org/model", "x")[0] is True


def test_half_precision_load_keeps_the_vae_weights_exact(local_files):
    from adjoint_lib.tasks import load_sd

    model = load_sd(str(local_files / "sd"), device="cpu", dtype="bfloat16")
    ref = tiny_sd_components(0)  # what the fixture saved
    assert model.dtype == torch.bfloat16 and next(model.vae.parameters()).dtype == torch.float32
    for (n, a), (_, b) in zip(model.vae.named_parameters(), ref["vae"].named_parameters()):
        assert torch.equal(a, b), n
