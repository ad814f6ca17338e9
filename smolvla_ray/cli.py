"""The `smolvla-ray` command line.

Heavy imports (torch, transformers, av) happen inside the commands, so `--help` and input
validation stay instant. Exit codes: 0 success, 2 invalid input, 1 failure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from smolvla_ray.cli_common import ForceOption, SetOption
from smolvla_ray.cli_common import fail as _fail
from smolvla_ray.cli_jobs import jobs_app

app = typer.Typer(
    name="smolvla-ray",
    help="Distributed finetuning of LeRobot's SmolVLA policy on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.command("demo-dataset")
def demo_dataset(
    out: Annotated[str, typer.Argument(help="Directory or fsspec URL to write the dataset to.")],
    format: Annotated[
        str, typer.Option("--format", help="LeRobot dataset layout: v3.0 or v2.1.")
    ] = "v3.0",
    episodes: Annotated[int, typer.Option("--episodes", min=1, help="Number of episodes.")] = 8,
    cameras: Annotated[
        str, typer.Option("--cameras", help="Comma-separated camera names.")
    ] = "top,wrist",
    codec: Annotated[str, typer.Option("--codec", help="Video codec: av1 or h264.")] = "av1",
    fps: Annotated[int, typer.Option("--fps", min=1, help="Frames per second.")] = 30,
) -> None:
    """Write a small, learnable synthetic LeRobot dataset with real mp4 videos."""
    if format not in ("v3.0", "v2.1"):
        _fail(f"--format {format!r} is not supported; use v3.0 or v2.1")
    if codec not in ("av1", "h264"):
        _fail(f"--codec {codec!r} is not supported; use av1 or h264")
    camera_names = [c.strip() for c in cameras.split(",") if c.strip()]
    if not camera_names:
        _fail("--cameras is empty; name at least one camera, e.g. --cameras top,wrist")
    from smolvla_ray.keys import camera_name_problem

    for name in camera_names:
        if problem := camera_name_problem(name):
            _fail(f"--cameras: {problem}")
    from smolvla_ray.data.synthetic import write_demo_dataset

    layout: Literal["v3.0", "v2.1"] = format  # type: ignore[assignment]
    target = Path(out)
    if "://" not in out and target.exists() and not target.is_dir():
        _fail(f"{out} is a file; give a new directory to write the dataset to")
    try:
        written = write_demo_dataset(
            out, format=layout, num_episodes=episodes, cameras=camera_names, codec=codec, fps=fps
        )
    except FileExistsError as err:
        _fail(str(err))
    typer.echo(f"wrote {written}")


def _load(spec_path: str, overrides: list[str] | None):  # -> JobSpec
    from smolvla_ray.spec import SpecError, load_spec

    try:
        return load_spec(spec_path, overrides or ())
    except (SpecError, FileNotFoundError) as err:
        _fail(str(err))


@app.command()
def validate(
    spec: Annotated[str, typer.Argument(help="Job spec YAML file.")],
    set_: SetOption = None,
) -> None:
    """Check a job spec (schema and cross-field rules) without starting anything."""
    job = _load(spec, set_)
    typer.echo(f"{spec}: valid job spec {job.name!r}")
    from smolvla_ray.prepare import resolve_local

    try:
        resolution, skipped = resolve_local(job)
    except (ValueError, OSError) as err:  # FeatureMismatch is a ValueError
        _fail(str(err))
    if resolution is not None:
        typer.echo(f"features (dataset -> policy):\n{resolution.table()}")
    else:
        typer.echo(f"features not checked: {skipped} (run and submit check them)")


@app.command()
def schema() -> None:
    """Print the job spec's JSON Schema."""
    import json

    from smolvla_ray.spec import json_schema

    typer.echo(json.dumps(json_schema(), indent=2))


