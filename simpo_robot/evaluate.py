"""`simpo-robot eval`: roll a policy out on a task in vectorised envs; success with a 95% CI.

Writes `OUT/eval_info.json` with LeRobot's keys (`lerobot-eval` writes the same):

    per_episode: [{episode_ix, sum_reward, max_reward, success, seed}, ...]
    aggregated:  {avg_sum_reward, avg_max_reward, pc_success, eval_s, eval_ep_s}

plus `pc_success_ci95` (Wilson interval, percent), `n_episodes`, `task`, `policy` and `video_paths`.
Episode i is reset with seed `seed + i`; diffusion sampling noise is seeded per batch from the same seed,
so the same command gives the same result. `noise_scale` scales the sampler's initial noise x_T (1: the policy as
trained; 0: every chunk starts from x_T = 0, a deterministic policy with DDIM or flow sampling, as RL evaluates
SAC's mean action). `best_of` N > 1 acts by the critic a SiMPO fine-tuning run saved beside the policy: N chunks
per decision, the highest-Q one executed (`simpo_robot.rl.best_of`). An episode succeeds when `info[success_key]` is true at its
last step (termination or truncation), as in `lerobot-eval`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simpo_robot.errors import SimpoRobotError
from simpo_robot.logging_utils import console
from simpo_robot.tasks import TaskSpec, check_policy_fits_task, load_task, make_vec_env

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    policy: str = "pretrained/fetch_push"
    """Local policy folder or Hugging Face Hub repo id (cached snapshots load offline)."""
    task: str = "fetch_push"
    """Task name (a file in tasks/) or path to a task YAML."""
    episodes: int = 50
    """Number of evaluation episodes."""
    seed: int = 1000
    """Episode i is seeded seed + i."""
    batch_size: int = 25
    """Episodes run in parallel (one synchronous vector env)."""
    out: Path | None = None
    """Output folder for eval_info.json and videos (default: outputs/eval/<task>)."""
    videos: int = 0
    """Record mp4s of the first this many episodes (MUJOCO_GL=egl renders on CPU)."""
    device: str = "cpu"
    num_inference_steps: int | None = None
    """The policy's sampler steps (default: the checkpoint's)."""
    n_action_steps: int | None = None
    """Actions executed per decision, at most the chunk's length (default: the checkpoint's)."""
    noise_scale: float = 1.0
    """Scale of the sampler's initial noise x_T. 1 samples the policy as trained; 0 makes a DDIM or flow policy
    deterministic (each chunk from x_T = 0), as RL evaluates SAC's mean action."""
    torch_threads: int = 1
    """CPU threads for torch. Float rounding differs with the thread count and can flip a borderline episode;
    1 is what `finetune` uses, so its before/after numbers reproduce here."""
    best_of: int = 1
    """Act by the critic: sample this many chunks per decision and execute the one with the highest Q (the
    reference SiMPO recipe evaluates with 10). Needs the critic that `finetune --algo simpo` saves in final/;
    costs this many times the sampling. 1: the policy alone."""

    def overrides(self) -> dict[str, int]:
        """The policy config fields this evaluation changes."""
        return {k: v for k in ("num_inference_steps", "n_action_steps") if (v := getattr(self, k)) is not None}

    def __post_init__(self) -> None:
        if any(v < 1 for v in self.overrides().values()):
            raise ValueError(f"num_inference_steps and n_action_steps must be >= 1, got {self.overrides()}")
        if not (math.isfinite(self.noise_scale) and self.noise_scale >= 0):
            raise ValueError(f"noise_scale must be a finite number >= 0, got {self.noise_scale}")
        if self.best_of < 1:
            raise ValueError(f"best_of must be >= 1, got {self.best_of}")
        if self.best_of > 1 and self.noise_scale != 1.0:
            raise ValueError("best_of > 1 samples chunks with the policy's own noise; leave noise_scale at 1")
        if self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1, got {self.torch_threads}")
        if self.episodes <= 0:
            raise ValueError(f"episodes must be positive, got {self.episodes}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if not 0 <= self.videos <= self.episodes:
            raise ValueError(f"videos must be in [0, episodes={self.episodes}], got {self.videos}")


@dataclass
class EpisodeResult:
    episode_ix: int
    sum_reward: float
    max_reward: float
    success: bool
    seed: int


@dataclass
class EvalResult:
    per_episode: list[EpisodeResult]
    success_rate: float
    """Fraction of successful episodes."""
    ci95: tuple[float, float]
    """Wilson 95% interval of the success rate (fractions)."""
    avg_sum_reward: float
    avg_max_reward: float
    eval_s: float
    video_paths: list[str] = field(default_factory=list)

    def to_eval_info(self, **extra: Any) -> dict[str, Any]:
        """The `eval_info.json` dict (LeRobot's keys, success in percent)."""
        n = len(self.per_episode)
        return {
            "per_episode": [asdict(e) for e in self.per_episode],
            "aggregated": {
                "avg_sum_reward": self.avg_sum_reward,
                "avg_max_reward": self.avg_max_reward,
                "pc_success": 100.0 * self.success_rate,
                "eval_s": self.eval_s,
                "eval_ep_s": self.eval_s / n,
                "pc_success_ci95": [100.0 * self.ci95[0], 100.0 * self.ci95[1]],
                "n_episodes": n,
            },
            "video_paths": self.video_paths,
            **extra,
        }


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion: centre (p + z^2/2n) / (1 + z^2/n),
    half-width z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def evaluate_policy(
    loaded: Any,
    spec: TaskSpec,
    episodes: int,
    seed: int,
    batch_size: int = 25,
    videos: int = 0,
    video_dir: Path | None = None,
    on_step: Callable[[int, dict[str, np.ndarray]], None] | None = None,
    noise_scale: float = 1.0,
    noise_seed: int | None = None,
) -> EvalResult:
    """Roll `loaded` (a `LoadedPolicy`) out for `episodes` episodes of `spec`, seeds `seed + i`.

    `on_step(first, obs)`, if given, sees each batch's observations (episodes first, first + 1, ...) after the
    reset and after every step: a way to measure more than success along the same rollouts. The sampling noise of
    each batch is seeded from `noise_seed` (default `seed`) + its first episode, so the same episodes can be
    replayed with other noise draws."""
    from rich.progress import Progress

    check_policy_fits_task(loaded.config, spec)
    policy, pre, post = loaded.policy, loaded.preprocessor, loaded.postprocessor
    policy.eval()
    chunk_shape = (policy.config.horizon, policy.config.action_feature.shape[0])
    results: list[EpisodeResult] = []
    video_paths: list[str] = []
    start = time.time()
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task(f"eval {spec.name}", total=episodes)
        for first in range(0, episodes, batch_size):
            n = min(batch_size, episodes - first)
            n_video = max(0, min(videos - first, n))
            env = make_vec_env(spec, n, render_mode="rgb_array" if n_video else None)
            seeds = [seed + first + i for i in range(n)]
            torch.manual_seed((seed if noise_seed is None else noise_seed) + first)  # the sampler's noise
            obs, _ = env.reset(seed=seeds)
            if on_step is not None:
                on_step(first, obs)
            policy.reset()
            frames: list[list[np.ndarray]] = [[env.envs[i].render()] for i in range(n_video)]
            rewards = np.zeros((spec.max_episode_steps, n))
            done = np.zeros(n, bool)
            success = np.zeros(n, bool)
            for t in range(spec.max_episode_steps):
                batch = {k: torch.from_numpy(v) for k, v in obs.items()}
                with torch.inference_mode():
                    # At scale 1 the policy draws its own noise (the same RNG stream as without this option).
                    noise = None if noise_scale == 1.0 else noise_scale * torch.randn(n, *chunk_shape)
                    action = post(policy.select_action(pre(batch), noise=noise))
                obs, reward, term, trunc, info = env.step(action.numpy())
                if on_step is not None:
                    on_step(first, obs)
                rewards[t] = np.where(done, 0.0, reward)
                ended = (term | trunc) & ~done
                step_success = np.asarray(info.get(spec.success_key, np.zeros(n)), bool)
                success[ended] = step_success[ended]
                for i in range(n_video):
                    if not done[i]:
                        frames[i].append(env.envs[i].render())
                done |= ended
                if done.all():
                    break
            steps = t + 1
            for i in range(n):
                r = rewards[:steps, i]
                results.append(EpisodeResult(first + i, float(r.sum()), float(r.max()), bool(success[i]), seeds[i]))
            for i in range(n_video):
                video_paths.append(str(_write_video(video_dir, first + i, frames[i], spec.fps)))
            env.close()
            progress.update(bar, advance=n)
    k = sum(e.success for e in results)
    return EvalResult(
        per_episode=results,
        success_rate=k / episodes,
        ci95=wilson_interval(k, episodes),
        avg_sum_reward=float(np.mean([e.sum_reward for e in results])),
        avg_max_reward=float(np.mean([e.max_reward for e in results])),
        eval_s=time.time() - start,
        video_paths=video_paths,
    )


def _write_video(video_dir: Path | None, episode: int, frames: list[np.ndarray], fps: int) -> Path:
    from lerobot.utils.io_utils import write_video

    if video_dir is None:
        raise ValueError("video_dir is required to record videos")
    video_dir.mkdir(parents=True, exist_ok=True)
    path = video_dir / f"eval_episode_{episode}.mp4"
    write_video(path, frames, fps)
    return path


def run_eval(cfg: EvalConfig) -> EvalResult:
    from simpo_robot.policy_io import load_policy

    torch.set_num_threads(cfg.torch_threads)
    spec = load_task(cfg.task)
    loaded = load_policy(cfg.policy, device=cfg.device, overrides=cfg.overrides())
    if cfg.best_of > 1:
        from simpo_robot.rl.best_of import BestOfN
        from simpo_robot.rl.critic import load_critic

        critic, _ = load_critic(loaded.path)
        loaded = replace(loaded, policy=BestOfN(loaded.policy, critic, cfg.best_of))
    out = Path(cfg.out) if cfg.out is not None else Path("outputs/eval") / spec.name
    try:
        result = evaluate_policy(loaded, spec, cfg.episodes, cfg.seed, cfg.batch_size, cfg.videos, out / "videos",
                                 noise_scale=cfg.noise_scale)
    except RuntimeError as exc:
        if "EGL" in str(exc) or "GL" in str(exc):
            raise SimpoRobotError(f"rendering failed ({exc}); set MUJOCO_GL=egl (or osmesa) for --videos.") from exc
        raise
    out.mkdir(parents=True, exist_ok=True)
    info = result.to_eval_info(task=spec.name, policy=str(cfg.policy), seed=cfg.seed, noise_scale=cfg.noise_scale,
                               best_of=cfg.best_of)
    (out / "eval_info.json").write_text(json.dumps(info, indent=2))
    lo, hi = result.ci95
    k = sum(e.success for e in result.per_episode)
    message = (f"{spec.name}: success {100 * result.success_rate:.1f}% ({k}/{cfg.episodes}), "
               f"95% CI [{100 * lo:.1f}, {100 * hi:.1f}]%, seeds {cfg.seed}..{cfg.seed + cfg.episodes - 1}, "
               f"noise scale {cfg.noise_scale:g}{f', best of {cfg.best_of} by Q' if cfg.best_of > 1 else ''}, "
               f"{result.eval_s:.1f}s; wrote {out / 'eval_info.json'}")
    log.info(message)
    return result
