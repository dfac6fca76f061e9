"""Twin Q critics on (observation, executed action chunk), their TD target and the EMA target update.

Shape glossary
    B   batch of transitions
    Do  flattened observation (n_obs_steps x (state + environment state) dims, normalised)
    Dc  flattened executed chunk (n_action_steps x action dims, normalised)
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from simpo_robot.errors import SimpoRobotError

CRITIC_WEIGHTS = "critic.safetensors"
CRITIC_CONFIG = "critic.json"


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
        self.obs_dim, self.chunk_dim, self.hidden, self.layer_norm = obs_dim, chunk_dim, tuple(hidden), layer_norm
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


@dataclass(frozen=True)
class CriticCard:
    """What `critic.json` records beside a fine-tuned policy: the twin critic's shape and what it was trained on."""

    obs_dim: int
    chunk_dim: int
    hidden: tuple[int, ...]
    layer_norm: bool
    trained_on: dict[str, Any]
    """task, training reward (env kwargs), gamma and env steps of the run whose last phase fitted it."""


def save_critic(folder: str | Path, critic: TwinCritic, trained_on: dict[str, Any]) -> None:
    """Write `critic.safetensors` and `critic.json` into `folder` (a fine-tuned policy's LeRobot folder; stock
    LeRobot ignores both files)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    card = CriticCard(critic.obs_dim, critic.chunk_dim, critic.hidden, critic.layer_norm, trained_on)
    save_file({k: v.detach().cpu().contiguous() for k, v in critic.state_dict().items()}, folder / CRITIC_WEIGHTS)
    (folder / CRITIC_CONFIG).write_text(json.dumps(asdict(card), indent=2))


def load_critic(folder: str | Path) -> tuple[TwinCritic, CriticCard]:
    """The twin critic saved beside a policy by `save_critic` (strict load), in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    config, weights = folder / CRITIC_CONFIG, folder / CRITIC_WEIGHTS
    if not config.is_file() or not weights.is_file():
        raise SimpoRobotError(
            f"{folder} has no critic ({CRITIC_CONFIG} and {CRITIC_WEIGHTS}); acting by the critic needs the final/ "
            "folder of a `simpo-robot finetune --algo simpo` run (DPPO and pretrained policies have none).")
    try:
        raw = json.loads(config.read_text())
        card = CriticCard(**{**raw, "hidden": tuple(raw["hidden"])})
    except (json.JSONDecodeError, TypeError, KeyError) as exc:
        raise SimpoRobotError(f"{config} is not a critic card written by simpo-robot (corrupt?): {exc}") from exc
    critic = TwinCritic(card.obs_dim, card.chunk_dim, card.hidden, card.layer_norm)
    try:
        critic.load_state_dict(load_file(weights), strict=True)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise SimpoRobotError(f"{weights} does not load into the critic {config} describes (corrupt or "
                              f"mismatched checkpoint?): {exc}") from exc
    return critic.eval(), card