@app.command()
def run(
    spec: Annotated[str, typer.Argument(help="Job spec YAML file.")],
    set_: SetOption = None,
    address: Annotated[
        str | None,
        typer.Option(
            help="Ray cluster to join (HOST:6379, ray://..., auto: the one `ray start` runs "
            "here); default: $RAY_ADDRESS if set (as inside a submitted job), else a private "
            "local Ray, never another cluster found on this machine."
        ),
    ] = None,
    progress: Annotated[
        str | None,
        typer.Option(
            "--progress",
            help="Live progress: bar, lines, json (one object per line) or quiet; "
            "default: bar on a terminal, else lines.",
        ),
    ] = None,
    force: ForceOption = False,
) -> None:
    """Run a finetune and block until it ends (Ctrl-C stops it cleanly)."""
    from smolvla_ray.observe.progress import PROGRESS_MODES, default_mode

    if progress is not None and progress not in PROGRESS_MODES:
        _fail(f"--progress {progress!r} is not one of {', '.join(PROGRESS_MODES)}")
    mode = progress or default_mode()
    job = _load(spec, set_)
    from smolvla_ray import driver

    try:
        driver.check_peft_package(job)  # LoRA needs peft here (the cache decision) too
        resolution = driver.preflight(job)
        driver.check_address(address)
        driver.check_sink_packages(job, address)  # driver.run checks again, for the API
    except (ValueError, OSError) as err:  # bad dataset, checkpoint, storage, address: input
        _fail(str(err))
    if mode != "json":
        typer.echo(f"features (dataset -> policy):\n{resolution.table()}", err=True)
    from smolvla_ray.lease import LeaseHeldError
    from smolvla_ray.stop import RunStopped

    private = driver.ray_address(address) == "local"
    try:
        result = driver.run(job, address=address, check=False, progress=mode, force=force)  # type: ignore[arg-type]
    except LeaseHeldError as err:  # another run writes this run directory: nothing started
        _fail(str(err))
    except driver.StorageNotSharedError as err:  # refused before step 1: fix the spec
        _fail(str(err))
    except RunStopped as stopped:
        metrics = stopped.result.metrics or {}
        typer.secho(
            f"job {job.name!r} stopped at step {metrics.get('step')} of {job.train.steps}; "
            f"checkpoint: {_last_checkpoint(job, stopped.result)}. Run the same command "
            "to resume.",
            err=True,
            fg=typer.colors.YELLOW,
        )
        raise typer.Exit(stopped.exit_code) from None
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        _end_ray(private=private)
        typer.secho(
            f"aborted; last complete checkpoint: {_last_checkpoint(job)}",
            err=True,
            fg=typer.colors.YELLOW,
        )
        raise typer.Exit(130) from None
    except Exception as err:  # the job failed; its error says why
        _fail(f"job {job.name!r} failed: {err}", code=1)
    finally:
        _end_ray(private=private)
    metrics = result.metrics or {}
    checkpoint = driver.final_checkpoint(job, result)  # the newest valid, one that exists
    if mode == "json":  # scripts read stdout: the end is one more JSON object
        import json

        end = {"event": "finished", "job": job.name, "step": metrics.get("step")}
        typer.echo(json.dumps({**end, "loss": metrics.get("loss"), "checkpoint": checkpoint}))
        return
    typer.echo(
        f"job {job.name!r} finished at step {metrics.get('step')} with loss "
        f"{metrics.get('loss', float('nan')):.4f}; checkpoint: "
        f"{checkpoint or 'none'}"
    )


def _end_ray(*, private: bool) -> None:
    """Shut down this process's Ray, then delete the scratch directories of processes that
    are gone (`smolvla_ray.scratch`); a `private` Ray's workers end with it, so wait a
    little for them."""
    import ray

    from smolvla_ray.scratch import sweep

    ray.shutdown()
    sweep(settle_s=10.0 if private else 0.0)


def _last_checkpoint(job, result=None) -> str:
    """The newest checkpoint of `job`'s run that verifies by size, or 'none'."""
    from smolvla_ray import driver

    try:
        return driver.final_checkpoint(job, result) or "none"
    except OSError as err:
        return f"unknown (storage: {err})"


def _storage_options() -> dict:
    """Storage options for commands without a spec: SMOLVLA_STORAGE_OPTIONS (JSON) and the
    backends' own environment variables (AWS_*, GOOGLE_*, AZURE_*)."""
    from smolvla_ray.spec import SpecError, env_storage_options

    try:
        return env_storage_options()
    except (SpecError, ValueError) as err:
        _fail(str(err))


