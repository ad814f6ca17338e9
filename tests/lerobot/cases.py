"""One definition of each LeRobot parity case, shared by the live tests (which run LeRobot
through the oracle scripts) and the golden tests (which compare with LeRobot's outputs
committed under `tests/lerobot/golden/` by `make_golden.py`).

A case writes its inputs into a work directory exactly as the oracle script reads them;
`inputs_digest` hashes those files so a golden test can tell when a builder no longer makes
the inputs its golden was made from. The comparisons (and their tolerances) live here too, so
the live and the golden test check the same things.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from smolvla_ray.policy import SmolVLAPolicy
from smolvla_ray.policy.fingerprint import tensor_digest
from smolvla_ray.policy.processor import PolicyProcessor
from tests.unit.policy.conftest import make_batch, tiny_config

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
GOLDEN_DIR = HERE / "golden"
REGENERATE = "regenerate with: python tests/lerobot/make_golden.py"
ROOT_TOKEN = "<repo>"  # absolute paths in saved JSON (the tiny VLM's assets) are stored as this
WORKDIR_TOKEN = "<workdir>"

LOSS_TOL = {"rtol": 1e-5, "atol": 1e-6}
GRAD_TOL = {"rtol": 1e-4, "atol": 1e-6}
ACTION_TOL = {"rtol": 1e-4, "atol": 1e-5}


# ---------------------------------------------------------------- digests and file helpers


def tensor_sha256(value: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and the project's digest of its values."""
    text = f"{value.dtype}{tuple(value.shape)}{tensor_digest(value)}"
    return hashlib.sha256(text.encode()).hexdigest()


def canonical_json(text: str, workdir: Path | None = None) -> str:
    """JSON with sorted keys and machine-specific absolute paths replaced by tokens."""
    if workdir is not None:
        text = text.replace(str(workdir), WORKDIR_TOKEN)
    text = text.replace(str(REPO_ROOT), ROOT_TOKEN)
    return json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"


def inputs_digest(workdir: Path, names: Iterable[str]) -> str:
    """sha256 of the named files and directories under `workdir`: JSON canonicalized,
    safetensors by their tensors (so neither paths nor file layout matter)."""
    h = hashlib.sha256()
    for name in sorted(names):
        path = workdir / name
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            h.update(file.relative_to(workdir).as_posix().encode() + b"\0")
            if file.suffix == ".safetensors":
                for key, value in sorted(load_file(str(file)).items()):
                    h.update(f"{key}\0{tensor_sha256(value)}\0".encode())
            elif file.suffix == ".json":
                h.update(canonical_json(file.read_text(), workdir).encode())
            else:
                h.update(file.read_bytes())
    return h.hexdigest()


def run_oracle(python: str, script: str, workdir: Path) -> dict[str, torch.Tensor]:
    """Run a LeRobot oracle script (a file next to this one) on `workdir`; its outputs."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([python, str(HERE / script), str(workdir)], check=True, env=env)
    return load_file(str(workdir / "outputs.safetensors"))


# ---------------------------------------------------------------- parity: tiny policy


PARITY_CASES = {"parity_expert_only": True, "parity_full": False}  # name -> train_expert_only
PARITY_INPUTS = ("pretrained_model", "inputs.safetensors", "tasks.json")


def stats_for(config) -> dict:
    g = torch.Generator().manual_seed(5)
    return {
        "observation.state": {
            "mean": torch.randn(config.state_dim, generator=g),
            "std": torch.rand(config.state_dim, generator=g) + 0.5,
            "min": -torch.ones(config.state_dim),
            "max": torch.ones(config.state_dim),
        },
        "action": {
            "mean": torch.randn(config.action_dim, generator=g),
            "std": torch.rand(config.action_dim, generator=g) + 0.5,
            "min": -torch.ones(config.action_dim),
            "max": torch.ones(config.action_dim),
        },
    }


@dataclass
class ParityCase:
    """A tiny policy with normalization stats, a preprocessed batch with fixed noise and
    flow time, and raw inputs for the processors."""

    policy: SmolVLAPolicy
    batch: dict[str, torch.Tensor]
    noise: torch.Tensor
    time: torch.Tensor
    tasks: list[str]
    raw_state: torch.Tensor
    raw_action: torch.Tensor


def parity_case(train_expert_only: bool) -> ParityCase:
    torch.manual_seed(1)  # the tiny policy's weights
    config = tiny_config(train_expert_only=train_expert_only)
    policy = SmolVLAPolicy(config)
    policy.processor = PolicyProcessor(config, stats_for(config))
    batch = make_batch(config, batch_size=3, seed=2)
    return ParityCase(
        policy=policy,
        batch=batch,
        noise=torch.randn(3, config.chunk_size, config.max_action_dim),
        time=torch.tensor([0.2, 0.5, 0.9]),
        tasks=["pick the red cube", "push the box to the left\n", "open the drawer"],
        raw_state=torch.randn(3, config.state_dim),
        raw_action=torch.randn(3, config.chunk_size, config.action_dim),
    )


def write_parity_inputs(case: ParityCase, workdir: Path) -> str:
    """Write what `oracle.py` reads; the inputs' digest."""
    case.policy.save_pretrained(workdir / "pretrained_model")
    inputs = {
        **case.batch,
        "_noise": case.noise,
        "_time": case.time,
        "_raw_state": case.raw_state,
        "_raw_action": case.raw_action,
    }
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(workdir / "inputs.safetensors"))
    (workdir / "tasks.json").write_text(json.dumps(case.tasks))
    return inputs_digest(workdir, PARITY_INPUTS)


