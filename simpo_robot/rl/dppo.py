"""DPPO (Ren et al. 2024, "Diffusion Policy Policy Optimization"): PPO through the denoising chain.

Shape glossary
    T   chunks per env in one on-policy batch (n_steps)
    E   envs of a process
    K   denoising steps of the sampler; K' the last K' of them are fine-tuned
    H   horizon; Da action dim; C global conditioning dim; Do value-net input dim

Two-level MDP. The env level is the chunk MDP (one executed chunk = one step, reward summed over its env
steps, discount gamma^steps); GAE with a value network V(s) gives an advantage A_t per chunk. The
denoising level treats each of the K reverse steps as a Gaussian policy step

    x_{k-1} ~ N(mu_theta(x_k, k, s), sigma_k^2),   sigma_k = max(sigma_k^DDIM(eta=1), min_std)

(the std is floored so that exploration and the likelihood stay well-defined, and the last step is
stochastic too). PPO's clipped ratio objective applies per denoising step, with the chunk's advantage
discounted by denoise_gamma^(K'-1-j) for fine-tuned step j. Only the last K' steps are fine-tuned; the
first K - K' use a frozen copy of the pretrained denoiser, as in the paper.

As in the paper's code, a step's log-likelihood is the elementwise Gaussian log-density clamped to [-5, 2]
and averaged (not summed) over the executed actions of the chunk and their dimensions, and the ratio clip
grows exponentially along the chain, from clip_coef_base at the first fine-tuned step to clip_coef at the
last. A sum over the whole (H, Da) chunk makes each ratio H * Da times more sensitive to the same change
of the mean; with it, 85% of the ratios were clipped at the end of every PPO iteration on fetch_push
(BENCHMARKS.md, eighth round).
"""

import copy
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simpo_robot.rl.actor import DiffusionActor, StepTables, step_tables
from simpo_robot.rl.agent import ChunkBatch, Stepper
from simpo_robot.rl.critic import mlp
from simpo_robot.rl.replay import Transition
from simpo_robot.rl.simpo import critic_obs


@dataclass
class DppoConfig:
    """DPPO's knobs (`--dppo.field value`)."""

    n_steps: int = 25
    """Chunks per env collected per PPO iteration (25 = one 50-step Fetch episode with 2-action chunks)."""
    epochs: int = 5
    """PPO epochs over each on-policy batch."""
    minibatch_size: int = 512
    """(chunk, fine-tuned denoising step) pairs per PPO minibatch."""
    clip_coef: float = 0.01
    """PPO ratio clip at the last denoising step; DPPO uses a small one because every step is its own ratio."""
    clip_coef_base: float = 1e-3
    """Ratio clip at the first fine-tuned denoising step (the clip grows exponentially towards clip_coef)."""
    clip_coef_rate: float = 3.0
    """Growth rate of that schedule (0 < rate; larger keeps the early steps near clip_coef_base longer)."""
    gae_lambda: float = 0.95
    denoise_gamma: float = 0.99
    """Discount of the advantage along the denoising chain (the final step gets the full advantage)."""
    denoising_steps: int = 10
    """K: DDIM steps of the stochastic sampler used for acting and for the likelihood."""
    ft_denoising_steps: int = 10
    """K': the last K' denoising steps are fine-tuned (K' <= K)."""
    min_std: float = 0.1
    """Floor on each denoising step's std (normalised action units)."""
    actor_lr: float = 3e-5
    value_lr: float = 1e-3
    value_hidden: tuple[int, ...] = (256, 256)
    norm_adv: bool = True
    """Normalise advantages over each minibatch."""

    def __post_init__(self):
        for name in ("n_steps", "epochs", "minibatch_size", "denoising_steps", "ft_denoising_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"dppo.{name} must be >= 1, got {getattr(self, name)}")
        if self.ft_denoising_steps > self.denoising_steps:
            raise ValueError("dppo.ft_denoising_steps must be <= dppo.denoising_steps")
        if not (self.clip_coef > 0 and self.min_std > 0 and self.actor_lr > 0 and self.value_lr > 0):
            raise ValueError("dppo.clip_coef, min_std and the learning rates must be > 0")
        if not (0 < self.clip_coef_base <= self.clip_coef and self.clip_coef_rate > 0):
            raise ValueError("dppo.clip_coef_base must be in (0, clip_coef] and dppo.clip_coef_rate > 0")
        if not (0 <= self.gae_lambda <= 1 and 0 < self.denoise_gamma <= 1):
            raise ValueError("dppo.gae_lambda must be in [0, 1] and denoise_gamma in (0, 1]")


# ---------------------------------------------------------------------------------------------------
# Pure pieces: the Gaussian denoising step, its log-density, the clip schedule, GAE.
# ---------------------------------------------------------------------------------------------------


class GaussianSteps(NamedTuple):
    """Per-step coefficients (K,) of the stochastic DDIM (eta = 1) reverse step with a floored std."""

    x0_coeff: Tensor
    eps_coeff: Tensor
    std: Tensor


def gaussian_steps(tables: StepTables, min_std: float) -> GaussianSteps:
    """mu = sqrt(a') x0 + sqrt(1 - a' - s^2) eps, s = sqrt((1-a')/(1-a) (1 - a/a')), std = max(s, min_std).

    a = alphas_cumprod at the step's timestep, a' at the next one (1 after the last step), from the
    deterministic DDIM tables (x0_coeff = sqrt(a')).
    """
    a = tables.sqrt_alpha_prod.double() ** 2
    a_prev = tables.x0_coeff.double() ** 2
    sigma = torch.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev)).clamp(min=0.0)
    eps_coeff = torch.sqrt((1 - a_prev - sigma**2).clamp(min=0.0))
    return GaussianSteps(tables.x0_coeff.float(), eps_coeff.float(), sigma.clamp(min=min_std).float())


