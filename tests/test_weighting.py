"""SiMPO particle weights: hand-computed answers, solver agreement, invariances and degenerate inputs."""

import math

import pytest
import torch

from simpo_robot.simpo import WEIGHTINGS, get_weighting, solve_weights
from simpo_robot.simpo.weighting import Weighting

Q4 = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
SQRT7 = math.sqrt(7.0)


@pytest.mark.parametrize(
    "name, bound, expected",
    [
        # linear, b = 0: top three particles active, m = -4/3 in x-space, g = [0, 1/3, 4/3, 7/3].
        ("linear", 0.0, [0.0, 1 / 12, 1 / 3, 7 / 12]),
        # linear, b = -0.5: the worst particle sits on the floor, g = [-0.5, 0.5, 1.5, 2.5].
        ("linear", -0.5, [-0.125, 0.125, 0.375, 0.625]),
        # square: top two active, m = -(1 + sqrt 7) / 2, g = [0, 0, 2 - sqrt7/2, 2 + sqrt7/2].
        ("square", 0.0, [0.0, 0.0, (2 - SQRT7 / 2) / 4, (2 + SQRT7 / 2) / 4]),
        # exp: the softmax.
        ("exp", 0.0, torch.softmax(Q4, 0).tolist()),
    ],
)
def test_hand_computed_weights(name, bound, expected):
    result = solve_weights(Q4, 1.0, name, bound)
    torch.testing.assert_close(result.weights, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0)


def test_hand_computed_nu():
    # nu = max(Q) + lambda * m: linear b=0 -> 3 - 4/3; exp -> logsumexp(Q) - log 4.
    assert solve_weights(Q4, 1.0, "linear").nu.item() == pytest.approx(3 - 4 / 3, abs=1e-12)
    assert solve_weights(Q4, 1.0, "exp").nu.item() == pytest.approx(
        torch.logsumexp(Q4, 0).item() - math.log(4), abs=1e-12
    )
    # Temperature scales the x-space solution: lambda = 2 on 2*Q gives the same weights.
    torch.testing.assert_close(
        solve_weights(2 * Q4, 2.0, "square").weights, solve_weights(Q4, 1.0, "square").weights, atol=1e-12, rtol=0
    )


