"""Checkpoint before a worker is taken away, or the user stops the run: SIGTERM, Ray's
preemption notices, and the driver's stop request.

Three events make the workers checkpoint at the end of the current step:

- **A stop request** from the driver (Ctrl-C or SIGTERM to `smolvla-ray run`, `ray job
  stop`): the driver writes `stop_key` into Ray's key-value store (`request_stop`); rank 0
  reads it at most once a second. Every rank saves, the upload is synchronous (so every
  earlier asynchronous upload has landed too), and the training function returns: the run
  ends as finished at that step, and the same command resumes it.

- **SIGTERM** to a worker process (Kubernetes deleting a pod, `kill`, a node shutting
  down). Ray's own handler would exit the process at once; ours records the signal, the loop
  checkpoints at the end of the current step, and then the worker exits (rank 0 uploads the
  checkpoint synchronously first). The run then fails over like any worker failure
  (`failure.max_failures`) and resumes from that checkpoint.
- **Ray's preemption notice** (`ray.train.get_preemption_info()`, Ray >= 2.60): a node of the
  worker group is being drained with a deadline (a spot reclaim, an autoscaler drain). Ray's
  advice is to save a just-in-time checkpoint and keep training: Ray Train restarts the group
  when the node actually goes, counting against `FailureConfig.max_preemption_failures`
  (separately from `max_failures`), and the run resumes from that checkpoint.

These are per-worker events, but every rank must call `ray.train.report` equally often, so
`Interrupts.poll` all-reduces the flags: every rank agrees on the same step.

Python runs signal handlers only in a process's main thread and only lets that thread
install them; Ray Train runs the training function in another thread, so `install` asks the
worker actor to run the installation on its main thread (`__ray_call__`).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Process-wide: the signal handler (main thread) and the training thread share these.
_SIGTERM = threading.Event()
_RELEASED = threading.Event()
_PREVIOUS: dict[str, Any] = {}


def _pass_on(signum: int, frame) -> None:
    """Do what the handler before ours would have done (Ray's: exit the worker)."""
    previous = _PREVIOUS.get("handler")
    if callable(previous):
        previous(signum, frame)
    signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _on_sigterm(signum: int, frame) -> None:
    training = _PREVIOUS.get("thread")
    # Pass the signal on once the checkpoint is saved, on a second SIGTERM, and when no
    # training loop is running to checkpoint (it ended, or failed).
    if _RELEASED.is_set() or _SIGTERM.is_set() or training is None or not training.is_alive():
        _pass_on(signum, frame)
        return
    _SIGTERM.set()
    sys.stderr.write(
        f"[smolvla-ray] pid {os.getpid()} received SIGTERM: checkpointing after this step\n"
    )


def _install_in_main_thread(_actor: Any = None) -> bool:
    if threading.current_thread() is not threading.main_thread():
        return False
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not _on_sigterm:  # a restarted loop in the same process: keep Ray's
        _PREVIOUS["handler"] = previous
        signal.signal(signal.SIGTERM, _on_sigterm)
    return True


def install_sigterm_handler() -> bool:
    """Install the SIGTERM handler in this process's main thread; True when installed.

    From a Ray Train worker's training thread it runs on the worker actor's main thread;
    outside Ray (tests, a plain script) on the calling thread if that is the main one."""
    _SIGTERM.clear()
    _RELEASED.clear()
    _PREVIOUS["thread"] = threading.current_thread()
    if threading.current_thread() is threading.main_thread():
        return _install_in_main_thread()
    import ray

    try:
        actor = ray.get_runtime_context().current_actor
    except Exception:  # not in an actor: nothing else can install it
        return False
    return bool(ray.get(actor.__ray_call__.remote(_install_in_main_thread), timeout=60))


def _local_preemption() -> bool:
    """Whether Ray has told this worker of an imminent preemption. Reads the worker's own
    copy of the notice (set by Ray Train's PreemptionWatcher on every worker) without the
    barrier that `ray.train.get_preemption_info()` adds; the ranks then agree through
    `Interrupts.poll`'s all-reduce."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        return get_train_context().preemption_context.preemption_info is not None
    except Exception:  # outside Ray Train, or a Ray without preemption notices
        return False


STOP_NAMESPACE = "smolvla_ray_stop"


def request_stop(stop_key: str, reason: str) -> None:
    """Ask the run's workers to checkpoint and end (the driver, on Ctrl-C or SIGTERM)."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(stop_key, reason.encode(), namespace=STOP_NAMESPACE)


def _stop_requested(stop_key: str) -> bool:
    try:
        from ray.experimental import internal_kv

        return internal_kv._internal_kv_get(stop_key, namespace=STOP_NAMESPACE) is not None
    except Exception:  # outside Ray, or the GCS briefly away: ask again next time
        return False


@dataclass(frozen=True)
class Decision:
    """What every rank agreed on after a step."""

    checkpoint: bool  # save a checkpoint now
    exit: bool  # and stop after it (SIGTERM, stop request); False: keep training (preemption)
    reason: str
    stop: bool = False  # the run ends here as finished (the user's stop request)


class Interrupts:
    """The SIGTERM/preemption state of one worker and the cross-rank agreement on it."""

    def __init__(self, *, device: torch.device, stop_key: str | None = None, rank: int = 0) -> None:
        self.device = device
        self.installed = install_sigterm_handler()
        self._preemption_handled = False
        self.stop_key = stop_key if rank == 0 else None  # rank 0 asks; the all-reduce tells
        self._next_stop_check = 0.0

    def _stop(self) -> bool:
        if self.stop_key is None or time.monotonic() < self._next_stop_check:
            return False
        self._next_stop_check = time.monotonic() + 1.0  # a GCS call at most once a second
        return _stop_requested(self.stop_key)

    def poll(self) -> Decision:
        """Called by every rank after every step (a tiny all-reduce): checkpoint now?"""
        preempted = _local_preemption() and not self._preemption_handled
        flags = torch.tensor(
            [float(_SIGTERM.is_set()), float(preempted), float(self._stop())], device=self.device
        )
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        sigterm, preemption, stop = (bool(v) for v in flags.tolist())
        if stop:
            return Decision(checkpoint=True, exit=True, reason="stop request", stop=True)
        if sigterm:
            return Decision(checkpoint=True, exit=True, reason="SIGTERM")
        if preemption:
            self._preemption_handled = True  # one just-in-time checkpoint per notice
            return Decision(checkpoint=True, exit=False, reason="preemption notice")
        return Decision(checkpoint=False, exit=False, reason="")

    def exit_after_checkpoint(self, *, step: int, checkpoint_dir: str) -> None:
        """After the interrupt checkpoint is reported: the signalled worker exits the way
        Ray's own SIGTERM handler would; every rank ends its training function with an error,
        so Ray Train fails over (or fails the run) instead of calling it finished."""
        got_signal = _SIGTERM.is_set()
        message = (
            f"stopping after SIGTERM: checkpoint {checkpoint_dir} at step {step} is saved; the "
            "run resumes from it on restart (failure.max_failures)"
        )
        if got_signal and self.installed:
            _RELEASED.set()
            os.kill(os.getpid(), signal.SIGTERM)  # the main thread passes it on: exits
        raise WorkerInterrupted(message)


class WorkerInterrupted(RuntimeError):
    """A worker stopped on SIGTERM after saving a checkpoint."""
