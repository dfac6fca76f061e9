"""SiMPO's particle weights: the virtual target pi* = pi_old * g((Q - nu) / lambda), made discrete.

Shape glossary
    B   states (batch)
    N   particles per state, a_1..a_N ~ pi_old(.|s)

For each state we draw N particles from pi_old, score them with Q, and give particle i the weight

    w_i = max(g((Q_i - nu) / lambda), b) / N            (normalised: sum_i w_i = 1)

where g is a monotonically increasing weighting function, lambda > 0 the temperature, b <= 0 the
negative bound (the floor w_i >= b / N), and nu (per state) the normaliser that makes the weights sum
to 1. Each particle carries mass 1/N under pi_old, so max(g(.), b) is the density ratio pi*/pi_old;
b = 0 gives sparsemax-like weights with exact zeros, b < 0 lets the target put negative mass on bad
actions (repulsion). The trainer multiplies the normalised weights by N (mean weight 1 per state).

The normaliser is solved in "x-space": with d_i = (Q_i - max_j Q_j) / lambda <= 0 and
m = (nu - max_j Q_j) / lambda, the weights are max(g(d_i - m), b) / N. Working with d makes the
solves independent of the absolute level of Q (adding a constant to Q changes nu, not the weights) and
keeps them finite for huge Q. Every solve is done in float64.

Solvers:
    exp      closed form   m = logsumexp(d) - log N             (softmax; the floor never binds)
    linear   sort/cumsum   g(x) = 1 + x with the floor b          (exact, piecewise linear)
    square   sort/cumsum   g(x) = max(x, 0)^2                     (exact, quadratic on the active set)
    other    bisection     any monotone g, with the floor b      (to float64 resolution)
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

WeightFn = Callable[[Tensor], Tensor]
Solver = Literal["exp", "linear", "square", "bisect"]

BISECT_ITERS = 200  # halvings of the bracket; float64 resolution is reached well before this


# ---------------------------------------------------------------------------------------------------
# Weighting functions g (monotonically increasing). Each has g(0) = 1 except `square`, whose form
# follows f' = sqrt(t); shifts and scales of the argument are absorbed by nu and lambda.
# ---------------------------------------------------------------------------------------------------


def exp_weight(x: Tensor) -> Tensor:
    """KL divergence: g(x) = exp(x), the softmax reweighting."""
    return torch.exp(x)


def linear_weight(x: Tensor) -> Tensor:
    """Pearson chi^2: g(x) = 1 + x, may go negative (down to the floor b)."""
    return 1.0 + x


def square_weight(x: Tensor) -> Tensor:
    """f' = sqrt(t): g(x) = max(x, 0)^2."""
    return torch.clamp(x, min=0.0) ** 2


def tanh_weight(x: Tensor) -> Tensor:
    """g(x) = 1 + tanh(x): bounded in (0, 2), so no single particle dominates."""
    return 1.0 + torch.tanh(x)


def sigmoid_weight(x: Tensor) -> Tensor:
    """g(x) = 2 * sigmoid(x): bounded in (0, 2), softer saturation than tanh."""
    return 2.0 * torch.sigmoid(x)


LEAKY_SLOPE = 0.2


def leaky_relu_weight(x: Tensor) -> Tensor:
    """g(x) = 1 + x for x >= 0, 1 + 0.2 x below: weaker repulsion than linear (floored at b)."""
    return 1.0 + torch.where(x >= 0, x, LEAKY_SLOPE * x)


CLIP_LOW, CLIP_HIGH = -1.0, 3.0


def clipped_linear_weight(x: Tensor) -> Tensor:
    """g(x) = clip(1 + x, -1, 3): linear with both the repulsion and the attraction bounded."""
    return torch.clamp(1.0 + x, CLIP_LOW, CLIP_HIGH)


@dataclass(frozen=True)
class Weighting:
    """A weighting function g together with the solver that finds its normaliser."""

    name: str
    fn: WeightFn
    solver: Solver

    def __call__(self, x: Tensor) -> Tensor:
        return self.fn(x)


WEIGHTINGS: dict[str, Weighting] = {
    w.name: w
    for w in (
        Weighting("exp", exp_weight, "exp"),
        Weighting("linear", linear_weight, "linear"),
        Weighting("square", square_weight, "square"),
        Weighting("tanh", tanh_weight, "bisect"),
        Weighting("sigmoid", sigmoid_weight, "bisect"),
        Weighting("leaky_relu", leaky_relu_weight, "bisect"),
        Weighting("clipped_linear", clipped_linear_weight, "bisect"),
    )
}


