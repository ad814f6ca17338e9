"""Training step time per sample: LeRobot's way vs the no-grad prefix vs the feature cache.

One process, the same machine, the same batch, for each preset:

- lerobot_way: decode the video frames, run the vision encoder, joint forward with autograd
  over the whole prefix, backward (numerically LeRobot 0.6.1's step: tests/lerobot checks
  equal losses and gradients against LeRobot itself);
- no_grad_prefix: decode, vision encoder, image/language keys and values without autograd;
- feature_cache: cached vision features (no decode, no vision encoder) + the no-grad prefix.

Also the cache's bytes per frame (float32 and bfloat16) and build time per frame. Prints JSON.

    .venv/bin/python benchmarks/step_vs_lerobot.py [--presets tiny,base] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from smolvla_ray.data.samples import FrameDataset, collate_samples
from smolvla_ray.data.synthetic import write_demo_dataset
from smolvla_ray.policy import PolicyConfig, SmolVLAPolicy
from smolvla_ray.policy.config import TINY_VLM_DIR
from smolvla_ray.policy.processor import PolicyProcessor


def timed_steps(policy, make_batch, mode: str, repeats: int, noise, t) -> tuple[float, float]:
    policy.prefix_mode = mode
    times, loss = [], 0.0
    for i in range(repeats + 1):
        policy.zero_grad(set_to_none=True)
        start = time.perf_counter()
        batch = make_batch()
        value, _ = policy(batch, noise=noise, time=t)
        value.backward()
        if i:
            times.append(time.perf_counter() - start)
        loss = value.item()
    return statistics.median(times), loss


def run(preset: str, dataset_root: str, batch_size: int, repeats: int) -> dict:
    dataset = FrameDataset(dataset_root, chunk_size=50 if preset == "base" else 10)
    cameras = {k.removeprefix("observation.images."): (3, 480, 640) for k in dataset.camera_keys}
    config = PolicyConfig.preset(preset).with_features(  # type: ignore[arg-type]
        state_dim=6, action_dim=6, cameras=cameras
    )
    torch.manual_seed(0)
    policy = SmolVLAPolicy(config)
    policy.train()
    # Offline, the base preset has no SmolVLM2 tokenizer; the tiny one's ids stand in (the
    # step cost does not depend on which ids the task string becomes).
    tokenizer_config = config.model_copy(update={"vlm_model_name": str(TINY_VLM_DIR)})
    processor = PolicyProcessor(tokenizer_config, dataset.meta.stats)
    rows = list(range(batch_size))

    def from_video() -> dict:
        return processor.preprocess(collate_samples([dataset[r] for r in rows]))

    start = time.perf_counter()
    reference = from_video()
    features = policy.encode_images(reference)
    encode_s = (time.perf_counter() - start) / (batch_size * len(cameras))
    policy.train()
    text_only = {k: v for k, v in reference.items() if not k.startswith("observation.images.")}

    def from_cache() -> dict:  # what CachedFeatures yields: stored tensors, no decode
        return {**text_only, **{k: v.clone() for k, v in features.items()}}

    g = torch.Generator().manual_seed(1)
    noise = torch.randn(batch_size, config.chunk_size, config.max_action_dim, generator=g)
    t = torch.rand(batch_size, generator=g)
    lerobot, loss_a = timed_steps(policy, from_video, "joint", repeats, noise, t)
    no_grad, loss_b = timed_steps(policy, from_video, "no_grad", repeats, noise, t)
    cached, loss_c = timed_steps(policy, from_cache, "no_grad", repeats, noise, t)
    per_frame = next(iter(features.values()))[0]
    # A bfloat16 cache: the same step from features rounded to bf16 and back.
    policy.zero_grad(set_to_none=True)
    rounded = {**text_only, **{k: v.to(torch.bfloat16).float() for k, v in features.items()}}
    loss_bf16 = policy(rounded, noise=noise, time=t)[0].item()
    return {
        "batch_size": batch_size,
        "cameras": len(cameras),
        "image_hw": [480, 640],
        "step_s_per_sample": {
            "lerobot_way": lerobot / batch_size,
            "no_grad_prefix": no_grad / batch_size,
            "feature_cache": cached / batch_size,
        },
        "speedup_vs_lerobot": {
            "no_grad_prefix": lerobot / no_grad,
            "feature_cache": lerobot / cached,
        },
        "losses_equal": max(loss_a, loss_b, loss_c) - min(loss_a, loss_b, loss_c) < 1e-4,
        "bf16_cache_loss_relative_deviation": abs(loss_bf16 - loss_c) / abs(loss_c),
        "cache_bytes_per_frame_per_camera": {
            "float32": per_frame.numel() * 4,
            "bfloat16": per_frame.numel() * 2,
        },
        "cache_build_s_per_frame_per_camera": encode_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,base")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_demo_dataset(
            str(Path(tmp) / "ds"), num_episodes=1, episode_length=8, height=480, width=640
        )
        results = {
            p: run(p, root, 2 if p == "base" else 8, args.repeats) for p in args.presets.split(",")
        }
    print(
        json.dumps(
            {
                "benchmark": "step_vs_lerobot",
                "device": "cpu",
                "threads": args.threads,
                "torch": torch.__version__,
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
