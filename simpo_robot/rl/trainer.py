"""`simpo-robot finetune`: online fine-tuning of a pretrained diffusion policy, one loop for every algorithm.

Reads top to bottom (CleanRL-style):
    seed -> task, policy -> agent (SimpoAgent or DppoAgent) -> Accelerate prepare -> envs -> loop:
        collect one action chunk in every env with the agent's sampler (one MDP step) -> agent.observe
        agent.update when it is ready (SiMPO: critic + particle-weighted denoising; DPPO: PPO epochs;
            with --overlap-updates, SiMPO's critic-only rounds run in a second thread during the next collection)
        log (metrics.jsonl + TensorBoard), evaluate periodically (learning curve), checkpoint
    -> final evaluation (also deterministic: x_T = 0), OUT/final/ (LeRobot layout + training_info.json),
       eval_info.json (and eval_info_deterministic.json), curve PNG.

Accelerate appears only here: agents take their optimiser steps through `step` (backward, clipping,
collective NaN skip) and receive `gather`/`unwrap` as plain functions. Each process runs its own
environments with its own seed; gradients are all-reduced through the prepared modules; metrics are
gathered; only the main process writes.
"""

import json
import logging
import math
import shutil
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from simpo_robot.errors import SimpoRobotError
from simpo_robot.logging_utils import console
from simpo_robot.rl.actor import DiffusionActor, FlowActor, make_actor
from simpo_robot.rl.agent import Agent, ChunkBatch
from simpo_robot.rl.chunks import chunk_return
from simpo_robot.rl.critic import save_critic
from simpo_robot.rl.dppo import DppoAgent, DppoConfig
from simpo_robot.rl.metrics import MetricsLogger, plot_learning_curve
from simpo_robot.rl.replay import Transition
from simpo_robot.rl.simpo import SimpoAgent, SimpoConfig
from simpo_robot.simpo.weighting import WEIGHTINGS
from simpo_robot.tasks import (
    OBS_ENV_STATE,
    OBS_STATE,
    TaskSpec,
    check_policy_fits_task,
    load_task,
    make_vec_env,
)

log = logging.getLogger(__name__)

ALGOS = ("simpo", "dppo")


