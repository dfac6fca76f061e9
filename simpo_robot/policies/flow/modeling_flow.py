"""`FlowPolicy`: a rectified-flow (flow-matching) policy over action chunks, in LeRobot's policy shape.

Shape glossary
    B   batch;  O  n_obs_steps;  Ds, De  state / environment-state dims
    H   horizon (actions the model generates);  Da  action dim;  C  global conditioning dim (O * (Ds + De))
    K   Euler steps

Convention (the same as `simpo_robot.simpo.matching.flow_interpolate`, which the loss uses):

    x_t = t a + (1 - t) eps,   t in [0, 1],  t = 0 is noise, t = 1 is the action chunk
    v_theta(x_t, t, s) is trained toward the constant velocity a - eps:  loss = mean (v_theta - (a - eps))^2
    sampling (Euler, K steps):  x_0 = eps,  x_{k+1} = x_k + (1/K) v_theta(x_k, k/K, s),  a = x_K
                                (then clipped to [-clip_sample_range, clip_sample_range] when clip_sample)

The velocity network is LeRobot's `DiffusionConditionalUnet1d`; its sinusoidal time embedding gets
t * config.timestep_scale. That scaling happens in `FlowModel.velocity` and nowhere else: call `velocity`,
not `unet`, unless you scale t yourself.

Interface for fine-tuning (`policy.flow` is a `FlowModel`, like `policy.diffusion` in LeRobot):

    policy.flow.unet                                  the velocity network: unet(x (B,H,Da), t * scale (B,),
                                                      global_cond=(B,C)) -> (B,H,Da)
    policy.flow._prepare_global_conditioning(batch)   normalised batch {"observation.state": (B,O,Ds),
                                                      "observation.environment_state": (B,O,De)} -> (B,C)
    policy.flow.velocity(x, t, global_cond)           t: (B,) float in [0, 1] -> v (B,H,Da)
    policy.flow.sample(global_cond, noise, num_steps) K Euler steps from explicit noise (B,H,Da) -> (B,H,Da)
    policy.flow.compute_loss(batch)                   the behaviour-cloning flow-matching loss

Everything is in the normalised action space; the policy's processors (LeRobot's default pipeline, see
processor_flow.py) normalise observations and unnormalise actions outside the network.
"""

from __future__ import annotations

from collections import deque

import torch
import torch.nn.functional as F  # noqa: N812
from lerobot.policies.diffusion.modeling_diffusion import DiffusionConditionalUnet1d
from lerobot.policies.pretrained import PreTrainedPolicy
from lerobot.policies.utils import populate_queues
from lerobot.utils.constants import ACTION, OBS_ENV_STATE, OBS_STATE
from torch import Tensor, nn

from simpo_robot.policies.flow.configuration_flow import FlowConfig
from simpo_robot.simpo.matching import flow_interpolate


