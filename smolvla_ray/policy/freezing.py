"""LeRobot's freezing overrides, in one place (docs/design.md, "LeRobot facts").

Two mechanisms, both needed: `requires_grad`, set once at construction, and the train/eval
mode of the frozen towers, re-applied on every `train()` call (`apply_modes`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from smolvla_ray.policy.backbone import SmolVLMWithExpert


def vlm_frozen_patterns(num_vlm_layers: int, num_expert_layers: int) -> list[str]:
    """Name fragments of VLM parameters that get no gradient when the VLM is partly trained
    (frozen so DDP sees no unused parameters), as LeRobot."""
    last_layers = [num_vlm_layers - 1]
    if num_vlm_layers != num_expert_layers and num_vlm_layers % num_expert_layers == 0:
        last_layers.append(num_vlm_layers - 2)
    patterns = ["lm_head", "text_model.norm.weight"]
    patterns += [f"text_model.layers.{layer}." for layer in last_layers]
    return patterns


def apply_requires_grad(
    towers: SmolVLMWithExpert,
    state_proj: nn.Module,
    *,
    freeze_vision_encoder: bool,
    train_expert_only: bool,
    train_state_proj: bool,
) -> None:
    """Set `requires_grad` on every parameter from the three overrides."""
    if freeze_vision_encoder:
        towers.vision_model.requires_grad_(False)
    if train_expert_only:
        towers.vlm.requires_grad_(False)
    else:
        patterns = vlm_frozen_patterns(towers.num_vlm_layers, towers.num_expert_layers)
        unmatched = set(patterns)
        for name, param in towers.vlm.named_parameters():
            hits = [p for p in patterns if p in name]
            if hits:
                param.requires_grad_(False)
                unmatched.difference_update(hits)
        if unmatched:
            raise RuntimeError(
                f"freezing patterns {sorted(unmatched)} matched no VLM parameter; the layers "
                "they name would silently stay trainable (did transformers rename them?)"
            )
    for name, param in towers.lm_expert.named_parameters():
        if "lm_head" in name:
            param.requires_grad_(False)
    state_proj.requires_grad_(train_state_proj)


def trainable_image_towers(*, freeze_vision_encoder: bool, train_expert_only: bool) -> list[str]:
    """The towers between an image and its tokens that `apply_requires_grad` leaves
    trainable: "vision encoder" unless `freeze_vision_encoder` or `train_expert_only`,
    "connector" unless `train_expert_only` (it is part of the VLM, which only
    `train_expert_only` freezes). The image tokens are constant per frame, as the feature
    cache needs, exactly when this is empty."""
    towers = []
    if not (freeze_vision_encoder or train_expert_only):
        towers.append("vision encoder")
    if not train_expert_only:
        towers.append("connector")
    return towers


def apply_modes(
    towers: SmolVLMWithExpert, *, freeze_vision_encoder: bool, train_expert_only: bool
) -> None:
    """Put frozen towers back in eval mode after `train()` switched everything to train."""
    if freeze_vision_encoder:
        towers.vision_model.eval()
    if train_expert_only:
        towers.vlm.eval()


def trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters training updates, by their state-dict name, in registration order."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}
