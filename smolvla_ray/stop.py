"""Durable endings of `run`: Ctrl-C and SIGTERM stop a run without losing a checkpoint.

The first SIGINT or SIGTERM to the driver does not kill anything: it writes a stop request
that the workers read after their current step (`train.interrupt.request_stop`). They save
a checkpoint, upload it synchronously (every earlier asynchronous upload lands first), and
return; `trainer.fit()` then returns and `run` raises `RunStopped`, which the CLI turns into
exit 130 (SIGINT) or 143 (SIGTERM) naming the step and the checkpoint. A second signal
aborts at once (`KeyboardInterrupt`): the CLI shuts Ray down and names the last complete
checkpoint.

Without this, Python's KeyboardInterrupt (or Ray's own SIGTERM handler, which aborts the
driver) ended the driver mid-upload, and an embedded Ray died with it: checkpoints still in
flight were lost and their local copies left behind.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class RunStopped(Exception):
    """The run ended early on the user's stop request, resumable from `result`'s checkpoint."""

    def __init__(self, result: Any, signum: int) -> None:
        self.result = result
        self.signum = signum
        self.exit_code = EXIT_CODES.get(signal.Signals(signum), 128 + signum)
        super().__init__(f"stopped on {signal.Signals(signum).name}")


@dataclass
class StopState:
    """What the handler saw: the first signal (None: none yet)."""

    signum: int | None = None
    names: list[str] = field(default_factory=list)


@contextlib.contextmanager
def graceful_stop(stop_key: str) -> Iterator[StopState]:
    """While the body runs (`trainer.fit()`), the first SIGINT/SIGTERM requests a stop and
    the second raises KeyboardInterrupt. Outside the main thread (no signals there) it does
    nothing."""
    from smolvla_ray.train.interrupt import request_stop

    state = StopState()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def on_signal(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        state.names.append(name)
        if state.signum is not None:
            sys.stderr.write(f"[smolvla-ray] {name} again: aborting now\n")
            sys.stderr.flush()
            raise KeyboardInterrupt
        state.signum = signum
        sys.stderr.write(
            f"[smolvla-ray] {name}: stopping after the current step; its checkpoint is "
            "uploaded before the run ends (Ctrl-C again to abort at once)\n"
        )
        sys.stderr.flush()
        request_stop(stop_key, name)

    previous = {s: signal.getsignal(s) for s in EXIT_CODES}
    for signum in EXIT_CODES:
        signal.signal(signum, on_signal)
    try:
        yield state
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """Processes started in the body ignore SIGINT (an ignored signal stays ignored across
    exec): the Ray processes an embedded `ray.init` starts share the driver's process
    group, so a terminal's Ctrl-C would otherwise reach them too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def abort_on_signals() -> Iterator[None]:
    """Before training starts (the feature-cache build), SIGTERM aborts like Ctrl-C: a
    KeyboardInterrupt, not Ray's handler, which would abort the driver with a core dump."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, on_signal) for s in EXIT_CODES}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def call_off_main_thread(call: Callable[[], T]) -> T:
    """`call()` on a helper thread while the main thread waits, so signals reach the
    handlers of `graceful_stop`: Ray Train's `fit()` installs a SIGINT handler of its own
    when it runs on the main thread, which aborts the run (workers killed mid-upload)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = call()
        except BaseException as err:  # handed to the main thread
            box["error"] = err

    thread = threading.Thread(target=target, name="smolvla-ray-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)  # short waits: a signal handler runs between them
    if "error" in box:
        raise box["error"]
    return box["value"]
