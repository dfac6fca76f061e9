"""Scripted experts for the Fetch tasks: batched, stateless feedback controllers on LeRobot observations.

Each expert maps a batch of LeRobot observations to a batch of actions, reading the layout that the
Fetch task files define:

    observation.state              (B, 10): grip_pos[0:3], finger widths[3:5], velocities[5:10]
    observation.environment_state  (B, 18): object_pos[0:3], object_rel_pos[3:6], ..., goal[15:18]
                                   (B, 3) for reach: goal

Fetch actions are (dx, dy, dz, grip) in [-1, 1]; a position step of 1 moves the gripper target 5 cm, and
grip +1 opens, -1 closes. Being stateless, an expert re-plans at every step, so it recovers from the
disturbances that its own `noise` (Gaussian std added to the xyz action, then clipped) causes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from simpo_robot.tasks import OBS_ENV_STATE, OBS_STATE

Obs = dict[str, np.ndarray]

_STEP = 0.05  # metres per unit of Fetch position action
_GAIN = 1.0 / _STEP  # move the full error in one step (the action is clipped to [-1, 1] anyway)


def _move(target: np.ndarray, pos: np.ndarray, gain: float = _GAIN) -> np.ndarray:
    """(B, 3) target and position -> (B, 3) clipped position action."""
    return np.clip((target - pos) * gain, -1.0, 1.0)


def reach(obs: Obs) -> np.ndarray:
    """Move the gripper onto the goal. (B, 4)."""
    grip, goal = obs[OBS_STATE][:, 0:3], obs[OBS_ENV_STATE][:, 0:3]
    act = np.zeros((len(grip), 4))
    act[:, :3] = _move(goal, grip)
    return act


def push(obs: Obs) -> np.ndarray:
    """Go behind the block (seen from the goal) from above, descend, then push it to the goal. (B, 4)."""
    grip, es = obs[OBS_STATE][:, 0:3], obs[OBS_ENV_STATE]
    obj, goal = es[:, 0:3], es[:, 15:18]
    to_goal = goal[:, :2] - obj[:, :2]
    dist = np.linalg.norm(to_goal, axis=1, keepdims=True)
    d = to_goal / np.maximum(dist, 1e-6)  # (B, 2) pushing direction
    rel = grip[:, :2] - obj[:, :2]
    along = (rel * d).sum(1)  # < 0: gripper behind the block
    across = np.abs(rel[:, 0] * d[:, 1] - rel[:, 1] * d[:, 0])
    low = np.abs(grip[:, 2] - obj[:, 2]) < 0.02
    aligned = (along < -0.02) & (along > -0.09) & (across < 0.02) & low

    behind = obj.copy()
    behind[:, :2] -= 0.06 * d
    # not aligned: rise, go above the behind point, descend only once there (never sweep through the block)
    over = np.linalg.norm(grip[:, :2] - behind[:, :2], axis=1) > 0.015
    hover = behind.copy()
    hover[:, 2] = np.where(over, obj[:, 2] + 0.06, obj[:, 2])
    act = np.zeros((len(grip), 4))
    act[:, :3] = _move(hover, grip)
    rising = over & (grip[:, 2] < obj[:, 2] + 0.035)
    act[rising, :2] = 0.0
    # aligned: push along the line through the block, slowly near the goal so that it does not overshoot,
    # plus a correction toward the point 4.5 cm behind the block, weighted toward the axis across the push
    speed = np.clip(8.0 * (dist[:, 0] - 0.01), 0.0, 0.6)
    push_xy = speed[:, None] * d + 4.0 * (obj[:, :2] - 0.045 * d - grip[:, :2]) * np.abs(d[:, ::-1])
    act[aligned, :2] = np.clip(push_xy[aligned], -1.0, 1.0)
    act[aligned, 2] = np.clip((obj[aligned, 2] - grip[aligned, 2]) * _GAIN, -1.0, 1.0)
    act[:, 3] = -1.0  # closed fingers make a stiffer pusher
    done = dist[:, 0] < 0.015
    act[done, :3] = 0.0
    return act


def pick_place(obs: Obs) -> np.ndarray:
    """Open above the block, descend, close, then carry it to the goal. (B, 4)."""
    state, es = obs[OBS_STATE], obs[OBS_ENV_STATE]
    grip, width = state[:, 0:3], state[:, 3:5].sum(1)
    obj, goal = es[:, 0:3], es[:, 15:18]
    rel = obj - grip
    xy_far = np.linalg.norm(rel[:, :2], axis=1) > 0.01
    at_block = (~xy_far) & (np.abs(rel[:, 2]) < 0.01)
    # the block is 5 cm wide: closed fingers on it are ~5 cm apart, on nothing ~0
    holding = (np.linalg.norm(rel, axis=1) < 0.02) & (width < 0.065) & (width > 0.03)

    above = obj.copy()
    above[:, 2] += np.where(xy_far, 0.05, 0.0)
    act = np.zeros((len(grip), 4))
    act[:, :3] = _move(above, grip)
    act[:, 3] = 1.0
    grasp = at_block & ~holding
    act[grasp, :3] = 0.0
    act[grasp, 3] = -1.0
    act[holding, :3] = _move(goal[holding], obj[holding])
    act[holding, 3] = -1.0
    return act


def slide(obs: Obs) -> np.ndarray:
    """Line up behind the puck (seen from the goal), then strike it once with a speed set by distance. (B, 4).

    The goal is out of reach, so the strike must give the puck the right speed; friction makes this a
    guess, and the expert succeeds far less often than the others.
    """
    state, es = obs[OBS_STATE], obs[OBS_ENV_STATE]
    grip, obj, goal = state[:, 0:3], es[:, 0:3], es[:, 15:18]
    obj_vel = es[:, 9:12] + state[:, 5:8]  # Fetch reports the object's velocity relative to the gripper
    to_goal = goal[:, :2] - obj[:, :2]
    dist = np.linalg.norm(to_goal, axis=1, keepdims=True)
    d = to_goal / np.maximum(dist, 1e-6)
    rel = grip[:, :2] - obj[:, :2]
    along = (rel * d).sum(1)
    across = np.abs(rel[:, 0] * d[:, 1] - rel[:, 1] * d[:, 0])
    low = np.abs(grip[:, 2] - obj[:, 2]) < 0.015
    moving = np.linalg.norm(obj_vel[:, :2], axis=1) > 1e-3  # velocities are per env step
    aligned = (along < -0.04) & (along > -0.12) & (across < 0.01) & low

    behind = obj.copy()
    behind[:, :2] -= 0.08 * d
    over = np.linalg.norm(grip[:, :2] - behind[:, :2], axis=1) > 0.01
    hover = behind.copy()
    hover[:, 2] = np.where(over, obj[:, 2] + 0.05, obj[:, 2])
    act = np.zeros((len(grip), 4))
    act[:, :3] = _move(hover, grip)
    # strike once, harder for a farther goal (a guess: friction is not modelled), then let it slide
    strike_speed = np.clip(0.5 + 1.0 * dist[:, 0], 0.0, 1.0)
    strike = aligned & ~moving
    act[strike, :2] = strike_speed[strike, None] * d[strike]
    act[strike, 2] = 0.0
    act[moving, :3] = 0.0
    act[:, 3] = -1.0
    return act


EXPERTS: dict[str, Callable[[Obs], np.ndarray]] = {
    "fetch_reach": reach,
    "fetch_push": push,
    "fetch_pick_place": pick_place,
    "fetch_slide": slide,
}


@dataclass
class ScriptedExpert:
    """A named expert with action noise: `expert(obs, rng) -> (B, Da)` actions in [-1, 1]."""

    name: str
    """Key of `EXPERTS`."""
    noise: float = 0.0
    """Std of Gaussian noise added to the position part of the action (0 = deterministic)."""

    def __post_init__(self) -> None:
        if self.name not in EXPERTS:
            raise ValueError(f"no scripted expert {self.name!r}; known: {sorted(EXPERTS)}")
        if self.noise < 0:
            raise ValueError(f"noise must be >= 0, got {self.noise}")

    def __call__(self, obs: Obs, rng: np.random.Generator) -> np.ndarray:
        act = EXPERTS[self.name](obs)
        if self.noise > 0:
            act[:, :3] += rng.normal(0.0, self.noise, size=act[:, :3].shape)
        return np.clip(act, -1.0, 1.0).astype(np.float32)
