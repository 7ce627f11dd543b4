"""``sample()``: probability-flow ODE sampling with gradients by AdjointDPM, checkpointing
or plain backprop.

Forward: ``y = x / alpha`` solves ``dy/drho = eps(alpha y, t(rho), c)`` from ``rho_0`` (noise)
down to ``rho_N``. Backward (``grad="adjoint"``), with ``a = dL/dy``, from ``rho_N`` up to
``rho_0``:

    da/drho = -a^T d eps/dy,   dL/dc = int_{rho_0}^{rho_N} a^T d eps/dc drho,
    dL/dtheta = int_{rho_0}^{rho_N} a^T d eps/dtheta drho,   dL/dx_T = a(rho_0) / alpha_0,

with ``y`` re-solved backwards alongside (``trajectory="backsolve"``: O(1) memory). Two
discretizations of these equations (``scheme=``): ``"transpose"`` steps them with the
transpose of the forward step's exponential-integrator weights, so on the exact trajectory
it returns the sampler's exact gradient; ``"continuous"`` integrates them with their own
exponential integrator and approximates the ODE's gradient. ``grad="checkpoint"`` is the
transpose scheme on the stored grid states.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from .gradient_methods import Adjoint, Backprop, Checkpoint, GradMethod, resolve_grad
from .schedule import GaussianSchedule
from .solvers import Grid, lambda_weights, make_grid, solve

Tensor = torch.Tensor
EpsFn = Callable[[Tensor, Tensor, Any], Tensor]

__all__ = ["sample", "SampleStats", "pack_cond", "model_timesteps"]


@dataclass
class SampleStats:
    """Cost of one ``sample()`` call: eps evaluations forward and backward (filled in as
    the forward and backward passes run); with ``grad="adjoint"`` and backsolve,
    ``extra["backsolve_error"]`` is the relative error of the re-solved ``x_T``."""

    mode: str | None = None
    steps: int = 0
    order: int = 1
    nfe_forward: int = 0
    nfe_backward: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def nfe(self) -> int:
        """Eps evaluations in all, forward and backward."""
        return self.nfe_forward + self.nfe_backward


# ------------------------------------------------------------------------- helpers
def model_timesteps(t: float, x: Tensor) -> Tensor:
    """The model-timestep tensor ``t`` of shape (B,) for a batch ``x`` (float64 stays float64;
    otherwise float32), on ``x``'s device."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.full((x.shape[0],), t, dtype=dtype, device=x.device)


def pack_cond(cond: Any) -> tuple[list[Tensor], Callable[[Sequence[Tensor]], Any]]:
    """Flatten ``cond`` (None, a tensor or a tuple/list of tensors) and return a rebuild."""
    if cond is None:
        return [], lambda ts: None
    if isinstance(cond, Tensor):
        return [cond], lambda ts: ts[0]
    if isinstance(cond, (tuple, list)) and all(isinstance(c, Tensor) for c in cond):
        kind = type(cond)
        return list(cond), lambda ts: kind(ts)
    raise TypeError("cond must be None, a tensor or a tuple of tensors, "
                    f"got {type(cond).__name__}")


