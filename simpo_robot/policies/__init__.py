"""Policy types simpo-robot adds to LeRobot. Importing this package registers them with LeRobot's factory.

After `import simpo_robot.policies`, `PreTrainedConfig.from_pretrained`, `get_policy_class("flow")`,
`make_policy` and `make_pre_post_processors` handle "flow" like any built-in type. (`simpo_robot`
itself stays light so the CLI's --help and the robot-side client do not import torch; every simpo-robot
module that loads policies imports this package.)
"""

from simpo_robot.policies.flow import FlowConfig, FlowPolicy, make_flow_pre_post_processors

__all__ = ["FlowConfig", "FlowPolicy", "make_flow_pre_post_processors"]
