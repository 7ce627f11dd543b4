"""Paper task 1: turn a visual effect into the text embedding of a new token.

Targets are images generated from noises ``z`` with prompts that *name* an effect
(MiniSD: the color yellow, ``"a bold yellow seven on gray"``; Stable Diffusion: ``"a street
scene in the style of Van Gogh"``). A new token (``<effect>``, initialised from a neutral word)
is appended to the same prompts *without* the effect word (MiniSD: ``"a bold seven on gray
<effect>"``; SD: ``"a street scene <effect>"``) and its input embedding ``v`` is learned so
that generation from the same ``z`` matches the targets::

    min_v  mean_i || Decode(ODESolve(z_i, c(prompt_i + <effect>; v))) - target_i ||^2

with AdamW (lr 0.05, as in the paper). ``dL/dv`` flows from the image through the sampler (by
:func:`adjoint_lib.sample`, ``grad="adjoint"`` or ``"checkpoint"``), into the text
embeddings ``c`` and through the text encoder into ``v`` (:meth:`TaskModel.encode` with
``token_vectors``). The token then *transfers*: appended to unseen prompts with unseen
noises it adds the effect. The result is exported in diffusers' textual-inversion format
(``learned_embeds.safetensors`` = ``{token: vector}``), which ``load_textual_inversion``
reads on a Stable Diffusion pipeline (and :func:`load_embedding` on MiniSD).

``python -m adjoint_lib.tasks.effect_embedding --profile mini`` prints the metrics as one
JSON line (every :class:`EffectConfig` field is a flag; see :mod:`.cli`).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..adjoint import SampleStats
from ..io import save_safetensors
from .cli import GRAD_MODES, nonnegative_int, one_of, order_int, positive_float, positive_int, run_cli, setting, validate
from .common import TaskModel, TaskResult

Tensor = torch.Tensor
PLACEHOLDER = "<effect>"
EMBEDS_FILE = "learned_embeds.safetensors"

# Stable Diffusion: the paper's effect and a few scenes (the first ones train, the rest test transfer).
SD_EFFECT = "in the style of Van Gogh"
SD_SCENES = ("a street scene", "a house by a river", "a bridge over a canal", "a market square",
             "a harbour with boats", "a village church", "a country road", "a cafe terrace at night")


@dataclass
class EffectConfig:
    """Settings of one run (defaults: MiniSD; :func:`default_config` gives each profile's)."""

    effect: str = setting("yellow", help="mini: a color or stroke style word; sd: appended to the scene")
    init_word: str = setting("a", help="neutral word the new token starts from")
    token: str = PLACEHOLDER
    n_train: int = setting(8, positive_int, "(prompt, noise) target pairs the token is fitted to")
    batch_size: int | None = setting(None, positive_int, "pairs per iteration (random subset; default all)")
    n_transfer: int = setting(64, positive_int, "unseen (prompt, noise) pairs for the transfer test")
    iterations: int = setting(30, positive_int)
    lr: float = setting(0.05, positive_float, "AdamW learning rate (the paper: 0.05)")
    weight_decay: float = 0.0
    steps: int = setting(10, positive_int, "sampler steps (DPM-Solver multistep, log-SNR grid)")
    order: int = setting(2, order_int)
    guidance_scale: float | None = setting(None, positive_float, "default: the model's")
    seed: int = setting(0, nonnegative_int)
    grad: str = setting("adjoint", one_of(*GRAD_MODES), "gradient method of adjoint_lib.sample")


def default_config(profile: str, **overrides) -> EffectConfig:
    """``mini``: the color yellow as effect (drawn on black and on gray), 8 training pairs,
    10 steps, 30 iterations. ``sd``: the paper's setting (Van Gogh style, 50 steps, CFG 7.5).

    On mini, yellow converges to a plateau within about ten iterations: seeds 0, 1, 2 give
    MSE -83%, -85%, -78%, and on 64 unseen pairs the judge reads yellow in 100% of them with
    the token (17%, 12%, 23% without: the base prompts name no color, so about one in eight
    comes out yellow anyway). Measured with the shipped, jointly trained MiniSD."""
    if profile == "sd":
        base = dict(effect=SD_EFFECT, init_word="painting", n_train=2, n_transfer=4, iterations=30,
                    steps=50, order=1, guidance_scale=7.5)
    else:
        base = {}
    return dataclasses.replace(EffectConfig(**base), **overrides)


CONFIG = EffectConfig


@dataclass
class EffectPairs:
    """Prompts of one effect: ``target_prompts`` name it, ``base_prompts`` do not (the token
    is appended to them); ``seeds`` give the noises; ``labels`` (mini) the attributes."""

    target_prompts: list[str]
    base_prompts: list[str]
    seeds: list[int]
    labels: object | None = None

    def with_token(self, token: str) -> list[str]:
        """The base prompts with ``token`` appended."""
        return [f"{p} {token}" for p in self.base_prompts]


def mini_labels(effect: str, n: int, generator: torch.Generator):
    """Random MiniSD attributes (a :class:`~adjoint_lib.models.mini.Labels`) that carry
    ``effect``: a stroke style (every digit/color pair) or a foreground color (with the
    backgrounds it is drawn on)."""
    from ..models.mini.data import BACKGROUNDS, COLORS, PAIRS, STYLES, Labels, random_labels

    if effect in STYLES:
        labels = random_labels(n, generator)
        return labels._replace(style=torch.full((n,), STYLES.index(effect)))
    if effect in COLORS:
        bgs = [BACKGROUNDS.index(b) for fg, b in PAIRS if fg == effect]
        return Labels(torch.randint(10, (n,), generator=generator), torch.full((n,), COLORS.index(effect)),
                      torch.tensor(bgs)[torch.randint(len(bgs), (n,), generator=generator)],
                      torch.randint(len(STYLES), (n,), generator=generator))
    raise ValueError(f"on mini the effect is a stroke style {STYLES} or a color {COLORS}, got {effect!r}")


def make_pairs(model: TaskModel, cfg: EffectConfig, n: int, split: str = "train") -> EffectPairs:
    """Target/base prompt pairs and seeds. The base prompt is the target prompt without the
    effect word. ``split="train"`` and ``"transfer"`` use disjoint seeds (and, on mini,
    independently drawn attribute combinations)."""
    offset = 0 if split == "train" else 10_000
    seeds = [cfg.seed * 100_000 + offset + i for i in range(n)]
    if model.profile == "mini":
        from ..models.mini.data import STYLES

        labels = mini_labels(cfg.effect, n, torch.Generator().manual_seed(cfg.seed * 2 + (split != "train")))
        targets = labels.captions()
        slot = 1 if cfg.effect in STYLES else 2  # captions read "a {style} {color} {digit} on {background}"
        bases = [" ".join(w for i, w in enumerate(t.split()) if i != slot) for t in targets]
        return EffectPairs(targets, bases, seeds, labels)
    scenes = SD_SCENES[:max(1, min(n, 2))] if split == "train" else SD_SCENES[2:]
    bases = [scenes[i % len(scenes)] for i in range(n)]
    return EffectPairs([f"{b} {cfg.effect}" for b in bases], bases, seeds)


# ---------------------------------------------------------------------- the new token
def is_known_token(tokenizer, token: str) -> bool:
    """Whether ``token`` already means something to ``tokenizer``: in its vocabulary (CLIP
    stores words as ``"red</w>"``) or read as one existing token."""
    ids = tokenizer(token, add_special_tokens=False).input_ids
    return token in tokenizer.get_vocab() or token + "</w>" in tokenizer.get_vocab() or len(ids) == 1


def add_token(model: TaskModel, token: str = PLACEHOLDER, init_word: str = "a") -> tuple[TaskModel, int]:
    """A copy of ``model`` whose tokenizer knows ``token``, its embedding row initialised
    from ``init_word`` (the mean of its pieces if the tokenizer splits it); the original
    model is left untouched. Returns (model, token id)."""
    tokenizer = copy.deepcopy(model.tokenizer)
    if is_known_token(tokenizer, token):
        raise ValueError(f"token {token!r} is already in the tokenizer: pick another placeholder")
    init_ids = tokenizer(init_word, add_special_tokens=False).input_ids
    if not init_ids:
        raise ValueError(f"init_word {init_word!r} has no tokens")
    text_encoder = copy.deepcopy(model.text_encoder)
    tokenizer.add_tokens([token])
    token_id = tokenizer.convert_tokens_to_ids(token)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    text_encoder.requires_grad_(False)
    weight = text_encoder.get_input_embeddings().weight
    weight.data[token_id] = weight.data[init_ids].mean(0)
    return dataclasses.replace(model, tokenizer=tokenizer, text_encoder=text_encoder), token_id


def embedding_row(model: TaskModel, token_id: int) -> Tensor:
    """The (float32) input-embedding row of ``token_id``."""
    return model.text_encoder.get_input_embeddings().weight[token_id].detach().float().clone()


@torch.no_grad()
def render(model: TaskModel, prompts: Sequence[str], x_T: Tensor, cfg: EffectConfig,
           token_vectors: dict[int, Tensor] | None = None, batch_size: int = 64) -> Tensor:
    """Images (B, 3, H, W) in [-1, 1] from prompts and noises, no gradients."""
    return model.render(prompts, x_T, batch_size=batch_size, steps=cfg.steps, order=cfg.order,
                        guidance_scale=cfg.guidance_scale, token_vectors=token_vectors)


# ---------------------------------------------------------------------- learning
@dataclass
class EffectResult:
    """A learned token: ``vector`` (D,), ``init_vector``, the loss per iteration, the first
    iteration's gradient ``grad0`` (for comparing gradient modes), wall time and eps calls."""

    model: TaskModel
    token: str
    token_id: int
    vector: Tensor
    init_vector: Tensor
    losses: list[float]
    grad0: Tensor
    seconds: float
    nfe: int
    grad: str
    extra: dict = field(default_factory=dict)

    @property
    def token_vectors(self) -> dict[int, Tensor]:
        """``{token id: learned vector}`` for :meth:`TaskModel.encode`."""
        return {self.token_id: self.vector}


def effect_loss(model: TaskModel, prompts: Sequence[str], x_T: Tensor, targets: Tensor, token_id: int,
                vector: Tensor, cfg: EffectConfig, grad: str = "adjoint",
                stats: SampleStats | None = None) -> Tensor:
    """Pixel MSE between the images generated with ``vector`` as the token's embedding and
    the targets; differentiable in ``vector`` through sampler and text encoder."""
    cond = model.encode(prompts, token_vectors={token_id: vector})
    images = model.generate(x_T, cond, steps=cfg.steps, order=cfg.order, grad=grad,
                            guidance_scale=cfg.guidance_scale, stats=stats)
    return F.mse_loss(images.float(), targets.float())


def learn_embedding(model: TaskModel, pairs: EffectPairs, targets: Tensor, cfg: EffectConfig, *,
                    grad: str | None = None, progress: bool = True) -> EffectResult:
    """Fit the new token's input embedding to the targets (AdamW on the pixel MSE, float32).

    ``model`` is the original model (a copy with the token is made by :func:`add_token`);
    ``targets``: images (B, 3, H, W) generated from ``pairs.target_prompts``; ``grad``
    overrides ``cfg.grad``.
    """
    grad = cfg.grad if grad is None else grad
    if grad not in GRAD_MODES:
        raise ValueError(f"grad must be 'adjoint', 'checkpoint' or 'backprop', got {grad!r}")
    if cfg.iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {cfg.iterations}")
    tok_model, token_id = add_token(model, cfg.token, cfg.init_word)
    prompts = tok_model.check_prompts(pairs.with_token(cfg.token))
    x_T = tok_model.noise(pairs.seeds)
    init = embedding_row(tok_model, token_id)
    vector = init.clone().to(tok_model.device).requires_grad_(True)
    opt = torch.optim.AdamW([vector], lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses: list[float] = []
    nfe = 0
    grad0 = None
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(cfg.seed)
    n, bs = len(prompts), min(cfg.batch_size or len(prompts), len(prompts))
    bar = tqdm(range(cfg.iterations), desc=f"<effect> ({grad})", disable=not progress)
    for _ in bar:
        idx = torch.randperm(n, generator=g)[:bs].sort().values if bs < n else torch.arange(n)
        stats = SampleStats()
        loss = effect_loss(tok_model, [prompts[i] for i in idx.tolist()], x_T[idx], targets[idx],
                           token_id, vector, cfg, grad, stats)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nfe += stats.nfe
        if grad0 is None:
            grad0 = vector.grad.detach().clone()
        if not torch.isfinite(vector.grad).all():
            raise FloatingPointError("non-finite gradient for the token embedding")
        opt.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(mse=f"{losses[-1]:.4f}")
    seconds = time.perf_counter() - t0
    vector = vector.detach()
    tok_model.text_encoder.get_input_embeddings().weight.data[token_id] = vector.to(
        tok_model.text_encoder.get_input_embeddings().weight.dtype)
    return EffectResult(tok_model, cfg.token, token_id, vector, init, losses, grad0, seconds, nfe, grad)


# ---------------------------------------------------------------------- analysis
def nearest_words(model: TaskModel, vector: Tensor, k: int = 5,
                  words: Sequence[str] | None = None) -> list[tuple[str, float]]:
    """The ``k`` words whose input embeddings have the largest cosine similarity with
    ``vector``: among ``words`` (default: MiniSD's vocabulary on mini, the whole tokenizer
    vocabulary on sd)."""
    weight = model.text_encoder.get_input_embeddings().weight.detach().float()
    if words is None:
        words = model.spec.vocabulary
    if words is not None:
        ids = [model.tokenizer(w, add_special_tokens=False).input_ids for w in words]
        keep = [(w, i[0]) for w, i in zip(words, ids) if len(i) == 1]
        names, rows = [w for w, _ in keep], weight[[i for _, i in keep]]
    else:
        n = min(weight.shape[0], len(model.tokenizer))
        names = [t.replace("</w>", "") for t in model.tokenizer.convert_ids_to_tokens(list(range(n)))]
        rows = weight[:n]
    cos = F.cosine_similarity(rows, vector.float().to(rows.device)[None], dim=1)
    top = cos.topk(min(k, len(names)))
    return [(names[i], round(float(c), 3)) for c, i in zip(top.values.tolist(), top.indices.tolist())]


def mse_per_image(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared error per image, ``mean_{c,h,w} (a - b)^2``, shape (B,)."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


def detect_effect(model: TaskModel, images: Tensor, effect: str) -> Tensor | None:
    """mini: boolean (B,), the judges read ``effect`` off the images (the style CNN for a
    stroke style, the color read-out for a color). sd: ``None`` (no judge; transfer is
    measured by the MSE to the effect prompt's images)."""
    judges = model.spec.judges
    if judges is None:
        return None
    from ..models.mini.data import COLORS, STYLES
    from ..models.mini.judges import read_colors

    with torch.no_grad():
        if effect in STYLES:
            return judges.style(images.float()).argmax(1) == STYLES.index(effect)
        return read_colors(images.float())[0] == COLORS.index(effect)


@torch.no_grad()
def transfer(model: TaskModel, result: EffectResult, cfg: EffectConfig) -> dict:
    """The learned token on unseen prompts and noises: images of the base prompt without
    and with the token and of the target (effect-word) prompt; MSE of each to the target;
    on mini the fraction the style judge reads as the effect, and color/digit read-outs."""
    pairs = make_pairs(model, cfg, cfg.n_transfer, split="transfer")
    x_T = model.noise(pairs.seeds)
    target = render(model, pairs.target_prompts, x_T, cfg)
    without = render(model, pairs.base_prompts, x_T, cfg)
    with_tok = render(result.model, pairs.with_token(cfg.token), x_T, cfg, result.token_vectors)
    out = {"pairs": pairs, "target": target, "without": without, "with": with_tok,
           "mse_without": float(mse_per_image(without, target).mean()),
           "mse_with": float(mse_per_image(with_tok, target).mean())}
    det = [detect_effect(model, im, cfg.effect) for im in (without, with_tok, target)]
    if det[0] is not None:
        from ..models.mini.judges import read_colors
        out.update(rate_without=float(det[0].float().mean()), rate_with=float(det[1].float().mean()),
                   rate_target=float(det[2].float().mean()),
                   color_with=float((read_colors(with_tok)[0] == pairs.labels.color).float().mean()),
                   style_with=float((model.spec.judges.style(with_tok).argmax(1) == pairs.labels.style).float().mean()),
                   digit_agree_with=float((model.spec.judges.digit(with_tok).argmax(1)
                                           == model.spec.judges.digit(target).argmax(1)).float().mean()))
    return out


# ---------------------------------------------------------------------- export / import
def save_embedding(result: EffectResult, directory: str | os.PathLike) -> Path:
    """Write ``learned_embeds.safetensors`` = ``{token: vector (1, D)}`` (diffusers'
    textual-inversion format, as its ``train_textual_inversion.py`` saves it), atomically."""
    file = Path(directory) / EMBEDS_FILE
    save_safetensors({result.token: result.vector.detach().float().cpu()[None].contiguous()}, file)
    if not file.is_file():
        raise OSError(f"{file} was not written")
    return file


def as_pipeline(model: TaskModel):
    """The model's ``StableDiffusionPipeline`` (built from its components if it has none)."""
    pipe = model.spec.pipe
    if pipe is not None:
        return pipe
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=model.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def load_embedding(model: TaskModel, file: str | os.PathLike) -> tuple[TaskModel, str]:
    """A copy of ``model`` with the token of a ``learned_embeds.safetensors`` added.

    sd: diffusers' ``pipeline.load_textual_inversion`` (on copies of the tokenizer and
    text encoder, so ``model`` is untouched). mini: the same steps by hand (add the token,
    resize the embedding table, write the row). Returns (model, token).
    """
    from safetensors.torch import load_file

    file = Path(file)
    if file.is_dir():
        file = file / EMBEDS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no textual-inversion file at {file}: save one with save_embedding()")
    state = load_file(str(file))
    if len(state) != 1:
        raise ValueError(f"{file} must hold exactly one {{token: vector}} entry, found {list(state)}")
    (token, vec), = state.items()
    tokenizer, text_encoder = copy.deepcopy(model.tokenizer), copy.deepcopy(model.text_encoder)
    if model.profile == "sd":
        as_pipeline(model).load_textual_inversion(str(file), tokenizer=tokenizer, text_encoder=text_encoder)
    else:
        if is_known_token(tokenizer, token):
            raise ValueError(f"token {token!r} is already in the tokenizer")
        weight = text_encoder.get_input_embeddings().weight
        if vec.shape[-1] != weight.shape[1]:
            raise ValueError(f"embedding has size {vec.shape[-1]}, the text encoder expects {weight.shape[1]}")
        tokenizer.add_tokens([token])
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        text_encoder.requires_grad_(False)
        text_encoder.get_input_embeddings().weight.data[tokenizer.convert_tokens_to_ids(token)] = vec.reshape(-1)
    return dataclasses.replace(model, tokenizer=tokenizer, text_encoder=text_encoder), token


# ---------------------------------------------------------------------- whole task
def run(model: TaskModel, cfg: EffectConfig | None = None, *, out_dir: str | os.PathLike | None = None,
        progress: bool = True) -> TaskResult:
    """The whole task: targets, learning, transfer, nearest words, export and reload.

    Returns a :class:`TaskResult`: ``metrics`` JSON-ready (rounded), ``artifacts`` the images
    and the :class:`EffectResult` for plotting.
    """
    cfg = validate(cfg or default_config(model.profile))
    grad = cfg.grad
    pairs = make_pairs(model, cfg, cfg.n_train)
    x_T = model.noise(pairs.seeds)
    targets = render(model, pairs.target_prompts, x_T, cfg)
    result = learn_embedding(model, pairs, targets, cfg, grad=grad, progress=progress)
    prompts = pairs.with_token(cfg.token)
    before = render(result.model, prompts, x_T, cfg, {result.token_id: result.init_vector})
    after = render(result.model, prompts, x_T, cfg, result.token_vectors)
    mse_start = float(mse_per_image(before, targets).mean())
    mse_end = float(mse_per_image(after, targets).mean())
    tr = transfer(model, result, cfg)
    if out_dir is None:
        from ..paths import outputs_dir
        out_dir = outputs_dir("effect_embedding", model.profile)
    file = save_embedding(result, out_dir)
    loaded, token = load_embedding(model, file)
    reloaded = render(loaded, [f"{p} {token}" for p in pairs.base_prompts], x_T, cfg)
    metrics = {
        "profile": model.profile, "grad": grad, "effect": cfg.effect, "token": cfg.token,
        "init_word": cfg.init_word, "n_train": cfg.n_train, "batch_size": cfg.batch_size or cfg.n_train,
        "iterations": cfg.iterations, "lr": cfg.lr,
        "steps": cfg.steps, "order": cfg.order,
        "mse_start": round(mse_start, 5), "mse_end": round(mse_end, 5),
        "mse_drop": round(1 - mse_end / max(mse_start, 1e-12), 4),
        "n_transfer": cfg.n_transfer,
        "transfer_mse_without": round(tr["mse_without"], 5), "transfer_mse_with": round(tr["mse_with"], 5),
        "nearest_words": nearest_words(result.model, result.vector),
        "vector_norm": round(float(result.vector.norm()), 3), "init_norm": round(float(result.init_vector.norm()), 3),
        "export_file": str(file), "reload_max_abs_diff": float((reloaded - after).abs().max()),
        "train_seconds": round(result.seconds, 1), "nfe": result.nfe,
    }
    if "rate_with" in tr:
        metrics.update({k: round(tr[k], 4) for k in ("rate_without", "rate_with", "rate_target",
                                                      "color_with", "style_with", "digit_agree_with")})
    artifacts = {"pairs": pairs, "x_T": x_T, "targets": targets, "before": before, "after": after,
                 "reloaded": reloaded, "result": result, "transfer": tr}
    return TaskResult(metrics, artifacts)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: run the task and print its metrics as one JSON line."""
    import sys

    run_cli(sys.modules[__name__], "Paper task 1: a visual effect -> a new token's embedding.", argv)


if __name__ == "__main__":
    main()