def random_q(batch=16, n=64, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(batch, n, generator=gen, dtype=torch.float64)


CLOSED_FORMS = [
    ("exp", torch.exp, 0.0),
    ("linear", lambda x: 1 + x, 0.0),
    ("linear", lambda x: 1 + x, -0.3),
    ("linear", lambda x: 1 + x, -2.0),
    ("square", lambda x: torch.clamp(x, min=0) ** 2, 0.0),
    ("square", lambda x: torch.clamp(x, min=0) ** 2, -0.5),
]


@pytest.mark.parametrize("name, fn, bound", CLOSED_FORMS)
@pytest.mark.parametrize("temperature", [0.1, 1.0, 7.5])
def test_closed_form_matches_bisection(name, fn, bound, temperature):
    q = random_q()
    closed = solve_weights(q, temperature, name, bound)
    bisected = solve_weights(q, temperature, Weighting("bisect-" + name, fn, "bisect"), bound)
    torch.testing.assert_close(closed.weights, bisected.weights, atol=1e-6, rtol=0)
    # nu is only pinned down where the weights are not flat in it; compare it via the weights instead,
    # and directly where every particle is active (exp).
    if name == "exp":
        torch.testing.assert_close(closed.nu, bisected.nu, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
@pytest.mark.parametrize("bound", [0.0, -0.5])
def test_weights_sum_to_one_and_respect_floor(name, bound):
    q = random_q()
    w = solve_weights(q, 0.5, name, bound).weights
    n = q.shape[-1]
    torch.testing.assert_close(w.sum(-1), torch.ones(q.shape[0], dtype=q.dtype), atol=1e-9, rtol=0)
    assert (w >= bound / n - 1e-12).all()
    if bound == 0.0:
        assert (w >= 0).all()


def test_negative_bound_allows_negative_weights_and_zero_bound_gives_exact_zeros():
    q = random_q()
    assert (solve_weights(q, 0.5, "linear", -0.5).weights < 0).any()
    w0 = solve_weights(q, 0.5, "linear", 0.0).weights
    assert (w0 == 0).any() and (w0 >= 0).all()


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
@pytest.mark.parametrize("bound", [0.0, -0.5])
def test_invariant_to_adding_a_constant_to_q(name, bound):
    q = random_q(seed=1)
    base = solve_weights(q, 0.8, name, bound).weights
    for shift in (-1e3, 17.25, 1e4):
        torch.testing.assert_close(solve_weights(q + shift, 0.8, name, bound).weights, base, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
@pytest.mark.parametrize("bound", [0.0, -0.5])
def test_weights_are_monotone_in_q(name, bound):
    q = random_q(seed=2)
    w = solve_weights(q, 0.7, name, bound).weights
    order = q.argsort(dim=-1)
    w_sorted = w.gather(-1, order)
    assert (torch.diff(w_sorted, dim=-1) >= -1e-12).all()


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
@pytest.mark.parametrize("bound", [0.0, -0.5])
def test_degenerate_inputs_give_finite_weights(name, bound):
    # All-equal Q: uniform weights.
    equal = torch.full((3, 8), 4.2, dtype=torch.float64)
    torch.testing.assert_close(solve_weights(equal, 1.0, name, bound).weights, torch.full_like(equal, 1 / 8))
    # N = 1: the single particle has weight 1.
    single = torch.tensor([[3.0], [-1e6]], dtype=torch.float64)
    torch.testing.assert_close(solve_weights(single, 1.0, name, bound).weights, torch.ones_like(single))
    # Huge Q values and huge gaps: finite weights that still sum to 1.
    huge = torch.tensor([[1e12, -1e12, 0.0, 5e11], [1e30, 1e30, -1e30, 0.0]], dtype=torch.float64)
    w = solve_weights(huge, 1e-3, name, bound).weights
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(2, dtype=torch.float64), atol=1e-9, rtol=0)
    # Ties: tied particles get equal weights.
    ties = torch.tensor([[1.0, 2.0, 2.0, 0.5, 2.0]], dtype=torch.float64)
    wt = solve_weights(ties, 0.3, name, bound).weights[0]
    assert wt[1] == wt[2] == wt[4]


def test_float32_input_keeps_dtype_and_vector_input_keeps_shape():
    q = torch.tensor([0.0, 1.0, 2.0, 3.0])
    result = solve_weights(q, 1.0, "linear", -0.5)
    assert result.weights.dtype == torch.float32 and result.weights.shape == (4,) and result.nu.shape == ()


def test_per_state_temperature_equals_separate_solves():
    q = random_q(batch=3)
    temps = torch.tensor([0.2, 1.0, 5.0], dtype=torch.float64)
    together = solve_weights(q, temps, "linear", -0.5).weights
    for i in range(3):
        torch.testing.assert_close(together[i], solve_weights(q[i], temps[i].item(), "linear", -0.5).weights)


def test_user_callable_weighting():
    def cubic(x):
        return torch.clamp(1 + x, min=0) ** 3

    w = solve_weights(random_q(), 1.0, cubic, 0.0).weights
    torch.testing.assert_close(w.sum(-1), torch.ones(16, dtype=torch.float64), atol=1e-9, rtol=0)
    assert get_weighting(cubic).solver == "bisect"


def test_user_callable_that_is_not_monotone_is_rejected():
    with pytest.raises(ValueError, match="monotonically"):
        solve_weights(random_q(), 1.0, lambda x: 1 + torch.sin(x), 0.0)


def test_weighting_whose_range_misses_one_is_rejected():
    with pytest.raises(ValueError, match="never goes above 1"):
        solve_weights(random_q(), 1.0, torch.tanh, 0.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(q=torch.tensor([0.0, float("nan")])), "NaN or inf"),
        (dict(q=torch.tensor([0.0, float("inf")])), "NaN or inf"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(negative_bound=0.5), "negative_bound"),
        (dict(weighting="softmaxx"), "unknown weighting"),
        (dict(q=torch.zeros(2, 3, 4)), "shape"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, match):
    args = dict(q=torch.tensor([0.0, 1.0]), temperature=1.0, weighting="linear", negative_bound=0.0) | kwargs
    with pytest.raises(ValueError, match=match):
        solve_weights(**args)
