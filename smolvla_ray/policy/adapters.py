"""LoRA adapters on SmolVLA through the `peft` library, as LeRobot 0.6.1 trains them
(`--peft.method_type LORA`): every base parameter frozen, LoRA layers injected into the
target modules, full copies of the `modules_to_save` trained beside them.

The adapters are injected into the policy in place (`peft.inject_adapter_in_model`), so the
policy keeps its class, interface and module names; only the adapted modules gain PEFT's
`base_layer` / `lora_A.default` / `original_module` children. On disk the adapters take
PEFT's layout, the one LeRobot's `make_policy(use_peft=True)` loads: `adapter_config.json`
(naming the base policy) and `adapter_model.safetensors` (keys `base_model.model.<module>`
with the adapter name dropped), beside the policy's `config.json` (`use_peft: true`) and
processor files.

`peft` is optional (`pip install 'smolvla-ray[peft]'`): it is imported on first use.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from smolvla_ray.policy.config import SMOLVLA_LORA_TARGETS
from smolvla_ray.policy.weights_file import ADAPTER_CONFIG, CONFIG_NAME, check_state_dict_keys

if TYPE_CHECKING:
    from smolvla_ray.policy.modeling import SmolVLAPolicy

PEFT_INSTALL = "pip install 'smolvla-ray[peft]' (peft>=0.18,<1.0)"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_NAME = "default"  # PEFT's, and what LeRobot's adapters use
SAVED_PREFIX = "base_model.model."  # PeftModel's prefix of the policy's own names on disk
# What PeftModel.save_pretrained records for LeRobot's policy class (informational only).
LEROBOT_AUTO_MAPPING = {
    "base_model_class": "SmolVLAPolicy",
    "parent_library": "lerobot.policies.smolvla.modeling_smolvla",
}
# Module prefixes whose adaptation reaches the image tokens (the feature cache's concern) and
# the image/language tokens (the no-grad prefix's concern).
VISION_TOWERS = {
    "vision encoder": "model.vlm_with_expert.vlm.model.vision_model.",
    "connector": "model.vlm_with_expert.vlm.model.connector.",
}
VLM_PREFIX = "model.vlm_with_expert.vlm."


@dataclass(frozen=True)
class LoraSettings:
    """LeRobot's `--peft.*` options for LoRA (`full_training_modules` is PEFT's
    `modules_to_save`)."""

    r: int = 16
    lora_alpha: int = 8
    lora_dropout: float = 0.0
    target_modules: str | Sequence[str] = SMOLVLA_LORA_TARGETS
    full_training_modules: Sequence[str] = field(default_factory=tuple)


def settings_from_options(options: Mapping[str, Any]) -> LoraSettings:
    """`LoraSettings` from LeRobot's `--peft.*` option names (a job spec's `policy.peft`
    as a dict: `method_type`, `r`, `lora_alpha`, `lora_dropout`, `target_modules`,
    `full_training_modules`)."""
    method = options.get("method_type", "LORA")
    if str(method).upper() != "LORA":
        raise ValueError(f"peft method_type {method!r} is not supported; use LORA")
    targets = options.get("target_modules", SMOLVLA_LORA_TARGETS)
    return LoraSettings(
        r=int(options.get("r", 16)),
        lora_alpha=int(options.get("lora_alpha", 8)),
        lora_dropout=float(options.get("lora_dropout", 0.0)),
        target_modules=targets if isinstance(targets, str) else tuple(targets),
        full_training_modules=tuple(options.get("full_training_modules") or ()),
    )


def require_peft() -> Any:
    """The `peft` module, or ImportError naming the extra that installs it."""
    try:
        import peft
    except ImportError:
        raise ImportError(f"LoRA adapters need the peft package: {PEFT_INSTALL}") from None
    return peft


def lora_config(
    settings: LoraSettings, *, base: str | None = None, revision: str | None = None
) -> Any:
    """PEFT's `LoraConfig` for `settings`, naming the base policy as LeRobot's does."""
    peft = require_peft()
    targets = settings.target_modules
    config = peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        modules_to_save=list(settings.full_training_modules),
        base_model_name_or_path=base,
        revision=revision,
    )
    return config


def settings_of(config: Any) -> LoraSettings:
    """The `LoraSettings` of a PEFT `LoraConfig` (one read from an adapter directory)."""
    if str(getattr(config.peft_type, "value", config.peft_type)) != "LORA":
        raise ValueError(f"only LoRA adapters are supported; this one is {config.peft_type}")
    targets = config.target_modules
    return LoraSettings(
        r=int(config.r),
        lora_alpha=int(config.lora_alpha),
        lora_dropout=float(config.lora_dropout),
        target_modules=targets if isinstance(targets, str) else tuple(sorted(targets)),
        full_training_modules=tuple(config.modules_to_save or ()),
    )


def add_adapters(policy: nn.Module, settings: LoraSettings, *, seed: int | None = None) -> None:
    """Freeze every parameter of `policy` and inject LoRA adapters (and trainable copies of
    the full-training modules), in place. `seed` makes the adapters' random init (lora_A)
    reproducible without touching the global RNG. A target pattern that matches no module
    is an error (PEFT's own)."""
    peft = require_peft()
    policy.requires_grad_(False)
    config = lora_config(settings)
    rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        peft.inject_adapter_in_model(config, policy, adapter_name=ADAPTER_NAME)
    policy.lora_settings = settings  # plain attribute: what export and save record


def has_adapters(policy: nn.Module) -> bool:
    """Whether `policy` carries injected adapters."""
    return getattr(policy, "lora_settings", None) is not None


def adapted_towers(policy: nn.Module) -> list[str]:
    """The image towers (vision encoder, connector) holding trainable parameters; empty when
    the image tokens stay constant per frame, as the feature cache needs."""
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    return [
        tower for tower, prefix in VISION_TOWERS.items() if any(n.startswith(prefix) for n in names)
    ]


def adapter_tensors(policy: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter (and full-training) tensors under the names PEFT saves them by, in
    `adapter_model.safetensors` (`base_model.model.<module>.lora_A.weight`, ...)."""
    peft = require_peft()
    state = peft.get_peft_model_state_dict(policy, adapter_name=ADAPTER_NAME)
    return {
        f"{SAVED_PREFIX}{k}": v.detach().to("cpu", torch.float32).contiguous()
        for k, v in state.items()
    }


def load_adapter_tensors(
    policy: nn.Module, tensors: Mapping[str, torch.Tensor], *, source: str
) -> None:
    """Put saved adapter tensors (`adapter_tensors`' names) into `policy`'s adapters; a
    missing, unexpected or mis-shaped tensor is an error naming it."""
    expected = adapter_tensors(policy)
    check_state_dict_keys(expected, dict(tensors), source=source)
    peft = require_peft()
    stripped = {k.removeprefix(SAVED_PREFIX): v for k, v in tensors.items()}
    result = peft.set_peft_model_state_dict(policy, stripped, adapter_name=ADAPTER_NAME)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ValueError(f"{source}: adapter tensors matched no adapter: {unexpected[:5]}")


def merge_adapters(policy: nn.Module) -> None:
    """Fold the adapters into the base weights and remove PEFT's layers, in place: the
    policy becomes a plain SmolVLA with LeRobot's tensor names (what `--merge` exports).
    Trainable copies of full-training modules replace their originals."""
    peft = require_peft()
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrappers = [
        name
        for name, module in policy.named_modules()
        if isinstance(module, BaseTunerLayer | peft.utils.other.AuxiliaryTrainingWrapper)
    ]
    # Outermost first; a module nested inside one already replaced is gone with it.
    for name in sorted(wrappers, key=lambda n: n.count(".")):
        parent_name, _, child = name.rpartition(".")
        parent = policy.get_submodule(parent_name) if parent_name else policy
        module = getattr(parent, child, None)
        if module is None or not isinstance(
            module, BaseTunerLayer | peft.utils.other.AuxiliaryTrainingWrapper
        ):
            continue
        if hasattr(module, "unload_and_optionally_merge_module"):
            plain = module.unload_and_optionally_merge_module(
                merge=True, safe_merge=True, adapter_names=None
            )
        else:
            module.merge(safe_merge=True)
            plain = module.get_base_layer()
        setattr(parent, child, plain)
    for attr in ("peft_config", "lora_settings"):
        if attr in policy.__dict__:
            delattr(policy, attr)
    policy.requires_grad_(False)


def read_adapter_config(directory: Path) -> Any:
    """The PEFT config of an adapter directory (its `adapter_config.json`)."""
    peft = require_peft()
    return peft.PeftConfig.from_pretrained(str(directory))


def is_adapter_dir(directory: Path) -> bool:
    """Whether `directory` holds a PEFT adapter (LeRobot's layout) rather than full weights."""
    return (directory / ADAPTER_CONFIG).exists()


def adapter_base(directory: Path) -> tuple[str | None, str | None]:
    """The base policy an adapter directory names, and its revision, read from
    `adapter_config.json` alone (no peft needed)."""
    data = json.loads((directory / ADAPTER_CONFIG).read_text())
    return data.get("base_model_name_or_path"), data.get("revision")


def write_adapter(
    policy: SmolVLAPolicy, directory: Path, *, base: str, revision: str | None
) -> None:
    """Write `policy`'s adapters in LeRobot's adapter layout into the local `directory`:
    `adapter_config.json` naming `base` (and `revision`), `adapter_model.safetensors`, the
    policy's `config.json` with `use_peft: true`, and its processor files."""
    from safetensors.torch import save_file

    settings: LoraSettings = policy.lora_settings  # type: ignore[assignment]
    directory.mkdir(parents=True, exist_ok=True)
    config = lora_config(settings, base=base, revision=revision)
    config.auto_mapping = dict(LEROBOT_AUTO_MAPPING)
    config.inference_mode = True  # as PeftModel.save_pretrained writes it
    config.save_pretrained(str(directory))
    save_file(adapter_tensors(policy), str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    policy_config = policy.config.model_copy(update={"use_peft": True})
    (directory / CONFIG_NAME).write_text(policy_config.to_lerobot_json())
    if policy.processor is not None:
        policy.processor.save(directory)
