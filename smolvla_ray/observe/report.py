"""`smolvla-ray report`: a run's metrics as a PNG (loss, learning rate, throughput over
steps; with held-out evaluation, its loss beside the training loss and its action MSE) and a
markdown summary (spec, duration, final loss, evaluations, checkpoints, restarts).

Everything comes from the run directory: `metrics.jsonl`, the checkpoints and the resolved
spec inside the newest one. The output depends only on those, not on the time or the
machine, so regenerating a report from the same run gives the same files.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smolvla_ray.storage import filesystem, join, mask_userinfo

PNG_NAME = "report.png"
MARKDOWN_NAME = "report.md"
FIGURE_INCHES = (8.0, 9.0)
FIGURE_DPI = 100  # -> an 800 x 900 pixel PNG


@dataclass(frozen=True)
class Plotted:
    """The points drawn in each panel, in step order."""

    steps: list[int]
    loss: list[float]
    lr: list[float]
    samples_per_s: list[float]
    # Held-out evaluations (docs/evaluation.md), at the step each evaluated (an async one's
    # `eval/checkpoint_step`); empty for a run without an eval section.
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    eval_action_mse: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Report:
    """What `write_report` produced."""

    png: Path
    markdown: Path
    plotted: Plotted
    summary: dict[str, Any] = field(default_factory=dict)


def plotted_series(records: Sequence[Mapping[str, Any]]) -> Plotted:
    """The series to plot: one point per record, in file order (metrics.jsonl keeps one
    record per step; a resumed run rewrote the steps it redid)."""
    evaluated = [r for r in records if "eval/loss" in r]
    return Plotted(
        steps=[int(r["step"]) for r in records],
        loss=[float(r.get("loss", math.nan)) for r in records],
        lr=[float(r.get("lr", math.nan)) for r in records],
        samples_per_s=[float(r.get("samples_per_s", math.nan)) for r in records],
        eval_steps=[int(r.get("eval/checkpoint_step", r["step"])) for r in evaluated],
        eval_loss=[float(r["eval/loss"]) for r in evaluated],
        eval_action_mse=[float(r.get("eval/action_mse", math.nan)) for r in evaluated],
    )


def render_png(records: Sequence[Mapping[str, Any]], path: Path, *, title: str) -> Plotted:
    """Three stacked panels (loss, learning rate, samples/s) over steps, written to `path`
    as an 800x900 PNG; returns the plotted points."""
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display; also the deterministic backend
    import matplotlib.pyplot as plt

    data = plotted_series(records)
    panels = [
        ("loss", data.loss, "loss (mean over log window)"),
        ("lr", data.lr, "learning rate"),
        ("samples_per_s", data.samples_per_s, "samples / s (all workers)"),
    ]
    evaluated = bool(data.eval_steps)
    if evaluated:
        panels.insert(1, ("eval/action_mse", data.eval_action_mse, "held-out action MSE"))
    size = (FIGURE_INCHES[0], FIGURE_INCHES[1] + (2.5 if evaluated else 0.0))
    with matplotlib.rc_context({"svg.hashsalt": "smolvla-ray", "font.size": 9}):
        fig, axes = plt.subplots(len(panels), 1, sharex=True, figsize=size, dpi=FIGURE_DPI)
        try:
            for ax, (name, values, label) in zip(axes, panels, strict=True):
                steps = data.eval_steps if name.startswith("eval/") else data.steps
                ax.plot(steps, values, marker="o", markersize=3, linewidth=1.2, label=name)
                ax.set_ylabel(label)
                ax.grid(True, alpha=0.3)
            if evaluated:  # the held-out loss beside the training loss
                axes[0].plot(
                    data.eval_steps, data.eval_loss, marker="s", markersize=4, linewidth=1.2,
                    label="eval/loss (held out)",
                )  # fmt: skip
                axes[0].legend(loc="best")
            axes[-2].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
            axes[-1].set_xlabel("step")
            fig.suptitle(title)
            fig.tight_layout()
            # No Software/date metadata: the same metrics give the same bytes.
            fig.savefig(path, format="png", dpi=FIGURE_DPI, metadata={"Software": None})
        finally:
            plt.close(fig)
    return data


def count_restarts(records: Sequence[Mapping[str, Any]]) -> int:
    """Resumes seen in the log: a record whose `resumed_from_step` differs from the one
    before it (the first compared with 0), or whose step goes back."""
    restarts, resumed, step = 0, 0, -1
    for record in records:
        now = int(record.get("resumed_from_step") or 0)
        if now != resumed or int(record["step"]) <= step:
            restarts += 1
        resumed, step = now, int(record["step"])
    return restarts


def _duration_s(records: Sequence[Mapping[str, Any]]) -> float | None:
    """Wall time from the start to the last record: first to last record's `time`, plus
    the first window's steps at their measured step time."""
    times = [r["time"] for r in records if "time" in r]
    if len(times) != len(records) or not records:
        return None
    first = records[0]
    before = (int(first["step"]) - int(first.get("resumed_from_step") or 0)) * float(
        first.get("step_s", 0.0)
    )
    return times[-1] - times[0] + before


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    total = round(seconds)
    return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"


def _read_spec(checkpoint_uri: str, storage_options: Mapping[str, Any]) -> dict | None:
    """The resolved spec (without secrets) that the checkpoint's state.json carries."""
    fs, root = filesystem(checkpoint_uri, storage_options)
    try:
        state = json.loads(fs.cat_file(join(root, "state.json")))
    except (FileNotFoundError, ValueError):
        return None
    return state.get("spec")


