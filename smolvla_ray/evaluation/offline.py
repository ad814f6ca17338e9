"""`smolvla-ray evaluate`: the held-out metrics of any policy on any LeRobot dataset.

The policy is one of our checkpoints (a `checkpoint_*` directory, or `<run>/best`), an
export, or a `pretrained_model/` that LeRobot itself saved, rename map included (from its
saved preprocessor). Its own processor normalizes (the statistics it was trained with); the
dataset's cameras are matched to the policy's as in training (`features.resolve_features`).
Episodes default to a checkpoint's own held-out episodes when the dataset is the one it
trained on, else every episode. A checkpoint of a run that kept an EMA of its weights
(`train.ema`) is evaluated with the EMA, as export writes it, unless `raw_weights`; the
record's `weights` says which (`saved` for an export or a LeRobot `pretrained_model/`: the
weights it holds). Writes `evaluation.json` (summaries and the full table),
`evaluation.md` and `trajectories.png` (predicted vs recorded actions per dimension).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from smolvla_ray import hub
from smolvla_ray.data.meta import DatasetMeta, load_meta, select_episodes
from smolvla_ray.data.samples import FrameDataset, collate_samples
from smolvla_ray.features import resolve_features
from smolvla_ray.keys import ACTION
from smolvla_ray.policy.modeling import SmolVLAPolicy
from smolvla_ray.storage import absolute, filesystem, join
from smolvla_ray.train.evaluation import (
    SAMPLING_KEY,
    EvalSums,
    HeldOut,
    evaluate_batches,
    evenly_spaced,
)
from smolvla_ray.train.step import flow_noise_and_time, to_device

JSON_NAME, MARKDOWN_NAME, PNG_NAME = "evaluation.json", "evaluation.md", "trajectories.png"
# Which weights were evaluated: a checkpoint's EMA or raw trained weights, or what a
# pretrained_model/ holds.
Weights = Literal["ema", "raw", "saved"]
_WEIGHTS_SHOWN = {
    "ema": "the run's EMA of its trained weights",
    "raw": "the raw trained weights",
    "saved": "as saved",
}
DEFAULT_SAMPLES, DEFAULT_SEED = 256, 1000


@dataclass
class Evaluated:
    """What `evaluate` measured and wrote."""

    summary: dict[str, float]
    table: dict[str, Any]
    episodes: list[int]
    files: list[Path]
    weights: Weights = "saved"


def load_policy(
    source: str, storage_options: Mapping[str, Any], *, raw_weights: bool = False
) -> tuple[SmolVLAPolicy, dict[str, Any] | None, Weights]:
    """The policy at `source`, for one of our checkpoints the spec it was trained with, and
    which weights the policy holds (a checkpoint's EMA unless `raw_weights`)."""
    from smolvla_ray.checkpoint.best import resolve_best
    from smolvla_ray.checkpoint.export import load_trained
    from smolvla_ray.checkpoint.format import MANIFEST, STATE

    source = resolve_best(source, storage_options)
    fs, root = filesystem(source, storage_options)
    if fs.exists(join(root, MANIFEST)):
        spec = json.loads(fs.cat_file(join(root, STATE))).get("spec")
        trained = load_trained(source, storage_options, raw_weights=raw_weights)
        return trained.policy, spec, trained.weights
    if raw_weights:
        raise ValueError(
            f"--raw-weights picks a checkpoint's raw weights over its EMA, but {source} is a "
            "pretrained_model/ (it holds one set of weights); drop --raw-weights"
        )
    return SmolVLAPolicy.from_pretrained(source, **dict(storage_options)), None, "saved"


def default_episodes(
    meta: DatasetMeta, data: str, spec: Mapping[str, Any] | None
) -> tuple[list[int], str]:
    """A checkpoint's own held-out episodes on its own dataset, else all; and why."""
    trained_on = (spec or {}).get("data", {}).get("uri")
    if spec and spec.get("eval") and trained_on and absolute(trained_on) == absolute(data):
        from smolvla_ray.build import eval_episodes
        from smolvla_ray.settings import RunSettings

        held = eval_episodes(RunSettings.from_spec_json(spec), meta)
        return held, "the checkpoint's held-out episodes"
    return select_episodes(meta, None), "every episode"


def evaluate(
    source: str,
    data: str,
    *,
    out: Path,
    episodes: Sequence[int] | None = None,
    revision: str | None = None,
    max_samples: int | Literal["auto"] | None = "auto",
    batch_size: int = 8,
    seed: int | None = None,
    device: torch.device | None = None,
    plot_episodes: int = 3,
    raw_weights: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    say=print,
) -> Evaluated:
    """Evaluate `source` on `data` and write the report files into `out` (a checkpoint
    with its EMA weights when it has them, unless `raw_weights`)."""
    options = dict(storage_options or {})
    device = device or torch.device("cpu")
    policy, spec, weights = load_policy(source, options, raw_weights=raw_weights)
    if spec and spec.get("data", {}).get("datasets"):
        # Its policy as one dataset sees it (statistics, cameras, widths) is an export.
        from smolvla_ray.settings import RunSettings

        names = [d.name for d in RunSettings.from_spec_json(spec).data.mixture or ()]
        raise ValueError(
            f"{source} was trained on a mixture (data.datasets: {names}); `evaluate` takes "
            "one dataset's policy: run `smolvla-ray export CHECKPOINT OUT --dataset NAME`, "
            "then `smolvla-ray evaluate OUT --data DATASET` (the run's own eval section "
            "evaluates each dataset's held-out episodes during training)"
        )
    if policy.processor is None:
        raise ValueError(f"{source} has no processor files: its normalization is unknown")
    meta = load_meta(hub.dataset_url(data, revision), storage_options=options)
    if episodes is None:
        chosen, why = default_episodes(meta, data, spec)
    else:
        chosen, why = select_episodes(meta, list(episodes)), "--episodes"
    # On a checkpoint's own held-out episodes, its own samples and seed by default: the
    # numbers then equal the ones the run logged for this checkpoint.
    own = why == "the checkpoint's held-out episodes" and spec is not None
    if max_samples == "auto":
        max_samples = spec["eval"].get("max_samples") if own and spec else DEFAULT_SAMPLES
    if seed is None:
        seed = int(spec["train"]["seed"]) if own and spec else DEFAULT_SEED
    resolution = resolve_features(
        policy.config, meta.features, rename_map=policy.processor.rename_map,
        policy_source=source, dataset_source=data,
    )  # fmt: skip
    policy.feature_resolution = resolution
    policy.to(device).eval()
    dataset = FrameDataset(
        meta, episodes=chosen, cameras=list(resolution.sources.values()),
        chunk_size=policy.config.chunk_size, storage_options=options,
        image_dtype=torch.uint8 if policy.processor.takes_uint8_images() else torch.float32,
    )  # fmt: skip
    rows = evenly_spaced(len(dataset), max_samples)
    shown = {"ema": " (its EMA weights)", "raw": " (its raw weights)", "saved": ""}[weights]
    say(
        f"evaluating {source}{shown} on {len(rows)} samples of {len(chosen)} episode(s) "
        f"({why}) of {data}"
    )
    held_out = HeldOut(dataset, rows, batch_size=batch_size, transform=policy.processor.preprocess)
    sums: EvalSums = evaluate_batches(policy, held_out.batches(), seed=seed, device=device)
    summary, table = sums.summary(), sums.table()
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "source": source, "weights": weights, "data": data, "episodes": chosen, "seed": seed,
        "summary": summary, **table,
    }  # fmt: skip
    (out / JSON_NAME).write_text(json.dumps(record, indent=1))
    (out / MARKDOWN_NAME).write_text(render_markdown(record))
    files = [out / JSON_NAME, out / MARKDOWN_NAME]
    if plot_episodes > 0:
        files.append(
            plot_trajectories(
                policy, dataset, chosen[:plot_episodes], out / PNG_NAME, seed=seed, device=device
            )
        )
    return Evaluated(summary, table, chosen, files, weights)