@dataclass
class FinetuneConfig:
    """`simpo-robot finetune`: every field is a flag (`--env-steps 20000`); `--config FILE` reads YAML/JSON."""

    policy: str = "pretrained/fetch_push"
    """Pretrained policy: a local folder in LeRobot layout or a Hub repo id."""
    task: str = "fetch_push"
    """Task name (tasks/<name>.yaml) or path to a task file."""
    algo: str = "simpo"
    """Algorithm: simpo (with --weighting exp it is the softmax-reweighting baseline) or dppo."""
    weighting: str = "linear"
    """SiMPO weighting g: exp, linear, square, tanh, sigmoid, leaky_relu, clipped_linear."""
    negative_bound: float = -0.5
    """Floor b <= 0 on N * w_i: b < 0 allows negative weights (repulsion), b = 0 sparsemax-like weights."""
    env_steps: int = 20_000
    """Environment steps of fine-tuning, summed over all envs and processes (at least: the episodes in flight
    are finished, so that the run ends with a resumable checkpoint)."""
    seed: int = 0
    out: Path = Path("outputs/finetune/fetch_push")
    """Output folder: final/, eval_info.json (and eval_info_deterministic.json), metrics.jsonl, tensorboard/,
    learning_curve.png."""
    overwrite: bool = False
    """Replace `out` if it already holds a run."""
    num_envs: int = 16
    """Parallel environments per process."""
    gamma: float = 0.99
    """Discount per env step (one chunk of S steps is discounted by gamma^S)."""
    grad_clip: float = 1.0
    """Max gradient norm of every update."""
    simpo: SimpoConfig = field(default_factory=SimpoConfig)
    dppo: DppoConfig = field(default_factory=DppoConfig)
    eval_every: int = 10_000
    """Env steps between evaluations (learning curve); 0 evaluates only before and after."""
    eval_episodes: int = 20
    """Episodes per evaluation on the curve."""
    final_eval_episodes: int = 100
    """Episodes of the before/after evaluations (eval_info.json)."""
    deterministic_eval: bool = True
    """Also measure the before/after success with the sampler started from x_T = 0 (`simpo-robot eval
    --noise_scale 0`, `serve --noise_scale 0`): the deterministic policy, often 5-12 points better than the
    sampled one (BENCHMARKS.md, "noise_scale"). Costs two more evaluations of final_eval_episodes."""
    eval_seed: int = 1000
    """Evaluation episode i resets with seed eval_seed + i (same episodes before and after)."""
    log_every: int = 10
    """Chunks (MDP steps) between metric lines."""
    checkpoint_every: int = 10_000
    """Env steps between resumable checkpoints (OUT/checkpoints/last), taken at episode boundaries."""
    resume: Path | None = None
    """Resume the run in this folder from its last checkpoint (rerun the same command with --resume OUT)."""
    device: str | None = None
    """torch device; default: Accelerate's choice (cuda when available)."""
    num_inference_steps: int | None = None
    """The policy's own sampler steps (DDIM for diffusion, Euler for flow), for acting, evaluation and the saved
    policy; default: the checkpoint's. With a flow policy, 1 (and --simpo.particle-steps 1) fine-tunes
    1.7x faster than the diffusion policy at 10 (BENCHMARKS.md, sixth round)."""
    shaped_reward: bool = True
    """Train on the task's `training_env_kwargs` (fetch_push, reach and slide: the dense reward, minus the goal
    distance; fetch_pick_place has none and trains on its sparse reward). Success, evaluation and the learning
    curve always use the task's own reward and success signal."""
    torch_threads: int = 1
    """CPU threads per process. The networks are small: one thread per process (and more processes via
    `accelerate launch`) is much faster than intra-op threads, which oversubscribe a busy CPU (measured:
    20x slower particle sampling with 2 threads on 2 loaded cores)."""
    overlap_updates: bool = False
    """Run the updates that follow a chunk (SiMPO's critic updates; never an actor burst or a DPPO update) in
    a second thread while the next chunk is collected, one CPU thread each, and wait for them before anything
    else: the same updates on the same data with the same random streams, so with --torch-threads 1 the same run
    bit for bit (with more threads the critic's float rounding differs). It needs a free core: alone on the 2
    cores with --torch-threads 2 it was 1.08x faster (BENCHMARKS.md, "overlap"); beside another run it gains
    nothing, which is why it is off by default."""

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise ValueError(f"unknown algo {self.algo!r}; available: {', '.join(ALGOS)}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; choose from {', '.join(sorted(WEIGHTINGS))}")
        if not (math.isfinite(self.negative_bound) and self.negative_bound <= 0):
            raise ValueError(f"negative_bound must be a finite number <= 0, got {self.negative_bound}")
        for name in ("env_steps", "num_envs", "final_eval_episodes", "eval_episodes", "log_every", "torch_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.num_inference_steps is not None and self.algo == "dppo":
            raise ValueError("num_inference_steps is for --algo simpo; DPPO's chain is --dppo.denoising-steps")
        if self.eval_every < 0 or self.checkpoint_every < 0:
            raise ValueError("eval_every and checkpoint_every must be >= 0")
        if not (0 < self.gamma <= 1 and self.grad_clip > 0):
            raise ValueError("gamma must be in (0, 1] and grad_clip > 0")
        if self.resume is not None:
            self.out = Path(self.resume)


ADDED_OPTIONS = {(None, "num_inference_steps"): None, ("simpo", "weighting_critic_every"): 0, ("simpo", "actor_burst"): 1,
                 ("simpo", "critic_reset"): False, ("simpo", "n_step"): 1,
                 ("simpo", "critic_layer_norm"): False, ("simpo", "final_burst"): False}
"""Options added after runs may have been saved, with the value that reproduces those runs (for --resume)."""
# Fields that may differ between a run and its resumption (everything else must match). SiMPO's final burst
# only acts once the env steps are spent, so a finished run resumed with it gets exactly the end it would have had.
# A run folder may have been moved or copied since it was written (`out`).
RESUMABLE_CHANGES = {"out", "env_steps", "resume", "overwrite", "eval_every", "eval_episodes", "final_eval_episodes",
                     "log_every", "checkpoint_every", "device", "torch_threads", "deterministic_eval",
                     "overlap_updates", "simpo.final_burst"}
CONFIG_FILE = "finetune_config.json"


@dataclass
class Counters:
    """Training progress, saved with the resumable state."""

    env_steps: int = 0
    chunks: int = 0
    updates: int = 0
    """Optimiser steps taken (all networks)."""
    skipped_updates: int = 0
    """Updates skipped because the loss or the gradient was not finite."""


class ObsHistory:
    """Last O normalised observations per env (LeRobot fills the history with the first obs at reset)."""

    def __init__(self, state: torch.Tensor, env_state: torch.Tensor, n_obs_steps: int):
        self.state = state.unsqueeze(1).repeat(1, n_obs_steps, 1)  # (E, O, Ds)
        self.env_state = env_state.unsqueeze(1).repeat(1, n_obs_steps, 1)  # (E, O, De)

    def push(self, state: torch.Tensor, env_state: torch.Tensor) -> None:
        self.state = torch.cat([self.state[:, 1:], state.unsqueeze(1)], dim=1)
        self.env_state = torch.cat([self.env_state[:, 1:], env_state.unsqueeze(1)], dim=1)


class Rollout:
    """Vectorised envs played chunk by chunk with the agent's sampler; episodes run in lock-step."""

    def __init__(self, spec: TaskSpec, actor: DiffusionActor | FlowActor, pre, post, num_envs: int, seed: int, gamma: float,
                 device: torch.device):
        self.spec, self.actor, self.pre, self.post = spec, actor, pre, post
        self.num_envs, self.seed, self.gamma, self.device = num_envs, seed, gamma, device
        self.envs = None
        self.episode_index = 0
        self.recent_success: deque[float] = deque(maxlen=100)

    def _normalise(self, obs: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.pre({k: torch.as_tensor(v, dtype=torch.float32) for k, v in obs.items()})
        state = batch[OBS_STATE].to(self.device)
        env_state = batch[OBS_ENV_STATE].to(self.device) if OBS_ENV_STATE in batch else state[:, :0]
        return state, env_state

    def _reset(self) -> None:
        if self.envs is None:
            self.envs = make_vec_env(self.spec, self.num_envs)
        seeds = [self.seed + self.episode_index * self.num_envs + i for i in range(self.num_envs)]
        self.episode_index += 1
        obs, _ = self.envs.reset(seed=seeds)
        self.history = ObsHistory(*self._normalise(obs), self.actor.n_obs_steps)
        self.done = np.zeros(self.num_envs, bool)

    @torch.no_grad()
    def step_chunk(self, agent: Agent, generator: torch.Generator) -> tuple[ChunkBatch, int]:
        """Play one chunk in every env; returns the batch (with the live mask) and the env steps taken."""
        if self.envs is None or self.done.all():
            self._reset()
        live = torch.from_numpy(~self.done)
        state, env_state = self.history.state.clone(), self.history.env_state.clone()
        chunk, extras = agent.act(self.actor.global_cond(state, env_state), generator)  # (E, H, Da) model space
        executed = self.actor.executed(chunk)
        e, s, da = executed.shape
        actions = self.post(executed.reshape(e * s, da).cpu()).reshape(e, s, da).numpy()
        rewards = torch.zeros(e, s)
        alive = torch.zeros(e, s, dtype=torch.bool)
        terminated = torch.zeros(e, dtype=torch.bool)
        for k in range(s):
            if self.done.all():
                break
            obs, reward, term, trunc, info = self.envs.step(actions[:, k])
            alive[:, k] = torch.from_numpy(~self.done)
            rewards[:, k] = torch.as_tensor(reward, dtype=torch.float32)
            ended = (term | trunc) & ~self.done
            terminated |= torch.from_numpy(term & ~self.done)
            success = np.asarray(info.get(self.spec.success_key, np.zeros(e)), bool)
            for i in np.flatnonzero(ended):
                self.recent_success.append(float(success[i]))
            self.done |= ended
            self.history.push(*self._normalise(obs))
        ret = chunk_return(rewards, alive, terminated, self.gamma)
        transition = Transition(state.cpu(), env_state.cpu(), chunk.cpu(), ret.reward, ret.discount,
                                self.history.state.cpu(), self.history.env_state.cpu())
        ended_now = live & torch.from_numpy(self.done)
        gamma_steps = self.gamma ** ret.steps.to(torch.float32)
        return ChunkBatch(transition, live, ended_now, gamma_steps, extras), int(alive.sum())

    def state_dict(self) -> dict:
        """Only valid at an episode boundary: the next episode is fully determined by its index."""
        if self.envs is not None and not self.done.all():
            raise RuntimeError("rollout state can only be saved between episodes")
        return {"episode_index": self.episode_index, "recent_success": list(self.recent_success)}

    def load_state_dict(self, state: dict) -> None:
        self.episode_index = state["episode_index"]
        self.recent_success.extend(state["recent_success"])

    @property
    def between_episodes(self) -> bool:
        return self.envs is None or bool(self.done.all())

    def close(self) -> None:
        if self.envs is not None:
            self.envs.close()


def _config_dict(cfg: FinetuneConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(cfg), default=str))


# A checkpoint save writes INCOMING, moves LAST to PREVIOUS, INCOMING to LAST, then removes PREVIOUS.
INCOMING, LAST, PREVIOUS = ".incoming", "last", ".previous"


def _last_checkpoint(out: Path, what: str) -> Path:
    ckpt, previous = out / "checkpoints" / LAST, out / "checkpoints" / PREVIOUS
    if not ckpt.exists() and (previous / "trainer_rank0.pt").is_file():
        # A save killed between its two renames: PREVIOUS is the whole state the run had before that save
        # (INCOMING is not trusted), so it becomes LAST again.
        try:
            previous.rename(ckpt)
            log.warning("%s: the last checkpoint was being replaced when the run stopped; restored the one before it",
                        out)
        except FileNotFoundError:  # another process of the same run restored it first
            pass
    if not (ckpt / "trainer_rank0.pt").is_file() or not (out / CONFIG_FILE).is_file():
        raise SimpoRobotError(f"{what} {out}: no checkpoint there ({ckpt} or {out / CONFIG_FILE} is missing or "
                              "incomplete); pass the --out folder of a `simpo-robot finetune` run.")
    return ckpt


def _load_state(accelerator, ckpt: Path, rank: int, what: str) -> dict[str, Any]:
    """Restore the prepared modules and registered state from `ckpt`; returns this rank's trainer state."""
    try:
        accelerator.load_state(str(ckpt))
        return torch.load(ckpt / f"trainer_rank{rank}.pt", weights_only=False)
    except Exception as exc:  # unpickling, safetensors and shape errors all mean the same to the user
        raise SimpoRobotError(
            f"{what}: the checkpoint in {ckpt} cannot be read ({type(exc).__name__}: {exc}); it is damaged or was "
            "written by another version or command. Restore the run folder from a copy, or start the run afresh "
            "with --overwrite true.") from exc


def _policy_overrides(cfg: FinetuneConfig) -> dict[str, Any]:
    return {} if cfg.num_inference_steps is None else {"num_inference_steps": cfg.num_inference_steps}


def _saved_config(out: Path) -> dict[str, Any]:
    """The run's saved config, with options added since it was saved set to what reproduces it."""
    saved = json.loads((out / CONFIG_FILE).read_text())
    for (group, name), value in ADDED_OPTIONS.items():
        (saved if group is None else saved.get(group, {})).setdefault(name, value)
    return saved


def _write_config(cfg: FinetuneConfig, out: Path) -> None:
    """OUT/finetune_config.json, atomically (a resume reads it back)."""
    tmp = out / f".{CONFIG_FILE}.tmp"
    tmp.write_text(json.dumps(_config_dict(cfg), indent=2))
    tmp.replace(out / CONFIG_FILE)


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"simpo": {"actor_burst": 1}} -> {"simpo.actor_burst": 1}, so that a mismatch names the one option."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _check_resumable(cfg: FinetuneConfig, out: Path) -> Path:
    """The checkpoint to resume from; the saved config must match the command line (but RESUMABLE_CHANGES)."""
    ckpt = _last_checkpoint(out, "--resume")
    saved = _flat(_saved_config(out))
    current = _flat(_config_dict(cfg))
    differ = sorted(k for k in current.keys() | saved.keys()
                    if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k))
    if "shaped_reward" in differ and not load_task(cfg.task).training_env_kwargs:
        differ.remove("shaped_reward")  # the task has no shaped reward: either way the run collects the same data
    if differ:
        details = ", ".join(f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}" for k in differ)
        raise SimpoRobotError(f"--resume {out}: the command differs from the run's ({details}); rerun the same "
                              "command with --resume.")
    return ckpt