def summarize(
    run_uri: str,
    records: Sequence[Mapping[str, Any]],
    checkpoints: Sequence[Any],
    spec: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The facts the markdown shows."""
    last = records[-1] if records else {}
    evaluated = [r for r in records if "eval/loss" in r]
    return {
        "run": run_uri,
        "name": (spec or {}).get("name") or run_uri.rstrip("/").rsplit("/", 1)[-1],
        "steps": last.get("step"),
        "total_steps": ((spec or {}).get("train") or {}).get("steps"),
        "final_loss": last.get("loss"),
        "first_loss": records[0].get("loss") if records else None,
        "duration_s": _duration_s(records),
        "mean_samples_per_s": (
            sum(r.get("samples_per_s", 0.0) for r in records) / len(records) if records else None
        ),
        "restarts": count_restarts(records),
        "skipped_steps": last.get("skipped_steps", 0),
        "evaluations": len(evaluated),
        "eval_loss": evaluated[-1]["eval/loss"] if evaluated else None,
        "eval_action_mse": evaluated[-1].get("eval/action_mse") if evaluated else None,
        "best_metric": last.get("best_metric"),
        "best_metric_name": last.get("best_of") or "eval/action_mse min",
        "best_step": last.get("best_step"),
        "checkpoints": [
            {"step": c.step, "uri": c.uri, "bytes": c.num_bytes, "valid": c.valid}
            for c in checkpoints
        ],
        "spec": spec,
    }


def render_markdown(summary: Mapping[str, Any], *, png_name: str = PNG_NAME) -> str:
    """The summary as markdown, the PNG embedded by its file name."""

    def num(value: Any, fmt: str = ".4f") -> str:
        return "n/a" if value is None else format(value, fmt)

    lines = [
        f"# Run report: {summary['name']}",
        "",
        f"![loss, learning rate and throughput over steps]({png_name})",
        "",
        "| | |",
        "|---|---|",
        f"| run | `{summary['run']}` |",
        f"| steps | {summary['steps']} of {summary['total_steps'] or '?'} |",
        f"| duration | {_clock(summary['duration_s'])} |",
        f"| loss | {num(summary['first_loss'])} at the first log, "
        f"{num(summary['final_loss'])} at the end |",
        f"| throughput | {num(summary['mean_samples_per_s'], '.1f')} samples/s (mean) |",
        f"| restarts survived | {summary['restarts']} |",
        f"| skipped steps (non-finite) | {summary['skipped_steps']} |",
        *(
            [
                f"| held-out evaluation | {summary['evaluations']} evaluations; last "
                f"eval/loss {num(summary['eval_loss'])}, eval/action_mse "
                f"{num(summary['eval_action_mse'])}; best {summary['best_metric_name']} "
                f"{num(summary['best_metric'], '.6g')} at step {summary['best_step']} |"
            ]
            if summary.get("evaluations")
            else []
        ),
        "",
        "## Checkpoints",
        "",
    ]
    if summary["checkpoints"]:
        lines += ["| step | size | status | uri |", "|---:|---:|---|---|"]
        for c in summary["checkpoints"]:
            status = "manifest ok" if c["valid"] else "INVALID"
            lines.append(f"| {c['step']} | {c['bytes']:,} B | {status} | `{c['uri']}` |")
    else:
        lines.append("None found.")
    lines += ["", "## Spec (secrets removed)", ""]
    if summary["spec"] is not None:
        lines += ["```json", json.dumps(summary["spec"], indent=2, sort_keys=True), "```"]
    else:
        lines.append("Not available (no checkpoint carries it).")
    return "\n".join(lines) + "\n"


def write_report(
    run_uri: str, out_dir: str | Path, storage_options: Mapping[str, Any] | None = None
) -> Report:
    """Read the run at `run_uri` and write `report.png` and `report.md` into `out_dir`."""
    from smolvla_ray.checkpoint.discovery import list_checkpoints
    from smolvla_ray.train.metrics import read_metrics

    options = dict(storage_options or {})
    records = read_metrics(run_uri, options)
    if not records:
        raise ValueError(f"{run_uri}/metrics.jsonl has no records yet; report once it logged")
    checkpoints = list_checkpoints(run_uri, options, hashes=False)
    spec = None
    for info in reversed(checkpoints):
        if info.valid and (spec := _read_spec(info.uri, options)) is not None:
            break
    if spec is not None:
        spec = {**spec, "storage_options": _public_options(spec.get("storage_options") or {})}
    summary = summarize(run_uri, records, checkpoints, spec)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png, markdown = out / PNG_NAME, out / MARKDOWN_NAME
    title = f"{summary['name']}: {summary['steps']} steps"
    plotted = render_png(records, png, title=title)
    markdown.write_text(mask_userinfo(render_markdown(summary, png_name=PNG_NAME)))
    return Report(png=png, markdown=markdown, plotted=plotted, summary=summary)


def _public_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Belt and braces: checkpoints hold `public_dict()` already; keep only known-public
    keys in case an older checkpoint did not."""
    from smolvla_ray.spec import PUBLIC_STORAGE_KEYS

    return {k: v for k, v in options.items() if k in PUBLIC_STORAGE_KEYS}
