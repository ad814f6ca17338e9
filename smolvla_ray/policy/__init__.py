"""SmolVLA, faithful to LeRobot 0.6.1: config, model, freezing, processor, checkpoints."""

from smolvla_ray.policy.config import PolicyConfig, PolicyFeature
from smolvla_ray.policy.modeling import SmolVLAPolicy

__all__ = ["PolicyConfig", "PolicyFeature", "SmolVLAPolicy"]
