"""`simpo-robot run-sim --server ws://127.0.0.1:N --task T --episodes E --out DIR`: evaluate through a server.

Plays E episodes of the task, asking the policy server for a chunk whenever the previous one is used
up and executing every action of it (as LeRobot's DiffusionPolicy.select_action does in-process), and
writes DIR/eval_info.json with the keys `simpo-robot eval` writes (per_episode: episode_ix, sum_reward,
max_reward, success, seed; aggregated: avg_sum_reward, avg_max_reward, pc_success, eval_s, eval_ep_s)
plus the success rate's 95% Wilson interval and the request latency percentiles (latency_ms).

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
    seed: int = 0
    """Episode i resets with seed + i."""
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


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a success rate, in percent."""
    if n == 0:
        return (0.0, 100.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (100 * max(0.0, centre - half), 100 * min(1.0, centre + half))


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


def eval_info(results: list[EpisodeResult], eval_s: float, latency: LatencyStats | None, extra: dict[str, Any]) -> dict:
    """eval_info.json content: LeRobot's per_episode/aggregated keys plus CI and latency."""
    n = len(results)
    successes = sum(r.success for r in results)
    low, high = wilson_interval(successes, n)
    return {
        "per_episode": [
            {"episode_ix": r.episode_ix, "sum_reward": r.sum_reward, "max_reward": r.max_reward,
             "success": r.success, "seed": r.seed} for r in results
        ],
        "aggregated": {
            "avg_sum_reward": float(np.mean([r.sum_reward for r in results])),
            "avg_max_reward": float(np.mean([r.max_reward for r in results])),
            "pc_success": 100.0 * successes / n,
            "pc_success_ci95": [low, high],
            "n_episodes": n,
            "eval_s": eval_s,
            "eval_ep_s": eval_s / n,
        },
        "latency_ms": asdict(latency) if latency is not None else None,
        **extra,
    }


def run_run_sim(cfg: RunSimConfig) -> dict[str, Any]:
    from rich.progress import Progress

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
    info = eval_info(results, eval_s, latency, {
        "task": spec.name, "server": cfg.server, "policy_name": meta.policy_name, "backend": meta.backend,
    })
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / EVAL_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    agg = info["aggregated"]
    log.info("success %.1f%% (95%% CI %.1f-%.1f) over %d episodes; latency p50 %.2f ms, p99 %.2f ms over %d requests",
             agg["pc_success"], *agg["pc_success_ci95"], len(results), latency.p50, latency.p99, latency.requests)
    log.info("wrote %s", cfg.out / EVAL_INFO_FILE)
    return info
