"""Paper task 3: security auditing with adversarial initial noise.

For prompts and seeds whose generated image an *auditee* classifier reads correctly, move
the initial noise ``x_T`` inside an L-infinity ball of radius ``delta`` around the original
``z`` until the auditee is wrong. Normalized gradient ascent on the auditee's cross-entropy,
as in the paper's official code (lr 0.01, 30 iterations, clamp 0.1)::

    g      = d CE(auditee(Decode(ODESolve(x_T, c))), label) / d x_T          (by adjoint_lib.sample)
    x_T   <- z + clip(x_T + lr * sqrt(d) * g / ||g||_2 - z, -delta, delta)   (per sample)

(``sqrt(d)`` makes ``lr`` the RMS step per element, so one setting means the same for a
16x16 MiniSD image and a 4x64x64 SD latent; the official code's step is ``lr`` in L2 norm.)
``step="sign"`` takes ``lr * sign(g)`` instead (projected gradient ascent in L-infinity); the
``mini`` profile uses it with a larger radius (:data:`MINI_ATTACK`: MiniSD's noise is small).
A sample stops moving as soon as the auditee is fooled; all pairs are optimized together as
one batch. An independent judge (MiniSD: :class:`~adjoint_lib.models.mini.judges.DigitJudgeMLP`)
checks that the adversarial images still show what the prompt asked for, and a random sign
perturbation of the same size is the baseline.

Auditees: MiniSD's :class:`~adjoint_lib.models.mini.judges.AuditeeCNN`; on ``sd`` a
``transformers`` ImageNet classifier (``microsoft/resnet-50``; no torchvision), with a
tiny random ``ResNetConfig`` model for CI; ``--auditee`` / ``$ADJOINTDPM_AUDITEE`` and
``--judge`` / ``$ADJOINTDPM_JUDGE`` name others (hub id or local folder). ``python -m
adjoint_lib.tasks.adversarial --profile mini`` prints the metrics as one JSON line.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..adjoint import SampleStats
from . import distributed
from .cli import GRAD_MODES, nonnegative_int, one_of, order_int, positive_float, positive_int, run_cli, setting, validate
from .common import TaskModel, TaskResult, tiny_resnet_config
from .loading import load_hf, metric_model_id

Tensor = torch.Tensor
Classifier = Callable[[Tensor], Tensor]  # images (B, 3, H, W) in [-1, 1] -> logits (B, K)

IMAGENET_CLASSIFIER = "microsoft/resnet-50"
IMAGENET_JUDGE = "google/vit-base-patch16-224"
AUDITEE_ENV, JUDGE_ENV = "ADJOINTDPM_AUDITEE", "ADJOINTDPM_JUDGE"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ImageNet classes the sd profile prompts for ("a photo of a <name>")
SD_CLASSES = (1, 207, 281, 291, 340, 386, 417, 430, 508, 817, 949, 954)


@dataclass
class AttackConfig:
    """Settings of one audit (defaults: the paper's attack; :func:`default_config` gives each
    profile's, the tuned MiniSD ones for ``mini``)."""

    delta: float = setting(0.1, positive_float, "L-inf radius around the original noise (official: clamp 0.1)")
    lr: float = setting(0.01, positive_float, "RMS step per element of the normalized gradient (official: 0.01)")
    iterations: int = setting(30, positive_int, "official: 30")
    step: str = setting("l2", one_of("l2", "sign"), "l2: normalized gradient (the paper); sign: L-inf PGD")
    steps: int = setting(10, positive_int, "sampler steps (DPM-Solver multistep, log-SNR grid)")
    order: int = setting(2, order_int)
    guidance_scale: float | None = setting(None, positive_float, "default: the model's")
    n_pairs: int = setting(56, positive_int, "attacked (prompt, seed) pairs")
    max_candidates: int = setting(256, positive_int, "prompts/seeds generated to find n_pairs correct ones")
    batch_size: int = setting(64, positive_int, "generation batch while selecting")
    seed: int = setting(0, nonnegative_int)
    grad: str = setting("adjoint", one_of(*GRAD_MODES), "gradient method of adjoint_lib.sample")
    auditee: str | None = setting(None, None, f"sd: classifier under audit (hub id or folder; ${AUDITEE_ENV}, "
                                              f"default {IMAGENET_CLASSIFIER})")
    judge: str | None = setting(None, None, f"sd: independent judge (${JUDGE_ENV}, default {IMAGENET_JUDGE})")
    labels_from: str = setting("prompt", one_of("prompt", "auditee"),
                               "prompt: the class the prompt asks for; auditee: its own reading of the clean "
                               "image (for classifiers whose classes the prompts do not name, e.g. random ones)")


# MiniSD's settings (notebook 06): its noise has 3x16x16 = 768 numbers against SD's 16384, so the
# paper's radius 0.1 holds a ~4.6x smaller perturbation in L2; 0.4 keeps the attack comparable
# (measurements across radii and seeds: docs/results.md).
MINI_ATTACK = dict(delta=0.4, lr=0.02, step="sign", iterations=30)


def default_config(profile: str, **overrides) -> AttackConfig:
    """``mini``: tuned for MiniSD (:data:`MINI_ATTACK`, see notebook 06). ``sd``: the official
    settings (delta 0.1, normalized-gradient step 0.01, 30 iterations) at 50 DDIM steps."""
    base = dict(steps=50, order=1, guidance_scale=7.5, n_pairs=8, max_candidates=24,
                batch_size=4) if profile == "sd" else dict(MINI_ATTACK)
    return dataclasses.replace(AttackConfig(**base), **overrides)


CONFIG = AttackConfig


# ---------------------------------------------------------------------- classifiers
class ImageNetClassifier(nn.Module):
    """A ``transformers`` image classifier on images in [-1, 1] of any size: rescale to
    [0, 1], resize to ``size`` (bilinear, antialiased), ImageNet normalisation, logits."""

    def __init__(self, model: nn.Module, size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        self.model, self.size = model.eval().requires_grad_(False), int(size)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.id2label = dict(getattr(model.config, "id2label", {}) or {})

    def forward(self, images: Tensor) -> Tensor:
        x = (images.float().clamp(-1, 1) + 1) / 2
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        dtype = next(self.model.parameters()).dtype
        return self.model(pixel_values=x.to(dtype)).logits.float()


def load_imagenet_classifier(model_id: str = IMAGENET_CLASSIFIER, device: str | torch.device = "cpu", *,
                             flag: str = "--auditee", env: str = AUDITEE_ENV) -> ImageNetClassifier:
    """A hub/local ``AutoModelForImageClassification`` wrapped as :class:`ImageNetClassifier`
    (float32); a clear ``RuntimeError`` naming ``flag``/``env`` (never a hang) when it cannot
    be loaded."""
    from transformers import AutoModelForImageClassification

    model = load_hf(AutoModelForImageClassification, model_id, "the image classifier", flag=flag, env=env)
    size = getattr(model.config, "image_size", 224)
    return ImageNetClassifier(model, size=size if isinstance(size, int) else 224).to(device)


def tiny_classifier(num_labels: int = 10, seed: int = 0, size: int = 32) -> ImageNetClassifier:
    """A randomly initialized tiny ``ResNetForImageClassification`` (CI stand-in for ResNet-50)."""
    from transformers import ResNetForImageClassification

    torch.manual_seed(seed)
    return ImageNetClassifier(ResNetForImageClassification(tiny_resnet_config(num_labels=num_labels)), size=size)


@dataclass
class Auditors:
    """The classifier under audit and the independent judge of the content."""
    auditee: Classifier
    judge: Classifier
    names: tuple[str, str] = ("auditee", "judge")
    class_names: dict[int, str] = field(default_factory=dict)  # the auditee's label names (sd)

    def label_name(self, i: int | Tensor, width: int = 10) -> str:
        """The name of class ``i`` (its index when the auditee has no names)."""
        return self.class_names.get(int(i), str(int(i)))[:width]


def mini_auditors(model: TaskModel) -> Auditors:
    judges = model.spec.judges
    if judges is None:
        raise ValueError("the mini auditors need MiniSD's judges (data/mini/judges)")
    return Auditors(judges.auditee, judges.digit, ("AuditeeCNN", "DigitJudgeMLP"))


# ---------------------------------------------------------------------- pairs
@dataclass
class AuditPairs:
    """Prompts, seeds and the label each prompt asks for (``labels``: class indices of the
    auditee); ``n_candidates``: how many were generated to find them."""
    prompts: list[str]
    seeds: list[int]
    labels: Tensor
    images: Tensor
    n_candidates: int
    clean_acc: float


def candidate_prompts(model: TaskModel, n: int, seed: int,
                      names: dict[int, str] | None = None) -> tuple[list[str], Tensor]:
    """Random prompts and their labels: MiniSD captions (label = digit) or, on sd,
    ``"a photo of a <ImageNet class>"`` over :data:`SD_CLASSES` (``names``: class names)."""
    g = torch.Generator().manual_seed(seed)
    if model.profile == "mini":
        from ..models.mini.data import random_labels

        labels = random_labels(n, g)
        return labels.captions(), labels.digit
    names = names or {}
    idx = torch.randint(len(SD_CLASSES), (n,), generator=g)
    cls = torch.tensor([SD_CLASSES[i] for i in idx.tolist()])
    return [f"a photo of a {names.get(int(c), f'class {int(c)}')}" for c in cls.tolist()], cls


@torch.no_grad()
def generate_images(model: TaskModel, prompts: Sequence[str], x_T: Tensor, cfg: AttackConfig,
                    batch_size: int | None = None) -> Tensor:
    """Images in [-1, 1] from prompts and noises, in batches, no gradients."""
    return model.render(prompts, x_T, batch_size=batch_size or cfg.batch_size, steps=cfg.steps,
                        order=cfg.order, guidance_scale=cfg.guidance_scale)


@torch.no_grad()
def select_pairs(model: TaskModel, auditors: Auditors, cfg: AttackConfig, *,
                 require_judge: bool | None = None, labels_from_auditee: bool | None = None,
                 progress: bool = True) -> AuditPairs:
    """Generate candidates until ``cfg.n_pairs`` images are read correctly by the auditee
    (and, with ``require_judge``, by the judge too, so the judge's verdict afterwards
    measures whether the content survived). Seeds ``seed*100000 + i``.
    ``labels_from_auditee``: take the auditee's own reading of each clean image as its
    label (for classifiers whose classes the prompts do not name, e.g. random CI ones).
    Defaults: from ``cfg.labels_from`` (``"auditee"``: no judge requirement)."""
    if labels_from_auditee is None:
        labels_from_auditee = cfg.labels_from == "auditee"
    if require_judge is None:
        require_judge = not labels_from_auditee
    prompts, labels = candidate_prompts(model, cfg.max_candidates, cfg.seed,
                                        {i: n.split(",")[0] for i, n in auditors.class_names.items()})
    model.check_prompts(prompts)
    keep_p, keep_s, keep_l, keep_i = [], [], [], []
    n_done, n_ok_auditee = 0, 0
    bar = tqdm(total=cfg.n_pairs, desc="selecting pairs", disable=not progress)
    for start in range(0, cfg.max_candidates, cfg.batch_size):
        if len(keep_p) >= cfg.n_pairs:
            break
        sl = slice(start, min(start + cfg.batch_size, cfg.max_candidates))
        seeds = [cfg.seed * 100_000 + i for i in range(sl.start, sl.stop)]
        images = generate_images(model, prompts[sl], model.noise(seeds), cfg)
        lab = labels[sl].to(images.device)
        if labels_from_auditee:
            lab = auditors.auditee(images).argmax(1)
        ok = auditors.auditee(images).argmax(1) == lab
        n_ok_auditee += int(ok.sum())
        n_done += len(seeds)
        if require_judge:
            ok &= auditors.judge(images).argmax(1) == lab
        for j in ok.nonzero().flatten().tolist():
            if len(keep_p) < cfg.n_pairs:
                keep_p.append(prompts[sl][j]), keep_s.append(seeds[j]), keep_l.append(int(lab[j]))
                keep_i.append(images[j])
                bar.update(1)
    bar.close()
    if not keep_p:
        raise RuntimeError(f"none of {n_done} generated images was classified correctly by the auditee: "
                           "nothing to attack (check the model, the classifier and the prompts)")
    return AuditPairs(keep_p, keep_s, torch.tensor(keep_l), torch.stack(keep_i), n_done, n_ok_auditee / n_done)


# ---------------------------------------------------------------------- the attack
@dataclass
class AttackResult:
    """Adversarial noises ``x_adv`` (B, ...) for the original ``x_T``, which pairs fooled the
    auditee (``success``), at which iteration (``iterations``, -1 = never), the mean
    cross-entropy of the still-active pairs per iteration, the first iteration's gradient
    ``grad0`` (for comparing gradient modes), wall time and eps evaluations."""
    x_T: Tensor
    x_adv: Tensor
    success: Tensor
    iterations: Tensor
    losses: list[float]
    grad0: Tensor
    seconds: float
    nfe: int
    grad: str
    extra: dict = field(default_factory=dict)


def normalized(g: Tensor, step: str = "l2") -> Tensor:
    """The unit step for gradient ``g`` per sample: ``"l2"``: ``sqrt(d) g / ||g||_2`` (unit
    RMS per element); ``"sign"``: ``sign(g)`` (every element moves by one)."""
    if step == "sign":
        return torch.sign(g)
    if step != "l2":
        raise ValueError(f"step must be 'l2' or 'sign', got {step!r}")
    flat = g.flatten(1)
    scale = math.sqrt(flat.shape[1]) / flat.norm(dim=1).clamp_min(1e-20)
    return g * scale.view(-1, *([1] * (g.ndim - 1)))


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy per sample, written ``softplus(logsumexp_{k != y}(z_k - z_y))``: the same
    value as ``F.cross_entropy``, but its gradient does not vanish in float32 when the
    classifier is very sure (``F.cross_entropy``'s ``p_y - 1`` rounds to 0 beyond a logit
    margin of about 17, leaving only the push on the other logits; at 90 all of it is 0)."""
    z = logits.float()
    labels = labels.to(z.device)
    zy = z.gather(1, labels[:, None])
    others = (z - zy).masked_fill(F.one_hot(labels, z.shape[1]).bool(), float("-inf"))
    return F.softplus(others.logsumexp(1))


def noise_gradient(model: TaskModel, x: Tensor, cond: Tensor, labels: Tensor, auditee: Classifier,
                   cfg: AttackConfig, grad: str | None = None,
                   stats: SampleStats | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(dCE/dx, CE per sample, logits)`` of the auditee on the image generated from ``x``."""
    x = x.detach().requires_grad_(True)
    images = model.generate(x, cond, steps=cfg.steps, order=cfg.order, grad=cfg.grad if grad is None else grad,
                            guidance_scale=cfg.guidance_scale, stats=stats)
    logits = auditee(images.float())
    ce = cross_entropy(logits, labels)
    (g,) = torch.autograd.grad(ce.sum(), x)
    return g, ce.detach(), logits.detach()


def attack(model: TaskModel, prompts: Sequence[str], x_T: Tensor, labels: Tensor, auditee: Classifier,
           cfg: AttackConfig, *, grad: str | None = None, progress: bool = True) -> AttackResult:
    """Normalized gradient ascent on the auditee's cross-entropy inside the L-inf ball of
    radius ``cfg.delta`` around ``x_T``; a pair stops once the auditee is wrong. ``grad``
    overrides ``cfg.grad``."""
    grad = cfg.grad if grad is None else grad
    if grad not in GRAD_MODES:
        raise ValueError(f"grad must be 'adjoint', 'checkpoint' or 'backprop', got {grad!r}")
    if cfg.step not in ("l2", "sign"):
        raise ValueError(f"step must be 'l2' or 'sign', got {cfg.step!r}")
    if not (math.isfinite(cfg.delta) and math.isfinite(cfg.lr)) or cfg.delta <= 0 or cfg.lr <= 0 or cfg.iterations < 1:
        raise ValueError(f"need finite delta > 0, lr > 0 and iterations >= 1, got {cfg.delta}, {cfg.lr}, {cfg.iterations}")
    if len(prompts) != x_T.shape[0] or len(labels) != x_T.shape[0]:
        raise ValueError(f"{len(prompts)} prompts, {len(labels)} labels and {x_T.shape[0]} noises: they must match")
    with torch.no_grad():
        cond_all = model.encode(prompts)
    labels = labels.to(x_T.device)
    z = x_T.detach()
    x = z.clone()
    done = torch.zeros(len(prompts), dtype=torch.bool, device=z.device)
    at = torch.full((len(prompts),), -1, dtype=torch.long)
    losses, grad0, nfe = [], None, 0
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.iterations + 1), desc=f"attack ({grad})", disable=not progress)
    for it in bar:
        active = (~done).nonzero().flatten()
        if active.numel() == 0:
            break
        stats = SampleStats()
        if it < cfg.iterations:
            g, ce, logits = noise_gradient(model, x[active], cond_all[active], labels[active], auditee, cfg, grad, stats)
        else:  # after the last step: only check
            with torch.no_grad():
                images = model.generate(x[active], cond_all[active], steps=cfg.steps, order=cfg.order,
                                        guidance_scale=cfg.guidance_scale, stats=stats)
                logits = auditee(images.float())
            ce = cross_entropy(logits, labels[active])
        nfe += stats.nfe
        if grad0 is None:
            grad0 = g.detach().clone()
        fooled = logits.argmax(1) != labels[active]
        done[active[fooled]] = True
        at[active[fooled].cpu()] = it
        losses.append(float(ce.mean()))
        bar.set_postfix(fooled=f"{int(done.sum())}/{len(prompts)}", ce=f"{losses[-1]:.3f}")
        if it == cfg.iterations:
            break
        move = ~fooled
        if move.any():
            idx = active[move]
            moved = x[idx] + cfg.lr * normalized(g[move], cfg.step)
            x[idx] = z[idx] + (moved - z[idx]).clamp(-cfg.delta, cfg.delta)
    return AttackResult(z, x, done.cpu(), at, losses, grad0, time.perf_counter() - t0, nfe, grad)