def euler_times(num_steps: int) -> Tensor:
    """(K,) float32 start times of the K Euler steps: t_k = k / K, k = 0..K-1 (step size 1 / K)."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"the number of Euler steps must be an integer >= 1, got {num_steps!r}")
    return torch.arange(num_steps, dtype=torch.float32) / num_steps


def euler_sample(velocity, global_cond: Tensor, noise: Tensor, num_steps: int) -> Tensor:
    """Integrate dx/dt = velocity(x, t, global_cond) from x(0) = noise to t = 1 with K Euler steps.

    velocity: (x (B,H,Da), t (B,) in [0, 1], global_cond (B,C)) -> (B,H,Da); noise: (B,H,Da). Returns x(1).
    """
    x = noise
    dt = 1.0 / num_steps
    for t in euler_times(num_steps).tolist():
        x = x + dt * velocity(x, torch.full(x.shape[:1], t, dtype=x.dtype, device=x.device), global_cond)
    return x


class FlowModel(nn.Module):
    """The velocity network, the observation conditioning, the Euler sampler and the training loss."""

    def __init__(self, config: FlowConfig):
        super().__init__()
        self.config = config
        per_step = config.robot_state_feature.shape[0] + config.env_state_feature.shape[0]
        self.global_cond_dim = per_step * config.n_obs_steps
        self.unet = DiffusionConditionalUnet1d(config, global_cond_dim=self.global_cond_dim)

    def _prepare_global_conditioning(self, batch: dict[str, Tensor]) -> Tensor:
        """{"observation.state": (B,O,Ds), "observation.environment_state": (B,O,De)} -> (B, O*(Ds+De)),
        ordered as LeRobot's DiffusionModel orders it (per observation step: state then environment state)."""
        return torch.cat([batch[OBS_STATE], batch[OBS_ENV_STATE]], dim=-1).flatten(start_dim=1)

    def velocity(self, x: Tensor, t: Tensor, global_cond: Tensor) -> Tensor:
        """v_theta(x, t, s): x (B,H,Da), t (B,) flow time in [0, 1], global_cond (B,C) -> (B,H,Da)."""
        return self.unet(x, t * self.config.timestep_scale, global_cond=global_cond)

    def sample(self, global_cond: Tensor, noise: Tensor, num_steps: int | None = None) -> Tensor:
        """K Euler steps (default config.num_inference_steps) from x_0 = noise (B,H,Da); clipped when clip_sample."""
        k = self.config.num_inference_steps if num_steps is None else num_steps
        x = euler_sample(self.velocity, global_cond, noise, k)
        if self.config.clip_sample:
            x = x.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return x

    def generate_actions(self, batch: dict[str, Tensor], noise: Tensor | None = None,
                         generator: torch.Generator | None = None) -> Tensor:
        """Normalised observations (B,O,...) -> the executed part of the chunk, (B, n_action_steps, Da).

        noise: x_0 (B,H,Da); drawn with `generator` (default: torch's global RNG) when None.
        """
        state = batch[OBS_STATE]
        if state.ndim != 3 or state.shape[1] != self.config.n_obs_steps:
            raise ValueError(
                f"{OBS_STATE} must be (B, n_obs_steps={self.config.n_obs_steps}, dim), got {tuple(state.shape)}; "
                "for one frame per call use select_action, which keeps the observation history")
        batch_size, n_obs_steps = state.shape[:2]
        global_cond = self._prepare_global_conditioning(batch)
        if noise is None:
            noise = torch.randn((batch_size, self.config.horizon, self.config.action_feature.shape[0]),
                                dtype=global_cond.dtype, device=global_cond.device, generator=generator)
        actions = self.sample(global_cond, noise)
        start = n_obs_steps - 1  # the chunk starts at the oldest observation; execute from the current one
        return actions[:, start : start + self.config.n_action_steps]

    def compute_loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        """mean (v_theta(x_t, t, s) - (a - eps))^2 with t ~ U[0, 1], eps ~ N(0, I) per sample.

        batch: normalised {"observation.state": (B,O,Ds), "observation.environment_state": (B,O,De),
        "action": (B,H,Da), "action_is_pad": (B,H)}.
        """
        actions = batch[ACTION]
        if actions.shape[1] != self.config.horizon:
            raise ValueError(f"expected action chunks of {self.config.horizon} steps, got {actions.shape[1]}")
        global_cond = self._prepare_global_conditioning(batch)
        eps = torch.randn(actions.shape, dtype=actions.dtype, device=actions.device, generator=generator)
        t = torch.rand(actions.shape[0], dtype=actions.dtype, device=actions.device, generator=generator)
        x_t, target = flow_interpolate(actions, eps, t)
        loss = F.mse_loss(self.velocity(x_t, t, global_cond), target, reduction="none")
        if self.config.do_mask_loss_for_padding:
            mask = (~batch["action_is_pad"]).unsqueeze(-1)
            return (loss * mask).sum() / (mask.sum() * loss.shape[-1]).clamp_min(1)
        return loss.mean()


class VelocityNetwork(nn.Module):
    """`FlowModel.velocity` as a module's forward (what the ONNX export traces): (x, t in [0, 1], global_cond) -> v.

    Built on demand around a policy's `flow`; it is not part of the policy's state dict.
    """

    def __init__(self, flow: FlowModel):
        super().__init__()
        self.flow = flow

    def forward(self, x: Tensor, t: Tensor, global_cond: Tensor) -> Tensor:
        return self.flow.velocity(x, t, global_cond)


class FlowPolicy(PreTrainedPolicy):
    """Rectified-flow policy: LeRobot's diffusion-policy UNet predicting velocities, sampled with K Euler steps.

    Rollout (select_action) keeps n_obs_steps observations and a queue of n_action_steps actions, exactly as
    LeRobot's DiffusionPolicy does.
    """

    config_class = FlowConfig
    name = "flow"

    def __init__(self, config: FlowConfig, **kwargs):
        super().__init__(config)
        config.validate_features()
        self.config = config
        self.flow = FlowModel(config)
        self._queues: dict[str, deque] = {}
        self.reset()

    def get_optim_params(self) -> dict:
        return self.flow.parameters()

    def reset(self) -> None:
        """Clear the observation and action queues; call on env.reset()."""
        self._queues = {
            OBS_STATE: deque(maxlen=self.config.n_obs_steps),
            OBS_ENV_STATE: deque(maxlen=self.config.n_obs_steps),
            ACTION: deque(maxlen=self.config.n_action_steps),
        }

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, Tensor], noise: Tensor | None = None) -> Tensor:
        """(B, n_action_steps, Da) normalised actions, from the queued observations when there are any,
        else from `batch` itself ((B,O,...) tensors, e.g. a dataloader batch)."""
        if any(len(self._queues[k]) for k in (OBS_STATE, OBS_ENV_STATE)):
            batch = {k: torch.stack(list(self._queues[k]), dim=1) for k in (OBS_STATE, OBS_ENV_STATE)}
        return self.flow.generate_actions(batch, noise=noise)

    @torch.no_grad()
    def select_action(self, batch: dict[str, Tensor], noise: Tensor | None = None) -> Tensor:
        """One action (B, Da) per call; a new chunk is sampled when the action queue is empty."""
        batch = {k: v for k, v in batch.items() if k != ACTION}
        self._queues = populate_queues(self._queues, batch)
        if len(self._queues[ACTION]) == 0:
            actions = self.predict_action_chunk(batch, noise=noise)
            self._queues[ACTION].extend(actions.transpose(0, 1))
        return self._queues[ACTION].popleft()

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, None]:
        """The training loss of a normalised batch (see FlowModel.compute_loss)."""
        return self.flow.compute_loss(batch), None
