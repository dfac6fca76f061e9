"""Reweighted matching: fit the diffusion or flow model to the virtual target pi*.

Shape glossary
    M   samples (states x particles, flattened: M = B * N)
    H   action horizon (chunk length); the toy uses H = 1
    Da  action dimension

Diffusion (epsilon prediction, the DDPM forward process of LeRobot's DiffusionPolicy):
    x_t = sqrt(abar_t) a + sqrt(1 - abar_t) eps
    loss = mean_m  w_m * mean_{h,d} min((eps_theta(x_t, t, s) - eps)^2, clip)

Flow matching (rectified flow, t in [0, 1], t = 1 is the data):
    x_t = t a + (1 - t) eps,   target v = a - eps
    loss = mean_m  w_m * mean_{h,d} min((v_theta(x_t, t, s) - v)^2, clip)

w are SiMPO's particle weights scaled to mean 1 (N * normalised weights). They are detached: the
weights define the target measure, they are not optimised. The per-element clip bounds the squared
error, so a negative weight cannot drive the loss to minus infinity by pushing the error up forever.
"""

from typing import NamedTuple

import torch
from diffusers import DDPMScheduler
from torch import Tensor

DEFAULT_CLIP = 5.0  # the reference recipe's per-element bound on the squared error


def make_noise_scheduler(
    num_train_timesteps: int = 100,
    beta_schedule: str = "squaredcos_cap_v2",
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    clip_sample: bool = True,
    clip_sample_range: float = 1.0,
    prediction_type: str = "epsilon",
) -> DDPMScheduler:
    """The DDPM scheduler LeRobot's DiffusionPolicy builds (its defaults), used for its noise tables."""
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        beta_start=beta_start,
        beta_end=beta_end,
        clip_sample=clip_sample,
        clip_sample_range=clip_sample_range,
        prediction_type=prediction_type,
    )


def diffuse(alphas_cumprod: Tensor, actions: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """Forward process x_t = sqrt(abar_t) a + sqrt(1 - abar_t) eps.

    alphas_cumprod: (T,) the scheduler's table; actions, noise: (M, ...); timesteps: (M,) long.
    """
    abar = alphas_cumprod.to(device=actions.device, dtype=actions.dtype)[timesteps]
    abar = abar.reshape(-1, *([1] * (actions.ndim - 1)))
    return abar.sqrt() * actions + (1.0 - abar).sqrt() * noise


def _weighted_clipped_mse(pred: Tensor, target: Tensor, weights: Tensor, clip: float) -> Tensor:
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if weights.shape != pred.shape[:1]:
        raise ValueError(f"weights must have shape ({pred.shape[0]},), got {tuple(weights.shape)}")
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    per_sample = torch.clamp((pred - target) ** 2, max=clip).flatten(1).mean(dim=1)
    return (weights.detach().to(per_sample.dtype) * per_sample).mean()


def weighted_denoising_loss(eps_pred: Tensor, eps: Tensor, weights: Tensor, clip: float = DEFAULT_CLIP) -> Tensor:
    """mean_m w_m * mean(min((eps_pred - eps)^2, clip)). eps_pred, eps: (M, ...); weights: (M,)."""
    return _weighted_clipped_mse(eps_pred, eps, weights, clip)


class FlowSample(NamedTuple):
    """x_t: the point on the straight path at time t; target: the velocity a - eps."""

    x_t: Tensor
    target: Tensor


def flow_interpolate(actions: Tensor, noise: Tensor, t: Tensor) -> FlowSample:
    """x_t = t a + (1 - t) eps and v = a - eps. actions, noise: (M, ...); t: (M,) in [0, 1]."""
    tt = t.to(actions.dtype).reshape(-1, *([1] * (actions.ndim - 1)))
    return FlowSample(tt * actions + (1.0 - tt) * noise, actions - noise)


def weighted_flow_loss(v_pred: Tensor, target: Tensor, weights: Tensor, clip: float = DEFAULT_CLIP) -> Tensor:
    """mean_m w_m * mean(min((v_pred - (a - eps))^2, clip)). v_pred, target: (M, ...); weights: (M,)."""
    return _weighted_clipped_mse(v_pred, target, weights, clip)
