"""SmolVLA, faithful to LeRobot 0.6.1: config, model, freezing, processor, checkpoints.

`PolicyConfig` imports no torch (job specs validate instantly); the model classes load torch
on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from smolvla_ray.policy.config import PolicyConfig, PolicyFeature

if TYPE_CHECKING:
    from smolvla_ray.policy.modeling import SmolVLAPolicy

__all__ = ["PolicyConfig", "PolicyFeature", "SmolVLAPolicy"]


def __getattr__(name: str) -> Any:
    if name == "SmolVLAPolicy":
        from smolvla_ray.policy.modeling import SmolVLAPolicy

        return SmolVLAPolicy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
