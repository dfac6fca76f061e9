"""SiMPO's actor update for chunked diffusion policies (the algorithm plugged into the trainer).

Shape glossary
    B   states in the actor batch
    N   particles per state
    O   n_obs_steps; H horizon; Da action dim; C global conditioning dim; Do, Dc critic input dims

Per actor update (SIMPO.md, two-stage measure matching):
    1. particles a_1..a_N ~ pi_old(.|s) (a periodically refreshed copy of the denoiser), sampled with
       few DDIM steps (cheap), plus Gaussian exploration noise, clipped to the model's action range;
    2. Q(s, a_i) from the twin critics (mean of the two, as the reference recipe);
    3. w = N * solve_weights(Q, lambda, g, b).weights   (mean weight 1 per state);
    4. loss = weighted denoising loss of the current model on the particles, one random diffusion
       timestep per particle (all denoising steps are trained), per-element clipped squared error;
    5. lambda learned toward a target KL of the weights from uniform.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from simpo_robot.rl.actor import DiffusionActor, sample_chunks, step_tables
from simpo_robot.rl.critic import TwinCritic
from simpo_robot.rl.replay import Transition
from simpo_robot.simpo import diffuse, solve_weights, weight_kl_from_uniform
from simpo_robot.simpo.weighting import WEIGHTINGS


@dataclass
class SimpoConfig:
    """SiMPO's knobs besides the weighting and the negative bound (which are top-level flags)."""

    particles: int = 16
    """N: particles drawn from pi_old per state."""
    particle_steps: int = 5
    """DDIM steps used to sample particles (and the TD target's next chunk): fewer than the policy's own."""
    particle_noise: float = 0.1
    """Std of Gaussian exploration noise added to particles, in the model's normalised action units."""
    refresh_every: int = 50
    """Actor updates between refreshes of pi_old (a hard copy of the denoiser)."""
    target_kl: float = 1.0
    """Target KL(weights || uniform) of the learned temperature."""
    init_temperature: float = 1.0
    temperature_lr: float = 3e-3
    loss_clip: float = 5.0
    """Per-element bound on the squared denoising error (bounds the repulsive term)."""

    def __post_init__(self):
        if self.particles < 1 or self.particle_steps < 1 or self.refresh_every < 1:
            raise ValueError("particles, particle_steps and refresh_every must be >= 1")
        if self.particle_noise < 0 or self.target_kl < 0 or not self.loss_clip > 0:
            raise ValueError("particle_noise and target_kl must be >= 0 and loss_clip > 0")
        if not (self.init_temperature > 0 and self.temperature_lr > 0):
            raise ValueError("init_temperature and temperature_lr must be > 0")


class ActorBatch(NamedTuple):
    """What the trainer feeds the DenoisingObjective, and the weights for the temperature loss."""

    noisy: Tensor
    """(B*N, H, Da)"""
    timesteps: Tensor
    """(B*N,)"""
    global_cond: Tensor
    """(B*N, C)"""
    noise: Tensor
    """(B*N, H, Da)"""
    weights: Tensor
    """(B*N,) mean-1 weights"""
    normalised: Tensor
    """(B, N) normalised weights (sum 1 per state)"""
    q: Tensor
    """(B, N) critic values of the particles"""


def critic_obs(state: Tensor, env_state: Tensor) -> Tensor:
    """(B, O, Ds), (B, O, De) -> (B, Do) flattened critic observation."""
    return torch.cat([state, env_state], dim=-1).flatten(1)


class Simpo:
    """SiMPO (any weighting from simpo_robot.simpo; `exp` is the softmax baseline)."""

    def __init__(self, cfg: SimpoConfig, weighting: str, negative_bound: float, actor: DiffusionActor):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; choose from {sorted(WEIGHTINGS)}")
        if not negative_bound <= 0:
            raise ValueError(f"negative_bound must be <= 0, got {negative_bound}")
        self.cfg = cfg
        self.weighting = weighting
        self.negative_bound = negative_bound
        self.actor = actor
        self.tables = step_tables(actor.policy.config, cfg.particle_steps, scheduler="DDIM")

    def sample_particles(self, unet: nn.Module, cond: Tensor, generator: torch.Generator) -> Tensor:
        """cond (M, C) -> (M, H, Da) chunks from `unet` with the cheap particle sampler."""
        return sample_chunks(unet, cond, self.tables, self.actor.horizon, self.actor.action_dim, generator)

    @torch.no_grad()
    def actor_batch(self, batch: Transition, critic: TwinCritic, pi_old: nn.Module, temperature: float,
                    generator: torch.Generator) -> ActorBatch:
        n = self.cfg.particles
        b = batch.state.shape[0]
        cond = self.actor.global_cond(batch.state, batch.env_state).repeat_interleave(n, dim=0)  # (B*N, C)
        particles = self.sample_particles(pi_old, cond, generator)
        if self.cfg.particle_noise > 0:
            particles = particles + self.cfg.particle_noise * torch.randn(
                particles.shape, generator=generator, device=particles.device)
        bound = self.tables.clip_range or 1.0
        particles = particles.clamp(-bound, bound)
        obs = critic_obs(batch.state, batch.env_state).repeat_interleave(n, dim=0)
        q1, q2 = critic(obs, self.actor.executed(particles).flatten(1))
        q = (0.5 * (q1 + q2)).reshape(b, n)
        normalised = solve_weights(q, temperature, self.weighting, self.negative_bound).weights
        noise = torch.randn(particles.shape, generator=generator, device=particles.device)
        t = torch.randint(0, len(self.actor.alphas_cumprod), (b * n,), generator=generator, device=particles.device)
        noisy = diffuse(self.actor.alphas_cumprod, particles, noise, t)
        return ActorBatch(noisy, t, cond, noise, n * normalised.reshape(-1), normalised, q)

    @staticmethod
    def metrics(ab: ActorBatch) -> dict[str, float]:
        return {
            "simpo/weight_kl": weight_kl_from_uniform(ab.normalised).mean().item(),
            "simpo/negative_mass": ab.normalised.clamp(max=0).abs().sum(-1).mean().item(),
            "simpo/max_weight": ab.weights.max().item(),
            "simpo/q_std": ab.q.std(dim=-1).mean().item(),
        }
