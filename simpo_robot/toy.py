"""`simpo-robot toy`: SiMPO weightings on a 2-D action space with a known multimodal reward.

The landscape on [-1, 1]^2 (see `toy_reward`): one narrow best mode (height 1), one wide deceptive
local mode (height 0.5), and a wide bad region (the lower 40% of the square, reward -1). A small
diffusion policy is first behaviour-cloned on uniform samples (it covers everything), then fine-tuned
with SiMPO's two-stage update using the *true* reward as Q, for the same number of updates and seeds
per weighting:

    particles a_1..a_N ~ pi_old (+ Gaussian exploration noise)     pi_old: copy refreshed periodically
    w = N * solve_weights(r(a), lambda, g, b).weights              mean weight 1
    loss = weighted_denoising_loss(eps_theta(x_t, t), eps, w)      all denoising steps, clipped
    lambda learned toward a target KL of the weights from uniform

Shape glossary: N particles, Da = 2 action dimension, M = N samples in a denoising batch.
"""

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import Tensor, nn

from simpo_robot.errors import SimpoRobotError
from simpo_robot.logging_utils import console
from simpo_robot.simpo import (
    LearnedTemperature,
    diffuse,
    make_noise_scheduler,
    solve_weights,
    weight_kl_from_uniform,
    weighted_denoising_loss,
)
from simpo_robot.simpo.weighting import WEIGHTINGS

log = logging.getLogger(__name__)

# The landscape. Centres and widths are in action units on [-1, 1]^2.
BEST_CENTRE, BEST_WIDTH, BEST_HEIGHT = (0.5, 0.5), 0.12, 1.0
DECOY_CENTRE, DECOY_WIDTH, DECOY_HEIGHT = (-0.5, 0.4), 0.25, 0.5
BAD_EDGE, BAD_SHARPNESS = -0.2, 0.05  # reward -> -1 below y = BAD_EDGE
BEST_RADIUS = 0.2  # "in the best mode": within this distance of BEST_CENTRE


def toy_reward(actions: Tensor) -> Tensor:
    """r(a) for actions (M, 2) -> (M,): best bump + deceptive bump - smooth step over the bad region."""

    def bump(centre: tuple[float, float], width: float, height: float) -> Tensor:
        sq = ((actions - actions.new_tensor(centre)) ** 2).sum(-1)
        return height * torch.exp(-sq / (2 * width**2))

    bad = torch.sigmoid((BAD_EDGE - actions[:, 1]) / BAD_SHARPNESS)
    return bump(BEST_CENTRE, BEST_WIDTH, BEST_HEIGHT) + bump(DECOY_CENTRE, DECOY_WIDTH, DECOY_HEIGHT) - bad


def best_mode_mass(actions: Tensor) -> float:
    """Fraction of actions (M, 2) within BEST_RADIUS of the best mode."""
    return ((actions - actions.new_tensor(BEST_CENTRE)).norm(dim=-1) < BEST_RADIUS).float().mean().item()


def bad_region_mass(actions: Tensor) -> float:
    """Fraction of actions (M, 2) in the bad region (y < BAD_EDGE)."""
    return (actions[:, 1] < BAD_EDGE).float().mean().item()


