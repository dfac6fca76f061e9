"""Tiny random policies (LeRobot DiffusionPolicy, simpo-robot FlowPolicy) in LeRobot's folder layout, for tests
and benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

OBS_STATE_DIM = 10
ENV_STATE_DIM = 25
ACTION_DIM = 4


def save_tiny_policy(
    out_dir: str | Path,
    seed: int = 0,
    noise_scheduler_type: str = "DDPM",
    num_inference_steps: int = 10,
    down_dims: tuple[int, ...] = (32, 64),
    horizon: int = 16,
    n_action_steps: int = 8,
    n_obs_steps: int = 2,
    env_state_dim: int = ENV_STATE_DIM,
    diffusion_step_embed_dim: int = 32,
) -> Path:
    """Write a state-only DiffusionPolicy with random weights and min/max stats to `out_dir`.

    Features: observation.state (10,), observation.environment_state (env_state_dim,), action (4,)
    (env_state_dim=18 fits the fetch_push task);
    state stats span [-1, 1], action stats [-2, 2], so unnormalised actions lie in [-2, 2].
    """
    from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy

    return _save_tiny(
        out_dir, seed, DiffusionConfig, DiffusionPolicy, env_state_dim, obs_mean_std=False,
        n_obs_steps=n_obs_steps,
        horizon=horizon,
        n_action_steps=n_action_steps,
        down_dims=down_dims,
        diffusion_step_embed_dim=diffusion_step_embed_dim,
        noise_scheduler_type=noise_scheduler_type,
        num_inference_steps=num_inference_steps,
        pretrained_backbone_weights=None,
    )


def save_tiny_flow_policy(
    out_dir: str | Path,
    seed: int = 0,
    num_inference_steps: int = 4,
    down_dims: tuple[int, ...] = (32, 64),
    horizon: int = 16,
    n_action_steps: int = 8,
    n_obs_steps: int = 2,
    env_state_dim: int = ENV_STATE_DIM,
    diffusion_step_embed_dim: int = 32,
    timestep_scale: float = 100.0,
) -> Path:
    """Write a state-only FlowPolicy with random weights and the same features and stats as `save_tiny_policy`
    (plus observation mean 0 / std 1, which FlowConfig's mean/std normalisation of observations reads)."""
    from simpo_robot.policies.flow import FlowConfig, FlowPolicy

    return _save_tiny(
        out_dir, seed, FlowConfig, FlowPolicy, env_state_dim, obs_mean_std=True,
        n_obs_steps=n_obs_steps,
        horizon=horizon,
        n_action_steps=n_action_steps,
        down_dims=down_dims,
        diffusion_step_embed_dim=diffusion_step_embed_dim,
        timestep_scale=timestep_scale,
        num_inference_steps=num_inference_steps,
    )


def _save_tiny(out_dir: str | Path, seed: int, config_cls: Any, policy_cls: Any, env_state_dim: int,
               obs_mean_std: bool, **config_kwargs: Any) -> Path:
    """Seed, build `policy_cls(config_cls(features, **config_kwargs))` on CPU, save it with the tiny stats."""
    import torch
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.factory import make_pre_post_processors

    from simpo_robot.policy_io import save_policy

    torch.manual_seed(seed)
    config = config_cls(
        input_features={
            "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(OBS_STATE_DIM,)),
            "observation.environment_state": PolicyFeature(type=FeatureType.ENV, shape=(env_state_dim,)),
        },
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,))},
        device="cpu",
        push_to_hub=False,
        **config_kwargs,
    )
    policy = policy_cls(config)

    def unit_stats(dim: int) -> dict[str, torch.Tensor]:
        stats = {"min": -torch.ones(dim), "max": torch.ones(dim)}
        if obs_mean_std:
            stats.update(mean=torch.zeros(dim), std=torch.ones(dim))
        return stats

    stats = {
        "observation.state": unit_stats(OBS_STATE_DIM),
        "observation.environment_state": unit_stats(env_state_dim),
        "action": {"min": -2 * torch.ones(ACTION_DIM), "max": 2 * torch.ones(ACTION_DIM)},
    }
    preprocessor, postprocessor = make_pre_post_processors(config, dataset_stats=stats)
    return save_policy(policy, out_dir, preprocessor, postprocessor)