def render_markdown(record: Mapping[str, Any]) -> str:
    """The summaries and the per-dimension table as markdown."""
    s = record["summary"]
    lines = [
        f"# Evaluation of {record['source']}",
        "",
        *([f"Weights: {_WEIGHTS_SHOWN[record['weights']]}.", ""] if "weights" in record else []),
        f"Data: {record['data']}, episodes {record['episodes']}, "
        f"{int(s['eval/samples'])} samples (seed {record['seed']}).",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {v:.6g} |" for k, v in s.items()],
        "",
        "| action dim | MSE | L1 | MSE (robot units) | L1 (robot units) |",
        "|---|---|---|---|---|",
    ]
    per = record["per_dimension"]
    for dim in range(len(per["mse"])):
        lines.append(
            f"| {dim} | {per['mse'][dim]:.6g} | {per['l1'][dim]:.6g} | "
            f"{per['mse_robot'][dim]:.6g} | {per['l1_robot'][dim]:.6g} |"
        )
    return "\n".join(lines) + "\n"


@torch.no_grad()
def plot_trajectories(
    policy: SmolVLAPolicy,
    dataset: FrameDataset,
    episodes: Sequence[int],
    path: Path,
    *,
    seed: int,
    device: torch.device,
    points: int = 40,
) -> Path:
    """Predicted (the first action of the chunk sampled at a frame) against recorded actions,
    in robot units, per action dimension (rows) and episode (columns)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    processor = policy.processor
    assert processor is not None
    dims = policy.config.action_dim
    fig, axes = plt.subplots(
        dims, len(episodes), figsize=(4 * len(episodes), 1.6 * dims), squeeze=False
    )
    episode_of = dataset.frames.episode_index  # type: ignore[attr-defined]
    for column, episode in enumerate(episodes):
        rows = [i for i in range(len(dataset)) if int(episode_of[i]) == episode]
        picked = evenly_spaced(len(rows), points)
        predicted, recorded, frames = [], [], []
        for start in range(0, len(picked), 8):
            samples = [dataset[rows[p]] for p in picked[start : start + 8]]
            raw = collate_samples(samples)
            batch = to_device(processor.preprocess(raw), device)
            noise, _ = flow_noise_and_time(
                raw["index"].tolist(), seed=seed, step=SAMPLING_KEY,
                chunk_size=policy.config.chunk_size, action_dim=policy.config.max_action_dim,
            )  # fmt: skip
            chunk = policy.predict_action_chunk(batch, noise=noise.to(device))
            predicted.append(processor.postprocess(chunk[:, 0]).cpu())
            recorded.append(processor.postprocess(batch[ACTION][:, 0, :dims]).cpu())
            frames.extend(int(f) for f in raw["frame_index"])
        pred, rec = torch.cat(predicted), torch.cat(recorded)
        for dim in range(dims):
            axis = axes[dim][column]
            axis.plot(frames, rec[:, dim], label="recorded", color="black", linewidth=1)
            axis.plot(frames, pred[:, dim], label="predicted", color="tab:orange", linewidth=1)
            if dim == 0:
                axis.set_title(f"episode {episode}")
            if column == 0:
                axis.set_ylabel(f"action {dim}")
    axes[0][0].legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
