"""Tasks: one declarative YAML file each in `tasks/`, parsed into a typed `TaskSpec`.

A task names a gymnasium env (id, kwargs, the package that registers it), how its raw observation
maps onto LeRobot's features, the success signal in `info`, the episode length and its scripted expert.

The observation mapping lists *sources* per LeRobot feature, concatenated in order. A source is a key
of the raw (dict) observation, optionally sliced: `"desired_goal"`, `"observation[3:9]"`.

    observation.state              the robot (proprioception)
    observation.environment_state  the rest of the world: objects and the goal

Feature shapes are derived from the env's observation and action spaces (`policy_features`), never typed
by hand. Episode success is `info[success_key]` at the episode's last step (termination or truncation),
as LeRobot's evaluation counts it.
"""

from __future__ import annotations

import importlib
import re
import types
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

import draccus
import gymnasium as gym
import numpy as np

from simpo_robot.errors import SimpoRobotError

OBS_STATE = "observation.state"
OBS_ENV_STATE = "observation.environment_state"
ACTION = "action"

TASKS_DIR = Path(__file__).resolve().parent.parent / "tasks"

_SOURCE = re.compile(r"^(?P<key>[A-Za-z_][\w]*)(\[(?P<start>\d*):(?P<stop>\d*)\])?$")


@dataclass(frozen=True)
class ObsSource:
    """One slice of the raw observation: `raw[key][start:stop]` (`key` alone for a non-dict space)."""

    key: str
    start: int | None = None
    stop: int | None = None

    @classmethod
    def parse(cls, text: str) -> ObsSource:
        m = _SOURCE.match(text.strip())
        if m is None:
            raise ValueError(f"bad observation source {text!r}: expected 'key' or 'key[start:stop]'")
        start, stop = m["start"], m["stop"]
        return cls(m["key"], int(start) if start else None, int(stop) if stop else None)

    def take(self, raw: dict[str, np.ndarray]) -> np.ndarray:
        """(..., D_key) -> (..., stop - start)."""
        return np.asarray(raw[self.key])[..., self.start : self.stop]


@dataclass
class TaskSpec:
    """A task, as written in `tasks/<name>.yaml`."""

    name: str
    """Short name, also the file name (`fetch_push`)."""
    env_id: str
    """Gymnasium id, e.g. `FetchPush-v4`."""
    env_package: str
    """Module whose import registers the env id (`gymnasium_robotics`, `gym_pusht`)."""
    max_episode_steps: int
    """Episode length (the env registration's, e.g. 50 for Fetch)."""
    state: list[str]
    """Sources concatenated into `observation.state` (the robot)."""
    environment_state: list[str]
    """Sources concatenated into `observation.environment_state` (objects and goal)."""
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for `gym.make`."""
    training_env_kwargs: dict[str, Any] = field(default_factory=dict)
    """Overrides of `env_kwargs` for the fine-tuning envs only (e.g. a shaped reward); evaluation, success and
    every other command use `env_kwargs`."""
    fps: int = 25
    """Control frequency (1 / env step duration), stored in recorded datasets."""
    success_key: str = "is_success"
    """Key of `info` that is truthy when the task is solved."""
    expert: str | None = None
    """Name of the scripted expert in `simpo_robot.experts.EXPERTS`, or null."""
    description: str = ""
    """One line for humans."""

    def training(self) -> TaskSpec:
        """This task with `training_env_kwargs` applied (what `simpo-robot finetune` trains on)."""
        return replace(self, env_kwargs={**self.env_kwargs, **self.training_env_kwargs})

    def __post_init__(self) -> None:
        if self.max_episode_steps <= 0:
            raise ValueError(f"task {self.name}: max_episode_steps must be positive, got {self.max_episode_steps}")
        if self.fps <= 0:
            raise ValueError(f"task {self.name}: fps must be positive, got {self.fps}")
        if not self.state:
            raise ValueError(f"task {self.name}: `state` needs at least one source")
        for text in [*self.state, *self.environment_state]:
            ObsSource.parse(text)  # raises on a malformed source

    @property
    def state_sources(self) -> list[ObsSource]:
        return [ObsSource.parse(s) for s in self.state]

    @property
    def env_state_sources(self) -> list[ObsSource]:
        return [ObsSource.parse(s) for s in self.environment_state]


def available_tasks() -> list[str]:
    """Names of the task files shipped in `tasks/`."""
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def load_task(name_or_path: str | Path) -> TaskSpec:
    """Load `tasks/<name>.yaml`, or a YAML file given by path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = TASKS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise SimpoRobotError(f"unknown task {str(name_or_path)!r}; known tasks: {', '.join(available_tasks())}.")
    try:
        with path.open() as f:
            return draccus.load(TaskSpec, f)
    except Exception as exc:  # draccus/yaml raise many types; the innermost message says what to fix
        root = exc
        while root.__cause__ is not None:
            root = root.__cause__
        raise SimpoRobotError(f"task file {path} is invalid: {root}") from exc


