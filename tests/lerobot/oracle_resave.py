"""Runs inside a LeRobot 0.6.1 interpreter (never imported by smolvla-ray or by CI).

Usage: python oracle_resave.py WORKDIR. Loads WORKDIR/pretrained_model (our export of a
finetune across renamed cameras) with LeRobot's own loaders and saves it again with LeRobot's
own `save_pretrained`: the policy (config.json, model.safetensors) and both processor
pipelines (their JSON and statistics, the rename map inside the preprocessor) into
WORKDIR/lerobot_saved, the directory `smolvla-ray evaluate` must treat like our export.
"""

import sys
from pathlib import Path

from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
from oracle import load_processors
from safetensors.torch import save_file


def main(workdir: Path) -> None:
    pretrained = workdir / "pretrained_model"
    policy = SmolVLAPolicy.from_pretrained(str(pretrained), strict=True)
    pre, post = load_processors(pretrained)  # the script's directory is on sys.path
    saved = workdir / "lerobot_saved"
    policy.save_pretrained(str(saved))
    pre.save_pretrained(str(saved))
    post.save_pretrained(str(saved))
    save_file({}, str(workdir / "outputs.safetensors"))  # what run_oracle reads back


if __name__ == "__main__":
    main(Path(sys.argv[1]))
