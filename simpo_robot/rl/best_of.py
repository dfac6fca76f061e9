"""Acting by the critic: sample N chunks per decision from the policy and execute the one the critic rates best.

The reference SiMPO recipe evaluates its agents this way (best of 10 actions by Q, see SIMPO.md). Here the agent
is a fine-tuned policy plus the twin critic `finetune` saves beside it (`final/critic.safetensors`); Q is the
min of the twins on (observation history, executed part of the chunk), as in training. It costs N times the
policy's sampling per decision (one batched call).

Shape glossary
    B   environments (batch)
    N   chunks sampled per decision
    O   n_obs_steps; Ds, De state / environment-state dims
    H   horizon; S n_action_steps; Da action dim
"""

from collections import deque

import torch
from torch import Tensor

from simpo_robot.errors import SimpoRobotError
from simpo_robot.rl.actor import make_actor
from simpo_robot.rl.critic import TwinCritic
from simpo_robot.rl.simpo import critic_obs
from simpo_robot.tasks import OBS_ENV_STATE, OBS_STATE


def chunk_q(critic: TwinCritic, state: Tensor, env_state: Tensor, executed: Tensor) -> Tensor:
    """Observation histories (B, O, Ds), (B, O, De) and the executed parts of N chunks per row (B*N, S, Da), N
    consecutive rows each -> Q (B, N): the min of the twins, as the critic was trained to judge them."""
    b = state.shape[0]
    obs = critic_obs(state, env_state).repeat_interleave(executed.shape[0] // b, 0)
    return torch.minimum(*critic(obs, executed.flatten(1))).reshape(b, -1)


def pick_best(q: Tensor, chunks: Tensor) -> Tensor:
    """q (B, N), chunks (B, N, H, Da) -> (B, H, Da): each row's chunk with the highest q (the first on ties)."""
    return chunks[torch.arange(chunks.shape[0], device=chunks.device), q.argmax(dim=1)]


class BestOfN:
    """A policy that plays the best of `n` chunks by `critic`, with LeRobot's `select_action` / `reset` interface.

    Takes normalised observation batches (the policy's preprocessor output) and returns one normalised action
    (B, Da) per call, like the policy it wraps: it keeps the last O observations (the first one repeated after a
    reset, as LeRobot does) and the queue of the chosen chunk's executed actions.
    """

    def __init__(self, policy, critic: TwinCritic, n: int, generator: torch.Generator | None = None):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.policy, self.config, self.n, self.generator = policy, policy.config, n, generator
        self.actor = make_actor(policy)
        device = next(policy.parameters()).device
        self.critic = critic.to(device).eval()
        obs_dim = self.actor.n_obs_steps * (self.config.robot_state_feature.shape[0]
                                            + (self.config.env_state_feature.shape[0] if self.actor.has_env_state else 0))
        chunk_dim = self.actor.n_action_steps * self.actor.action_dim
        if (obs_dim, chunk_dim) != (critic.obs_dim, critic.chunk_dim):
            raise SimpoRobotError(
                f"the critic takes an observation history of {critic.obs_dim} and an executed chunk of {critic.chunk_dim} "
                f"numbers, but this policy gives {obs_dim} and {chunk_dim} (n_action_steps {self.actor.n_action_steps} "
                f"x {self.actor.action_dim} actions); evaluate with the n_action_steps the policy was fine-tuned with.")
        self.reset()

    def eval(self) -> "BestOfN":
        self.policy.eval()
        return self

    def reset(self) -> None:
        self._history: deque[tuple[Tensor, Tensor]] = deque(maxlen=self.actor.n_obs_steps)
        self._actions: deque[Tensor] = deque()

    @torch.no_grad()
    def choose(self, state: Tensor, env_state: Tensor) -> Tensor:
        """Observation histories (B, O, Ds), (B, O, De) -> the chosen chunks (B, H, Da), model space."""
        cond = self.actor.global_cond(state, env_state).repeat_interleave(self.n, 0)  # (B*N, C)
        chunks = self.actor.sample(self.actor.unet, cond, generator=self.generator)  # the policy's own sampler
        q = chunk_q(self.critic, state, env_state, self.actor.executed(chunks))
        return pick_best(q, chunks.reshape(*q.shape, *chunks.shape[1:]))

    @torch.no_grad()
    def select_action(self, batch: dict[str, Tensor], noise: Tensor | None = None) -> Tensor:
        """Normalised observation batch (B, Ds) [+ (B, De)] -> normalised action (B, Da)."""
        if noise is not None:
            raise ValueError("best-of-N acting samples its own noise; a fixed x_T would give N equal chunks")
        state = batch[OBS_STATE]
        env_state = batch[OBS_ENV_STATE] if self.actor.has_env_state else state[:, :0]
        if not self._history:
            self._history.extend([(state, env_state)] * self.actor.n_obs_steps)
        else:
            self._history.append((state, env_state))
        if not self._actions:
            states, env_states = (torch.stack(x, dim=1) for x in zip(*self._history, strict=True))
            executed = self.actor.executed(self.choose(states, env_states))  # (B, S, Da)
            self._actions.extend(executed.unbind(dim=1))
        return self._actions.popleft()