@app.command()
def checkpoints(
    uri: Annotated[str, typer.Argument(help="A run directory (storage URI + job name).")],
    verify: Annotated[
        bool, typer.Option(help="Hash every file (slower); sizes are always checked.")
    ] = True,
) -> None:
    """List a run's checkpoints with step, size, whether they verify and, for evaluated
    runs, the evaluation metric (`*` marks the best; best copies are listed too)."""
    from smolvla_ray.checkpoint.best import read_ranking, stored_evaluation
    from smolvla_ray.checkpoint.discovery import list_checkpoints
    from smolvla_ray.run_layout import BEST_DIR
    from smolvla_ray.storage import filesystem

    _check_url(uri, "the run directory")
    options = _storage_options()
    infos = list_checkpoints(uri, options, hashes=verify)
    if not infos:
        _fail(f"no checkpoints under {uri}", code=1)
    ranking = read_ranking(*filesystem(uri, options))
    best_step = ranking[0]["step"] if ranking else None
    evaluations = {info.uri: stored_evaluation(info.uri, options) for info in infos}
    metric = ranking[0]["metric"] if ranking else None
    if metric is None:
        names = {key for e in evaluations.values() for key in e}
        metric = "eval/action_mse" if "eval/action_mse" in names else None
    typer.echo(
        f"{'step':>9}  {'size':>12}  status      " + (f"{metric:>16}   " if metric else "") + "uri"
    )
    for info in infos:
        status = "verified" if info.valid else f"INVALID: {info.problem}"
        step = "?" if info.step is None else str(info.step)
        value = evaluations[info.uri].get(metric) if metric else None
        column = ""
        if metric:
            mark = "*" if info.step is not None and info.step == best_step else " "
            column = f"{value:>16.6g} {mark} " if value is not None else f"{'-':>16} {mark} "
        typer.echo(f"{step:>9}  {info.num_bytes:>12,}  {status:<10}  {column}{info.uri}")
    if ranking:
        kept = ", ".join(f"step {r['step']} ({r['value']:.6g})" for r in ranking)
        typer.echo(
            f"best by {ranking[0]['metric']} ({ranking[0]['mode']}): {kept}; copies under "
            f"{uri.rstrip('/')}/{BEST_DIR}/ (export {uri.rstrip('/')}/{BEST_DIR} exports the best)"
        )
    if not any(info.valid for info in infos):
        _fail(f"no checkpoint under {uri} verifies: none can be resumed from or exported", code=1)


def _check_url(url: str, what: str) -> None:
    """Exit 2 on a URL no filesystem can open (a typo'd scheme), before anything is read;
    exit 1 on a storage endpoint that does not answer. Storage calls of these commands
    give up after the connect bound, not the training run's longer retry budget."""
    import os

    from smolvla_ray.storage import RETRY_BUDGET_ENV, url_problem
    from smolvla_ray.waits import check_endpoint, connect_timeout_s

    if problem := url_problem(url):
        _fail(f"{what} {url!r}: {problem}")
    if "://" in url:
        try:
            check_endpoint(_storage_options())
        except ConnectionError as err:
            _fail(str(err), code=1)
        # A command (not a training run): one process, one command; the environment is ours.
        os.environ.setdefault(RETRY_BUDGET_ENV, str(connect_timeout_s()))


@app.command()
def report(
    uri: Annotated[str, typer.Argument(help="A run directory (storage URI + job name).")],
    out: Annotated[
        str, typer.Option("--out", help="Directory for report.png and report.md.")
    ] = "report",
) -> None:
    """Render a run's loss, learning rate and throughput (PNG) and a markdown summary."""
    from smolvla_ray.observe.report import write_report

    _check_url(uri, "the run directory")
    if Path(out).is_file():
        _fail(f"--out {out} is a file; give a directory for report.png and report.md")
    try:
        written = write_report(uri, out, _storage_options())
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err), code=1)
    typer.echo(f"wrote {written.png} and {written.markdown}")


RawWeightsOption = Annotated[
    bool,
    typer.Option(
        "--raw-weights",
        help="Use the checkpoint's raw trained weights, not the EMA of them that a run with "
        "train.ema keeps (the default when there is one).",
    ),
]
_WEIGHTS = {
    "ema": "the EMA of the trained weights (train.ema; --raw-weights for the raw ones)",
    "raw": "the trained weights as they are (no EMA used)",
    "saved": "as saved in the pretrained_model/",
}