def _per_sample(coeff: Tensor, k: int | Tensor, like: Tensor) -> Tensor:
    """coeff[k] shaped to broadcast over like (M, H, Da); k an int or a per-sample index tensor (M,)."""
    c = coeff.to(like.device)[k]
    return c.reshape(-1, *([1] * (like.ndim - 1))) if c.ndim else c


def step_mean(x: Tensor, eps: Tensor, k: int | Tensor, tables: StepTables, steps: GaussianSteps) -> Tensor:
    """Mean of x_{k-1} given x_k (x, eps: (M, H, Da)) at denoising step index k (0 = first; int or (M,))."""
    x0 = (x - _per_sample(tables.sqrt_one_minus_alpha_prod, k, x) * eps) / _per_sample(tables.sqrt_alpha_prod, k, x)
    if tables.clip_range is not None:
        x0 = x0.clamp(-tables.clip_range, tables.clip_range)
    return _per_sample(steps.x0_coeff, k, x) * x0 + _per_sample(steps.eps_coeff, k, x) * eps


LOGPROB_RANGE = (-5.0, 2.0)
"""DPPO's clamp on each element's log-density (bounds the ratio of a sample far in a tail)."""


def gaussian_logprob(x: Tensor, mean: Tensor, std: Tensor | float) -> Tensor:
    """Elementwise log N(x; mean, std^2), the shape of x."""
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    return -0.5 * ((x - mean) / std) ** 2 - torch.log(std) - 0.5 * torch.log(torch.tensor(2 * torch.pi))


def step_logprob(x: Tensor, mean: Tensor, std: Tensor | float, start: int, length: int) -> Tensor:
    """DPPO's log-likelihood of one denoising step: (M, H, Da) -> (M,).

    The elementwise log-density, clamped to LOGPROB_RANGE, averaged over the executed actions
    (horizon indices start .. start + length - 1) and the action dims. The rest of the chunk never
    reaches the env, so it gets no gradient.
    """
    logp = gaussian_logprob(x, mean, std)[:, start:start + length].clamp(*LOGPROB_RANGE)
    return logp.flatten(1).mean(dim=1)


def clip_schedule(ft_steps: int, base: float, final: float, rate: float) -> Tensor:
    """Ratio clip of each fine-tuned denoising step j = 0 .. K'-1 (K' = ft_steps), shape (K',):

        clip_j = base + (final - base) * (exp(rate * t_j) - 1) / (exp(rate) - 1),   t_j = j / (K' - 1)

    so clip_0 = base and clip_{K'-1} = final; one fine-tuned step gets final.
    """
    if ft_steps == 1:
        return torch.tensor([final])
    t = torch.arange(ft_steps, dtype=torch.float64) / (ft_steps - 1)
    return (base + (final - base) * torch.expm1(rate * t) / math.expm1(rate)).float()


def gae(rewards: Tensor, values: Tensor, next_values: Tensor, discounts: Tensor, gamma_steps: Tensor,
        ended: Tensor, lam: float) -> Tensor:
    """Generalised advantage estimation over chunk MDP steps; all inputs (T, E), returns A (T, E).

    delta_t = r_t + discounts_t * V(s_{t+1}) - V(s_t)      (discounts_t = gamma^steps, 0 if terminated)
    A_t     = delta_t + gamma_steps_t * lam * (1 - ended_t) * A_{t+1},   A_T = delta_T
    The trace is cut where an episode ended (terminated or truncated); a truncated chunk still
    bootstraps through its own V(s_{t+1}).
    """
    deltas = rewards + discounts * next_values - values
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        running = deltas[t] + gamma_steps[t] * lam * (~ended[t]).to(rewards.dtype) * running
        adv[t] = running
    return adv


