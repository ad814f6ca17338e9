"""The checkpoint format: only what training changed, no pickle, a manifest written last.

A checkpoint directory holds

    trainable.safetensors   trainable parameters by state-dict name (float32)
    optimizer.safetensors   AdamW moments and step per parameter name
    state.json              step, epoch, optimizer param groups, scheduler state, the data
                            cursor of every worker (the same global position on each: any
                            world size with the run's global batch resumes from it), the
                            spec, the policy config and the base weights' identity
    rng.safetensors         torch RNG state of every worker (restored on the same number of
                            workers only: no training result depends on it)
    ema.safetensors         with `train.ema` on: the EMA of the trainable parameters by
                            state-dict name (float32)
    processor files         LeRobot's normalizer statistics (for export)
    manifest.json           size and sha256 of every file above; written last

A checkpoint without a manifest, or whose files do not match it, is never resumed from.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"
RNG = "rng.safetensors"
EMA = "ema.safetensors"  # only with train.ema on
MANIFEST = "manifest.json"
# What every checkpoint holds; a manifest that leaves one out does not verify.
REQUIRED_FILES = (TRAINABLE, OPTIMIZER, RNG, STATE)


@dataclass
class TrainingState:
    """Everything besides tensors that resuming needs, as JSON."""

    step: int
    epoch: int
    cursors: list[dict[str, Any]]
    param_names: list[str]
    param_groups: list[dict[str, Any]]
    scheduler: dict[str, Any]
    spec: dict[str, Any]
    policy_config: dict[str, Any]
    base: dict[str, Any]
    counters: dict[str, Any] = field(default_factory=dict)
    features: dict[str, Any] | None = None
    """The feature resolution trained with (`FeatureResolution.to_json`): dataset camera ->
    policy camera, widths, the rename map."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def optimizer_tensors(
    optimizer: torch.optim.Optimizer, names: list[str]
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """AdamW state as named tensors plus its param groups (hyperparameters) as JSON."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"{key}/{names[index]}"] = tensor.detach().to("cpu").contiguous()
    groups = [{k: v for k, v in g.items()} for g in state["param_groups"]]
    for group in groups:
        group["betas"] = list(group.get("betas", ()))
    return tensors, groups


def load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    tensors: Mapping[str, torch.Tensor],
    names: list[str],
    groups: list[dict[str, Any]],
) -> None:
    """Inverse of `optimizer_tensors`; parameters are matched by name."""
    position = {name: i for i, name in enumerate(names)}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        kind, _, name = key.partition("/")
        if name not in position:
            raise ValueError(f"optimizer state names {name!r}, which is not a trainable parameter")
        state.setdefault(position[name], {})[kind] = value
    restored = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in groups]
    optimizer.load_state_dict({"state": state, "param_groups": restored})


def check_finite(tensors: Mapping[str, torch.Tensor], *, what: str) -> None:
    """Raise RuntimeError naming the tensors of `tensors` that hold NaN or inf."""
    bad = [
        name
        for name, tensor in tensors.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
    if bad:
        raise RuntimeError(
            f"refusing to write a checkpoint with non-finite values: NaN/inf in {len(bad)} "
            f"tensor(s) of the {what}, e.g. {bad[:3]}. Training diverged; lower "
            "train.optimizer.lr or set failure.on_nonfinite: skip"
        )


def write_checkpoint(
    directory: Path,
    *,
    trainable: Mapping[str, torch.Tensor],
    optimizer: Mapping[str, torch.Tensor],
    rng_states: list[torch.Tensor],
    state: TrainingState,
    ema: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Write the checkpoint's files, then the manifest of every file in `directory` (files
    placed there before, such as processor files, are covered too). Refuses non-finite
    weights, EMA or optimizer state: resuming from them could never recover."""
    check_finite(trainable, what=f"trainable parameters at step {state.step}")
    check_finite(optimizer, what=f"optimizer state at step {state.step}")
    if ema is not None:
        check_finite(ema, what=f"EMA of the trainable parameters at step {state.step}")
    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in trainable.items()},
        str(directory / TRAINABLE),
    )
    save_file(dict(optimizer), str(directory / OPTIMIZER))
    if ema is not None:
        save_file(
            {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in ema.items()},
            str(directory / EMA),
        )
    save_file({f"rank{i}": t for i, t in enumerate(rng_states)}, str(directory / RNG))
    (directory / STATE).write_text(json.dumps(state.__dict__, indent=1, default=str))
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest = {
        "format_version": FORMAT_VERSION,
        "step": state.step,
        "files": {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in files},
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))