@dataclass
class ToyConfig:
    """Configuration of the toy benchmark (`simpo-robot toy --field value`)."""

    # Weightings to compare, each "name" or "name@negative_bound" (e.g. "linear@-0.5"); names from
    # simpo_robot.simpo.WEIGHTINGS. A missing bound means 0.
    variants: list[str] = field(default_factory=lambda: ["exp", "linear@0", "linear@-0.5", "square"])
    # Number of fine-tuning seeds per variant (seeds 0..seeds-1). Every run starts from the same
    # pretrained policy, so differences between variants come from the weighting alone.
    seeds: int = 3
    # SiMPO updates per run (the same for every variant).
    updates: int = 150
    # Particles N drawn from pi_old per update.
    particles: int = 256
    # Std of the Gaussian exploration noise added to particles (the reference recipe uses 0.2).
    particle_noise: float = 0.1
    # pi_old is refreshed from the policy every this many updates.
    refresh_every: int = 10
    # Target KL(weights || uniform) for the learned temperature, and its initial value.
    target_kl: float = 1.0
    init_temperature: float = 1.0
    # Adam learning rates of the denoiser and of the temperature's parameter.
    lr: float = 1e-3
    temperature_lr: float = 0.05
    # Behaviour-cloning steps on uniform actions (batch `particles`) that make the starting policy,
    # their learning rate, and the seed of that policy.
    pretrain_steps: int = 1500
    pretrain_lr: float = 3e-3
    pretrain_seed: int = 0
    # DDPM steps (train and sampling; cosine schedule like LeRobot's DiffusionPolicy).
    denoising_steps: int = 20
    # Hidden width of the 3-layer MLP denoiser.
    hidden: int = 128
    # Samples used for each evaluation, and the evaluation period (in updates) for the curves.
    eval_samples: int = 1000
    eval_every: int = 5
    # Torch CPU threads. The networks are tiny, so one thread is fastest (no threading overhead).
    threads: int = 1
    # Write results as JSON here ({"results": [...]}), and a before/after PNG here.
    json: str | None = None
    plot: str | None = None

    def __post_init__(self):
        for name, value in [("seeds", self.seeds), ("updates", self.updates), ("particles", self.particles),
                            ("refresh_every", self.refresh_every), ("denoising_steps", self.denoising_steps),
                            ("hidden", self.hidden), ("eval_samples", self.eval_samples),
                            ("eval_every", self.eval_every), ("threads", self.threads)]:
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.pretrain_steps < 0 or self.particle_noise < 0 or self.target_kl < 0:
            raise ValueError("pretrain_steps, particle_noise and target_kl must be >= 0")
        if not (self.lr > 0 and self.temperature_lr > 0 and self.init_temperature > 0 and self.pretrain_lr > 0):
            raise ValueError("lr, pretrain_lr, temperature_lr and init_temperature must be > 0")
        if not self.variants:
            raise ValueError("variants must name at least one weighting")
        self.parsed_variants()  # validates the names and bounds

    def parsed_variants(self) -> list[tuple[str, float]]:
        out = []
        for spec in self.variants:
            name, _, bound = spec.partition("@")
            if name not in WEIGHTINGS:
                raise ValueError(f"unknown weighting {name!r} in variant {spec!r}; choose from {sorted(WEIGHTINGS)}")
            try:
                b = float(bound) if bound else 0.0
            except ValueError as exc:
                raise ValueError(f"variant {spec!r}: negative bound {bound!r} is not a number") from exc
            if not (math.isfinite(b) and b <= 0):
                raise ValueError(f"variant {spec!r}: the negative bound must be a finite number <= 0")
            out.append((name, b))
        return out


class ToyDenoiser(nn.Module):
    """eps_theta(x_t, t): a 3-layer Mish MLP on the noisy action and a sinusoidal timestep embedding."""

    def __init__(self, action_dim: int = 2, hidden: int = 128, time_dim: int = 32):
        super().__init__()
        self.time_dim = time_dim
        self.net = nn.Sequential(
            nn.Linear(action_dim + time_dim, hidden), nn.Mish(),
            nn.Linear(hidden, hidden), nn.Mish(),
            nn.Linear(hidden, hidden), nn.Mish(),
            nn.Linear(hidden, action_dim),
        )

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """x: (M, Da), t: (M,) integer timesteps -> eps: (M, Da)."""
        half = self.time_dim // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=x.dtype) / half)
        angles = t.to(x.dtype).unsqueeze(-1) * freqs
        return self.net(torch.cat([x, torch.sin(angles), torch.cos(angles)], dim=-1))


@torch.no_grad()
def sample_actions(model: ToyDenoiser, scheduler, n: int, generator: torch.Generator) -> Tensor:
    """DDPM ancestral sampling of n actions (n, 2), timesteps passed explicitly to scheduler.step."""
    x = torch.randn(n, 2, generator=generator)
    for t in scheduler.timesteps:
        eps = model(x, torch.full((n,), int(t), dtype=torch.long))
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
    return x


def denoising_step_loss(model: ToyDenoiser, scheduler, actions: Tensor, weights: Tensor,
                        generator: torch.Generator) -> Tensor:
    """Weighted denoising loss of the model on actions (M, 2), one random timestep per sample."""
    m = actions.shape[0]
    noise = torch.randn(actions.shape, generator=generator)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (m,), generator=generator)
    noisy = diffuse(scheduler.alphas_cumprod, actions, noise, t)
    return weighted_denoising_loss(model(noisy, t), noise, weights)