def _all_finite(*modules: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for m in modules for p in m.parameters())


def _save_checkpoint(accelerator, out: Path, rank_state: dict, modules: list[torch.nn.Module]) -> bool:
    """Resumable state into OUT/checkpoints/last, atomically: written aside, then swapped in by rename."""
    if not _all_finite(*modules):
        log.error("parameters are not finite: checkpoint not saved (the last good one is kept)")
        return False
    root = out / "checkpoints"
    tmp, last, old = root / INCOMING, root / LAST, root / PREVIOUS
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    torch.save(rank_state, tmp / f"trainer_rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(old, ignore_errors=True)
        if last.exists():
            last.rename(old)
        tmp.rename(last)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return True


def _everyone(accelerator, flag: bool, device) -> bool:
    """True when `flag` holds on every process (a collective: all ranks must call it)."""
    return bool(accelerator.gather(torch.tensor([int(flag)], device=device)).min() == 1)


def _rank_divergence(accelerator, *modules: torch.nn.Module) -> float:
    """Largest difference of any parameter between processes (0 when DDP keeps them in sync)."""
    flat = torch.cat([p.detach().flatten().float() for m in modules for p in m.parameters()]).unsqueeze(0)
    gathered = accelerator.gather(flat)  # (world, P)
    return float((gathered - gathered[:1]).abs().max())


def _grad_ok(accelerator, params, max_norm: float) -> bool:
    norm = accelerator.clip_grad_norm_(params, max_norm)
    return bool(torch.isfinite(torch.as_tensor(norm)).all())


def build_agent(cfg: FinetuneConfig, actor: DiffusionActor | FlowActor, policy_config, accelerator,
                device: torch.device) -> Agent:
    """The run's agent on `actor`, its modules prepared by `accelerator` and its shared state registered for
    checkpointing (so that `accelerator.load_state` restores it)."""
    obs_dim = actor.n_obs_steps * sum(f.shape[0] for f in policy_config.input_features.values())
    if cfg.algo == "simpo":
        agent = SimpoAgent(cfg.simpo, cfg.weighting, cfg.negative_bound, actor, obs_dim, device)
    else:
        agent = DppoAgent(cfg.dppo, cfg.gamma, actor, obs_dim, device)
    to_prepare = agent.modules_to_prepare()
    prepared = accelerator.prepare(*to_prepare.values())
    agent.set_prepared(dict(zip(to_prepare, prepared, strict=True)), accelerator.unwrap_model)
    # Identical on every rank (updated from synced modules / gathered data): saved once with the state.
    for obj in agent.shared_state():
        accelerator.register_for_checkpointing(obj)
    return agent


class SavedRun(NamedTuple):
    cfg: FinetuneConfig
    spec: TaskSpec
    loaded: Any
    """LoadedPolicy: the run's starting policy, its weights replaced by the checkpoint's"""
    agent: Agent
    summary: dict[str, Any]
    """summary.json of the run, or {} if it has none yet"""


def load_run(out: Path) -> SavedRun:
    """A fine-tuning run as its last resumable checkpoint left it, on one CPU process: policy, critic(s),
    pi_old, temperature, optimisers and rank 0's replay buffer (for probes and analysis, not for resuming)."""
    from accelerate import Accelerator

    from simpo_robot.policy_io import load_policy

    out = Path(out)
    ckpt = _last_checkpoint(out, "load_run")
    saved = _saved_config(out)
    cfg = FinetuneConfig(**{**saved, "out": out, "resume": None, "simpo": SimpoConfig(**saved["simpo"]),
                            "dppo": DppoConfig(**saved["dppo"])})
    loaded = load_policy(cfg.policy, device="cpu", overrides=_policy_overrides(cfg))
    accelerator = Accelerator(cpu=True)
    agent = build_agent(cfg, make_actor(loaded.policy), loaded.config, accelerator, torch.device("cpu"))
    agent.load_rank_state(_load_state(accelerator, ckpt, 0, f"load_run {out}")["agent"])
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    return SavedRun(cfg, load_task(cfg.task), loaded, agent, summary)


def run_finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from simpo_robot.evaluate import evaluate_policy
    from simpo_robot.policy_io import LoadedPolicy, load_policy, save_policy

    out = Path(cfg.out)
    if cfg.resume is not None:
        resume_from = _check_resumable(cfg, out)
    elif out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise SimpoRobotError(f"{out} is not empty; pass --overwrite true, --resume {out}, or another --out.")
        shutil.rmtree(out)
    torch.set_num_threads(cfg.torch_threads)
    # Without CUDA, cpu=True lets Accelerate pick MULTI_CPU (gloo) under torchrun / accelerate launch.
    accelerator = Accelerator(cpu=cfg.device == "cpu" or not torch.cuda.is_available())
    device = torch.device(cfg.device) if cfg.device else accelerator.device
    set_seed(cfg.seed, device_specific=True)
    rank, world = accelerator.process_index, accelerator.num_processes

    # --- task, policy, agent ----------------------------------------------------------------------
    spec = load_task(cfg.task)
    loaded = load_policy(cfg.policy, device=str(device), overrides=_policy_overrides(cfg))
    check_policy_fits_task(loaded.config, spec)
    if loaded.config.type not in ("diffusion", "flow") or (cfg.algo == "dppo" and loaded.config.type != "diffusion"):
        needs = "a diffusion policy" if cfg.algo == "dppo" else "a diffusion or flow policy"
        raise SimpoRobotError(f"{cfg.policy} is a {loaded.config.type!r} policy; --algo {cfg.algo} needs {needs}.")
    policy, pre, post = loaded.policy, loaded.preprocessor, loaded.postprocessor
    actor = make_actor(policy)
    agent = build_agent(cfg, actor, loaded.config, accelerator, device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank)
    cpu_generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    rollout = Rollout(training_spec(cfg, spec), actor, pre, post, cfg.num_envs, seed=cfg.seed * 1_000_000 + rank * 100_000,
                      gamma=cfg.gamma, device=device)
    counters = Counters()
    logger = MetricsLogger(out, enabled=accelerator.is_main_process)
    loaded_for_eval = LoadedPolicy(policy, pre, post, loaded.path, loaded.config)

    def evaluate(episodes: int, noise_scale: float = 1.0, loaded_policy: LoadedPolicy = loaded_for_eval):
        result = evaluate_policy(loaded_policy, spec, episodes, cfg.eval_seed, noise_scale=noise_scale)
        policy.train()
        return result

    def step(loss: torch.Tensor, optimizer, module) -> bool:
        """Backward, clip, step; a non-finite loss or gradient skips the update (and is counted)."""
        optimizer.zero_grad(set_to_none=True)
        # Every rank must take part in backward (its all-reduce), so the skip is decided collectively.
        if not _everyone(accelerator, bool(torch.isfinite(loss)), device):
            counters.skipped_updates += 1
            return False
        accelerator.backward(loss)
        if not _grad_ok(accelerator, module.parameters(), cfg.grad_clip):
            optimizer.zero_grad(set_to_none=True)
            counters.skipped_updates += 1
            return False
        optimizer.step()
        counters.updates += 1
        return True

    metrics: dict[str, float] = {}
    sim_seconds = elapsed = 0.0
    if cfg.resume is not None:
        state = _load_state(accelerator, resume_from, rank, f"--resume {out}")
        counters = Counters(**state["counters"])
        rollout.load_state_dict(state["rollout"])
        agent.load_rank_state(state["agent"])
        generator.set_state(state["generator"])
        cpu_generator.set_state(state["cpu_generator"])
        before, curve = state["before"], [tuple(p) for p in state["curve"]]
        before_det = state.get("before_deterministic")  # absent in checkpoints of older versions
        if cfg.deterministic_eval and before_det is None and accelerator.is_main_process:
            # the base policy, as loaded at the start of the run (the fine-tuned one is in `policy` now)
            base = load_policy(cfg.policy, device=str(device), overrides=_policy_overrides(cfg))
            before_det = _success_block(evaluate(cfg.final_eval_episodes, 0.0, base), cfg)
        sim_seconds, elapsed = state["sim_seconds"], state["elapsed"]
        if accelerator.is_main_process:
            _write_config(cfg, out)  # what the run last ran with (RESUMABLE_CHANGES may differ from its start)
        log.info("resumed %s at %d env steps", out, counters.env_steps)
    else:
        log.info("fine-tuning %s on %s with %s for %d env steps on %d process(es)", cfg.policy, spec.name,
                 _algo_label(cfg), cfg.env_steps, world)
        if accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            _write_config(cfg, out)
        before = _success_block(evaluate(cfg.final_eval_episodes), cfg) if accelerator.is_main_process else None
        before_det = (_success_block(evaluate(cfg.final_eval_episodes, 0.0), cfg)
                      if cfg.deterministic_eval and accelerator.is_main_process else None)
        curve = [(0, before["pc_success"])] if before else []
        if before:
            logger.log(0, {"eval/pc_success": before["pc_success"]})
    next_eval = (counters.env_steps // cfg.eval_every + 1) * cfg.eval_every if cfg.eval_every else math.inf
    next_ckpt = (counters.env_steps // cfg.checkpoint_every + 1) * cfg.checkpoint_every if cfg.checkpoint_every else math.inf
    start = time.perf_counter() - elapsed  # wall time counts across resumptions
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[status]}"))
    # Updates that may overlap the next chunk's collection run here; the main thread waits for them before it
    # does anything else with the agent, and before any collective (so each rank's collectives stay in order).
    updater = ThreadPoolExecutor(1, thread_name_prefix="updates") if cfg.overlap_updates else None
    pending: Future | None = None

    def finish_updates() -> None:
        nonlocal pending
        if pending is not None:
            done, pending = pending, None
            metrics.update(done.result())
            torch.set_num_threads(cfg.torch_threads)

    def save_checkpoint() -> None:
        rank_state = {
            "counters": asdict(counters), "rollout": rollout.state_dict(), "agent": agent.rank_state(),
            "generator": generator.get_state(), "cpu_generator": cpu_generator.get_state(),
            "before": before, "before_deterministic": before_det, "curve": curve, "sim_seconds": sim_seconds,
            "elapsed": time.perf_counter() - start,
        }
        if _save_checkpoint(accelerator, out, rank_state, agent.synced_modules()):
            log.info("checkpoint at %d env steps", counters.env_steps)

    with Progress(*columns, console=console, transient=True, disable=not accelerator.is_main_process) as progress:
        bar = progress.add_task(f"{_algo_label(cfg)} {spec.name}", total=cfg.env_steps, status="")
        # Runs finish the episodes in flight, so that the final state is a resumable one (between episodes).
        while counters.env_steps < cfg.env_steps or not rollout.between_episodes:
            # --- collect one chunk per env -----------------------------------------------------------
            t0 = time.perf_counter()
            batch, steps = rollout.step_chunk(agent, generator)
            sim_seconds += time.perf_counter() - t0
            finish_updates()
            agent.observe(batch, generator)
            counters.env_steps += int(accelerator.gather(torch.tensor([steps], device=device)).sum())
            counters.chunks += 1
            progress.update(bar, completed=min(counters.env_steps, cfg.env_steps))

            # --- update ------------------------------------------------------------------------------
            if _everyone(accelerator, agent.ready(counters.env_steps), device):
                args = (step, accelerator.gather, generator, cpu_generator, accelerator.unwrap_model, counters.env_steps)
                if updater is not None and agent.can_overlap(counters.env_steps):
                    torch.set_num_threads(1)  # a core each for the updates and the collection (and the worker
                    pending = updater.submit(agent.update, *args)  # thread keeps the count it first ran with)
                else:
                    metrics |= agent.update(*args)

            # --- log ---------------------------------------------------------------------------------
            if counters.chunks % cfg.log_every == 0:
                finish_updates()
                elapsed = time.perf_counter() - start
                rollout_success = float(np.mean(rollout.recent_success)) if rollout.recent_success else float("nan")
                success = accelerator.gather_for_metrics(torch.tensor([rollout_success], device=device))
                line = {"charts/rollout_success": float(success.nanmean()),
                        "charts/env_steps_per_s": counters.env_steps / elapsed, "charts/sim_s": sim_seconds,
                        "charts/skipped_updates": counters.skipped_updates, **metrics}
                logger.log(counters.env_steps, line)
                status = (f"success {100 * line['charts/rollout_success']:.0f}%  "
                          f"{line['charts/env_steps_per_s']:.0f} steps/s  "
                          + "  ".join(f"{k.split('/')[-1]} {v:.3g}" for k, v in metrics.items() if k.startswith("losses")))
                progress.update(bar, status=status)

            # --- evaluate ----------------------------------------------------------------------------
            if counters.env_steps >= next_eval and counters.env_steps < cfg.env_steps:
                finish_updates()
                next_eval += cfg.eval_every
                if accelerator.is_main_process:
                    result = evaluate(cfg.eval_episodes)
                    curve.append((counters.env_steps, 100 * result.success_rate))
                    logger.log(counters.env_steps, {"eval/pc_success": 100 * result.success_rate})
                    log.info("env steps %d: success %.1f%% over %d episodes", counters.env_steps,
                             100 * result.success_rate, cfg.eval_episodes)
                accelerator.wait_for_everyone()

            # --- checkpoint (between episodes, so the envs' next state is given by the episode seeds) --
            # (also at the end of the run, so that a finished run can be extended with --resume)
            at_end = counters.env_steps >= cfg.env_steps
            checkpoint_due = counters.env_steps >= next_ckpt or at_end
            if checkpoint_due:
                finish_updates()
            if checkpoint_due and cfg.checkpoint_every and _everyone(
                    accelerator, rollout.between_episodes, device):
                next_ckpt = (counters.env_steps // cfg.checkpoint_every + 1) * cfg.checkpoint_every
                save_checkpoint()
    finish_updates()
    if updater is not None:
        updater.shutdown()
    # Updates due at the end (SiMPO's final burst); the resumable state then matches final/ again.
    if final_metrics := agent.finish(step, accelerator.gather, generator, cpu_generator, accelerator.unwrap_model,
                                     counters.env_steps):
        logger.log(counters.env_steps, final_metrics)
        if cfg.checkpoint_every:
            save_checkpoint()
    rollout.close()
    wall = time.perf_counter() - start
    divergence = _rank_divergence(accelerator, *agent.synced_modules())
    if divergence > 0:
        log.error("parameters differ between processes by up to %g: gradient sync is broken", divergence)

    summary: dict[str, Any] = {}
    if accelerator.is_main_process:
        if not _all_finite(*agent.synced_modules()):  # (before evaluating: a NaN policy sends NaN actions)
            raise SimpoRobotError("the fine-tuned parameters are not finite; nothing was saved. The last good "
                                  f"resumable state is in {out / 'checkpoints' / 'last'}.")
        after = evaluate(cfg.final_eval_episodes)
        after_det = evaluate(cfg.final_eval_episodes, 0.0) if cfg.deterministic_eval else None
        curve.append((counters.env_steps, 100 * after.success_rate))
        logger.log(counters.env_steps, {"eval/pc_success": 100 * after.success_rate})
        deterministic = (before_det, after_det) if before_det is not None and after_det is not None else None
        summary = _write_outputs(cfg, out, spec, policy, pre, post, save_policy, before, after, curve, counters, wall,
                                 sim_seconds, deterministic, agent.acting_critic(accelerator.unwrap_model))
        summary |= {"num_processes": world, "rank_param_divergence": divergence, **agent.summary()}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def training_spec(cfg: FinetuneConfig, spec: TaskSpec) -> TaskSpec:
    """The task as fine-tuning collects data on it: with its training_env_kwargs (e.g. a dense reward) or as is."""
    return spec.training() if cfg.shaped_reward else spec


def critic_trained_on(cfg: FinetuneConfig, spec: TaskSpec, env_steps: int) -> dict[str, Any]:
    """What critic.json records of the data a run's critic was fitted to."""
    return {"task": spec.name, "gamma": cfg.gamma, "env_steps": env_steps,
            "env_kwargs": training_spec(cfg, spec).env_kwargs}


def _success_block(result, cfg: FinetuneConfig) -> dict[str, Any]:
    lo, hi = result.ci95
    return {"pc_success": 100 * result.success_rate, "n_episodes": len(result.per_episode),
            "first_seed": cfg.eval_seed, "ci95": [100 * lo, 100 * hi]}


def _algo_label(cfg: FinetuneConfig) -> str:
    return f"simpo/{cfg.weighting} (b={cfg.negative_bound:g})" if cfg.algo == "simpo" else cfg.algo


def _write_outputs(cfg, out, spec, policy, pre, post, save_policy, before, after, curve, counters, wall,
                   sim_seconds, deterministic=None, critic=None) -> dict[str, Any]:
    """Write final/ (shareable artifact + training_info.json + curve), eval_info.json and the curve PNG.

    `deterministic`: (before block, after EvalResult) at noise scale 0, or None (not measured).
    `critic`: a TwinCritic saved beside the policy (critic.safetensors, critic.json) for best-of-N acting, or None."""
    final = out / "final"
    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_policy(policy, tmp, pre, post)
    if critic is not None:
        save_critic(tmp, critic, critic_trained_on(cfg, spec, counters.env_steps))
    plot_learning_curve(curve, tmp / "learning_curve.png", title=f"{_algo_label(cfg)} on {spec.name}")
    shutil.copy(tmp / "learning_curve.png", out / "learning_curve.png")
    info = {
        "base_model": str(cfg.policy), "task": spec.name, "algorithm": cfg.algo,
        "weighting": cfg.weighting if cfg.algo == "simpo" else None,
        "weighting_params": {"negative_bound": cfg.negative_bound} if cfg.algo == "simpo" else None,
        "algorithm_params": asdict(cfg.simpo if cfg.algo == "simpo" else cfg.dppo),
        "env_steps": counters.env_steps, "control_hz": spec.fps, "seed": cfg.seed,
        "success_before": before, "success_after": _success_block(after, cfg),
        "learning_curve": "learning_curve.png", "curve": curve,
    }
    if deterministic is not None:
        info |= {"success_before_deterministic": deterministic[0],
                 "success_after_deterministic": _success_block(deterministic[1], cfg)}
    (tmp / "training_info.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)  # the artifact appears whole or not at all
    eval_info = after.to_eval_info(task=spec.name, policy=str(final), seed=cfg.eval_seed)
    (out / "eval_info.json").write_text(json.dumps(eval_info, indent=2))
    if deterministic is not None:
        info_det = deterministic[1].to_eval_info(task=spec.name, policy=str(final), seed=cfg.eval_seed, noise_scale=0.0)
        (out / "eval_info_deterministic.json").write_text(json.dumps(info_det, indent=2))
    summary = {
        "pc_success_before": before["pc_success"], "pc_success_after": 100 * after.success_rate,
        "env_steps": counters.env_steps, "wall_s": wall, "env_steps_per_s": counters.env_steps / wall,
        "sim_s": sim_seconds, "curve": curve, **asdict(counters),
    }
    if deterministic is not None:
        summary |= {"pc_success_deterministic_before": deterministic[0]["pc_success"],
                    "pc_success_deterministic_after": 100 * deterministic[1].success_rate}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("success %.1f%% -> %.1f%% (%d episodes, seeds %d..) in %d env steps, %.0f s; wrote %s",
             before["pc_success"], 100 * after.success_rate, len(after.per_episode), cfg.eval_seed,
             counters.env_steps, wall, final)
    if deterministic is not None:
        log.info("deterministic sampling (x_T = 0): %.1f%% -> %.1f%%", summary["pc_success_deterministic_before"],
                 summary["pc_success_deterministic_after"])
    return summary
