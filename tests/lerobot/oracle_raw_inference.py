"""Runs inside a LeRobot 0.6.1 interpreter (never imported by smolvla-ray or by CI).

Usage: python oracle_raw_inference.py WORKDIR. Loads WORKDIR/pretrained_model (our export of a
finetune across renamed cameras) with LeRobot's own `make_policy`-free loaders: the policy
with `SmolVLAPolicy.from_pretrained`, the processors with `PolicyProcessorPipeline`. Feeds
the raw observation in WORKDIR/raw.safetensors (the dataset's own key names) through LeRobot's
saved preprocessor, `select_action` with the given noise, and the postprocessor; writes the
action and the preprocessed batch to WORKDIR/outputs.safetensors.
"""

import json
import sys
from pathlib import Path

import torch
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
from oracle import load_processors
from safetensors.torch import load_file, save_file


def main(workdir: Path) -> None:
    pretrained = workdir / "pretrained_model"
    policy = SmolVLAPolicy.from_pretrained(str(pretrained), strict=True).eval()
    pre, post = load_processors(pretrained)  # the script's directory is on sys.path
    inputs = load_file(str(workdir / "raw.safetensors"))
    raw = {k: v for k, v in inputs.items() if not k.startswith("_")}
    raw["task"] = json.loads((workdir / "task.json").read_text())
    batch = pre(raw)
    with torch.no_grad():
        action = policy.select_action(batch, noise=inputs["_noise"])
    out = {"action": post(action), "normalized_action": action}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[f"pre.{key}"] = value.to(torch.float32)
    out["_image_features"] = torch.tensor([len(policy.config.image_features)])
    save_file({k: v.contiguous() for k, v in out.items()}, str(workdir / "outputs.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