def attack_shared(model: TaskModel, prompts: Sequence[str], x_T: Tensor, labels: Tensor, auditee: Classifier,
                  cfg: AttackConfig, *, grad: str | None = None, progress: bool = True) -> AttackResult:
    """:func:`attack` with the pairs split across processes (:mod:`.distributed`): each attacks
    its share, and the per-pair results come back in order on every process. Pairs never
    interact (each has its own step and stops on its own), so this is :func:`attack` on all
    pairs; ``losses`` are recombined from the shares' means weighted by their active pairs,
    ``nfe`` and ``seconds`` are the slowest process's. One process: :func:`attack` itself."""
    if distributed.world_size() == 1:
        return attack(model, prompts, x_T, labels, auditee, cfg, grad=grad, progress=progress)
    n, mine = len(prompts), distributed.shard(len(prompts))
    local = None
    if mine:
        local = attack(model, [prompts[i] for i in mine], x_T[mine], labels[mine], auditee, cfg, grad=grad,
                       progress=progress and distributed.is_main_process())
    rows = {k: distributed.gather_rows(None if local is None else getattr(local, k), n, device)
            for k, device in (("x_adv", x_T.device), ("success", "cpu"), ("iterations", "cpu"), ("grad0", x_T.device))}
    parts = distributed.gather_objects(None if local is None else (local.losses, local.iterations, local.seconds,
                                                                   local.nfe, local.grad))
    parts = [q for q in parts if q is not None]
    losses = []
    for it in range(max(len(q[0]) for q in parts)):
        # a pair is active at iteration ``it`` until the iteration that fooled it
        terms = [(q[0][it], int(((q[1] < 0) | (q[1] >= it)).sum())) for q in parts if it < len(q[0])]
        losses.append(sum(v * k for v, k in terms) / sum(k for _, k in terms))
    return AttackResult(x_T.detach(), rows["x_adv"], rows["success"], rows["iterations"], losses, rows["grad0"],
                        max(q[2] for q in parts), max(q[3] for q in parts), parts[0][4])


