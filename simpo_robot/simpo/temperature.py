"""The learned temperature lambda of SiMPO.

Shape glossary
    B   states
    N   particles per state

lambda is learned so that the normalised particle weights stay a target KL away from uniform:

    loss(lambda) = lambda * (target_kl + H(p) - log N) = lambda * (target_kl - KL(p || uniform))

with p the weights as a distribution. Weights may be negative (signed measure), so p = |w| / sum|w|,
which is the weights themselves when none is negative. When the weights are greedier than the target
(KL > target_kl) the gradient is negative and lambda grows, flattening them; when they are too flat,
lambda shrinks. LearnedTemperature parameterises lambda = lambda_min + exp(theta): positive for any
theta, even after exp(theta) underflows, so no projection step is needed after the optimiser step.
"""

import math

import torch
from torch import Tensor, nn


def weight_entropy(weights: Tensor) -> Tensor:
    """H(p) per state, p = |w| / sum_i |w_i|, with 0 log 0 = 0. weights: (B, N) -> (B,)."""
    mass = weights.abs()
    p = mass / mass.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(mass.dtype).tiny)
    return -torch.where(p > 0, p * torch.log(p.clamp(min=torch.finfo(p.dtype).tiny)), torch.zeros_like(p)).sum(-1)


def weight_kl_from_uniform(weights: Tensor) -> Tensor:
    """KL(p || uniform) = log N - H(p) per state: 0 for uniform weights, log N for one particle."""
    return math.log(weights.shape[-1]) - weight_entropy(weights)


def temperature_loss(temperature: Tensor, weights: Tensor, target_kl: float) -> Tensor:
    """lambda * (target_kl + H(p) - log N), averaged over states; only `temperature` gets gradients.

    temperature: scalar tensor lambda > 0 (differentiable); weights: (B, N) normalised particle weights.
    """
    kl = weight_kl_from_uniform(weights.detach())
    return (temperature * (target_kl - kl)).mean()


class LearnedTemperature(nn.Module):
    """lambda = min_temperature + exp(theta), theta a parameter (the trainer gives it its own optimiser)."""

    def __init__(self, init: float = 1.0, target_kl: float = 1.0, min_temperature: float = 1e-4):
        super().__init__()
        if not (0 <= min_temperature < init and math.isfinite(init)):
            raise ValueError(f"initial temperature must be finite and > min_temperature={min_temperature}, got {init}")
        if not target_kl >= 0:
            raise ValueError(f"target_kl must be >= 0, got {target_kl}")
        self.target_kl = target_kl
        self.min_temperature = min_temperature
        self.theta = nn.Parameter(torch.tensor(math.log(init - min_temperature)))

    def forward(self) -> Tensor:
        """lambda as a differentiable scalar tensor."""
        return self.min_temperature + torch.exp(self.theta)

    @property
    def value(self) -> float:
        """Current lambda, as a plain float (to pass to solve_weights)."""
        return float(self().detach())

    def loss(self, weights: Tensor) -> Tensor:
        return temperature_loss(self(), weights, self.target_kl)