def our_parity_outputs(case: ParityCase) -> dict[str, torch.Tensor]:
    """Ours, under the names `oracle.py` writes LeRobot's."""
    policy, batch = case.policy, case.batch
    policy.train()
    loss, _ = policy(dict(batch), noise=case.noise, time=case.time)
    loss.backward()
    per_sample, _ = policy(dict(batch), noise=case.noise, time=case.time, reduction="none")
    out = {"loss": loss.detach().reshape(1), "per_sample": per_sample.detach()}
    for name, param in policy.trainable_parameters().items():
        out[f"grad.{name}"] = param.grad
    out["actions"] = policy.predict_action_chunk(dict(batch), noise=case.noise)
    processed = policy.processor.preprocess(
        {"observation.state": case.raw_state, "task": case.tasks}
    )
    out["pre.state"] = processed["observation.state"]
    out["pre.tokens"] = processed["observation.language.tokens"]
    out["pre.mask"] = processed["observation.language.attention_mask"].long()
    out["post.action"] = policy.processor.postprocess(case.raw_action)
    return out


GRAD_SKETCHES = 4  # random-sign projections per gradient, besides its norm
FULL_GRAD_MAX_NUMEL = 4096  # goldens keep gradients up to this size whole


def _signs(n: int, k: int) -> torch.Tensor:
    """A fixed ±1 pattern from integer hashing: identical on every machine and torch."""
    x = (torch.arange(n, dtype=torch.int64) + 1) * (2 * k + 0x9E3779B1) & 0xFFFFFFFF
    x = (x ^ (x >> 15)) * 0x2C1B3C6D & 0xFFFFFFFF
    x = (x ^ (x >> 12)) * 0x297A2D39 & 0xFFFFFFFF
    x = x ^ (x >> 15)
    return ((x & 1) * 2 - 1).to(torch.float64)


def grad_sketch(grad: torch.Tensor) -> torch.Tensor:
    """[norm, u_1·g, ..., u_K·g] in float64, u_k fixed unit ±1/sqrt(n) vectors. If two
    gradients agree elementwise within rtol/atol, each entry agrees within
    atol·sqrt(n) + rtol·norm (see `assert_parity`)."""
    flat = grad.detach().reshape(-1).to(torch.float64)
    n = flat.numel()
    projections = [(_signs(n, k) @ flat) / n**0.5 for k in range(GRAD_SKETCHES)]
    return torch.stack([flat.norm(), *projections])