# --- environments ---------------------------------------------------------------------------------


@cache
def _register(package: str) -> None:
    """Import the package that registers the env ids (once), with the MuJoCo compatibility fix."""
    module = importlib.import_module(package)
    if package == "gymnasium_robotics":
        _patch_mujoco_joint_types()
        gym.register_envs(module)


def _patch_mujoco_joint_types() -> None:
    """Make gymnasium-robotics 1.4's joint helpers work with MuJoCo >= 3.17.

    Its `set_joint_qpos` & co. assert `model.jnt_type[i] in (mjtJoint.mjJNT_HINGE, ...)`; since MuJoCo
    3.17 `mjtJoint` members no longer compare equal to numpy ints inside a tuple test, so every Fetch env
    fails at construction. We give that module a `mujoco` whose `mjtJoint` holds plain ints.
    """
    import mujoco
    from gymnasium_robotics.utils import mujoco_utils

    if isinstance(mujoco_utils.mujoco, types.ModuleType) and mujoco_utils.mujoco is mujoco:
        names = ("mjJNT_FREE", "mjJNT_BALL", "mjJNT_SLIDE", "mjJNT_HINGE")
        joint_types = types.SimpleNamespace(**{n: int(getattr(mujoco.mjtJoint, n)) for n in names})

        class _MujocoWithIntJoints(types.ModuleType):
            mjtJoint = joint_types

            def __getattr__(self, name: str) -> Any:
                return getattr(mujoco, name)

        mujoco_utils.mujoco = _MujocoWithIntJoints("mujoco")


def _concat_box(space: gym.spaces.Dict | gym.spaces.Box, sources: list[ObsSource]) -> gym.spaces.Box:
    def part(bound: str) -> np.ndarray:
        raw = {k: getattr(s, bound) for k, s in space.spaces.items()} if isinstance(space, gym.spaces.Dict) else {
            "observation": getattr(space, bound)}
        return np.concatenate([src.take(raw).astype(np.float32) for src in sources], axis=-1)

    return gym.spaces.Box(part("low"), part("high"), dtype=np.float32)


class LeRobotObservation(gym.ObservationWrapper):
    """Raw (dict) observation -> {"observation.state": (Ds,), "observation.environment_state": (De,)} float32."""

    def __init__(self, env: gym.Env, spec: TaskSpec):
        super().__init__(env)
        self.task = spec
        self._state = spec.state_sources
        self._env_state = spec.env_state_sources
        spaces = {OBS_STATE: _concat_box(env.observation_space, self._state)}
        if self._env_state:
            spaces[OBS_ENV_STATE] = _concat_box(env.observation_space, self._env_state)
        self.observation_space = gym.spaces.Dict(spaces)

    def observation(self, observation: Any) -> dict[str, np.ndarray]:
        raw = observation if isinstance(observation, dict) else {"observation": observation}
        out = {OBS_STATE: np.concatenate([s.take(raw) for s in self._state], -1).astype(np.float32)}
        if self._env_state:
            out[OBS_ENV_STATE] = np.concatenate([s.take(raw) for s in self._env_state], -1).astype(np.float32)
        return out


