"""The policy seen as the actor: conditioning, sampling with explicit noise, the weighted matching loss.

Two model families, one interface (`DiffusionActor`, `FlowActor`; `make_actor` picks by policy type):
    actor.unet                                the trained network (LeRobot's 1-D conditional UNet)
    actor.global_cond(state, env_state)       normalised observation histories -> conditioning (B, C)
    actor.sample(net, cond, steps, ...)       chunks (M, H, Da) from `net` (the actor's or a frozen copy)
    actor.objective(clip)                     module: (particles, cond, weights, generator, anchor) -> loss

The objectives compute SiMPO's weighted matching loss sum_i w_i l(net(x_t), target_i). With an `anchor`
network (pi_old) the part of it with weight 1 is matched in function space instead of on samples:

    sum_i (w_i - 1) l(net(x_t), target_i) + l(net(x_t), anchor(x_t))

(same quadratic term in net(x_t) per particle, so the same repulsion as the paper's loss, but with uniform
weights the update is exactly zero at net = anchor, where re-fitting to samples is not; see simpo.py).
    actor.executed(chunk)                     the part of a chunk sent to the env

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
from simpo_robot.simpo import diffuse, flow_interpolate, weighted_denoising_loss, weighted_flow_loss
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


class _ChunkActor:
    """What both families share: shapes, the observation conditioning and the executed slice."""

    def __init__(self, policy, model: nn.Module):
        cfg = policy.config
        if cfg.image_features:
            raise ValueError("fine-tuning supports state-only policies (no camera features)")
        self.policy, self.model = policy, model
        self.n_obs_steps = cfg.n_obs_steps
        self.horizon = cfg.horizon
        self.n_action_steps = cfg.n_action_steps
        self.action_dim = cfg.action_feature.shape[0]
        self.start = cfg.n_obs_steps - 1  # first executed action inside the generated chunk
        self.has_env_state = cfg.env_state_feature is not None
        self.action_bound = cfg.clip_sample_range if cfg.clip_sample else 1.0

    @property
    def unet(self) -> nn.Module:
        return self.model.unet

    def global_cond(self, state: Tensor, env_state: Tensor) -> Tensor:
        """(B, O, Ds), (B, O, De) normalised observation histories -> (B, C)."""
        batch = {OBS_STATE: state}
        if self.has_env_state:
            batch[OBS_ENV_STATE] = env_state
        return self.model._prepare_global_conditioning(batch)

    def executed(self, chunk: Tensor) -> Tensor:
        """(..., H, Da) -> (..., n_action_steps, Da): the actions actually sent to the env."""
        return chunk[..., self.start : self.start + self.n_action_steps, :]

    def initial_noise(self, m: int, cond: Tensor, generator: torch.Generator | None, noise: Tensor | None) -> Tensor:
        if noise is not None:
            return noise.to(device=cond.device, dtype=cond.dtype)
        return torch.randn((m, self.horizon, self.action_dim), generator=generator, device=cond.device,
                           dtype=cond.dtype)


class DiffusionActor(_ChunkActor):
    """A LeRobot DiffusionPolicy (epsilon prediction) as the actor."""

    def __init__(self, policy):
        super().__init__(policy, policy.diffusion)
        step_tables(policy.config)  # fails early for a policy this sampler cannot run
        self._tables: dict[tuple[int | None, bool], StepTables] = {}

    @property
    def alphas_cumprod(self) -> Tensor:
        return self.policy.diffusion.noise_scheduler.alphas_cumprod

    def sample(self, net: nn.Module, cond: Tensor, steps: int | None = None, clip: bool = True,
               generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
        """Chunks from `net` with DDIM `steps` (None: the policy's own sampler); clip=False keeps x0 unclipped."""
        if (steps, clip) not in self._tables:
            tables = step_tables(self.policy.config) if steps is None else step_tables(self.policy.config, steps, "DDIM")
            self._tables[steps, clip] = tables if clip else replace(tables, clip_range=None)
        tables = self._tables[steps, clip]
        return sample_chunks(net, cond, tables, self.horizon, self.action_dim, generator,
                             self.initial_noise(cond.shape[0], cond, generator, noise))

    def objective(self, clip: float) -> "DenoisingObjective":
        return DenoisingObjective(self.unet, self.alphas_cumprod, clip)


class FlowActor(_ChunkActor):
    """simpo_robot's FlowPolicy (rectified flow, Euler sampling) as the actor."""

    def __init__(self, policy):
        super().__init__(policy, policy.flow)
        self.timestep_scale = policy.config.timestep_scale

    def sample(self, net: nn.Module, cond: Tensor, steps: int | None = None, clip: bool = True,
               generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
        """Chunks from `net` with `steps` Euler steps (None: the policy's own K); clip as the policy does."""
        from simpo_robot.policies.flow.modeling_flow import euler_sample

        k = self.policy.config.num_inference_steps if steps is None else steps
        x = euler_sample(lambda x, t, c: net(x, t * self.timestep_scale, global_cond=c), cond,
                         self.initial_noise(cond.shape[0], cond, generator, noise), k)
        return x.clamp(-self.action_bound, self.action_bound) if clip and self.policy.config.clip_sample else x

    def objective(self, clip: float) -> "FlowObjective":
        return FlowObjective(self.unet, self.timestep_scale, clip)


def make_actor(policy) -> DiffusionActor | FlowActor:
    """The actor view for a loaded policy (LeRobot "diffusion" or simpo_robot "flow")."""
    kinds = {"diffusion": DiffusionActor, "flow": FlowActor}
    if policy.config.type not in kinds:
        raise ValueError(f"fine-tuning supports {sorted(kinds)} policies, not {policy.config.type!r}")
    return kinds[policy.config.type](policy)


class DenoisingObjective(nn.Module):
    """The weighted denoising loss as a module, so that Accelerate's DDP wrapper syncs its gradients."""

    def __init__(self, unet: nn.Module, alphas_cumprod: Tensor, clip: float):
        super().__init__()
        self.unet = unet
        self.register_buffer("alphas_cumprod", alphas_cumprod.clone(), persistent=False)
        self.clip = clip

    def forward(self, particles: Tensor, global_cond: Tensor, weights: Tensor, generator: torch.Generator,
                anchor: nn.Module | None = None) -> Tensor:
        """particles (M, H, Da), global_cond (M, C), weights (M,): one random diffusion step per particle."""
        noise = torch.randn(particles.shape, generator=generator, device=particles.device, dtype=particles.dtype)
        t = torch.randint(0, len(self.alphas_cumprod), (particles.shape[0],), generator=generator,
                          device=particles.device)
        noisy = diffuse(self.alphas_cumprod, particles, noise, t)
        pred = self.unet(noisy, t, global_cond=global_cond)
        if anchor is None:
            return weighted_denoising_loss(pred, noise, weights, self.clip)
        with torch.no_grad():
            anchored = anchor(noisy, t, global_cond=global_cond)
        return (weighted_denoising_loss(pred, noise, weights - 1.0, self.clip)
                + weighted_denoising_loss(pred, anchored, torch.ones_like(weights), self.clip))


class FlowObjective(nn.Module):
    """The weighted flow-matching loss (x_t = t a + (1 - t) eps, target a - eps) as a module."""

    def __init__(self, unet: nn.Module, timestep_scale: float, clip: float):
        super().__init__()
        self.unet, self.timestep_scale, self.clip = unet, timestep_scale, clip

    def forward(self, particles: Tensor, global_cond: Tensor, weights: Tensor, generator: torch.Generator,
                anchor: nn.Module | None = None) -> Tensor:
        """particles (M, H, Da), global_cond (M, C), weights (M,): one random flow time per particle."""
        eps = torch.randn(particles.shape, generator=generator, device=particles.device, dtype=particles.dtype)
        t = torch.rand((particles.shape[0],), generator=generator, device=particles.device, dtype=particles.dtype)
        x_t, target = flow_interpolate(particles, eps, t)
        velocity = self.unet(x_t, t * self.timestep_scale, global_cond=global_cond)
        if anchor is None:
            return weighted_flow_loss(velocity, target, weights, self.clip)
        with torch.no_grad():
            anchored = anchor(x_t, t * self.timestep_scale, global_cond=global_cond)
        return (weighted_flow_loss(velocity, target, weights - 1.0, self.clip)
                + weighted_flow_loss(velocity, anchored, torch.ones_like(weights), self.clip))