def random_perturbation(x_T: Tensor, delta: float, seed: int = 0) -> Tensor:
    """``x_T + delta * sign(n)``, ``n`` standard normal: a corner of the same L-inf ball."""
    n = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(seed))
    return x_T + delta * torch.sign(n).to(x_T)


# ---------------------------------------------------------------------- whole task
def auditors_for(model: TaskModel, auditee_id: str | None = None, judge_id: str | None = None) -> Auditors:
    """mini: AuditeeCNN and DigitJudgeMLP. sd: the classifiers named by ``auditee_id`` /
    ``judge_id``, else ``$ADJOINTDPM_AUDITEE`` / ``$ADJOINTDPM_JUDGE``, else tiny random
    ResNets for the tiny CI model and ResNet-50 / a ViT otherwise."""
    if model.profile == "mini":
        return mini_auditors(model)
    import os

    auditee_id, judge_id = auditee_id or os.environ.get(AUDITEE_ENV), judge_id or os.environ.get(JUDGE_ENV)
    if model.spec.tiny and auditee_id is None and judge_id is None:
        return Auditors(tiny_classifier(seed=0).to(model.device), tiny_classifier(seed=1).to(model.device),
                        ("tiny ResNet", "tiny ResNet (judge)"))
    auditee_id = metric_model_id(auditee_id, AUDITEE_ENV, IMAGENET_CLASSIFIER)
    judge_id = metric_model_id(judge_id, JUDGE_ENV, IMAGENET_JUDGE)
    auditee = load_imagenet_classifier(auditee_id, model.device)
    judge = load_imagenet_classifier(judge_id, model.device, flag="--judge", env=JUDGE_ENV)
    return Auditors(auditee, judge, (auditee_id, judge_id), dict(auditee.id2label))


