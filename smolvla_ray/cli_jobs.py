"""The `smolvla-ray` commands that talk to a cluster's Ray Jobs API: submit, status, logs,
stop and list (`cli.py` adds them to its app)."""

from __future__ import annotations

from typing import Annotated

import typer

from smolvla_ray.cli_common import AddressOption, ForceOption, SetOption
from smolvla_ray.cli_common import fail as _fail

jobs_app = typer.Typer()


def _jobs_call(call, *args, **kwargs):
    """Run a jobs API call, mapping its errors to exit codes (2 input, 1 cluster/job)."""
    from smolvla_ray.spec import SpecError

    try:
        return call(*args, **kwargs)
    except KeyboardInterrupt:
        typer.secho("interrupted; a submitted job keeps running on the cluster", err=True)
        raise typer.Exit(130) from None
    except ConnectionError as err:  # the cluster: unreachable (before the input checks)
        _fail(str(err), code=1)
    except (SpecError, FileNotFoundError, ValueError, PermissionError) as err:  # input
        _fail(str(err))
    except (OSError, RuntimeError) as err:  # the job failed or the cluster misbehaved
        _fail(str(err), code=1)


@jobs_app.command()
def submit(
    spec: Annotated[str, typer.Argument(help="Job spec YAML file.")],
    address: AddressOption = None,
    set_: SetOption = None,
    ship_package: Annotated[
        bool, typer.Option(help="Ship this smolvla_ray package with the job (py_modules).")
    ] = True,
    wait: Annotated[bool, typer.Option(help="Block until the job ends.")] = False,
    force: ForceOption = False,
) -> None:
    """Validate a spec here, then submit it to a Ray cluster's Jobs API; prints the job id."""
    from smolvla_ray import jobs

    job_id = _jobs_call(
        jobs.submit,
        spec,
        address,
        overrides=set_ or (),
        ship_package=ship_package,
        wait=wait,
        force=force,
    )
    typer.echo(job_id)


@jobs_app.command()
def status(
    job_id: Annotated[str, typer.Argument(help="Job id printed by submit.")],
    address: AddressOption = None,
) -> None:
    """Print a submitted job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    from smolvla_ray import jobs

    info = _jobs_call(jobs.info, job_id, address)
    typer.echo(f"{info.job_id}  {info.status}" + (f"  {info.message}" if info.message else ""))


@jobs_app.command()
def logs(
    job_id: Annotated[str, typer.Argument(help="Job id printed by submit.")],
    address: AddressOption = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream until it ends.")] = False,
    progress: Annotated[
        str | None,
        typer.Option("--progress", help="With --follow: bar, lines or json instead of raw logs."),
    ] = None,
) -> None:
    """Print a job's logs; with --follow, stream them (or show progress) until it ends."""
    from smolvla_ray import jobs
    from smolvla_ray.observe.progress import PROGRESS_MODES, Progress
    from smolvla_ray.progress_line import parse_progress_line

    if progress is not None and progress not in PROGRESS_MODES:
        _fail(f"--progress {progress!r} is not one of {', '.join(PROGRESS_MODES)}")
    display = Progress(progress) if progress and progress != "quiet" else None
    lines = _jobs_call(jobs.logs, job_id, address, follow=follow)
    try:
        for line in lines:
            record = parse_progress_line(line) if display is not None else None
            if display is None:
                typer.echo(line.rstrip("\n"))
            elif record is not None:
                display.update(record)
    except (ConnectionError, ValueError, RuntimeError) as err:
        _fail(str(err), code=1)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    finally:
        if display is not None:
            display.close()


@jobs_app.command()
def stop(
    job_id: Annotated[str, typer.Argument(help="Job id printed by submit.")],
    address: AddressOption = None,
) -> None:
    """Stop a running job (its last checkpoint stays; resubmit the spec to resume)."""
    from smolvla_ray import jobs

    stopped = _jobs_call(jobs.stop, job_id, address)
    typer.echo(f"{job_id}: {'stop requested' if stopped else 'already finished'}")


@jobs_app.command("list")
def list_(address: AddressOption = None) -> None:
    """List the jobs smolvla-ray submitted to a cluster."""
    from smolvla_ray import jobs

    for info in _jobs_call(jobs.list_jobs, address):
        started = info.start_time.isoformat(timespec="seconds") if info.start_time else "-"
        typer.echo(f"{info.job_id:<40} {info.status:<10} {started}  {info.name}")