def compact_parity_outputs(outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a golden keeps: everything but the gradients whole, the small gradients whole,
    and a sketch of every gradient."""
    out = {}
    for key, value in outputs.items():
        if not key.startswith("grad."):
            out[key] = value
            continue
        out[f"gradsketch.{key.removeprefix('grad.')}"] = grad_sketch(value)
        if value.numel() <= FULL_GRAD_MAX_NUMEL:
            out[key] = value
    return out


def assert_parity(ours: Mapping[str, torch.Tensor], theirs: Mapping[str, torch.Tensor]) -> None:
    """Our outputs against LeRobot's: whole (live) or compacted (golden)."""
    torch.testing.assert_close(ours["loss"], theirs["loss"], **LOSS_TOL)
    torch.testing.assert_close(ours["per_sample"], theirs["per_sample"], **LOSS_TOL)
    our_grads = {k.removeprefix("grad."): v for k, v in ours.items() if k.startswith("grad.")}
    grads = {k.removeprefix("grad."): v for k, v in theirs.items() if k.startswith("grad.")}
    sketches = {
        k.removeprefix("gradsketch."): v for k, v in theirs.items() if k.startswith("gradsketch.")
    }
    assert set(sketches or grads) == set(our_grads)
    for name, sketch in sketches.items():
        atol = GRAD_TOL["atol"] * our_grads[name].numel() ** 0.5 + GRAD_TOL["rtol"] * sketch[0]
        torch.testing.assert_close(
            grad_sketch(our_grads[name]), sketch, rtol=0, atol=float(atol), msg=name
        )
    for name, grad in grads.items():
        torch.testing.assert_close(our_grads[name], grad, **GRAD_TOL, msg=name)
    torch.testing.assert_close(ours["actions"], theirs["actions"], **ACTION_TOL)
    torch.testing.assert_close(ours["pre.state"], theirs["pre.state"])
    assert torch.equal(ours["pre.tokens"], theirs["pre.tokens"])
    assert torch.equal(ours["pre.mask"], theirs["pre.mask"])
    torch.testing.assert_close(ours["post.action"], theirs["post.action"])


def weights_manifest(directory: Path) -> dict[str, str]:
    """tensor name -> sha256 of a `pretrained_model/`'s model.safetensors."""
    tensors = load_file(str(directory / "model.safetensors"))
    return {key: tensor_sha256(value) for key, value in sorted(tensors.items())}


# ---------------------------------------------------------------- raw inference: real shapes


RAW_INFERENCE_INPUTS = ("pretrained_model", "raw.safetensors", "task.json")
RAW_TASK = "push the block to the left"


def write_raw_inference_inputs(workdir: Path) -> str:
    """A finetune of a smolvla_base-shaped checkpoint on a LIBERO-shaped dataset (renamed
    cameras, other widths), exported to WORKDIR/pretrained_model, and a raw observation under
    the dataset's own key names; what `oracle_raw_inference.py` reads. The inputs' digest."""
    from smolvla_ray.build import build_policy
    from smolvla_ray.data.meta import load_meta
    from smolvla_ray.settings import RunSettings
    from smolvla_ray.spec import spec_from_dict
    from tests.realshape import RENAME_MAP, STATE_DIM
    from tests.realshape import write_base_shaped_checkpoint as write_base
    from tests.realshape import write_libero_shaped_dataset as write_dataset

    base = write_base(workdir / "build" / "smolvla_base")
    dataset = write_dataset(workdir / "build" / "libero", episodes=2, length=10)
    spec = spec_from_dict({
        "name": "oracle",
        "policy": {"pretrained": base},
        "data": {"uri": dataset, "rename_map": RENAME_MAP},
        "train": {"steps": 1, "batch_size": 1},
        "checkpoint": {"storage": str(workdir / "build" / "runs")},
    })  # fmt: skip
    policy = build_policy(RunSettings.from_spec(spec), load_meta(dataset), storage_options={})
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # a "finetuned" expert: not the base's weights
        for param in policy.trainable_parameters().values():
            param.add_(0.01 * torch.randn(param.shape, generator=g))
    policy.save_pretrained(str(workdir / "pretrained_model"))

    g = torch.Generator().manual_seed(4)
    raw = {
        "observation.images.image": torch.rand(3, 64, 80, generator=g),
        "observation.images.image2": torch.rand(3, 64, 80, generator=g),
        "observation.state": torch.randn(STATE_DIM, generator=g),
    }
    noise = torch.randn(1, policy.config.chunk_size, policy.config.max_action_dim, generator=g)
    save_file({**raw, "_noise": noise}, str(workdir / "raw.safetensors"))
    (workdir / "task.json").write_text(json.dumps(RAW_TASK))
    return inputs_digest(workdir, RAW_INFERENCE_INPUTS)


def assert_raw_inference_like_lerobot(
    workdir: Path, theirs: Mapping[str, torch.Tensor], their_keys: Iterable[str]
) -> None:
    """Ours on WORKDIR's raw observation against LeRobot's outputs (`their_keys`: every
    key `oracle_raw_inference.py` wrote, some of which a golden does not keep)."""
    from tests.realshape import ACTION_DIM

    inputs = load_file(str(workdir / "raw.safetensors"))
    raw = {k: v for k, v in inputs.items() if not k.startswith("_")}
    ours = SmolVLAPolicy.from_pretrained(str(workdir / "pretrained_model")).eval()
    batch = ours.processor.preprocess({**raw, "task": RAW_TASK})
    # LeRobot renamed the raw keys with the saved map and normalized the 8-D state.
    their_keys = set(their_keys)
    assert "pre.observation.images.camera1" in their_keys
    assert "pre.observation.images.image" not in their_keys
    torch.testing.assert_close(batch["observation.state"], theirs["pre.observation.state"])
    assert int(theirs["_image_features"]) == 2  # the cameras actually trained
    with torch.no_grad():
        action = ours.select_action(batch, noise=inputs["_noise"])
    torch.testing.assert_close(action, theirs["normalized_action"], **ACTION_TOL)
    robot = ours.processor.postprocess(action)
    assert robot.shape == (1, ACTION_DIM)
    torch.testing.assert_close(robot, theirs["action"], **ACTION_TOL)


RAW_INFERENCE_GOLDEN_KEYS = (
    "action",
    "normalized_action",
    "pre.observation.state",
    "_image_features",
)


# ---------------------------------------------------------------- evaluate: LeRobot re-saved


def evaluate_both(workdir: Path, theirs: Path) -> tuple[dict, dict]:
    """`smolvla-ray evaluate` of our export (WORKDIR/pretrained_model) and of the same weights
    as LeRobot saved them (`theirs`: its config, processors and rename map), on the
    LIBERO-shaped dataset the raw-inference inputs wrote: (ours, theirs), each the JSON
    record evaluate wrote."""
    from smolvla_ray.evaluation.offline import JSON_NAME, evaluate

    dataset = str(workdir / "build" / "libero")
    records = []
    for source, out in ((workdir / "pretrained_model", "ours"), (theirs, "theirs")):
        evaluate(
            str(source), dataset, out=workdir / "eval" / out, max_samples=None, batch_size=4,
            plot_episodes=0, say=lambda _: None,
        )  # fmt: skip
        records.append(json.loads((workdir / "eval" / out / JSON_NAME).read_text()))
    return records[0], records[1]


def assert_evaluations_equal(ours: dict, theirs: dict) -> None:
    """Every summary and table entry equal, bit for bit (same weights, same samples)."""
    assert ours["summary"]["eval/samples"] == 13  # every frame of the 2 episodes (10 + 3)
    for key in ("summary", "per_dimension", "per_horizon_step", "valid_per_horizon_step"):
        assert ours[key] == theirs[key], key


# ---------------------------------------------------------------- LoRA adapters, both ways

LORA_INPUTS = ("base", "ours_adapter", "inputs.safetensors")


def write_lora_inputs(workdir: Path) -> str:
    """A tiny base policy, our adapter export of LoRA adapters on it (random, non-zero) and
    its `--merge` twin (`ours_merged`, not an oracle input), and a batch with fixed noise:
    what `oracle_lora.py` reads. Returns the inputs' digest."""
    from smolvla_ray.policy.adapters import LoraSettings, add_adapters, merge_adapters

    torch.manual_seed(1)
    config = tiny_config()
    base = SmolVLAPolicy(config)
    base.processor = PolicyProcessor(config, stats_for(config))
    base.save_pretrained(workdir / "base")
    settings = LoraSettings(r=4, lora_alpha=8, full_training_modules=("action_out_proj",))
    add_adapters(base, settings, seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for param in base.trainable_parameters().values():
            param.copy_(torch.randn(param.shape, generator=g) * 0.05)
    base.adapter_base = (str(workdir / "base"), None)
    base.save_pretrained(workdir / "ours_adapter")
    merge_adapters(base)
    base.save_pretrained(workdir / "ours_merged")
    batch = make_batch(config, batch_size=2, seed=5)
    noise = torch.randn(2, config.chunk_size, config.max_action_dim, generator=g)
    save_file(
        {**{k: v.contiguous() for k, v in batch.items()}, "_noise": noise},
        str(workdir / "inputs.safetensors"),
    )
    return inputs_digest(workdir, LORA_INPUTS)


def lora_actions(policy_dir: Path, workdir: Path) -> torch.Tensor:
    """Our actions from the policy at `policy_dir` on `oracle_lora.py`'s batch and noise."""
    inputs = load_file(str(workdir / "inputs.safetensors"))
    batch = {k: v for k, v in inputs.items() if not k.startswith("_")}
    policy = SmolVLAPolicy.from_pretrained(str(policy_dir))
    return policy.predict_action_chunk(batch, noise=inputs["_noise"])