def check_monotone(fn: WeightFn, name: str = "weighting") -> None:
    """Check on a probe grid that fn is elementwise, finite and non-decreasing; raise ValueError if not."""
    grid = torch.linspace(-50.0, 50.0, 2001, dtype=torch.float64)
    try:
        values = fn(grid)
    except Exception as exc:  # a user callable: say which one failed and why
        raise ValueError(f"{name}: calling it on a float64 tensor failed: {exc}") from exc
    if not isinstance(values, Tensor) or values.shape != grid.shape:
        raise ValueError(f"{name}: must map a tensor to a tensor of the same shape (elementwise)")
    finite = torch.isfinite(values)
    if not finite.all():
        # exp-like functions overflow far out; only the part that is finite must be monotone.
        values = values[finite]
    if values.numel() < 2 or (torch.diff(values) < -1e-12 * values.abs().max().clamp(min=1.0)).any():
        raise ValueError(f"{name}: the weighting function must be monotonically non-decreasing")


def get_weighting(weighting: str | Weighting | WeightFn) -> Weighting:
    """Resolve a name from WEIGHTINGS, a Weighting, or any monotone callable (solved by bisection)."""
    if isinstance(weighting, Weighting):
        return weighting
    if isinstance(weighting, str):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; choose one of {sorted(WEIGHTINGS)} or pass a callable")
        return WEIGHTINGS[weighting]
    if callable(weighting):
        name = getattr(weighting, "__name__", type(weighting).__name__)
        check_monotone(weighting, name)
        return Weighting(name, weighting, "bisect")
    raise TypeError(f"weighting must be a name, a Weighting or a callable, got {type(weighting).__name__}")


# ---------------------------------------------------------------------------------------------------
# Normaliser solves. Inputs d: (B, N) float64 with max_i d_i = 0. Output m: (B,), such that
# mean_i max(g(d_i - m), b) = 1.
# ---------------------------------------------------------------------------------------------------


def solve_exp(d: Tensor) -> Tensor:
    """mean_i exp(d_i - m) = 1  =>  m = logsumexp(d) - log N."""
    return torch.logsumexp(d, dim=-1) - math.log(d.shape[-1])


def _largest_valid(valid: Tensor) -> Tensor:
    """Index (B,) of the last True along the last dim; position 0 is always valid by construction."""
    n = valid.shape[-1]
    idx = torch.arange(n, device=valid.device).expand_as(valid)
    return torch.where(valid, idx, torch.zeros_like(idx)).amax(dim=-1)


def solve_linear(d: Tensor, negative_bound: float) -> Tensor:
    """mean_i max(1 + d_i - m, b) = 1, exactly.

    With the top-k particles (sorted descending) above the floor and the rest on it:
        k + S_k - k m + (N - k) b = N  =>  m_k = S_k / k - (N - k)(1 - b) / k,
    valid when particle k is above the floor, 1 + d_(k) - m_k > b. The sum is decreasing in m, so the
    largest valid k gives the unique root (as in sparsemax).
    """
    n = d.shape[-1]
    b = negative_bound
    sorted_d, _ = torch.sort(d, dim=-1, descending=True)
    k = torch.arange(1, n + 1, dtype=d.dtype, device=d.device)
    cumsum = torch.cumsum(sorted_d, dim=-1)
    m_k = cumsum / k - (n - k) * (1.0 - b) / k
    valid = 1.0 + sorted_d - m_k > b
    valid[..., 0] = True
    return m_k.gather(-1, _largest_valid(valid).unsqueeze(-1)).squeeze(-1)


def solve_square(d: Tensor) -> Tensor:
    """mean_i max(d_i - m, 0)^2 = 1, exactly.

    On the active set (top-k, d_i > m): sum (d_i - m)^2 = N, i.e. k m^2 - 2 S_k m + (S2_k - N) = 0,
    whose smaller root m_k = (S_k - sqrt(S_k^2 - k (S2_k - N))) / k lies below the active values.
    Valid when d_(k) > m_k; the largest valid k gives the unique root. (The floor b <= 0 never binds.)
    """
    n = d.shape[-1]
    sorted_d, _ = torch.sort(d, dim=-1, descending=True)
    k = torch.arange(1, n + 1, dtype=d.dtype, device=d.device)
    s1 = torch.cumsum(sorted_d, dim=-1)
    s2 = torch.cumsum(sorted_d**2, dim=-1)
    disc = torch.clamp(s1**2 - k * (s2 - n), min=0.0)
    m_k = (s1 - torch.sqrt(disc)) / k
    valid = sorted_d > m_k  # NaN (overflowed huge gaps) compares False: such k are never chosen
    valid[..., 0] = True
    return m_k.gather(-1, _largest_valid(valid).unsqueeze(-1)).squeeze(-1)


def _bracket(fn: WeightFn, negative_bound: float, upward: bool) -> float:
    """A scalar x with max(g(x), b) > 1 (upward) or < 1 (downward), found by doubling."""
    x = 1.0
    for _ in range(64):
        point = torch.tensor([x if upward else -x], dtype=torch.float64)
        value = torch.clamp(fn(point), min=negative_bound).item()
        if (value > 1.0) if upward else (value < 1.0):
            return point.item()
        x *= 2.0
    side = "above" if upward else "below"
    raise ValueError(
        f"the weighting never goes {side} 1 (with the floor b={negative_bound}): no normaliser makes the "
        "weights average 1; use a g whose range contains 1"
    )


