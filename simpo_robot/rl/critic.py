"""Twin Q critics on (observation, executed action chunk), their TD target and the EMA target update.

Shape glossary
    B   batch of transitions
    Do  flattened observation (n_obs_steps x (state + environment state) dims, normalised)
    Dc  flattened executed chunk (n_action_steps x action dims, normalised)
"""

from typing import NamedTuple

import torch
from torch import Tensor, nn


class TwinQ(NamedTuple):
    q1: Tensor
    """(B,)"""
    q2: Tensor
    """(B,)"""


def mlp(inp: int, hidden: tuple[int, ...], out: int, layer_norm: bool = False) -> nn.Sequential:
    """Linear -> [LayerNorm ->] Mish per hidden width, then a linear head."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(inp, width), *([nn.LayerNorm(width)] if layer_norm else []), nn.Mish()]
        inp = width
    layers.append(nn.Linear(inp, out))
    return nn.Sequential(*layers)


class TwinCritic(nn.Module):
    """Two independent MLPs Q_j(o, c) (the reference recipe's 256x256), optionally with LayerNorm after each
    hidden linear layer (as in RLPD's critics)."""

    def __init__(self, obs_dim: int, chunk_dim: int, hidden: tuple[int, ...] = (256, 256), layer_norm: bool = False):
        super().__init__()
        self.q1 = mlp(obs_dim + chunk_dim, hidden, 1, layer_norm)
        self.q2 = mlp(obs_dim + chunk_dim, hidden, 1, layer_norm)

    def forward(self, obs: Tensor, chunk: Tensor) -> TwinQ:
        """obs: (B, Do), chunk: (B, Dc) -> TwinQ of (B,) each."""
        x = torch.cat([obs, chunk], dim=-1)
        return TwinQ(self.q1(x).squeeze(-1), self.q2(x).squeeze(-1))


def td_target(reward: Tensor, discount: Tensor, next_q: TwinQ) -> Tensor:
    """y = r + discount * min(Q1', Q2') (clipped double Q). All (B,); discount is 0 after termination."""
    return reward + discount * torch.minimum(next_q.q1, next_q.q2)


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """target <- (1 - tau) * target + tau * source, parameter by parameter."""
    for t, s in zip(target.parameters(), source.parameters(), strict=True):
        t.lerp_(s, tau)
