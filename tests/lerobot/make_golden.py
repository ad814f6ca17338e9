"""Regenerate LeRobot's outputs for the parity checks, committed under tests/lerobot/golden/.

    python tests/lerobot/make_golden.py [--lerobot-python PATH] [CASE ...]

Run with the project's own python (the inputs are built by our code, from `cases.py`); the
LeRobot 0.6.1 interpreter (`--lerobot-python`, else $LEROBOT_PYTHON, else
/work/lerobot-venv/bin/python) runs the same oracle scripts the live tests run. Each case
writes golden/CASE/outputs.safetensors (LeRobot's tensors, compacted: small gradients whole,
a sketch of every gradient) and golden/CASE/meta.json (versions and the sha256 of the inputs,
which the golden tests check first). Parity cases also keep what LeRobot's save_pretrained
wrote besides the weights (golden/CASE/lerobot_saved/) and a manifest of those weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from safetensors.torch import save_file

from tests.lerobot import cases

DEFAULT_LEROBOT_PYTHON = "/work/lerobot-venv/bin/python"
CASES = [*cases.PARITY_CASES, "raw_inference", "evaluate_resaved", "lora"]


def lerobot_versions(python: str) -> dict[str, str]:
    code = (
        "import json, lerobot, torch; print(json.dumps([lerobot.__version__, torch.__version__]))"
    )
    out = subprocess.run([python, "-c", code], check=True, capture_output=True, text=True)
    lerobot_version, torch_version = json.loads(out.stdout.strip().splitlines()[-1])
    return {"lerobot": lerobot_version, "lerobot_torch": torch_version}


def parity_golden(name: str, python: str, workdir: Path, target: Path) -> dict:
    case = cases.parity_case(train_expert_only=cases.PARITY_CASES[name])
    digest = cases.write_parity_inputs(case, workdir)
    theirs = cases.run_oracle(python, "oracle.py", workdir)
    saved = workdir / "lerobot_saved"
    _keep_saved(workdir, target)
    save_file(
        {k: v.contiguous() for k, v in cases.compact_parity_outputs(theirs).items()},
        str(target / "outputs.safetensors"),
    )
    return {"inputs_sha256": digest, "lerobot_saved_weights": cases.weights_manifest(saved)}


def raw_inference_golden(python: str, workdir: Path, target: Path) -> dict:
    digest = cases.write_raw_inference_inputs(workdir)
    theirs = cases.run_oracle(python, "oracle_raw_inference.py", workdir)
    kept = {k: theirs[k].contiguous() for k in cases.RAW_INFERENCE_GOLDEN_KEYS}
    save_file(kept, str(target / "outputs.safetensors"))
    return {"inputs_sha256": digest, "lerobot_output_keys": sorted(theirs)}


def evaluate_resaved_golden(python: str, workdir: Path, target: Path) -> dict:
    """LeRobot re-saves our real-shaped export (policy and processors): keep what it wrote
    besides the weights, and a manifest of the weights."""
    digest = cases.write_raw_inference_inputs(workdir)
    cases.run_oracle(python, "oracle_resave.py", workdir)
    _keep_saved(workdir, target)
    save_file({}, str(target / "outputs.safetensors"))
    return {
        "inputs_sha256": digest,
        "lerobot_saved_weights": cases.weights_manifest(workdir / "lerobot_saved"),
    }


def lora_golden(python: str, workdir: Path, target: Path) -> dict:
    """LeRobot's actions on our adapter export, and an adapter LeRobot saved (its files,
    naming the base in the work directory, and its actions)."""
    digest = cases.write_lora_inputs(workdir)
    theirs = cases.run_oracle(python, "oracle_lora.py", workdir)
    save_file({k: v.contiguous() for k, v in theirs.items()}, str(target / "outputs.safetensors"))
    _keep_saved(workdir, target, "lerobot_adapter")
    return {"inputs_sha256": digest}


def _keep_saved(workdir: Path, target: Path, name: str = "lerobot_saved") -> None:
    saved = workdir / name
    (target / name).mkdir(parents=True)
    for file in sorted(saved.iterdir()):
        if file.name in ("model.safetensors", "README.md"):  # README: PEFT's model card
            continue
        if file.suffix == ".json":
            text = cases.canonical_json(file.read_text(), workdir)
            (target / name / file.name).write_text(text)
        else:
            shutil.copyfile(file, target / name / file.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--lerobot-python",
        default=os.environ.get("LEROBOT_PYTHON", DEFAULT_LEROBOT_PYTHON),
        help="a python with lerobot[smolvla]==0.6.1 (default: $LEROBOT_PYTHON, else %(default)s)",
    )
    parser.add_argument("--out", type=Path, default=cases.GOLDEN_DIR)
    parser.add_argument("cases", nargs="*", metavar="CASE", help=f"default: all of {CASES}")
    args = parser.parse_args()
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {CASES}")
    versions = lerobot_versions(args.lerobot_python)
    for name in args.cases or CASES:
        target = args.out / name
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        with tempfile.TemporaryDirectory(prefix=f"golden-{name}-") as tmp:
            if name == "raw_inference":
                meta = raw_inference_golden(args.lerobot_python, Path(tmp), target)
            elif name == "lora":
                meta = lora_golden(args.lerobot_python, Path(tmp), target)
            elif name == "evaluate_resaved":
                meta = evaluate_resaved_golden(args.lerobot_python, Path(tmp), target)
            else:
                meta = parity_golden(name, args.lerobot_python, Path(tmp), target)
        meta = {
            "case": name,
            **versions,
            "torch": torch.__version__,  # ours, that built the inputs
            "platform": f"{platform.system()} {platform.machine()}",
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "regenerate": "python tests/lerobot/make_golden.py " + name,
            **meta,
        }
        (target / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
        print(f"{name}: {size / 1024:.1f} KiB in {target}")


if __name__ == "__main__":
    main()
