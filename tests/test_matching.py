"""Reweighted matching losses against hand-computed values on tiny fixed tensors."""

import math

import pytest
import torch
from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
from lerobot.policies.diffusion.modeling_diffusion import _make_noise_scheduler

from simpo_robot.simpo import (
    diffuse,
    flow_interpolate,
    make_noise_scheduler,
    weighted_denoising_loss,
    weighted_flow_loss,
)


def hand_cosine_alphas_cumprod(T: int) -> torch.Tensor:
    """squaredcos_cap_v2 (Nichol & Dhariwal): beta_i = min(1 - abar((i+1)/T) / abar(i/T), 0.999)."""

    def abar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)]
    out, prod = [], 1.0
    for beta in betas:
        prod *= 1 - beta
        out.append(prod)
    return torch.tensor(out, dtype=torch.float64)


def test_scheduler_is_the_one_lerobot_diffusion_policy_builds():
    cfg = DiffusionConfig()
    theirs = _make_noise_scheduler(
        cfg.noise_scheduler_type,
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule,
        clip_sample=cfg.clip_sample,
        clip_sample_range=cfg.clip_sample_range,
        prediction_type=cfg.prediction_type,
    )
    ours = make_noise_scheduler()
    assert dict(ours.config) == dict(theirs.config)
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
    torch.testing.assert_close(ours.alphas_cumprod.double(), hand_cosine_alphas_cumprod(100), atol=1e-6, rtol=0)


def test_diffuse_hand_computed_and_equal_to_diffusers_add_noise():
    scheduler = make_noise_scheduler()
    actions = torch.tensor([[1.0, -1.0], [0.5, 0.0]])
    noise = torch.tensor([[0.0, 2.0], [-1.0, 1.0]])
    t = torch.tensor([0, 99])
    abar = hand_cosine_alphas_cumprod(100)
    expected = torch.stack([
        math.sqrt(abar[0]) * actions[0] + math.sqrt(1 - abar[0]) * noise[0],
        math.sqrt(abar[99]) * actions[1] + math.sqrt(1 - abar[99]) * noise[1],
    ]).float()
    out = diffuse(scheduler.alphas_cumprod, actions, noise, t)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(out, scheduler.add_noise(actions, noise, t), atol=1e-6, rtol=0)


def test_weighted_denoising_loss_hand_computed():
    eps_pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    eps = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    weights = torch.tensor([2.0, -1.0], requires_grad=True)
    # squared errors [[1, 4], [9 -> clipped to 5, 0]]; per-sample means [2.5, 2.5];
    # weighted [5, -2.5]; mean 1.25.
    loss = weighted_denoising_loss(eps_pred, eps, weights, clip=5.0)
    assert loss.item() == pytest.approx(1.25)
    loss.backward()
    assert weights.grad is None  # weights define the target; they never receive gradients
    # d/d eps_pred = w * 2 (pred - eps) / (numel per sample * M), zero where the clip is active.
    expected = torch.tensor([[2 * 2 * 1.0 / 4, 2 * 2 * 2.0 / 4], [0.0, 0.0]])
    torch.testing.assert_close(eps_pred.grad, expected)


def test_negative_weights_are_bounded_below_by_the_clip():
    pred = torch.full((3, 4, 2), 100.0)
    loss = weighted_denoising_loss(pred, torch.zeros_like(pred), torch.full((3,), -1.0), clip=5.0)
    assert loss.item() == pytest.approx(-5.0)


def test_flow_interpolation_and_loss_hand_computed():
    actions = torch.tensor([[1.0, 2.0], [0.0, -2.0]])
    noise = torch.tensor([[-1.0, 0.0], [2.0, 2.0]])
    t = torch.tensor([0.25, 1.0])
    sample = flow_interpolate(actions, noise, t)
    torch.testing.assert_close(sample.x_t, torch.tensor([[-0.5, 0.5], [0.0, -2.0]]))
    torch.testing.assert_close(sample.target, torch.tensor([[2.0, 2.0], [-2.0, -4.0]]))
    v_pred = torch.tensor([[2.0, 0.0], [0.0, -4.0]])
    # errors^2 [[0, 4], [4, 0]] -> means [2, 2]; weights [0.5, 1.5] -> [1, 3]; mean 2.
    assert weighted_flow_loss(v_pred, sample.target, torch.tensor([0.5, 1.5])).item() == pytest.approx(2.0)
    # the clip applies per element: with clip 1, errors^2 -> [[0, 1], [1, 0]] -> [0.25, 0.75] -> 0.5
    assert weighted_flow_loss(v_pred, sample.target, torch.tensor([0.5, 1.5]), clip=1.0).item() == pytest.approx(0.5)


@pytest.mark.parametrize("loss_fn", [weighted_denoising_loss, weighted_flow_loss])
def test_shape_errors_are_clear(loss_fn):
    with pytest.raises(ValueError, match="shape"):
        loss_fn(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2))
    with pytest.raises(ValueError, match="weights"):
        loss_fn(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="clip"):
        loss_fn(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2), clip=0.0)