def pretrain(cfg: ToyConfig, scheduler) -> ToyDenoiser:
    """Behaviour-clone a policy on uniform actions over [-1, 1]^2 (it covers the whole landscape)."""
    torch.manual_seed(cfg.pretrain_seed)
    gen = torch.Generator().manual_seed(cfg.pretrain_seed)
    model = ToyDenoiser(hidden=cfg.hidden)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.pretrain_lr)
    ones = torch.ones(cfg.particles)
    for _ in range(cfg.pretrain_steps):
        actions = torch.rand(cfg.particles, 2, generator=gen) * 2 - 1
        loss = denoising_step_loss(model, scheduler, actions, ones, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@dataclass
class CurvePoint:
    update: int
    reward: float
    best_mode_mass: float
    bad_region_mass: float


@dataclass
class ToyResult:
    """One (weighting, bound, seed) run; the first five fields are the benchmark's JSON schema."""

    weighting: str
    negative_bound: float
    seed: int
    final_reward: float
    best_mode_mass: float
    bad_region_mass: float
    # Mean over updates of the negative mass of the normalised weights, sum_i max(-w_i, 0).
    negative_mass: float
    curve: list[CurvePoint]
    wall_s: float


def evaluate(model: ToyDenoiser, scheduler, cfg: ToyConfig, update: int, seed: int) -> tuple[CurvePoint, Tensor]:
    # A fixed evaluation stream per seed, so curves of different weightings are comparable.
    actions = sample_actions(model, scheduler, cfg.eval_samples, torch.Generator().manual_seed(10_000 + seed))
    point = CurvePoint(update, toy_reward(actions).mean().item(), best_mode_mass(actions), bad_region_mass(actions))
    return point, actions


def finetune(cfg: ToyConfig, base: ToyDenoiser, scheduler, weighting: str, bound: float, seed: int,
             ) -> tuple[ToyResult, Tensor]:
    """SiMPO fine-tuning of a copy of `base`; returns the result and final evaluation samples."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(1 + seed)
    model = copy.deepcopy(base)
    pi_old = copy.deepcopy(model).requires_grad_(False)
    temperature = LearnedTemperature(cfg.init_temperature, cfg.target_kl)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    temp_opt = torch.optim.Adam(temperature.parameters(), lr=cfg.temperature_lr)
    curve = [evaluate(model, scheduler, cfg, 0, seed)[0]]
    negative_mass = 0.0
    for update in range(1, cfg.updates + 1):
        if update % cfg.refresh_every == 1 or cfg.refresh_every == 1:
            pi_old.load_state_dict(model.state_dict())
        particles = sample_actions(pi_old, scheduler, cfg.particles, gen)
        particles = (particles + cfg.particle_noise * torch.randn(particles.shape, generator=gen)).clamp(-1, 1)
        q = toy_reward(particles)
        normalised = solve_weights(q, temperature.value, weighting, bound).weights
        negative_mass += torch.clamp(normalised, max=0).abs().sum().item() / cfg.updates
        loss = denoising_step_loss(model, scheduler, particles, cfg.particles * normalised, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        temp_loss = temperature.loss(normalised.unsqueeze(0))
        temp_opt.zero_grad()
        temp_loss.backward()
        temp_opt.step()
        if update % cfg.eval_every == 0 or update == cfg.updates:
            point, _ = evaluate(model, scheduler, cfg, update, seed)
            curve.append(point)
            log.debug("%s@%s seed %d update %d: %s lambda=%.3g kl=%.3f", weighting, bound, seed, update, point,
                      temperature.value, weight_kl_from_uniform(normalised.unsqueeze(0)).item())
    final, actions = evaluate(model, scheduler, cfg, cfg.updates, seed)
    result = ToyResult(weighting, bound, seed, final.reward, final.best_mode_mass, final.bad_region_mass,
                       negative_mass, curve, time.perf_counter() - start)
    return result, actions


def mass_at(curve: list[CurvePoint], update: int) -> float:
    """Bad-region mass at the last evaluated update <= `update`."""
    return [p for p in curve if p.update <= update][-1].bad_region_mass


def first_update_below(curve: list[CurvePoint], threshold: float) -> int | None:
    """First evaluated update at which the bad-region mass is below threshold (None: never)."""
    return next((p.update for p in curve if p.bad_region_mass < threshold), None)


BAD_THRESHOLD = 0.05
EARLY_UPDATE = 10  # where the table reads the bad-region mass to compare how fast it empties


def summary_table(results: list[ToyResult], variants: list[tuple[str, float]], baseline: CurvePoint) -> Table:
    def mean_std(values: list[float]) -> str:
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        return f"{mean:.3f} ± {std:.3f}"

    table = Table(title="SiMPO toy benchmark (mean ± std over seeds)")
    # reward / best / bad: final mean reward, best-mode mass, bad-region mass; bad@K: bad-region mass
    # after K updates; to bad<5%: first update (mean over the runs that got there) with bad mass < 5%.
    for col in ("weighting", "b", "reward", "best", "bad", f"bad@{EARLY_UPDATE}", f"to bad<{BAD_THRESHOLD:.0%}"):
        table.add_column(col, justify="right")
    table.add_row("pretrained", "", f"{baseline.reward:.3f}", f"{baseline.best_mode_mass:.3f}",
                  f"{baseline.bad_region_mass:.3f}", "", "")
    for name, bound in variants:
        runs = [r for r in results if r.weighting == name and r.negative_bound == bound]
        reached = [first_update_below(r.curve, BAD_THRESHOLD) for r in runs]
        hit = [u for u in reached if u is not None]
        speed = f"{sum(hit) / len(hit):.0f} ({len(hit)}/{len(runs)})" if hit else f"never (0/{len(runs)})"
        table.add_row(name, f"{bound:g}", mean_std([r.final_reward for r in runs]),
                      mean_std([r.best_mode_mass for r in runs]), mean_std([r.bad_region_mass for r in runs]),
                      mean_std([mass_at(r.curve, EARLY_UPDATE) for r in runs]), speed)
    return table


def plot_samples(path: Path, before: Tensor, after: dict[str, Tensor]) -> None:
    """Reward heat map with samples of the pretrained policy and of each fine-tuned variant (one seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = torch.linspace(-1, 1, 200)
    xx, yy = torch.meshgrid(grid, grid, indexing="xy")
    reward = toy_reward(torch.stack([xx.flatten(), yy.flatten()], -1)).reshape(200, 200)
    panels = {"pretrained": before, **after}
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, actions) in zip(axes[0], panels.items(), strict=True):
        ax.imshow(reward.numpy(), extent=(-1, 1, -1, 1), origin="lower", cmap="RdYlGn", vmin=-1, vmax=1)
        pts = actions[:1000].numpy()
        ax.scatter(pts[:, 0], pts[:, 1], s=2, c="black", alpha=0.5)
        ax.set_title(title, fontsize=9)
        ax.set_xlim(-1, 1)
        ax.set_ylim(-1, 1)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_toy(cfg: ToyConfig) -> list[ToyResult]:
    """Run every variant for every seed; print the table; write JSON/PNG when asked."""
    for out in (cfg.json, cfg.plot):
        if out and Path(out).is_dir():
            raise SimpoRobotError(f"{out} is a directory; give a file path")
    variants = cfg.parsed_variants()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        scheduler = make_noise_scheduler(num_train_timesteps=cfg.denoising_steps)
        scheduler.set_timesteps(cfg.denoising_steps)
        results: list[ToyResult] = []
        after_samples = {}
        start = time.perf_counter()
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task("pretraining the starting policy", total=cfg.seeds * len(variants))
            base = pretrain(cfg, scheduler)
            baseline, before_samples = evaluate(base, scheduler, cfg, 0, seed=0)
            for seed in range(cfg.seeds):
                for name, bound in variants:
                    progress.update(task, description=f"{name}@{bound:g} (seed {seed})")
                    result, samples = finetune(cfg, base, scheduler, name, bound, seed)
                    results.append(result)
                    if seed == 0:
                        after_samples[f"{name} b={bound:g}"] = samples
                    progress.advance(task)
    finally:
        torch.set_num_threads(threads)
    console.print(summary_table(results, variants, baseline))
    log.info("toy benchmark: %d runs in %.1f s", len(results), time.perf_counter() - start)
    if cfg.json:
        path = Path(cfg.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "config": {k: v for k, v in asdict(cfg).items() if k not in ("json", "plot")},
            "pretrained": asdict(baseline),
            "results": [asdict(r) for r in results],
        }
        path.write_text(json.dumps(payload, indent=2))
        log.info("wrote %s", path)
    if cfg.plot:
        plot_samples(Path(cfg.plot), before_samples, after_samples)
        log.info("wrote %s", cfg.plot)
    return results
