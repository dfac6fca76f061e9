"""`simpo-robot collect`: record scripted-expert demonstrations as a LeRobot dataset on local disk.

The dataset is written with `LeRobotDataset.create(root=out)` and never pushed, so it loads with
`LeRobotDataset(repo_id, root=out)` and `lerobot-train --dataset.repo_id=local/<task> --dataset.root=out`
trains on it as on any Hub dataset. Per frame it stores the task's LeRobot observation features,
`action`, and `next.reward` / `next.success` / `next.done`.

Episodes run in a vector env in batches; attempt `i` is seeded `seed + i`, so the same config gives the
same dataset. By default only successful episodes are kept, until `episodes` are recorded.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from simpo_robot.errors import SimpoRobotError
from simpo_robot.logging_utils import console
from simpo_robot.tasks import ACTION, TaskSpec, load_task, make_vec_env, policy_features

log = logging.getLogger(__name__)


@dataclass
class CollectConfig:
    task: str = "fetch_push"
    """Task name (a file in tasks/) or path to a task YAML."""
    out: Path = Path("outputs/datasets/fetch_push")
    """Dataset folder to create (LeRobot layout: meta/, data/)."""
    episodes: int = 50
    """Number of episodes to record."""
    noise: float = 0.0
    """Std of the Gaussian noise on the expert's position actions."""
    seed: int = 0
    """Attempt i is seeded seed + i (env reset and expert noise)."""
    num_envs: int = 10
    """Episodes run in parallel (one synchronous vector env)."""
    keep_failures: bool = False
    """Record failed episodes too (default: only successful ones)."""
    max_attempts_factor: int = 3
    """Give up after episodes * this many attempts."""
    overwrite: bool = False
    """Delete `out` first if it exists."""
    success_tail: int | None = 10
    """Record a successful episode only up to this many steps after its first success (None: to the end).
    Scripted experts solve Fetch tasks in a fraction of the 50 steps and then hold still; without the cut
    most frames would be near-zero actions that drown the informative part of the demonstration."""

    def __post_init__(self) -> None:
        if self.episodes <= 0:
            raise ValueError(f"episodes must be positive, got {self.episodes}")
        if self.num_envs <= 0:
            raise ValueError(f"num_envs must be positive, got {self.num_envs}")
        if self.noise < 0:
            raise ValueError(f"noise must be >= 0, got {self.noise}")
        if self.success_tail is not None and self.success_tail < 0:
            raise ValueError(f"success_tail must be >= 0, got {self.success_tail}")
        if self.max_attempts_factor < 1:
            raise ValueError(f"max_attempts_factor must be >= 1, got {self.max_attempts_factor}")


class CollectResult(NamedTuple):
    path: Path
    episodes: int
    """Episodes recorded."""
    attempts: int
    """Episodes run."""
    frames: int
    expert_success: float
    """Fraction of the attempts that succeeded."""


def dataset_features(spec: TaskSpec) -> dict[str, dict]:
    """LeRobot dataset features (dtype, shape, names) for a task, from its env spaces."""
    feats = policy_features(spec)
    out = {
        name: {"dtype": "float32", "shape": tuple(f.shape), "names": None}
        for name, f in {**feats.inputs, **feats.outputs}.items()
    }
    out["next.reward"] = {"dtype": "float32", "shape": (1,), "names": None}
    out["next.success"] = {"dtype": "bool", "shape": (1,), "names": None}
    out["next.done"] = {"dtype": "bool", "shape": (1,), "names": None}
    return out


def run_collect(cfg: CollectConfig) -> CollectResult:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from rich.progress import Progress

    from simpo_robot.experts import ScriptedExpert

    spec = load_task(cfg.task)
    if spec.expert is None:
        raise SimpoRobotError(f"task {spec.name} has no scripted expert; record demonstrations another way.")
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise SimpoRobotError(f"{out} exists and is not empty; pass --overwrite true or another --out.")
        shutil.rmtree(out)
    elif out.exists():
        out.rmdir()  # LeRobot creates the root itself and refuses an existing one

    dataset = LeRobotDataset.create(
        repo_id=f"local/{spec.name}", fps=spec.fps, features=dataset_features(spec), root=out,
        robot_type="fetch" if spec.name.startswith("fetch") else None, use_videos=False, video_backend="pyav",
    )
    expert = ScriptedExpert(spec.expert, cfg.noise)
    env = make_vec_env(spec, cfg.num_envs)
    B, T = cfg.num_envs, spec.max_episode_steps
    recorded = attempts = successes = frames = 0
    start = time.time()
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task(f"collect {spec.name}", total=cfg.episodes)
        while recorded < cfg.episodes and attempts < cfg.episodes * cfg.max_attempts_factor:
            seeds = [cfg.seed + attempts + i for i in range(B)]
            rng = np.random.default_rng(seeds)
            obs, _ = env.reset(seed=seeds)
            steps: list[dict[str, np.ndarray]] = []
            done = np.zeros(B, bool)
            success = np.zeros(B, bool)
            length = np.full(B, T)
            first_success = np.full(B, T)
            for t in range(T):
                action = expert(obs, rng)
                next_obs, reward, term, trunc, info = env.step(action)
                step_success = np.asarray(info.get(spec.success_key, np.zeros(B)), bool)
                ended = (term | trunc) & ~done
                steps.append({**obs, ACTION: action, "next.reward": reward.astype(np.float32),
                              "next.success": step_success, "next.done": term | trunc})
                success[ended] = step_success[ended]
                first_success = np.where(step_success & (first_success == T) & ~done, t, first_success)
                length[ended] = t + 1
                done |= ended
                obs = next_obs
                if done.all():
                    break
            attempts += B
            successes += int(success.sum())
            for i in range(B):
                if recorded >= cfg.episodes or not (success[i] or cfg.keep_failures):
                    continue
                if success[i] and cfg.success_tail is not None:
                    length[i] = min(length[i], first_success[i] + 1 + cfg.success_tail)
                for t in range(length[i]):
                    frame = {k: np.asarray(v[i], dtype=np.float32).reshape(-1) for k, v in steps[t].items()
                             if k not in ("next.success", "next.done")}
                    frame["next.success"] = np.array([steps[t]["next.success"][i]], bool)
                    frame["next.done"] = np.array([t == length[i] - 1], bool)
                    frame["task"] = spec.description or spec.name
                    dataset.add_frame(frame)
                dataset.save_episode()
                recorded += 1
                frames += int(length[i])
                progress.update(bar, completed=recorded)
    dataset.finalize()
    env.close()
    if recorded < cfg.episodes:
        raise SimpoRobotError(
            f"only {recorded} of {cfg.episodes} episodes succeeded in {attempts} attempts (noise {cfg.noise}); "
            "lower --noise, raise --max_attempts_factor, or pass --keep_failures true."
        )
    rate = successes / max(attempts, 1)
    log.info("recorded %d episodes (%d frames) of %s in %s in %.1fs; expert success %.1f%% over %d attempts",
             recorded, frames, spec.name, out, time.time() - start, 100 * rate, attempts)
    return CollectResult(out, recorded, attempts, frames, rate)
