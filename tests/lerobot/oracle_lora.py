"""Runs inside a LeRobot 0.6.1 interpreter with peft (never imported by smolvla-ray or CI).

Usage: python oracle_lora.py WORKDIR. Two directions of LoRA adapters:

1. Loads our adapter export WORKDIR/ours_adapter as LeRobot's `make_policy` does for a
   `use_peft` config (its `PeftConfig` names the base; the base policy is built from the
   adapter directory's config and the base's weights; then `PeftModel.from_pretrained`),
   and predicts actions on WORKDIR/inputs.safetensors -> `ours_adapter.actions`.
2. Wraps the base WORKDIR/base with LeRobot's own `wrap_with_peft` (r 4, alpha 8,
   full_training_modules [action_out_proj]), sets every adapter tensor to fixed random
   values, saves it as LeRobot's training checkpoint does (PEFT's save_pretrained plus the
   policy config) to WORKDIR/lerobot_adapter, and predicts -> `lerobot_adapter.actions`.
"""

import sys
from pathlib import Path

import torch
from lerobot.configs.policies import PreTrainedConfig
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
from peft import PeftConfig, PeftModel
from safetensors.torch import load_file, save_file


def load_like_make_policy(adapter: Path):
    """The `cfg.pretrained_path and cfg.use_peft` branch of lerobot.policies.factory."""
    cfg = PreTrainedConfig.from_pretrained(str(adapter))
    cfg.pretrained_path = adapter
    assert cfg.use_peft, "the adapter directory's config.json must say use_peft: true"
    peft_config = PeftConfig.from_pretrained(str(adapter))
    policy = SmolVLAPolicy.from_pretrained(
        pretrained_name_or_path=peft_config.base_model_name_or_path,
        config=cfg,
        revision=peft_config.revision,
    )
    return PeftModel.from_pretrained(policy, str(adapter), config=peft_config, is_trainable=True)


def main(workdir: Path) -> None:
    inputs = load_file(str(workdir / "inputs.safetensors"))
    batch = {k: v for k, v in inputs.items() if not k.startswith("_")}
    noise = inputs["_noise"]
    out = {}

    ours = load_like_make_policy(workdir / "ours_adapter")
    out["ours_adapter.actions"] = ours.predict_action_chunk(dict(batch), noise=noise)

    policy = SmolVLAPolicy.from_pretrained(str(workdir / "base"))
    policy.config.pretrained_path = workdir / "base"
    wrapped = policy.wrap_with_peft(
        peft_cli_overrides={"r": 4, "lora_alpha": 8, "full_training_modules": ["action_out_proj"]}
    )
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for param in wrapped.parameters():
            if param.requires_grad:  # lora_A, lora_B, the trained copy of action_out_proj
                param.copy_(torch.randn(param.shape, generator=g) * 0.05)
    target = workdir / "lerobot_adapter"
    wrapped.save_pretrained(str(target))
    policy.config.save_pretrained(target)  # as lerobot's save_checkpoint does under PEFT
    out["lerobot_adapter.actions"] = wrapped.predict_action_chunk(dict(batch), noise=noise)
    save_file({k: v.contiguous() for k, v in out.items()}, str(workdir / "outputs.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
