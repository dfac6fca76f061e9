"""A LeRobot DiffusionPolicy seen as the actor: conditioning, explicit-timestep sampling, denoising loss.

Shape glossary
    M   samples (states x particles, flattened)
    O   n_obs_steps; Ds, De state / environment-state dims
    H   horizon (actions the model generates); Da action dim; C global conditioning dim
    K   denoising steps

Sampling runs the reverse process from explicit timestep tables (built from diffusers' scheduler tables
by `simpo_robot.deploy.sampler.make_tables`), never through a scheduler's internal state, so particle
sampling with fewer DDIM steps than the policy's own inference setting is a pure function of
(network, conditioning, generator).
"""

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from simpo_robot.deploy.sampler import SamplerSettings, make_tables
from simpo_robot.simpo import weighted_denoising_loss
from simpo_robot.tasks import OBS_ENV_STATE, OBS_STATE


@dataclass(frozen=True)
class StepTables:
    """Per-step scalars of the reverse process (K,) as tensors; see simpo_robot.deploy.sampler."""

    timesteps: Tensor
    sqrt_alpha_prod: Tensor
    sqrt_one_minus_alpha_prod: Tensor
    x0_coeff: Tensor
    x_coeff: Tensor
    eps_coeff: Tensor
    noise_std: Tensor
    clip_range: float | None


def step_tables(policy_config, num_steps: int | None = None, scheduler: str | None = None) -> StepTables:
    """Tables for the policy's sampler, optionally with another step count / scheduler ("DDIM" for particles)."""
    settings = SamplerSettings.from_policy_config(policy_config)
    if num_steps is not None:
        settings = replace(settings, num_inference_steps=num_steps)
    if scheduler is not None:
        settings = replace(settings, noise_scheduler_type=scheduler)
    tables = make_tables(settings)
    if settings.prediction_type != "epsilon":
        raise ValueError("the SiMPO actor needs an epsilon-prediction diffusion policy")
    as_t = {name: torch.as_tensor(getattr(tables, name)) for name in (
        "timesteps", "sqrt_alpha_prod", "sqrt_one_minus_alpha_prod", "x0_coeff", "x_coeff", "eps_coeff", "noise_std")}
    return StepTables(**as_t, clip_range=settings.clip_sample_range if settings.clip_sample else None)


@torch.no_grad()
def sample_chunks(unet: nn.Module, global_cond: Tensor, tables: StepTables, horizon: int, action_dim: int,
                  generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
    """Reverse process from x_T: global_cond (M, C) -> chunks (M, H, Da) in model space.

    x_T is `noise` (M, H, Da) when given, else drawn from N(0, I) with `generator` (which also draws the
    per-step noise of a DDPM sampler; DDIM with eta = 0 adds none).
    """
    m = global_cond.shape[0]
    device, dtype = global_cond.device, global_cond.dtype
    if noise is None:
        x = torch.randn((m, horizon, action_dim), generator=generator, device=device, dtype=dtype)
    else:
        x = noise.to(device=device, dtype=dtype)
    for k in range(len(tables.timesteps)):
        t = torch.full((m,), int(tables.timesteps[k]), device=device, dtype=torch.long)
        eps = unet(x, t, global_cond=global_cond)
        x0 = (x - tables.sqrt_one_minus_alpha_prod[k] * eps) / tables.sqrt_alpha_prod[k]
        if tables.clip_range is not None:
            x0 = x0.clamp(-tables.clip_range, tables.clip_range)
        x_next = tables.x0_coeff[k] * x0 + tables.x_coeff[k] * x + tables.eps_coeff[k] * eps
        if tables.noise_std[k] > 0:
            x_next = x_next + tables.noise_std[k] * torch.randn(x.shape, generator=generator, device=device,
                                                                 dtype=dtype)
        x = x_next
    return x


class DiffusionActor:
    """Views of a LeRobot DiffusionPolicy that the trainer and algorithms need (no state of its own)."""

    def __init__(self, policy):
        cfg = policy.config
        if cfg.image_features:
            raise ValueError("fine-tuning supports state-only diffusion policies (no camera features)")
        self.policy = policy
        self.n_obs_steps = cfg.n_obs_steps
        self.horizon = cfg.horizon
        self.n_action_steps = cfg.n_action_steps
        self.action_dim = cfg.action_feature.shape[0]
        self.start = cfg.n_obs_steps - 1  # first executed action inside the generated chunk
        self.has_env_state = cfg.env_state_feature is not None

    @property
    def unet(self) -> nn.Module:
        return self.policy.diffusion.unet

    @property
    def alphas_cumprod(self) -> Tensor:
        return self.policy.diffusion.noise_scheduler.alphas_cumprod

    def global_cond(self, state: Tensor, env_state: Tensor) -> Tensor:
        """(B, O, Ds), (B, O, De) normalised observation histories -> (B, C)."""
        batch = {OBS_STATE: state}
        if self.has_env_state:
            batch[OBS_ENV_STATE] = env_state
        return self.policy.diffusion._prepare_global_conditioning(batch)

    def executed(self, chunk: Tensor) -> Tensor:
        """(..., H, Da) -> (..., n_action_steps, Da): the actions actually sent to the env."""
        return chunk[..., self.start : self.start + self.n_action_steps, :]


class DenoisingObjective(nn.Module):
    """The weighted denoising loss as a module, so that Accelerate's DDP wrapper syncs its gradients."""

    def __init__(self, unet: nn.Module, clip: float):
        super().__init__()
        self.unet = unet
        self.clip = clip

    def forward(self, noisy: Tensor, timesteps: Tensor, global_cond: Tensor, noise: Tensor, weights: Tensor) -> Tensor:
        """noisy, noise: (M, H, Da); timesteps: (M,); global_cond: (M, C); weights: (M,) mean-1 weights."""
        return weighted_denoising_loss(self.unet(noisy, timesteps, global_cond=global_cond), noise, weights, self.clip)