def _unique_params(params: Sequence[Tensor], cond_tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """``params`` without repeats and without the tensors already in ``cond`` (those receive
    their gradient as conditioning), each checked to require grad."""
    if isinstance(params, Tensor):
        raise TypeError("params must be a sequence of tensors (e.g. list(module.parameters())), got a tensor")
    seen = {id(c) for c in cond_tensors}
    out = []
    for j, p in enumerate(params):
        if not isinstance(p, Tensor) or not p.requires_grad:
            raise ValueError(f"params[{j}] does not require grad: it would never receive a "
                             "gradient (call .requires_grad_() or leave it out of params)")
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return tuple(out)


def _leaves(root: Tensor) -> set[int]:
    """ids of the leaf tensors that ``root``'s autograd graph accumulates into."""
    seen, out, stack = set(), set(), [root.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            out.add(id(fn.variable))
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return out


def _eps_caller(eps_fn: EpsFn, grid: Grid, rebuild: Callable, stats: SampleStats, phase: str):
    """``eps_at(i, y, cond_tensors)``: eps at grid node ``i`` with ``x = alpha_i y``, in ``y``'s
    dtype; in the forward pass a non-finite eps is refused naming the step."""
    def eps_at(i: int, y: Tensor, cond_tensors: Sequence[Tensor]) -> Tensor:
        x = y * grid.alpha(i)
        eps = eps_fn(x, model_timesteps(grid.node_t(i), x), rebuild(cond_tensors))
        if not isinstance(eps, Tensor) or eps.shape != x.shape:
            raise ValueError(f"eps_fn must return a tensor shaped like x {tuple(x.shape)}, "
                             f"got {getattr(eps, 'shape', type(eps))}")
        setattr(stats, phase, getattr(stats, phase) + 1)
        if phase == "nfe_forward" and not bool(torch.isfinite(eps).all()):
            raise FloatingPointError(f"eps_fn returned a non-finite eps in the forward pass at step {i} "
                                     f"(t={grid.node_t(i):.2f}, rho={grid.rho[i]:.4g}): check the model, "
                                     "its dtype and the conditioning")
        return eps.to(y.dtype)
    return eps_at


# ------------------------------------------------------------------------- autograd
@dataclass(frozen=True)
class _Spec:
    """Everything the autograd Function needs besides its tensor inputs."""

    grid: Grid
    order: int
    method: Adjoint | Checkpoint
    n_cond: int
    stats: SampleStats
    params: tuple[Tensor, ...]
    progress: bool
    eps_at_fwd: Callable
    eps_at_bwd: Callable

    @property
    def cached(self) -> bool:
        """The forward grid states are kept (``Checkpoint``, ``Adjoint(trajectory="cache")``)."""
        return self.method.trajectory == "cache"


class _AdjointSampler(torch.autograd.Function):
    """Forward: solve under no_grad. Backward: continuous adjoint or exact discrete adjoint."""

    @staticmethod
    def forward(ctx, spec: _Spec, x_T: Tensor, *tensors: Tensor) -> Tensor:  # type: ignore[override]
        grid = spec.grid
        cond_tensors = tensors[:spec.n_cond]
        eps_at = spec.eps_at_fwd
        states: list[Tensor] = []
        keep = spec.cached
        y_N = solve(lambda i, y: eps_at(i, y, cond_tensors), x_T / grid.alpha(0), grid, spec.order,
                    on_state=(lambda i, y: states.append(y)) if keep else None,
                    progress=spec.progress)
        ctx.spec = spec
        # backsolve: x_T too, to measure how well the backward pass re-solves the trajectory
        ctx.save_for_backward(*(states if keep else [y_N]), *cond_tensors, *([] if keep else [x_T]))
        return y_N * grid.alpha(grid.steps)

    @staticmethod
    def backward(ctx, grad_x0: Tensor):  # type: ignore[override]
        spec: _Spec = ctx.spec
        n_cond, grid = spec.n_cond, spec.grid
        saved = list(ctx.saved_tensors)
        x_T = None if spec.cached else saved.pop()
        states, cond_saved = saved[:len(saved) - n_cond], saved[len(saved) - n_cond:]
        params = spec.params
        cond_req = [ctx.needs_input_grad[2 + j] for j in range(n_cond)]
        cond_in = [c.detach().requires_grad_(r) for c, r in zip(cond_saved, cond_req)]
        run = _backward_continuous if spec.method.scheme == "continuous" else _backward_transpose
        with torch.enable_grad():
            g_xT, g_cond, g_par, y_0 = run(spec, grid, states, cond_in, cond_req, params, grad_x0)
        if x_T is not None:
            _check_backsolve(y_0, x_T / grid.alpha(0), spec.stats)
        unused = [j for j, g in enumerate(g_par) if g is None]
        if unused:
            raise ValueError(f"params{unused} are never used by eps_fn: they would get no gradient")
        for j, (g, r) in enumerate(zip(g_cond, cond_req)):
            if r and g is None:
                warnings.warn(f"cond tensor {j} requires grad but eps_fn never uses it; its gradient is zero")
                g_cond[j] = torch.zeros_like(cond_saved[j])
        return (None, g_xT, *g_cond, *g_par)


def _vjp(eps_at: Callable, i: int, y: Tensor, cond_in: list[Tensor], cond_req: list[bool],
         params: tuple[Tensor, ...], g: Tensor) -> tuple[Tensor, Tensor, list, list]:
    """One eps evaluation at node ``i`` and one vector-Jacobian product with ``g``:
    returns ``eps, g^T deps/dy, [g^T deps/dc], [g^T deps/dtheta]`` (None where unused)."""
    yv = y.detach().requires_grad_(True)
    eps = eps_at(i, yv, cond_in)
    wrt = [yv] + [c for c, r in zip(cond_in, cond_req) if r] + list(params)
    # The vjp is linear in g: take it with the unit-norm cotangent and scale back in at least
    # float32, so a half-precision network never sees (and underflows on) a tiny cotangent.
    acc = torch.promote_types(g.dtype, torch.float32)
    scale = g.detach().to(acc).norm()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    grads = torch.autograd.grad(eps, wrt, grad_outputs=(g.to(acc) / scale).to(eps.dtype), allow_unused=True)
    grads = [None if d is None else d.to(torch.promote_types(d.dtype, acc)) * scale for d in grads]
    gy = grads[0] if grads[0] is not None else torch.zeros_like(y)
    it = iter(grads[1:1 + sum(cond_req)])
    gc = [next(it) if r else None for r in cond_req]
    return eps.detach(), gy.to(y.dtype), gc, list(grads[1 + sum(cond_req):])


def _add(acc: list, new: list, w: float) -> list:
    """``acc += w * new`` elementwise, keeping None where nothing arrived yet."""
    return [a if n is None else (w * n if a is None else a + w * n) for a, n in zip(acc, new)]


def _check_finite(a: Tensor | Sequence[Tensor | None], k: int, grid: Grid, what: str = "x_T") -> None:
    """Refuse a non-finite adjoint state or accumulated gradient, naming the step and the input."""
    for j, g in enumerate([a] if isinstance(a, Tensor) else a):
        if g is not None and not bool(torch.isfinite(g).all()):
            name = what if isinstance(a, Tensor) else f"{what}[{j}]"
            raise FloatingPointError(f"non-finite gradient of {name} in the backward pass at step {k} "
                                     f"(t={grid.node_t(k):.2f}, rho={grid.rho[k]:.4g})")


BACKSOLVE_WARN = 0.5


def _check_backsolve(y_0: Tensor, y_0_true: Tensor, stats: SampleStats) -> None:
    """Record ``|y_0 re-solved - x_T / alpha_0| / |x_T / alpha_0|`` in ``stats.extra["backsolve_error"]``
    and warn when the backward pass lost the trajectory (its gradients may then be inaccurate)."""
    err = float((y_0 - y_0_true).norm() / y_0_true.norm().clamp_min(1e-30))
    stats.extra["backsolve_error"] = err
    if not err <= BACKSOLVE_WARN:
        warnings.warn(f"the adjoint's backsolve lost the trajectory: the re-solved x_T is off by more than "
                      f"{BACKSOLVE_WARN:.0%} (SampleStats.extra['backsolve_error']), so the gradients, that of "
                      "x_T most, may be inaccurate; more steps, trajectory='cache' or grad='checkpoint' avoid it",
                      RuntimeWarning, stacklevel=2)


def _backward_continuous(spec: _Spec, grid: Grid, states, cond_in, cond_req, params, grad_x0: Tensor):
    """``scheme="continuous"``: integrate ``(y, a, g_c, g_theta)`` from ``rho_N`` back to ``rho_0``.

    With ``a = dL/dy``, ``J = deps/dy`` and ``U = a^T deps/d(c, theta)``:

        da/drho = -a^T J,   dL/d(c, theta) = int_{rho_0}^{rho_N} U drho,   dL/dx_T = a(rho_0) / alpha_0.

    Exponential integrator in ``lambda = -log rho`` (``drho = -rho dlambda``): the scalar part
    of the Jacobian, ``J ~ (mu / rho) I`` with ``mu = rho a^T J a / |a|^2`` read off each
    step's anchor vjp for free, is solved exactly (``a ~ rho^-mu``); the residual
    ``s = rho^mu (rho a^T J - mu a)`` is smooth in lambda and interpolated like eps. For
    Gaussian data with std ``s_d``, ``mu = rho^2 / (s_d^2 + rho^2)`` moves smoothly from 0
    (data) to 1 (noise) in every direction, narrow or wide, so the steps stay accurate where
    the paper's form (``mu = 0``) is stiff. Step ``k`` (``rho_{k+1} -> rho_k``) on nodes
    ``j = k+1, k+2, ...`` (an explicit multistep method; ``W``: :func:`lambda_weights`):

        y_k = y_{k+1} + sum_j w_j eps_j                       (backsolve, as the forward pass)
        a_k = (rho_{k+1}/rho_k)^mu a_{k+1} + sum_j W_j (rho_j/rho_k)^mu (rho_j a_j^T J_j - mu a_j)

    The parameter integrals are taken once the next node is known, by interpolation over
    nodes ``k, k+1, k+2`` (``U ~ rho^-mu`` again factored out); one more vjp at ``rho_0``
    closes the last interval (``N + 1`` evaluations in all; ``N`` for ``x_T`` alone).
    """
    N, order, eps_at = grid.steps, spec.order, spec.eps_at_bwd
    cached = spec.cached
    y = states[-1]
    a = grad_x0 * grid.alpha(N)
    g_cond: list = [None] * len(cond_in)
    g_par: list = [None] * len(params)
    nodes: dict[int, tuple] = {}  # node -> (a^T J, a, U_cond, U_params)
    mus: dict[int, float] = {}    # step k -> mu
    eps_hist: list[Tensor] = []   # eps at nodes k+1, k+2, ... (backsolve)

    def close_interval(i: int) -> None:
        """Add ``int_{rho_i}^{rho_{i+1}} U drho`` to the gradients (nodes i, i+1, i+2 known)."""
        nonlocal g_cond, g_par
        if grid.rho[i + 1] == 0.0:  # trapezoid in rho up to rho = 0
            w = {i: -0.5 * grid.rho[i], i + 1: -0.5 * grid.rho[i]}
        else:
            js = [i + 1, i] + ([i + 2] if order > 1 and i + 2 <= N else [])
            mu, r1 = mus[i], grid.rho[i + 1]
            lw = lambda_weights([grid.lam_eval(j) for j in js], grid.lam[i], 1.0 - mu)
            w = {j: r1 * wj * (grid.rho[j] / r1) ** mu for j, wj in zip(js, lw)}
        for j, wj in w.items():
            g_cond, g_par = _add(g_cond, nodes[j][2], wj), _add(g_par, nodes[j][3], wj)

    for k in tqdm(range(N - 1, -1, -1), desc="adjoint", disable=not spec.progress, leave=False):
        node = k + 1
        rho_n, rho_k = grid.rho[node], grid.rho[k]
        eps, v, uc, up = _vjp(eps_at, node, states[node] if cached else y, cond_in, cond_req, params, a)
        nodes[node] = (v, a, uc, up)
        if node < N:
            close_interval(node)
        if not cached:
            eps_hist = ([eps] + eps_hist)[:order]
            y = y + sum(wj * e for wj, e in zip(grid.backward_weights(k, order), eps_hist))
        if rho_n == 0.0:  # first order in rho from rho = 0, where mu = 0
            mus[k] = 0.0
            a = a - (rho_k - rho_n) * v
        else:
            mu = mus[k] = _mu(v, a, rho_n)
            js = range(node, node + grid.backward_order(k, order))
            lw = lambda_weights([grid.lam_eval(j) for j in js], grid.lam[k], 0.0)
            a = (rho_n / rho_k) ** mu * a + sum(
                wj * (grid.rho[j] / rho_k) ** mu * (grid.rho[j] * nodes[j][0] - mu * nodes[j][1])
                for wj, j in zip(lw, js))
        nodes.pop(node + 2, None)  # no later step or interval reaches back this far
        _check_finite(a, k, grid)
        _check_finite(g_cond, k, grid, "cond")
        _check_finite(g_par, k, grid, "params")
    if any(cond_req) or params:
        _, v, uc, up = _vjp(eps_at, 0, states[0] if cached else y, cond_in, cond_req, params, a)
        nodes[0] = (v, a, uc, up)
        close_interval(0)
        _check_finite(g_cond, 0, grid, "cond")
        _check_finite(g_par, 0, grid, "params")
    return a / grid.alpha(0), g_cond, g_par, y


MU_MAX = 10.0


def _mu(v: Tensor, a: Tensor, rho: float) -> float:
    """Rayleigh quotient ``rho a^T J a / |a|^2`` (``v = a^T J``) in ``[-MU_MAX, MU_MAX]``."""
    denom = float((a * a).sum())
    if denom <= 0.0:
        return 0.0
    return min(MU_MAX, max(-MU_MAX, rho * float((v * a).sum()) / denom))


def _backward_transpose(spec: _Spec, grid: Grid, states, cond_in, cond_req, params, grad_x0: Tensor):
    """``scheme="transpose"``: the adjoint equations stepped by the transpose of the forward step.

    The forward step ``y_{i+1} = y_i + sum_j w_{i,j} eps_{i-j}`` has the exact reverse mode
    (``abar_m = dL/dy_m``, ``g_m = sum_j w_{m+j,j} abar_{m+j+1}``, ``J_m = deps/dy`` at node m):

        abar_m = abar_{m+1} + g_m^T J_m,   dL/d(c, theta) += g_m^T deps_m/d(c, theta),

    an explicit discretization of ``da/drho = -a^T J`` and of the parameter integrals with
    the forward pass's own weights. On stored states (``trajectory="cache"``, and
    ``grad="checkpoint"``) it is the sampler's exact gradient. With backsolve, ``y_m`` is
    re-solved from ``y_{m+1}`` by the explicit multistep step on nodes ``m+1, m+2, ...``
    (one eps at ``y_N`` starts it: ``N + 1`` backward evaluations), and the result differs
    from the exact gradient only through that reconstruction.
    """
    N, order, eps_at = grid.steps, spec.order, spec.eps_at_bwd
    weights = [grid.forward_weights(i, order) for i in range(N)]
    cached = spec.cached
    y = states[-1]
    abar: dict[int, Tensor] = {N: grad_x0 * grid.alpha(N)}  # dL/dy_N
    g_cond: list = [None] * len(cond_in)
    g_par: list = [None] * len(params)
    eps_hist: list[Tensor] = []  # eps at nodes m+1, m+2, ... (backsolve)
    if not cached:
        with torch.no_grad():
            eps_hist = [eps_at(N, y, cond_in)]
    for m in tqdm(range(N - 1, -1, -1), desc=spec.method.name, disable=not spec.progress, leave=False):
        if cached:
            y = states[m]
        else:
            y = y + sum(wj * e for wj, e in zip(grid.backward_weights(m, order), eps_hist))
        g = sum(weights[m + j][j] * abar[m + j + 1]
                for j in range(order) if m + j < N and j < len(weights[m + j]))
        eps, v, uc, up = _vjp(eps_at, m, y, cond_in, cond_req, params, g)
        g_cond, g_par = _add(g_cond, uc, 1.0), _add(g_par, up, 1.0)
        abar[m] = abar[m + 1] + v
        abar.pop(m + order + 1, None)
        eps_hist = ([eps] + eps_hist)[:order]
        _check_finite(abar[m], m, grid)
        _check_finite(g_cond, m, grid, "cond")
        _check_finite(g_par, m, grid, "params")
    return abar[0] / grid.alpha(0), g_cond, g_par, y


# ------------------------------------------------------------------------- entry point
def sample(eps_fn: EpsFn, x_T: Tensor, cond: Any = None, *, schedule: GaussianSchedule,
           steps: int | Grid | None = None, timesteps: Sequence[float] | Tensor | None = None,
           order: int = 1, grad: str | GradMethod | None = None, params: Sequence[Tensor] = (),
           trajectory: str | None = None, scheme: str | None = None, spacing: str = "logsnr",
           t_start: float | None = None, t_end: float | None = None,
           stats: SampleStats | None = None, progress: bool = False) -> Tensor:
    """Sample ``x_0`` by the reparameterized probability-flow ODE ``dy/drho = eps``; optionally
    differentiable with respect to ``x_T``, ``cond`` and ``params``.

    Args:
        eps_fn: ``eps_fn(x, t, cond) -> eps`` (``t``: tensor (B,) of model timesteps,
            diffusers convention 0..999). Guidance and v-prediction live in eps_fn
            (see ``adjoint_lib.models.UNetEps``).
        x_T: initial noise (B, ...). cond: None, a tensor, or a tuple of tensors.
        schedule: a :class:`GaussianSchedule` (``VPSchedule`` or ``FlowSchedule``).
        steps / timesteps: ``steps`` grid intervals with ``spacing`` (``"logsnr"``,
            ``"time"``, ``"quadratic"``) from ``t_start`` to ``t_end``; or a ready
            :class:`~adjoint_lib.Grid` (``make_grid``) as ``steps``; or an explicit
            decreasing sequence of model timesteps (e.g. a diffusers scheduler's
            ``timesteps``), whose last step ends at ``schedule.rho_end``.
        order: 1 (DDIM), 2 or 3 (DPM-Solver multistep), exponential integrators in lambda.
        grad: ``None`` (no graph), or the gradient method: an :class:`~adjoint_lib.Adjoint`,
            :class:`~adjoint_lib.Checkpoint` or :class:`~adjoint_lib.Backprop` instance (their
            docstrings say what each computes, its memory and cost, and when to choose it),
            or the shortcut strings ``"adjoint"``, ``"checkpoint"``, ``"backprop"``.
        trajectory, scheme: refine the ``"adjoint"`` shortcut (``grad="adjoint",
            scheme="continuous"`` is ``grad=Adjoint(scheme="continuous")``); refused with any
            other ``grad``.
        params: tensors used inside eps_fn (weights, LoRA, embeddings) that should receive
            gradients; each must require grad. Repeats count once, and a tensor that is also
            in ``cond`` gets its gradient as conditioning.
        stats: a :class:`SampleStats` to fill with eps-evaluation counts.
        progress: show tqdm bars.

    Returns:
        ``x_0`` with the shape of ``x_T``; ``x_T``, ``cond`` and ``params`` receive
        gradients through ``loss(x_0).backward()`` when ``grad`` is set.

    Precision: the network may run in float16/bfloat16; the ODE state, the adjoint state
    and every accumulated gradient stay in float32 (a half-precision ``x_T`` is upcast, so
    ``x_0`` comes back in float32), and each vector-Jacobian product is taken with a
    unit-norm cotangent and scaled back, so small loss gradients do not underflow. Keep
    trainable ``params`` in float32 (peft's LoRA adapters are): ``.grad`` has the dtype of
    its tensor.
    """
    method = resolve_grad(grad, trajectory, scheme)
    if isinstance(order, bool) or not isinstance(order, int) or order not in (1, 2, 3):
        raise ValueError(f"order must be the int 1, 2 or 3, got {order!r}")
    if steps is not None and not isinstance(steps, Grid) and (
            isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive int or a Grid, got {steps!r}")
    if not isinstance(schedule, GaussianSchedule):
        raise TypeError("schedule must be an adjoint_lib.GaussianSchedule (see GaussianSchedule.from_diffusers)")
    if not isinstance(x_T, Tensor) or not x_T.is_floating_point():
        raise TypeError("x_T must be a floating-point tensor")
    if not callable(eps_fn):
        raise TypeError("eps_fn must be callable as eps_fn(x, t, cond)")
    if not bool(torch.isfinite(x_T).all()):
        raise ValueError("x_T contains NaN or inf: the initial noise must be finite")
    cond_tensors, rebuild = pack_cond(cond)
    params = _unique_params(params, cond_tensors)
    if params and method is None:
        raise ValueError("params were given but grad=None: pick a gradient method")
    if isinstance(steps, Grid):
        if timesteps is not None:
            raise ValueError("give a Grid as steps= or timesteps=, not both")
        grid = steps
    else:
        grid = make_grid(schedule, steps, timesteps, spacing, t_start, t_end)
    if x_T.dtype in (torch.float16, torch.bfloat16):
        x_T = x_T.float()
    stats = stats if stats is not None else SampleStats()
    stats.mode, stats.steps, stats.order = None if method is None else method.name, grid.steps, order
    stats.nfe_forward = stats.nfe_backward = 0
    stats.extra.pop("backsolve_error", None)
    eps_fwd = _eps_caller(eps_fn, grid, rebuild, stats, "nfe_forward")

    if method is None:
        with torch.no_grad():
            y = solve(lambda i, y: eps_fwd(i, y, cond_tensors), x_T / grid.alpha(0), grid, order,
                      progress=progress)
        return y * grid.alpha(grid.steps)

    if isinstance(method, Backprop):
        def eps_checked(i: int, y: Tensor) -> Tensor:
            eps = eps_fwd(i, y, cond_tensors)
            if i == 0 and params:
                used = _leaves(eps) if eps.grad_fn is not None else set()
                missing = [j for j, p in enumerate(params) if p.is_leaf and id(p) not in used]
                if missing:
                    raise ValueError(f"params{missing} are never used by eps_fn: they would get no gradient")
            return eps
        with torch.enable_grad():
            y = solve(eps_checked, x_T / grid.alpha(0), grid, order, progress=progress)
        return y * grid.alpha(grid.steps)

    spec = _Spec(grid=grid, order=order, method=method, n_cond=len(cond_tensors), stats=stats, params=params,
                 progress=progress, eps_at_fwd=eps_fwd,
                 eps_at_bwd=_eps_caller(eps_fn, grid, rebuild, stats, "nfe_backward"))
    return _AdjointSampler.apply(spec, x_T, *cond_tensors, *params)
