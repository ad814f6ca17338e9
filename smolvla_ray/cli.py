"""The `smolvla-ray` command line.

Heavy imports (torch, transformers, av) happen inside the commands, so `--help` and input
validation stay instant. Exit codes: 0 success, 2 invalid input, 1 failure.
"""

from __future__ import annotations

from typing import Annotated, Literal

import typer

app = typer.Typer(
    name="smolvla-ray",
    help="Distributed finetuning of LeRobot's SmolVLA policy on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _fail(message: str, *, code: int = 2) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


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
    from smolvla_ray.data.synthetic import write_demo_dataset

    layout: Literal["v3.0", "v2.1"] = format  # type: ignore[assignment]
    written = write_demo_dataset(
        out, format=layout, num_episodes=episodes, cameras=camera_names, codec=codec, fps=fps
    )
    typer.echo(f"wrote {written}")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