@torch.no_grad()
def evaluate(model: TaskModel, pairs: AuditPairs, result: AttackResult, auditors: Auditors,
             cfg: AttackConfig) -> dict:
    """Images and predictions of the adversarial and the random-baseline noises, and the
    audit's numbers: success rate, judge agreement among successes, random baseline. Under a
    launcher each process generates its share of the images (:mod:`.distributed`) and every
    process computes the numbers from all of them."""
    def images(x: Tensor) -> Tensor:
        return distributed.map_rows(lambda i: generate_images(model, [pairs.prompts[j] for j in i], x[i], cfg),
                                    len(pairs.prompts), x.device)

    adv = images(result.x_adv)
    rand_x = random_perturbation(result.x_T, cfg.delta, cfg.seed + 1)
    rand = images(rand_x)
    lab = pairs.labels.to(adv.device)
    pred = {k: auditors.auditee(im).argmax(1) for k, im in (("clean", pairs.images), ("adv", adv), ("rand", rand))}
    judge = {k: auditors.judge(im).argmax(1) for k, im in (("clean", pairs.images), ("adv", adv), ("rand", rand))}
    fooled = pred["adv"] != lab
    n_succ = int(fooled.sum())
    out = {
        "images_adv": adv, "images_rand": rand, "x_rand": rand_x, "pred": pred, "judge": judge,
        "success_rate": float(fooled.float().mean()),
        "judge_keeps_label": float((judge["adv"][fooled] == lab[fooled]).float().mean()) if n_succ else float("nan"),
        "random_success_rate": float((pred["rand"] != lab).float().mean()),
        "judge_keeps_label_random": float((judge["rand"] == lab).float().mean()),
        "n_success": n_succ,
        "linf": float((result.x_adv - result.x_T).abs().amax()),
        "noise_rms_change": float((result.x_adv - result.x_T).pow(2).mean().sqrt()),
        "image_rms_change": float((adv - pairs.images).pow(2).mean().sqrt()),
        "image_rms_change_random": float((rand - pairs.images).pow(2).mean().sqrt()),
    }
    its = result.iterations[result.iterations >= 0]
    out["mean_iterations_to_success"] = float(its.float().mean()) if its.numel() else float("nan")
    return out