def make_env(spec: TaskSpec, render_mode: str | None = None) -> gym.Env:
    """A gymnasium env for `spec` with LeRobot-style dict observations (numpy float32)."""
    _register(spec.env_package)
    kwargs = dict(spec.env_kwargs)
    if render_mode is not None:
        kwargs["render_mode"] = render_mode
    env = gym.make(spec.env_id, max_episode_steps=spec.max_episode_steps, **kwargs)
    return LeRobotObservation(env, spec)


def make_vec_env(spec: TaskSpec, num_envs: int, render_mode: str | None = None) -> gym.vector.SyncVectorEnv:
    """`num_envs` copies of `make_env` in one synchronous vector env (cheap MuJoCo steps: no processes).

    Autoreset is "next step" (gymnasium's default): the step after a done resets that sub-env.
    """
    if num_envs <= 0:
        raise SimpoRobotError(f"num_envs must be positive, got {num_envs}")
    return gym.vector.SyncVectorEnv([lambda: make_env(spec, render_mode) for _ in range(num_envs)])


def is_success(spec: TaskSpec, info: dict[str, Any]) -> bool:
    """Whether `info` (of one env step) says the task is solved."""
    return bool(info.get(spec.success_key, False))


@dataclass(frozen=True)
class TaskFeatures:
    """LeRobot features of a task, shapes read from the env's spaces."""

    inputs: dict[str, Any]
    """`observation.*` name -> `PolicyFeature` (STATE or ENV)."""
    outputs: dict[str, Any]
    """`action` -> `PolicyFeature` (ACTION)."""
    action_low: np.ndarray
    action_high: np.ndarray


_FEATURES: dict[str, TaskFeatures] = {}


def policy_features(spec: TaskSpec) -> TaskFeatures:
    """LeRobot input/output features of `spec`, derived from its env's spaces (cached per spec)."""
    key = repr(spec)
    if key not in _FEATURES:
        from lerobot.configs.types import FeatureType, PolicyFeature

        env = make_env(spec)
        obs_space, act_space = env.observation_space, env.action_space
        env.close()
        inputs = {OBS_STATE: PolicyFeature(FeatureType.STATE, tuple(obs_space[OBS_STATE].shape))}
        if OBS_ENV_STATE in obs_space.spaces:
            inputs[OBS_ENV_STATE] = PolicyFeature(FeatureType.ENV, tuple(obs_space[OBS_ENV_STATE].shape))
        outputs = {ACTION: PolicyFeature(FeatureType.ACTION, tuple(act_space.shape))}
        _FEATURES[key] = TaskFeatures(inputs, outputs, act_space.low.copy(), act_space.high.copy())
    return _FEATURES[key]


def check_policy_fits_task(policy_config: Any, spec: TaskSpec) -> None:
    """Raise `SimpoRobotError` naming each feature whose presence or shape differs between the two."""
    feats = policy_features(spec)
    problems = []
    want = {**feats.inputs, **feats.outputs}
    have = {**dict(policy_config.input_features), **dict(policy_config.output_features)}
    for name, feature in want.items():
        if name not in have:
            problems.append(f"{name}: task gives shape {tuple(feature.shape)}, policy does not take it")
        elif tuple(have[name].shape) != tuple(feature.shape):
            problems.append(f"{name}: policy expects shape {tuple(have[name].shape)}, task gives {tuple(feature.shape)}")
    for name, feature in have.items():
        if name not in want and not name.startswith("observation.image"):
            problems.append(f"{name}: policy expects shape {tuple(feature.shape)}, task {spec.name} has no such feature")
        elif name.startswith("observation.image") and name not in want:
            problems.append(f"{name}: policy expects camera images {tuple(feature.shape)}, task {spec.name} gives none")
    if problems:
        raise SimpoRobotError(f"policy does not fit task {spec.name}: " + "; ".join(problems))
