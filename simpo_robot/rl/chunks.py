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


class NStep(NamedTuple):
    reward: Tensor
    """(K,) sum_{j<m} (d_t ... d_{t+j-1}) r_{t+j}: the discounted reward of the next m chunks."""
    discount: Tensor
    """(K,) d_t ... d_{t+m-1}: the bootstrap discount after them (0 once the episode terminated)."""
    last: Tensor
    """(K,) t + m - 1: the row whose next state (and next chunk) the target bootstraps from."""


def n_step_return(reward: Tensor, discount: Tensor, n: int) -> NStep:
    """n-chunk returns along one episode's chunk transitions t = 0..K-1, where m = min(n, K - t) (an episode's
    last chunks look as far as it goes).

    reward, discount: (K,) each chunk's `ChunkReturn` reward and discount, in time order.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if reward.shape != discount.shape or reward.ndim != 1:
        raise ValueError(f"reward {tuple(reward.shape)} and discount {tuple(discount.shape)} must both be (K,)")
    k = reward.shape[0]
    out_reward, out_discount = reward.clone(), discount.clone()
    for j in range(1, min(n, k)):  # add chunk t + j where it exists
        out_reward[: k - j] += out_discount[: k - j] * reward[j:]
        out_discount[: k - j] *= discount[j:]
    last = torch.clamp(torch.arange(k) + n - 1, max=k - 1)
    return NStep(out_reward, out_discount, last)
