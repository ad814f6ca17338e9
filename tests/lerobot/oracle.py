"""Runs inside a LeRobot 0.6.1 interpreter (never imported by smolvla-ray or by CI).

Usage: python oracle.py WORKDIR. Reads WORKDIR/pretrained_model (written by our
save_pretrained) and WORKDIR/inputs.safetensors; loads the policy and processors with LeRobot's
own from_pretrained; writes WORKDIR/outputs.safetensors with LeRobot's loss, per-sample loss,
trainable gradients, predicted actions and preprocessed tensors; and re-saves the policy with
LeRobot's save_pretrained to WORKDIR/lerobot_saved for the reverse round trip.
"""

import json
import sys
from pathlib import Path

import torch
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
from lerobot.processor import PolicyProcessorPipeline
from lerobot.processor.converters import policy_action_to_transition, transition_to_policy_action
from safetensors.torch import load_file, save_file


def load_processors(pretrained: Path):
    """LeRobot's own pre- and postprocessor pipelines as saved in `pretrained`."""
    pre = PolicyProcessorPipeline.from_pretrained(str(pretrained), "policy_preprocessor.json")
    post = PolicyProcessorPipeline.from_pretrained(
        str(pretrained),
        "policy_postprocessor.json",
        to_transition=policy_action_to_transition,
        to_output=transition_to_policy_action,
    )
    return pre, post


def main(workdir: Path) -> None:
    pretrained = workdir / "pretrained_model"
    inputs = load_file(str(workdir / "inputs.safetensors"))
    tasks = json.loads((workdir / "tasks.json").read_text())
    policy = SmolVLAPolicy.from_pretrained(str(pretrained), strict=True)
    policy.train()
    batch = {k: v for k, v in inputs.items() if not k.startswith("_")}
    loss, _ = policy.forward(dict(batch), noise=inputs["_noise"], time=inputs["_time"])
    loss.backward()
    per_sample, _ = policy.forward(
        dict(batch), noise=inputs["_noise"], time=inputs["_time"], reduction="none"
    )
    out = {"loss": loss.detach().reshape(1), "per_sample": per_sample.detach()}
    for name, param in policy.named_parameters():
        if param.requires_grad and param.grad is not None:
            out[f"grad.{name}"] = param.grad.detach().clone()
    policy.reset()
    out["actions"] = policy.predict_action_chunk(dict(batch), noise=inputs["_noise"]).contiguous()

    pre, post = load_processors(pretrained)
    raw = {"observation.state": inputs["_raw_state"], "task": tasks}
    for key, value in inputs.items():
        if key.startswith("observation.images."):
            raw[key] = value
    processed = pre(raw)
    out["pre.state"] = processed["observation.state"]
    out["pre.tokens"] = processed["observation.language.tokens"]
    out["pre.mask"] = processed["observation.language.attention_mask"].to(torch.int64)
    out["post.action"] = post(inputs["_raw_action"])
    save_file({k: v.contiguous() for k, v in out.items()}, str(workdir / "outputs.safetensors"))
    policy.save_pretrained(str(workdir / "lerobot_saved"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