def solve_bisect(d: Tensor, fn: WeightFn, negative_bound: float) -> tuple[Tensor, Tensor]:
    """mean_i max(g(d_i - m), b) = 1 for any monotone g, by bisection on m.

    With x_lo (weight < 1) and x_hi (weight > 1) from _bracket, m = max(d) - x_lo puts every particle
    below 1 and m = min(d) - x_hi puts every particle above 1, so the root is bracketed for every state.
    Returns (ratios (B, N), m (B,)). The ratios are the mixture of those at the two final bracket ends
    whose mean is exactly 1: for a continuous g the ends coincide to float64 resolution; where the mean
    jumps across the bracket (a step in g, or gaps in Q beyond float64 resolution), the mixture is still
    monotone in Q, above the floor, and averages 1.
    """
    x_lo = _bracket(fn, negative_bound, upward=False)
    x_hi = _bracket(fn, negative_bound, upward=True)
    lo = d.amin(dim=-1) - x_hi  # mean ratio > 1 here
    hi = d.amax(dim=-1) - x_lo  # mean ratio < 1 here

    def ratios(m: Tensor) -> Tensor:
        return torch.clamp(fn(d - m.unsqueeze(-1)), min=negative_bound)

    for _ in range(BISECT_ITERS):
        mid = 0.5 * (lo + hi)
        above = ratios(mid).mean(dim=-1) > 1.0
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
        if torch.equal(lo, hi):
            break
    r_lo, r_hi = ratios(lo), ratios(hi)
    s_lo, s_hi = r_lo.mean(dim=-1), r_hi.mean(dim=-1)
    gap = s_lo - s_hi
    alpha = torch.where(gap > 0, (1.0 - s_hi) / gap.clamp(min=torch.finfo(gap.dtype).tiny), torch.full_like(gap, 0.5))
    alpha = alpha.clamp(0.0, 1.0).unsqueeze(-1)
    return alpha * r_lo + (1.0 - alpha) * r_hi, 0.5 * (lo + hi)


class ParticleWeights(NamedTuple):
    """Result of solve_weights.

    weights: (B, N) normalised weights, sum_i = 1, floored at negative_bound / N.
    nu:      (B,)   the normaliser, in the units of Q.
    """

    weights: Tensor
    nu: Tensor


def solve_weights(
    q: Tensor,
    temperature: float | Tensor,
    weighting: str | Weighting | WeightFn = "exp",
    negative_bound: float = 0.0,
) -> ParticleWeights:
    """Normalised SiMPO particle weights w_i = max(g((Q_i - nu) / lambda), b) / N per state.

    Args:
        q: (B, N) or (N,) critic values of N particles per state. Must be finite.
        temperature: lambda > 0, a float or a tensor broadcastable to (B,). Not differentiated.
        weighting: a name from WEIGHTINGS, a Weighting, or any monotone callable g.
        negative_bound: b <= 0, the floor on N * w_i.
    Returns:
        ParticleWeights(weights (same shape as q, dtype of q), nu (B,) or scalar).
    """
    w = get_weighting(weighting)
    if not math.isfinite(negative_bound) or negative_bound > 0:
        raise ValueError(f"negative_bound must be a finite number <= 0, got {negative_bound}")
    if q.ndim not in (1, 2) or q.shape[-1] < 1:
        raise ValueError(f"q must have shape (B, N) or (N,) with N >= 1, got {tuple(q.shape)}")
    q64 = q.detach().to(torch.float64)
    if not torch.isfinite(q64).all():
        raise ValueError("q contains NaN or inf: the critic diverged or a reward is non-finite")
    squeeze = q64.ndim == 1
    if squeeze:
        q64 = q64.unsqueeze(0)
    lam = torch.as_tensor(temperature, dtype=torch.float64, device=q64.device).detach()
    if not (torch.isfinite(lam).all() and (lam > 0).all()):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    lam = torch.broadcast_to(lam.reshape(-1, 1), (q64.shape[0], 1))  # (B, 1)

    q_max = q64.amax(dim=-1, keepdim=True)
    d = (q64 - q_max) / lam
    if w.solver == "bisect":
        ratios, m = solve_bisect(d, w.fn, negative_bound)
    else:
        if w.solver == "exp":
            m = solve_exp(d)
        elif w.solver == "linear":
            m = solve_linear(d, negative_bound)
        else:
            m = solve_square(d)
        ratios = torch.clamp(w.fn(d - m.unsqueeze(-1)), min=negative_bound)
    weights = ratios / q64.shape[-1]
    nu = q_max.squeeze(-1) + lam.squeeze(-1) * m
    if squeeze:
        weights, nu = weights.squeeze(0), nu.squeeze(0)
    return ParticleWeights(weights.to(q.dtype), nu.to(q.dtype))