# ---------------------------------------------------------------------------------------------------
# The agent.
# ---------------------------------------------------------------------------------------------------


class EpsNet(nn.Module):
    """The UNet as a module whose forward Accelerate's DDP wrapper sees (so gradients are all-reduced)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        return self.unet(x, t, global_cond=cond)


class DppoAgent:
    name = "dppo"

    def __init__(self, cfg: DppoConfig, gamma: float, actor: DiffusionActor, obs_dim: int, device: torch.device):
        self.cfg, self.gamma, self.actor, self.device = cfg, gamma, actor, device
        self.tables = step_tables(actor.policy.config, cfg.denoising_steps, scheduler="DDIM")
        self.steps = gaussian_steps(self.tables, cfg.min_std)
        self.clips = clip_schedule(cfg.ft_denoising_steps, cfg.clip_coef_base, cfg.clip_coef,
                                   cfg.clip_coef_rate).to(device)  # (K',)
        self.first_ft = cfg.denoising_steps - cfg.ft_denoising_steps  # steps before use the frozen copy
        self.base_unet = copy.deepcopy(actor.unet).requires_grad_(False) if self.first_ft else None
        self.eps_net = EpsNet(actor.unet)
        self.value = mlp(obs_dim, tuple(cfg.value_hidden), 1).to(device)
        self.actor_opt = torch.optim.Adam(self.eps_net.parameters(), lr=cfg.actor_lr)
        self.value_opt = torch.optim.Adam(self.value.parameters(), lr=cfg.value_lr)
        self.storage: list[ChunkBatch] = []
        self.iterations = 0

    # --- trainer plumbing --------------------------------------------------------------------------
    def modules_to_prepare(self) -> dict[str, Any]:
        return {"eps_net": self.eps_net, "value": self.value, "actor_opt": self.actor_opt,
                "value_opt": self.value_opt}

    def set_prepared(self, prepared: dict[str, Any], unwrap) -> None:
        for name, obj in prepared.items():
            setattr(self, name, obj)

    def shared_state(self) -> list[Any]:
        return [m for m in (self.base_unet,) if m is not None]

    def synced_modules(self) -> list[nn.Module]:
        return [self.eps_net, self.value] + self.shared_state()

    def rank_state(self) -> dict[str, Any]:
        # Checkpoints are taken between episodes; a partly filled on-policy batch is kept with them.
        return {"storage": [(b.transition._asdict(), b.live, b.ended, b.gamma_steps, b.extras) for b in self.storage],
                "iterations": self.iterations}

    def load_rank_state(self, state: dict[str, Any]) -> None:
        self.storage = [ChunkBatch(Transition(**t), live, ended, gs, extras)
                        for t, live, ended, gs, extras in state["storage"]]
        self.iterations = state["iterations"]

    # --- acting and data ---------------------------------------------------------------------------
    def _eps(self, k: int, x: Tensor, cond: Tensor, trainable: bool) -> Tensor:
        t = torch.full((x.shape[0],), int(self.tables.timesteps[k]), device=x.device, dtype=torch.long)
        if k < self.first_ft:
            return self.base_unet(x, t, global_cond=cond)
        return self.eps_net(x, t, cond) if trainable else self.actor.unet(x, t, global_cond=cond)

    def _logprob(self, x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        return step_logprob(x, mean, std, self.actor.start, self.actor.n_action_steps)

    @torch.no_grad()
    def act(self, cond: Tensor, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        m = cond.shape[0]
        shape = (m, self.actor.horizon, self.actor.action_dim)
        x = torch.randn(shape, generator=generator, device=cond.device)
        chain, logps = [x], []
        for k in range(self.cfg.denoising_steps):
            mean = step_mean(x, self._eps(k, x, cond, trainable=False), k, self.tables, self.steps)
            x = mean + self.steps.std[k] * torch.randn(shape, generator=generator, device=cond.device)
            chain.append(x)
            if k >= self.first_ft:
                logps.append(self._logprob(x, mean, self.steps.std[k]))
        bound = self.tables.clip_range or 1.0
        return x.clamp(-bound, bound), {"chain": torch.stack(chain, 1), "logprob": torch.stack(logps, 1)}

    def observe(self, batch: ChunkBatch, generator: torch.Generator) -> None:
        self.storage.append(ChunkBatch(Transition(*(x.cpu() for x in batch.transition)), batch.live.cpu(),
                                       batch.ended.cpu(), batch.gamma_steps.cpu(),
                                       {k: v.cpu() for k, v in batch.extras.items()}))

    def ready(self, env_steps: int) -> bool:
        return len(self.storage) >= self.cfg.n_steps

    def can_overlap(self, env_steps: int) -> bool:
        return False  # the PPO update changes the denoiser that acts

    # --- the PPO update ----------------------------------------------------------------------------
    def update(self, step: Stepper, gather, generator: torch.Generator, cpu_generator: torch.Generator,
               unwrap, env_steps: int) -> dict[str, float]:
        dev = self.device
        tr = [b.transition for b in self.storage]
        stack = lambda xs: torch.stack(xs).to(dev)  # noqa: E731  (T, E, ...)
        state, env_state = stack([t.state for t in tr]), stack([t.env_state for t in tr])
        next_state, next_env_state = stack([t.next_state for t in tr]), stack([t.next_env_state for t in tr])
        rewards, discounts = stack([t.reward for t in tr]), stack([t.discount for t in tr])
        gamma_steps = stack([b.gamma_steps for b in self.storage])
        live, ended = stack([b.live for b in self.storage]), stack([b.ended for b in self.storage])
        chain, old_logp = stack([b.extras["chain"] for b in self.storage]), stack([b.extras["logprob"] for b in self.storage])
        n_t, n_e = rewards.shape
        obs = critic_obs(state.flatten(0, 1), env_state.flatten(0, 1))  # (T*E, Do)
        next_obs = critic_obs(next_state.flatten(0, 1), next_env_state.flatten(0, 1))
        with torch.no_grad():
            values = self.value(obs).reshape(n_t, n_e)
            next_values = self.value(next_obs).reshape(n_t, n_e)
            adv = gae(rewards, values, next_values, discounts, gamma_steps, ended | ~live, self.cfg.gae_lambda)
            returns = adv + values
        keep = live.flatten()
        obs, adv, returns = obs[keep], adv.flatten()[keep], returns.flatten()[keep]
        chain = chain.flatten(0, 1)[keep]  # (S, K+1, H, Da)
        old_logp = old_logp.flatten(0, 1)[keep]  # (S, K')
        cond = self.actor.global_cond(state.flatten(0, 1)[keep], env_state.flatten(0, 1)[keep])
        n_samples, k_ft = old_logp.shape
        denoise_discount = self.cfg.denoise_gamma ** torch.arange(k_ft - 1, -1, -1, device=dev, dtype=adv.dtype)

        metrics: dict[str, float] = {}
        pairs = n_samples * k_ft
        for _ in range(self.cfg.epochs):
            order = torch.randperm(pairs, generator=cpu_generator).to(dev)
            for start in range(0, pairs, self.cfg.minibatch_size):
                idx = order[start:start + self.cfg.minibatch_size]
                i, j = idx // k_ft, idx % k_ft
                k = self.first_ft + j
                x_k = chain[i, k]
                x_next = chain[i, k + 1]
                # One forward for the whole minibatch (one DDP forward per backward), per-sample timesteps.
                eps = self.eps_net(x_k, self.tables.timesteps.to(dev)[k], cond[i])
                mean = step_mean(x_k, eps, k, self.tables, self.steps)
                new_logp = self._logprob(x_next, mean, _per_sample(self.steps.std, k, x_next))
                mb_adv = adv[i]
                if self.cfg.norm_adv and len(idx) > 1:
                    mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                mb_adv = mb_adv * denoise_discount[j]
                ratio = torch.exp(new_logp - old_logp[i, j])
                clip = self.clips[j]
                clipped = torch.clamp(ratio, 1 - clip, 1 + clip)
                policy_loss = -torch.minimum(ratio * mb_adv, clipped * mb_adv).mean()
                step(policy_loss, self.actor_opt, self.eps_net)
                value_loss = F.mse_loss(self.value(obs[i]).squeeze(-1), returns[i])
                step(value_loss, self.value_opt, self.value)
                with torch.no_grad():
                    metrics = {"losses/policy": policy_loss.item(), "losses/value": value_loss.item(),
                               "dppo/clip_frac": ((ratio - 1).abs() > clip).float().mean().item(),
                               "dppo/approx_kl": ((ratio - 1) - torch.log(ratio)).mean().item()}
        self.storage.clear()
        self.iterations += 1
        return metrics | {"dppo/iterations": self.iterations, "dppo/adv_mean": adv.mean().item()}

    def finish(self, step, gather, generator: torch.Generator, cpu_generator: torch.Generator, unwrap,
               env_steps: int) -> dict[str, float]:
        return {}  # each PPO iteration already ends on the policy update

    def acting_critic(self, unwrap) -> None:
        return None  # DPPO learns a state value, which cannot rank chunks

    def summary(self) -> dict[str, Any]:
        return {"ppo_iterations": self.iterations}
