"""A fixed-capacity replay buffer of chunk transitions, stored as tensors (checkpointable).

Shape glossary
    C   capacity
    B   sampled batch
    O   n_obs_steps; Ds, De state / environment-state dims (normalised)
    H   horizon of the sampled chunk; Da action dim (normalised, model space)
"""

from typing import NamedTuple

import torch
from torch import Tensor


class Transition(NamedTuple):
    """One MDP step (a batch of them): every field has a leading batch dimension."""

    state: Tensor
    """(B, O, Ds) observation.state history."""
    env_state: Tensor
    """(B, O, De) observation.environment_state history (De may be 0)."""
    chunk: Tensor
    """(B, H, Da) the whole sampled chunk (the executed part is chunk[:, O-1 : O-1+n_action_steps])."""
    reward: Tensor
    """(B,) discounted chunk reward."""
    discount: Tensor
    """(B,) gamma^steps, 0 after termination."""
    next_state: Tensor
    """(B, O, Ds)"""
    next_env_state: Tensor
    """(B, O, De)"""


class ReplayBuffer:
    """Ring buffer of a NamedTuple of tensors (`Transition`, or an agent's extension of it);
    `state_dict`/`load_state_dict` make it part of the resumable training state."""

    def __init__(self, capacity: int, example: NamedTuple):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.kind = type(example)
        self.storage = self.kind(*(torch.zeros((capacity, *x.shape[1:]), dtype=x.dtype) for x in example))
        self.size = 0
        self.cursor = 0

    def __len__(self) -> int:
        return self.size

    def add(self, batch: NamedTuple) -> None:
        n = batch.reward.shape[0]
        idx = (self.cursor + torch.arange(n)) % self.capacity
        for store, value in zip(self.storage, batch, strict=True):
            store[idx] = value.detach().to(store.device, store.dtype)
        self.cursor = (self.cursor + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator) -> NamedTuple:
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        idx = torch.randint(0, self.size, (batch_size,), generator=generator)
        return self.kind(*(store[idx] for store in self.storage))

    def state_dict(self) -> dict:
        return {"storage": self.storage._asdict(), "size": self.size, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.storage = self.kind(**state["storage"])
        self.size, self.cursor = int(state["size"]), int(state["cursor"])
