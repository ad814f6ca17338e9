"""What the `smolvla-ray` commands share: the error exit and the options several take."""

from __future__ import annotations

from typing import Annotated

import typer


def fail(message: str, *, code: int = 2) -> None:
    from smolvla_ray.storage import mask_userinfo

    typer.secho(f"error: {mask_userinfo(message)}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a spec field: --set train.steps=100 (repeatable)."),
]
ForceOption = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Take over the run directory from a run that died without releasing it (its "
        "lease expired); a live run's lease is never taken.",
    ),
]
AddressOption = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="Ray dashboard address, http://HOST:8265 (default: $RAY_ADDRESS).",
    ),
]
