"""What the trainer needs from an algorithm, and what it gives one.

The trainer owns Accelerate, the envs, evaluation, logging and checkpoints. An agent owns its networks,
optimisers and data (replay buffer or on-policy storage). Per collected chunk the trainer calls
`act` (inside the rollout), `observe`, and `update` when `ready` (in a second thread, during the next
chunk's collection, when `can_overlap`); updates take their optimiser steps
through the trainer's `Stepper`, so gradient all-reduce, clipping and NaN skipping live in one place.
"""

from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from simpo_robot.rl.replay import Transition


class ChunkBatch(NamedTuple):
    """One collected chunk in every env of a process (E rows; rows of envs already done are masked)."""

    transition: Transition
    """(E, ...) fields; meaningful where `live`."""
    live: Tensor
    """(E,) bool: the env was inside an episode when the chunk started."""
    ended: Tensor
    """(E,) bool: the episode ended (terminated or truncated) inside this chunk."""
    gamma_steps: Tensor
    """(E,) gamma^(env steps executed in the chunk), whether or not it terminated."""
    extras: dict[str, Tensor]
    """Whatever `act` returned besides the chunk (e.g. DPPO's denoising chain and log-probs), (E, ...)."""


class Stepper(Protocol):
    def __call__(self, loss: Tensor, optimizer: torch.optim.Optimizer, module: nn.Module) -> bool:
        """Backward, clip, step; skips (and counts) the update when the loss or the gradient is not finite."""
        ...


class Agent(Protocol):
    name: str

    def modules_to_prepare(self) -> dict[str, Any]:
        """Modules and optimisers for accelerator.prepare (DDP-synced), by name."""
        ...

    def set_prepared(self, prepared: dict[str, Any], unwrap) -> None:
        """Take the prepared objects back; `unwrap` gives the bare module of a prepared one."""
        ...

    def shared_state(self) -> list[Any]:
        """Objects with state_dict/load_state_dict, identical on every rank (checkpointed once)."""
        ...

    def rank_state(self) -> dict[str, Any]: ...

    def load_rank_state(self, state: dict[str, Any]) -> None: ...

    def act(self, cond: Tensor, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        """global_cond (E, C) -> chunk (E, H, Da) in model space, and extras to store with it."""
        ...

    def observe(self, batch: ChunkBatch, generator: torch.Generator) -> None:
        """Take in one collected chunk (`generator`: the rank's sampling stream, for any sampling)."""
        ...

    def ready(self, env_steps: int) -> bool: ...

    def can_overlap(self, env_steps: int) -> bool:
        """Whether the next `update` may run while the next chunk is collected: it changes nothing that `act`
        reads and draws nothing from the rank's sampling stream (`generator`), so the run is the same either way
        (up to float rounding when the sequential update would use more CPU threads)."""
        ...

    def synced_modules(self) -> list[nn.Module]:
        """Every module that must stay identical across processes (checked at the end of a run)."""
        ...

    def update(self, step: Stepper, gather, generator: torch.Generator, cpu_generator: torch.Generator,
               unwrap, env_steps: int) -> dict[str, float]:
        """One round of updates; `gather` concatenates a tensor over processes."""
        ...

    def finish(self, step: Stepper, gather, generator: torch.Generator, cpu_generator: torch.Generator,
               unwrap, env_steps: int) -> dict[str, float]:
        """Updates due once the run's env steps are spent (on every process), before the final evaluation."""
        ...

    def acting_critic(self, unwrap) -> nn.Module | None:
        """The Q critic to ship beside the fine-tuned policy for acting by it (`simpo_robot.rl.best_of`), or None."""
        ...

    def summary(self) -> dict[str, Any]: ...
