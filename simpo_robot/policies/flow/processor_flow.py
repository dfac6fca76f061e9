"""Processors of the flow policy: LeRobot's default pipeline (the one the diffusion policy uses).

Pre: rename -> add batch dim -> device -> normalise (dataset stats); post: unnormalise -> CPU.
"""

from __future__ import annotations

from typing import Any

import torch
from lerobot.processor import PolicyAction, PolicyProcessorPipeline, make_default_pre_post_processors

from simpo_robot.policies.flow.configuration_flow import FlowConfig


def make_flow_pre_post_processors(
    config: FlowConfig,
    dataset_stats: dict[str, dict[str, torch.Tensor]] | None = None,
) -> tuple[PolicyProcessorPipeline[dict[str, Any], dict[str, Any]], PolicyProcessorPipeline[PolicyAction, PolicyAction]]:
    """The pre/post-processor pair; LeRobot's factory finds it by name for policy type "flow"."""
    return make_default_pre_post_processors(config, dataset_stats)