def run(model: TaskModel, cfg: AttackConfig | None = None, *, auditors: Auditors | None = None,
        pairs: AuditPairs | None = None, out_dir: str | None = None, progress: bool = True) -> TaskResult:
    """Select correctly classified pairs, attack them, evaluate. Returns a :class:`TaskResult`:
    ``metrics`` JSON-ready (rounded; ``None`` where undefined, e.g. no pair fooled),
    ``artifacts`` images and results. ``out_dir``: where ``metrics.json`` is written (none by default).
    Under a launcher the main process selects the pairs and each process attacks its share
    (:func:`attack_shared`); the metrics equal a single process's."""
    cfg = validate(cfg or default_config(model.profile))
    grad = cfg.grad
    auditors = auditors or auditors_for(model, cfg.auditee, cfg.judge)
    if pairs is None:
        own = cfg.labels_from == "auditee" or (model.spec.tiny and cfg.auditee is None)
        if distributed.is_main_process():
            pairs = select_pairs(model, auditors, cfg, require_judge=not own, labels_from_auditee=own,
                                 progress=progress)
        if distributed.world_size() > 1:  # the same pairs everywhere, whatever each GPU's rounding
            pairs = distributed.broadcast_object(None if pairs is None else dataclasses.replace(
                pairs, labels=pairs.labels.cpu(), images=pairs.images.cpu()))
            pairs = dataclasses.replace(pairs, images=pairs.images.to(model.device))
    x_T = model.noise(pairs.seeds)
    result = attack_shared(model, pairs.prompts, x_T, pairs.labels, auditors.auditee, cfg, grad=grad,
                           progress=progress)
    ev = evaluate(model, pairs, result, auditors, cfg)
    metrics = {
        "profile": model.profile, "grad": grad, "auditee": auditors.names[0], "judge": auditors.names[1],
        "delta": cfg.delta, "lr": cfg.lr, "step": cfg.step, "iterations": cfg.iterations, "steps": cfg.steps, "order": cfg.order,
        "n_pairs": len(pairs.prompts), "n_candidates": pairs.n_candidates,
        "auditee_clean_acc": round(pairs.clean_acc, 4),
        "success_rate": round(ev["success_rate"], 4), "n_success": ev["n_success"],
        "judge_keeps_label": round(ev["judge_keeps_label"], 4),
        "random_success_rate": round(ev["random_success_rate"], 4),
        "judge_keeps_label_random": round(ev["judge_keeps_label_random"], 4),
        "mean_iterations_to_success": round(ev["mean_iterations_to_success"], 2),
        "linf": round(ev["linf"], 4), "noise_rms_change": round(ev["noise_rms_change"], 4),
        "image_rms_change": round(ev["image_rms_change"], 4),
        "image_rms_change_random": round(ev["image_rms_change_random"], 4),
        "attack_seconds": round(result.seconds, 1), "nfe": result.nfe,
    }
    if out_dir is not None and distributed.is_main_process():
        from ..io import write_json
        write_json(Path(out_dir) / "metrics.json", metrics)
    return TaskResult(metrics, {"pairs": pairs, "result": result, "eval": ev, "auditors": auditors})


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: run the audit and print its metrics as one JSON line."""
    import sys

    run_cli(sys.modules[__name__], "Paper task 3: adversarial initial noise against an auditee classifier.", argv)


# ---------------------------------------------------------------------- a stricter reading of "same content"
#: default largest RMS pixel change (images in [-1, 1]) for a pair to count as visibly the same image
SAME_MAX_RMS = 0.2


def image_rms_change(original: Tensor, candidate: Tensor) -> Tensor:
    """Per pair (B,): ``sqrt(mean((candidate - original)^2))`` over pixels and channels (images in [-1, 1])."""
    if original.shape != candidate.shape:
        raise ValueError(f"original {tuple(original.shape)} and candidate {tuple(candidate.shape)} must have one shape")
    return (candidate.float() - original.float()).flatten(1).pow(2).mean(1).sqrt()


def same_content(original: Tensor, candidate: Tensor, judge_logits: Tensor, labels: Tensor, *,
                 max_rms: float = SAME_MAX_RMS, min_confidence: float = 0.5) -> Tensor:
    """Per pair (B,) bool: the candidate still shows the original's content by two independent criteria,
    the judge gives the label probability ``>= min_confidence`` AND the image moved by at most ``max_rms``
    (:func:`image_rms_change`), so a pair the judge still names but that was redrawn (another shape, a blob)
    does not count."""
    if not (max_rms > 0 and 0 <= min_confidence <= 1):
        raise ValueError(f"need max_rms > 0 and min_confidence in [0, 1], got {max_rms}, {min_confidence}")
    labels = labels.to(judge_logits.device)
    p = judge_logits.float().softmax(1).gather(1, labels[:, None])[:, 0]
    return ((p >= min_confidence) & (image_rms_change(original, candidate).to(p.device) <= max_rms)).cpu()


if __name__ == "__main__":
    main()