def manifest_problem(
    files: Mapping[str, Mapping[str, Any]],
    size_of: Callable[[str], int | None],
    sha256_of: Callable[[str], str] | None,
    present: Iterable[str] = (),
) -> str | None:
    """The one rule a checkpoint's files are checked by, wherever they are: the manifest
    lists every required file and every file `present` in the directory (dotfiles aside:
    storage systems' own markers), and each listed file exists with its size and (when
    `sha256_of` is given) its sha256. None when all match, else what is wrong.
    `size_of(name)` is None for a missing file."""
    if not isinstance(files, Mapping):
        return "manifest.json is malformed: its files are not a mapping"
    unlisted = [n for n in REQUIRED_FILES if n not in files]
    unlisted += sorted(
        n for n in present if n not in files and n != MANIFEST and not n.startswith(".")
    )
    if unlisted:
        return f"the manifest does not list {', '.join(unlisted)}"
    for name, entry in files.items():
        if not isinstance(entry, Mapping) or not {"size", "sha256"} <= entry.keys():
            return f"manifest.json is malformed: the entry of {name} lacks size or sha256"
        size = size_of(name)
        if size is None:
            return f"{name} is missing"
        if size != entry["size"]:
            return f"{name} has {size} bytes, manifest says {entry['size']}"
        if sha256_of is not None and sha256_of(name) != entry["sha256"]:
            return f"{name} does not match its sha256 in the manifest"
    return None


def verify_checkpoint(directory: Path) -> str | None:
    """None when every file of a local checkpoint matches the manifest, else what is wrong."""
    manifest_path = directory / MANIFEST
    if not manifest_path.exists():
        return "no manifest.json (the checkpoint was not finished)"
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        return f"manifest.json is malformed: {err}"

    def size_of(name: str) -> int | None:
        path = directory / name
        return path.stat().st_size if path.exists() else None

    present = [p.name for p in directory.iterdir() if p.is_file()]
    return manifest_problem(files, size_of, lambda name: sha256_file(directory / name), present)


@dataclass
class LoadedCheckpoint:
    """A verified checkpoint read back into memory."""

    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    rng_states: list[torch.Tensor]
    state: TrainingState
    directory: Path
    ema: dict[str, torch.Tensor] | None = None
    """The EMA of the trainable parameters (`train.ema`); None when the run kept none."""


def read_checkpoint(directory: Path) -> LoadedCheckpoint:
    """Read a checkpoint, refusing one that does not verify."""
    problem = verify_checkpoint(directory)
    if problem is not None:
        raise ValueError(f"checkpoint {directory} is not valid: {problem}")
    rng = load_file(str(directory / RNG))
    state = TrainingState(**json.loads((directory / STATE).read_text()))
    return LoadedCheckpoint(
        trainable=load_file(str(directory / TRAINABLE)),
        optimizer=load_file(str(directory / OPTIMIZER)),
        rng_states=[rng[f"rank{i}"] for i in range(len(rng))],
        state=state,
        directory=directory,
        ema=load_file(str(directory / EMA)) if (directory / EMA).exists() else None,
    )


MIXTURE_STATS = "mixture_stats.safetensors"


def save_mixture_stats(directory: Path, processors: Mapping[str, Any]) -> None:
    """Every mixture dataset's normalization statistics, `<name>/<key>.<stat>`, in one file
    of the checkpoint (its processor files hold the first dataset's), for `export
    --dataset NAME`."""
    flat = {
        f"{name}/{key}": value
        for name, processor in processors.items()
        for key, value in processor.flat_stats().items()
    }
    save_file(flat, str(Path(directory) / MIXTURE_STATS))


def load_mixture_stats(directory: Path, name: str) -> dict[str, dict[str, torch.Tensor]]:
    """One mixture dataset's statistics from a checkpoint, keyed by policy key."""
    path = Path(directory) / MIXTURE_STATS
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the checkpoint holds no mixture statistics")
    stats: dict[str, dict[str, torch.Tensor]] = {}
    for flat_key, value in load_file(str(path)).items():
        owner, _, rest = flat_key.partition("/")
        if owner == name:
            key, _, stat = rest.rpartition(".")
            stats.setdefault(key, {})[stat] = value
    return stats
