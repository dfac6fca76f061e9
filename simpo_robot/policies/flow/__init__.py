"""The "flow" policy type (rectified flow over action chunks); importing this package registers it in LeRobot."""

from simpo_robot.policies.flow.configuration_flow import FlowConfig
from simpo_robot.policies.flow.modeling_flow import FlowPolicy
from simpo_robot.policies.flow.processor_flow import make_flow_pre_post_processors

__all__ = ["FlowConfig", "FlowPolicy", "make_flow_pre_post_processors"]
