"""LoRA adapters (LeRobot's default SmolVLA targets) against expert-only finetuning: training
step time (forward, backward, AdamW step) and checkpoint size in this project's format
(trainable tensors + AdamW moments + state), on the same policy and batch.

Prints one JSON object. CPU by default; `base` is the real SmolVLA architecture built from
its config (no download; token ids are fed directly, so no tokenizer is needed).

    .venv/bin/python benchmarks/lora.py [--presets tiny,base] [--repeats 3] [--r 16]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from smolvla_ray.checkpoint.format import TrainingState, optimizer_tensors, write_checkpoint
from smolvla_ray.policy import PolicyConfig, SmolVLAPolicy
from smolvla_ray.policy.adapters import LoraSettings, add_adapters
from smolvla_ray.train.optim import build_optimizer


def make_batch(config: PolicyConfig, batch_size: int, image_hw: tuple[int, int]) -> dict:
    g = torch.Generator().manual_seed(0)
    batch = {
        key: torch.rand(batch_size, 3, *image_hw, generator=g) for key in config.image_features
    }
    batch["observation.state"] = torch.randn(batch_size, config.state_dim, generator=g)
    batch["action"] = torch.randn(batch_size, config.chunk_size, config.action_dim, generator=g)
    batch["action_is_pad"] = torch.zeros(batch_size, config.chunk_size, dtype=torch.bool)
    batch["observation.language.tokens"] = torch.randint(5, 300, (batch_size, 16), generator=g)
    batch["observation.language.attention_mask"] = torch.ones(batch_size, 16, dtype=torch.bool)
    return batch


def measure(policy: SmolVLAPolicy, batch: dict, repeats: int) -> dict:
    """Median step time and the checkpoint this trainable set writes (after real steps)."""
    trainable = policy.trainable_parameters()
    optimizer = build_optimizer(
        list(trainable.values()), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-10
    )
    g = torch.Generator().manual_seed(1)
    size = batch["action"].shape[0]
    noise = torch.randn(size, policy.config.chunk_size, policy.config.max_action_dim, generator=g)
    t = torch.rand(size, generator=g)
    policy.train()
    steps = []
    for i in range(repeats + 1):  # the first step warms up allocators and creates moments
        optimizer.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss, _ = policy(dict(batch), noise=noise, time=t)
        loss.backward()
        optimizer.step()
        if i:
            steps.append(time.perf_counter() - start)
    names = list(trainable)
    moments, groups = optimizer_tensors(optimizer, names)
    state = TrainingState(
        step=repeats + 1, epoch=0, cursors=[{}], param_names=names, param_groups=groups,
        scheduler={}, spec={}, policy_config=json.loads(policy.config.to_lerobot_json()),
        base={},
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(
            Path(tmp), trainable=trainable, optimizer=moments, rng_states=[torch.get_rng_state()],
            state=state,
        )  # fmt: skip
        files = {p.name: p.stat().st_size for p in Path(tmp).iterdir()}
    return {
        "trainable_parameters": sum(p.numel() for p in trainable.values()),
        "trainable_tensors": len(trainable),
        "step_s": statistics.median(steps),
        "checkpoint_bytes": sum(files.values()),
        "trainable_file_bytes": files["trainable.safetensors"],
        "optimizer_file_bytes": files["optimizer.safetensors"],
        "no_grad_prefix": policy.model.vlm_is_frozen(),
        "loss": loss.item(),
    }


def run(preset: str, batch_size: int, image_hw: tuple[int, int], repeats: int, r: int) -> dict:
    config = PolicyConfig.preset(preset).with_features(  # type: ignore[arg-type]
        state_dim=6, action_dim=6, cameras={f"cam{i}": (3, *image_hw) for i in range(2)}
    )
    torch.manual_seed(0)
    policy = SmolVLAPolicy(config)  # default overrides: expert-only finetuning
    batch = make_batch(config, batch_size, image_hw)
    expert_only = measure(policy, batch, repeats)
    # The same policy with LeRobot's LoRA defaults (alpha left to PEFT's 8): base all frozen.
    add_adapters(policy, LoraSettings(r=r), seed=0)
    lora = measure(policy, batch, repeats)
    return {
        "batch_size": batch_size,
        "cameras": 2,
        "image_hw": list(image_hw),
        "total_parameters": sum(p.numel() for p in policy.parameters()),
        "expert_only": expert_only,
        "lora": {"r": r, **lora},
        "step_speedup": expert_only["step_s"] / lora["step_s"],
        "checkpoint_ratio": lora["checkpoint_bytes"] / expert_only["checkpoint_bytes"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,base")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (LeRobot's default 16)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = {"tiny": (8, (96, 128)), "base": (2, (480, 640))}
    results = {
        preset: run(preset, *shapes[preset], repeats=args.repeats, r=args.r)
        for preset in args.presets.split(",")
    }
    print(
        json.dumps(
            {
                "benchmark": "lora",
                "device": "cpu",
                "threads": args.threads,
                "torch": torch.__version__,
                "machine": platform.machine(),
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
