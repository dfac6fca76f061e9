"""Action chunks as MDP steps: the return of one executed chunk and its discount.

Shape glossary
    E   parallel environments
    S   env steps executed in one chunk (n_action_steps)

One MDP step = one executed chunk. Its reward is the discounted sum of the env rewards it collected,
and the next state's value is discounted by gamma^(steps actually taken), zero after a true
termination (a time-limit truncation still bootstraps: the state was not terminal).
"""

from typing import NamedTuple

import torch
from torch import Tensor


class ChunkReturn(NamedTuple):
    reward: Tensor
    """(E,) sum_k gamma^k r_k over the steps the env was alive for."""
    discount: Tensor
    """(E,) gamma^steps, or 0 where the episode terminated inside the chunk."""
    steps: Tensor
    """(E,) env steps executed (alive) in the chunk."""


def chunk_return(rewards: Tensor, alive: Tensor, terminated: Tensor, gamma: float) -> ChunkReturn:
    """Discounted chunk reward and bootstrap discount.

    rewards: (E, S) env rewards per step (values at dead steps are ignored);
    alive: (E, S) bool, True where the env executed that step (before its episode ended);
    terminated: (E,) bool, True where the episode truly terminated (not truncated) inside the chunk.
    """
    if rewards.shape != alive.shape or rewards.ndim != 2:
        raise ValueError(f"rewards {tuple(rewards.shape)} and alive {tuple(alive.shape)} must both be (E, S)")
    powers = gamma ** torch.arange(rewards.shape[1], dtype=rewards.dtype, device=rewards.device)
    mask = alive.to(rewards.dtype)
    reward = (rewards * mask * powers).sum(dim=1)
    steps = alive.sum(dim=1)
    discount = torch.where(terminated, torch.zeros_like(reward), gamma ** steps.to(rewards.dtype))
    return ChunkReturn(reward, discount, steps)
