"""`simpo-robot run-sim --server ws://127.0.0.1:N --task T --episodes E --out DIR`: evaluate through a server.

Plays E episodes of the task, asking the policy server for a chunk whenever the previous one is used
up and executing every action of it (as LeRobot's DiffusionPolicy.select_action does in-process), and
writes DIR/eval_info.json through `simpo_robot.evaluate` (the keys `simpo-robot eval` writes: per_episode
episode_ix, sum_reward, max_reward, success, seed; aggregated avg_sum_reward, avg_max_reward,
pc_success, pc_success_ci95, n_episodes, eval_s, eval_ep_s) plus the request latency percentiles
(latency_ms) and the server it used.

Episode i resets the env with seed `seed + i` (LeRobot's convention); the chunk requested at
decision k of that episode is sampled with seed SeedSequence([seed + i, k]), so a run is reproducible
and equals in-process inference of the same bundle (tested).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from simpo_robot.deploy.client import ObservationHistory, PolicyClient, ServerError, ServerMetadata
from simpo_robot.errors import SimpoRobotError

log = logging.getLogger(__name__)

EVAL_INFO_FILE = "eval_info.json"

ChunkSource = Callable[[dict[str, np.ndarray], int], np.ndarray]
"""(observation frames {name: (T, *shape)}, request seed) -> actions (n, Da)."""


@dataclass
class RunSimConfig:
    server: str = "ws://127.0.0.1:8765"
    """Policy server URL (ws://host:port)."""
    task: str = ""
    """Task name (tasks/<name>.yaml) or path to a task file."""
    episodes: int = 50
    """Episodes to play."""
    out: Path = Path("outputs/run_sim")
    """Folder for eval_info.json."""
    seed: int = 1000
    """Episode i resets with seed + i (the same default as `simpo-robot eval`)."""
    timeout_s: float = 30.0
    """Longest wait for one reply before giving up."""

    def __post_init__(self) -> None:
        if not self.task:
            raise ValueError("--task is required")
        if self.episodes < 1:
            raise ValueError(f"--episodes must be >= 1, got {self.episodes}")
        if not self.server.startswith(("ws://", "wss://")):
            raise ValueError(f"--server must be a ws:// or wss:// URL, got {self.server!r}")
        self.out = Path(self.out)


@dataclass(frozen=True)
class EpisodeResult:
    episode_ix: int
    sum_reward: float
    max_reward: float
    success: bool
    seed: int
    steps: int
    requests: int


@dataclass(frozen=True)
class LatencyStats:
    """Client round-trip latency per request, milliseconds."""

    requests: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float
    server_p50: float
    """Median time the server spent on a request (decode, queue, inference)."""

    @classmethod
    def of(cls, latencies: list[float], server: list[float]) -> LatencyStats:
        lat = np.asarray(latencies)
        q = np.percentile(lat, [50, 90, 99])
        return cls(len(lat), float(lat.mean()), float(q[0]), float(q[1]), float(q[2]), float(lat.max()),
                   float(np.median(server)) if server else math.nan)


def request_seed(episode_seed: int, decision: int) -> int:
    """The sampler seed of the decision-th chunk of an episode."""
    return int(np.random.SeedSequence([episode_seed, decision]).generate_state(1)[0])


def play_episode(env: Any, spec: Any, source: ChunkSource, n_obs_steps: int, keys: list[str],
                 episode_ix: int, seed: int) -> EpisodeResult:
    """One episode: request a chunk, execute all of it, repeat until the env ends the episode."""
    from simpo_robot.tasks import is_success

    history = ObservationHistory(n_obs_steps)
    obs, info = env.reset(seed=seed)
    history.push(obs)
    rewards: list[float] = []
    done, decisions = False, 0
    while not done:
        actions = source(history.frames(keys), request_seed(seed, decisions))
        decisions += 1
        for action in actions:
            obs, reward, terminated, truncated, info = env.step(action)
            rewards.append(float(reward))
            done = bool(terminated or truncated)
            if done:
                break
            history.push(obs)
    return EpisodeResult(episode_ix, float(sum(rewards)), float(max(rewards)), is_success(spec, info), seed,
                         len(rewards), decisions)


def check_server_fits_task(meta: ServerMetadata, env: Any, task: str) -> list[str]:
    """The observation keys to send; SimpoRobotError when the served policy does not fit the task."""
    spaces = env.observation_space.spaces
    problems = []
    for name, shape in meta.observation_features.items():
        if name not in spaces:
            problems.append(f"policy wants {name} {list(shape)}, task {task} does not give it")
        elif tuple(spaces[name].shape) != tuple(shape):
            problems.append(f"{name}: policy wants {list(shape)}, task gives {list(spaces[name].shape)}")
    action_dim = int(np.prod(env.action_space.shape))
    if meta.action_dim != action_dim:
        problems.append(f"policy acts in {meta.action_dim} dims, task {task} in {action_dim}")
    if problems:
        raise SimpoRobotError(f"the served policy {meta.policy_name!r} does not fit task {task}: " + "; ".join(problems))
    return list(meta.observation_features)


def run_run_sim(cfg: RunSimConfig) -> dict[str, Any]:
    from rich.progress import Progress

    from simpo_robot.evaluate import EpisodeResult as EvalEpisode
    from simpo_robot.evaluate import EvalResult, wilson_interval
    from simpo_robot.logging_utils import console
    from simpo_robot.tasks import load_task, make_env

    spec = load_task(cfg.task)
    client = PolicyClient(cfg.server, timeout_s=cfg.timeout_s)
    try:
        meta = client.connect()
    except (OSError, TimeoutError) as exc:
        raise SimpoRobotError(f"cannot reach the policy server at {cfg.server}: {exc}. Is `simpo-robot serve` running?") from exc
    latencies: list[float] = []
    server_ms: list[float] = []

    def source(frames: dict[str, np.ndarray], seed: int) -> np.ndarray:
        chunk = client.infer(frames, seed=seed)
        latencies.append(chunk.latency_ms)
        server_ms.append(float(chunk.timing.get("server_ms", math.nan)))
        return chunk.actions

    env = make_env(spec)
    results: list[EpisodeResult] = []
    t0 = time.perf_counter()
    try:
        keys = check_server_fits_task(meta, env, spec.name)
        log.info("playing %d episode(s) of %s through %s (%s, %s backend)", cfg.episodes, spec.name, cfg.server,
                 meta.policy_name, meta.backend)
        with Progress(console=console, transient=True) as progress:
            bar = progress.add_task("episodes", total=cfg.episodes)
            for i in range(cfg.episodes):
                results.append(play_episode(env, spec, source, meta.n_obs_steps, keys, i, cfg.seed + i))
                progress.advance(bar)
    except ServerError as exc:
        raise SimpoRobotError(f"the server refused a request: {exc}") from exc
    finally:
        env.close()
        client.close()
    eval_s = time.perf_counter() - t0
    latency = LatencyStats.of(latencies, server_ms)
    successes = sum(r.success for r in results)
    result = EvalResult(
        per_episode=[EvalEpisode(r.episode_ix, r.sum_reward, r.max_reward, r.success, r.seed) for r in results],
        success_rate=successes / len(results),
        ci95=wilson_interval(successes, len(results)),
        avg_sum_reward=float(np.mean([r.sum_reward for r in results])),
        avg_max_reward=float(np.mean([r.max_reward for r in results])),
        eval_s=eval_s,
    )
    info = result.to_eval_info(task=spec.name, policy=meta.policy_name, seed=cfg.seed, server=cfg.server,
                               backend=meta.backend, latency_ms=asdict(latency))
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / EVAL_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    agg = info["aggregated"]
    log.info("success %.1f%% (95%% CI %.1f-%.1f) over %d episodes; latency p50 %.2f ms, p99 %.2f ms over %d requests",
             agg["pc_success"], *agg["pc_success_ci95"], len(results), latency.p50, latency.p99, latency.requests)
    log.info("wrote %s", cfg.out / EVAL_INFO_FILE)
    return info
