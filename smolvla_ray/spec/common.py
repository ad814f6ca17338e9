"""What every section of the job spec shares: the pydantic model config and the storage
URL check."""

from __future__ import annotations

from pydantic import ConfigDict

from smolvla_ray.storage import url_problem

# Inputs stay out of pydantic's own messages: a rejected spec may hold credentials.
SECTION_CONFIG = ConfigDict(
    extra="forbid", hide_input_in_errors=True, use_attribute_docstrings=True, allow_inf_nan=False
)


def check_uri(value: str | None, *, writable: bool = False) -> str | None:
    """Reject an empty string, an unknown fsspec protocol (a typo like `s4://`), and for
    run storage a backend Ray Train cannot write checkpoints through."""
    if value is None:
        return None
    problem = url_problem(value, checkpoints=writable)
    if problem:
        raise ValueError(problem)
    return value