@app.command()
def export(
    checkpoint: Annotated[
        str, typer.Argument(help="Checkpoint URI (a checkpoint_* directory, or RUN_URI/best).")
    ],
    out: Annotated[str, typer.Argument(help="Directory or URL for the pretrained_model/.")],
    raw_weights: RawWeightsOption = False,
    merge: Annotated[
        bool,
        typer.Option(
            "--merge",
            help="A LoRA checkpoint: write full weights with the adapters merged in, instead "
            "of LeRobot's adapter layout.",
        ),
    ] = False,
    dataset: Annotated[
        str | None,
        typer.Option(
            "--dataset",
            help="A mixture's checkpoint (data.datasets): the dataset whose statistics, "
            "camera keys and state/action widths the export carries (default: the first).",
        ),
    ] = None,
) -> None:
    """Merge base weights and a checkpoint into a LeRobot pretrained_model/ directory.
    `RUN_URI/best` exports the run's best checkpoint (checkpoint.keep_best). A run that kept
    an EMA of its weights (train.ema) exports the EMA, unless --raw-weights. A LoRA
    checkpoint exports LeRobot's adapter layout (naming its base), or with --merge full
    weights. A mixture's checkpoint exports for one of its datasets (--dataset)."""
    from smolvla_ray.checkpoint.best import resolve_best
    from smolvla_ray.checkpoint.export import (
        DatasetChoiceError,
        destination_problem,
        export_checkpoint,
    )

    _check_url(checkpoint, "the checkpoint")
    _check_url(out, "the destination")
    if problem := destination_problem(out, _storage_options()):
        _fail(problem)
    try:
        checkpoint = resolve_best(checkpoint, _storage_options())
        trained = export_checkpoint(
            checkpoint, out, _storage_options(), raw_weights=raw_weights, merge=merge,
            dataset=dataset,
        )  # fmt: skip
    except (ImportError, DatasetChoiceError) as err:  # no peft package; a bad --dataset
        _fail(str(err))
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err), code=1)
    typer.echo(f"weights: {_WEIGHTS[trained.weights]}")
    if trained.dataset is not None:
        how = "--dataset" if dataset is not None else "the mixture's first; pick with --dataset"
        typer.echo(f"dataset: {trained.dataset} (its statistics, camera keys and widths; {how})")
    typer.echo(f"exported {checkpoint} -> {out} (load with SmolVLAPolicy.from_pretrained)")


def _episode_list(text: str | None) -> list[int] | None:
    """`--episodes`: "0,3,7" or a half-open range "0:10"."""
    if text is None:
        return None
    try:
        if ":" in text:
            start, stop = (int(x) for x in text.split(":", 1))
            return list(range(start, stop))
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        _fail(f"--episodes {text!r}: give indices like 0,3,7 or a range like 0:10")
        raise  # unreachable: _fail exits


@app.command()
def evaluate(
    source: Annotated[
        str,
        typer.Argument(
            help="A checkpoint_* directory, RUN_URI/best, an export, or a LeRobot "
            "pretrained_model/ (path, URL or hub id)."
        ),
    ],
    data: Annotated[str, typer.Option("--data", help="LeRobot dataset: path, URL or hub id.")],
    episodes: Annotated[
        str | None,
        typer.Option(
            help="Episodes, 0,3,7 or 0:10 (default: a checkpoint's held-out episodes on "
            "its own dataset, else all)."
        ),
    ] = None,
    out: Annotated[str, typer.Option("--out", help="Directory for the report files.")] = "eval",
    max_samples: Annotated[
        int | None,
        typer.Option(
            help="Samples evaluated, evenly spaced (0 = every frame; default: a checkpoint's "
            "eval.max_samples on its held-out episodes, else 256)."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    seed: Annotated[
        int | None,
        typer.Option(
            help="Keys the fixed noise and time per sample (default: a checkpoint's "
            "train.seed on its held-out episodes, else 1000)."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    plot_episodes: Annotated[
        int, typer.Option(help="Episodes plotted in trajectories.png (0 = no plot).")
    ] = 3,
    revision: Annotated[str | None, typer.Option(help="Hub revision of --data.")] = None,
    raw_weights: RawWeightsOption = False,
) -> None:
    """The held-out metrics of a policy on a dataset: evaluation.json (summaries and the
    table per action dimension and horizon step), evaluation.md, trajectories.png."""
    import torch

    from smolvla_ray.evaluation.offline import evaluate as run_evaluation

    _check_url(source, "the policy")
    _check_url(data, "the dataset")
    if Path(out).is_file():
        _fail(f"--out {out} is a file; give a directory for the evaluation files")
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        _fail(f"--device {device!r}: use cpu, or cuda on a machine with a GPU")
    try:
        result = run_evaluation(
            source, data, out=Path(out), episodes=_episode_list(episodes), revision=revision,
            max_samples="auto" if max_samples is None else (max_samples or None),
            batch_size=batch_size, seed=seed,
            device=torch.device(device), plot_episodes=plot_episodes, raw_weights=raw_weights,
            storage_options=_storage_options(), say=typer.echo,
        )  # fmt: skip
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    typer.echo(f"{'weights':>22}  {_WEIGHTS[result.weights]}")
    for key, value in result.summary.items():
        typer.echo(f"{key:>22}  {value:.6g}")
    typer.echo("wrote " + ", ".join(str(f) for f in result.files))


# The cluster's Ray Jobs commands (cli_jobs.py), after this module's own.
app.registered_commands.extend(jobs_app.registered_commands)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
