"""One writer per run (`smolvla_ray/lease.py`): real files, real processes, a real S3 server.

Time is a clock passed in (`clock=`), never a patched global: expiry and the clock-skew
allowance are checked at exact instants."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import socket
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from smolvla_ray import jobs, lease
from smolvla_ray.cli import app
from smolvla_ray.lease import LeaseHeldError, LeaseLostError
from smolvla_ray.run_layout import CONTROL_FILES, LEASE_FILE
from tests.integration.conftest import tiny_spec_dict
from tests.processes import free_port

TTL, SKEW = 60.0, 30.0


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def holder(clock: Clock, *, pid: int = 4242, host: str = "trainer-7") -> lease.Holder:
    """Another process, as a lease holder."""
    me = lease.new_holder(TTL, clock, command="smolvla-ray run a.yaml")
    return dataclasses.replace(me, pid=pid, host=host)


def read(run: Path) -> dict:
    return json.loads((run / LEASE_FILE).read_text())


def test_the_lease_file_is_a_control_file() -> None:
    assert LEASE_FILE in CONTROL_FILES


def test_a_second_writer_is_refused_with_the_holder_named(tmp_path: Path) -> None:
    clock = Clock()
    run = tmp_path / "run"
    first = lease.acquire(str(run), holder=holder(clock), clock=clock, ttl_s=TTL, skew_s=SKEW)
    record = read(run)
    assert record["pid"] == 4242 and record["host"] == "trainer-7"
    assert record["token"] == first.holder.token and record["expires_at"].endswith("Z")
    clock.now += 10
    with pytest.raises(LeaseHeldError) as caught:
        lease.acquire(str(run), clock=clock, ttl_s=TTL, skew_s=SKEW)
    message = str(caught.value)
    for words in ("pid 4242", "'trainer-7'", "`smolvla-ray run a.yaml`", "10s ago", "--force"):
        assert words in message, (words, message)
    assert caught.value.holder is not None and caught.value.holder.token == first.holder.token
    assert read(run) == record  # the refused writer wrote nothing


def test_the_same_holder_acquires_its_own_lease_again(tmp_path: Path) -> None:
    clock = Clock()
    first = lease.acquire(str(tmp_path), clock=clock, ttl_s=TTL)
    clock.now += 30
    again = lease.acquire(str(tmp_path), holder=first.holder, clock=clock, ttl_s=TTL)
    assert again.holder.token == first.holder.token
    assert again.holder.expires_at == clock.now + TTL == lease._epoch(read(tmp_path)["expires_at"])


def test_expiry_waits_for_the_clock_skew_allowance_and_force_takes_only_expired(
    tmp_path: Path,
) -> None:
    clock = Clock()
    run = str(tmp_path / "run")
    dead = lease.acquire(run, holder=holder(clock), clock=clock, ttl_s=TTL, skew_s=SKEW)
    expires = dead.holder.expires_at
    assert not lease.expired(dead.holder, expires + SKEW, SKEW)
    assert lease.expired(dead.holder, expires + SKEW + 0.001, SKEW)

    clock.now = expires + SKEW - 1  # past expires_at, but within the skew allowance: live
    with pytest.raises(LeaseHeldError, match="--force takes over only an expired lease"):
        lease.acquire(run, force=True, clock=clock, ttl_s=TTL, skew_s=SKEW)
    clock.now = expires + SKEW + 1  # expired: still refused without --force
    with pytest.raises(LeaseHeldError, match="expired at .* pass --force") as caught:
        lease.acquire(run, clock=clock, ttl_s=TTL, skew_s=SKEW)
    assert "pid 4242" in str(caught.value)
    assert read(tmp_path / "run")["token"] == dead.holder.token

    taker = lease.acquire(run, force=True, clock=clock, ttl_s=TTL, skew_s=SKEW)
    assert read(tmp_path / "run")["token"] == taker.holder.token
    # The old holder, come back: cannot renew, and its release leaves the new lease alone.
    with pytest.raises(LeaseLostError, match="taken over by pid"):
        dead.renew()
    assert dead.release() is False
    assert read(tmp_path / "run")["token"] == taker.holder.token
    assert taker.release() is True
    assert not (tmp_path / "run" / LEASE_FILE).exists()
    assert taker.release() is False
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []  # no temp files left


def test_check_is_read_only(tmp_path: Path) -> None:
    clock = Clock()
    run = str(tmp_path / "run")
    assert lease.check(run, clock=clock) is None
    assert not (tmp_path / "run").exists()
    held = lease.acquire(run, holder=holder(clock), clock=clock, ttl_s=TTL, skew_s=SKEW)
    with pytest.raises(LeaseHeldError, match="pid 4242"):
        lease.check(run, force=True, clock=clock, skew_s=SKEW)
    clock.now = held.holder.expires_at + SKEW + 1
    with pytest.raises(LeaseHeldError, match="pass --force"):
        lease.check(run, clock=clock, skew_s=SKEW)
    found = lease.check(run, force=True, clock=clock, skew_s=SKEW)
    assert found is not None and found.token == held.holder.token
    assert read(tmp_path / "run")["token"] == held.holder.token


def test_heartbeat_renews_and_exit_releases(tmp_path: Path) -> None:
    run = str(tmp_path)
    with lease.acquire(run, ttl_s=0.6, skew_s=0.0) as held:
        first = lease._epoch(read(tmp_path)["expires_at"])
        time.sleep(1.0)  # ttl 0.6 s: the lease would be over without the heartbeat
        renewed = lease._epoch(read(tmp_path)["expires_at"])
        assert renewed > first
        assert renewed > time.time()
        with pytest.raises(LeaseHeldError):
            lease.acquire(run, force=True, ttl_s=0.6, skew_s=0.0)
        assert held.lost is None
    assert not (tmp_path / LEASE_FILE).exists()


def test_heartbeat_that_loses_the_lease_says_so(tmp_path: Path) -> None:
    clock = Clock()
    run = str(tmp_path)
    held = lease.acquire(run, clock=clock, ttl_s=0.3, skew_s=0.0)
    clock.now += 10  # expired (the holder hung): someone takes over, then its heartbeat runs
    taker = lease.acquire(run, force=True, clock=clock, ttl_s=60.0, skew_s=0.0)
    with held:
        deadline = time.monotonic() + 5
        while held.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert held.lost is not None and "taken over" in held.lost
    assert read(tmp_path)["token"] == taker.holder.token  # exit released nothing of theirs


def test_a_file_that_is_not_a_lease_names_itself(tmp_path: Path) -> None:
    (tmp_path / LEASE_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=rf"{LEASE_FILE} is not a lease file.*delete that file"):
        lease.acquire(str(tmp_path))


def test_settings_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(lease.TTL_ENV, "12")
    assert lease.acquire(str(tmp_path / "a")).ttl_s == 12.0
    monkeypatch.setenv(lease.TTL_ENV, "soon")
    with pytest.raises(ValueError, match=f"{lease.TTL_ENV}='soon' is not a positive number"):
        lease.acquire(str(tmp_path / "b"))


def test_the_recorded_command_keeps_no_secrets() -> None:
    argv = ["/venv/bin/smolvla-ray", "run", "s.yaml", "--set", "storage_options.secret=abc",
            "--set=storage_options.key=def", "--set", "data.uri=s3://user:pw@host/b"]  # fmt: skip
    shown = lease._command(argv)
    assert shown.startswith("smolvla-ray run s.yaml --set storage_options.secret=*** ")
    assert "abc" not in shown and "def" not in shown and "pw" not in shown


# -- racing processes ------------------------------------------------------------------------


def _race(uri: str, options: dict | None, start, results) -> None:
    results.put(("ready", "", ""))
    start.wait()
    try:
        won = lease.acquire(uri, options, ttl_s=TTL)
        results.put(("won", won.holder.token, ""))
    except LeaseHeldError as err:
        results.put(("held", "", str(err)))
    except Exception as err:  # reported to the test, which fails naming it
        results.put(("error", "", f"{type(err).__name__}: {err}"))


def race(uri: str, options: dict | None = None, processes: int = 6) -> list[tuple]:
    """`processes` fresh processes acquire `uri` at the same instant; their outcomes."""
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_race, args=(uri, options, start, results)) for _ in range(processes)
    ]
    for proc in procs:
        proc.start()
    for _ in procs:  # every process imported and waits at the start line
        assert results.get(timeout=120)[0] == "ready"
    start.set()
    outcomes = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    return outcomes


def _one_winner(outcomes: list[tuple], token_now: str) -> None:
    kinds = sorted(kind for kind, _, _ in outcomes)
    assert kinds == ["held"] * (len(outcomes) - 1) + ["won"], outcomes
    (winner,) = [token for kind, token, _ in outcomes if kind == "won"]
    assert token_now == winner  # the file holds the winner's token
    host = socket.gethostname()
    assert all(f"on host {host!r}" in msg for kind, _, msg in outcomes if kind == "held")


def test_racing_processes_on_a_local_filesystem_one_wins(tmp_path: Path) -> None:
    outcomes = race(str(tmp_path / "run"))
    _one_winner(outcomes, read(tmp_path / "run")["token"])
    assert [p.name for p in (tmp_path / "run").iterdir()] == [LEASE_FILE]


def test_lease_on_s3_acquire_refuse_take_over_release(s3_server, s3_bucket: str) -> None:
    options = s3_server.storage_options
    run = s3_server.url(s3_bucket, "runs", "job")
    clock = Clock()
    first = lease.acquire(run, options, holder=holder(clock), clock=clock, ttl_s=TTL, skew_s=SKEW)
    with pytest.raises(LeaseHeldError, match="pid 4242 on host 'trainer-7'"):
        lease.acquire(run, options, force=True, clock=clock, skew_s=SKEW)
    # The server itself refuses a second create (PutObject with If-None-Match: *).
    backend = lease._backend(run, options)
    assert backend.create(lease.new_holder(TTL, clock)) is False
    clock.now += 30
    again = lease.acquire(run, options, holder=first.holder, clock=clock, ttl_s=TTL)
    assert again.holder.expires_at == clock.now + TTL  # renewed through If-Match
    clock.now = again.holder.expires_at + SKEW + 1
    taker = lease.acquire(run, options, force=True, clock=clock, skew_s=SKEW)
    assert first.release() is False
    with pytest.raises(LeaseLostError):
        first.renew()
    assert lease.read(run, options).token == taker.holder.token
    assert taker.release() is True
    assert lease.check(run, options, clock=clock) is None


def test_racing_processes_on_s3_one_wins(s3_server, s3_bucket: str) -> None:
    """moto honours If-None-Match like S3; the read-back would catch a store that did not."""
    options = s3_server.storage_options
    run = s3_server.url(s3_bucket, "runs", "job")
    outcomes = race(run, options)
    _one_winner(outcomes, lease.read(run, options).token)


# -- the commands ----------------------------------------------------------------------------

runner = CliRunner()


def live_lease_file(run: Path, *, expires_in: float = 3600.0) -> None:
    """What a `smolvla-ray run` on another machine leaves while it trains (or died)."""
    now = time.time()
    run.mkdir(parents=True, exist_ok=True)
    record = {"host": "trainer-7", "pid": 4242, "token": "f" * 32,
              "command": "smolvla-ray run other.yaml", "started_at": lease._iso(now - 600),
              "expires_at": lease._iso(now + expires_in), "ttl_s": 60.0}  # fmt: skip
    (run / LEASE_FILE).write_text(json.dumps(record))


def spec_file(tmp_path: Path, demo_dataset: str) -> tuple[str, Path]:
    spec = tiny_spec_dict(demo_dataset, tmp_path / "runs", "held", scaling={"num_workers": 1})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path), tmp_path / "runs" / "held"


def test_run_into_a_held_run_directory_exits_2_before_ray_starts(
    tmp_path: Path, demo_dataset: str
) -> None:
    import ray

    path, run = spec_file(tmp_path, demo_dataset)
    live_lease_file(run)
    before = (run / LEASE_FILE).read_text()
    for extra in ([], ["--force"]):
        result = runner.invoke(app, ["run", path, "--progress", "lines", *extra])
        assert result.exit_code == 2, result.output
        flat = " ".join(result.output.split())
        assert "pid 4242 on host 'trainer-7' (`smolvla-ray run other.yaml`)" in flat, flat
        assert "is in use by" in flat and "--force" in flat
        if extra:
            assert "--force takes over only an expired lease" in flat
        assert not ray.is_initialized()
    assert (run / LEASE_FILE).read_text() == before
    assert sorted(p.name for p in run.iterdir()) == [LEASE_FILE]


def test_submit_checks_the_lease_before_contacting_the_cluster(
    tmp_path: Path, demo_dataset: str
) -> None:
    path, run = spec_file(tmp_path, demo_dataset)
    nowhere = f"http://127.0.0.1:{free_port()}"  # no cluster there
    live_lease_file(run)
    held = runner.invoke(app, ["submit", path, "--address", nowhere, "--force"])
    assert held.exit_code == 2, held.output
    assert "pid 4242" in held.output and "only an expired lease" in " ".join(held.output.split())
    live_lease_file(run, expires_in=-3600.0)  # its holder died an hour ago
    expired = runner.invoke(app, ["submit", path, "--address", nowhere])
    assert expired.exit_code == 2 and "pass --force" in " ".join(expired.output.split())
    forced = runner.invoke(app, ["submit", path, "--address", nowhere, "--force"])
    assert forced.exit_code == 1 and "cannot reach a Ray dashboard" in forced.output  # past it
    assert jobs.entrypoint(force=True) == f"{jobs.ENTRYPOINT} --force"
    assert jobs.entrypoint() == jobs.ENTRYPOINT


def test_a_holder_that_ended_on_this_host_is_taken_over_without_force(tmp_path: Path) -> None:
    """A `run` killed with SIGKILL leaves its lease; run again on the same host, the same
    command goes on at once: the holder's pid no longer runs here, so nothing can be lost."""
    import subprocess
    import sys

    from smolvla_ray import lease

    run = str(tmp_path / "run")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    holder = lease.new_holder(60.0)
    holder = type(holder)(**{**holder.__dict__, "pid": int(dead.stdout), "token": "x" * 32})
    lease.acquire(run, holder=holder)  # a live-looking lease of a process that has ended
    taken = lease.acquire(run)  # no force, not expired
    assert taken.holder.pid == os.getpid()
    other = type(holder)(**{**holder.__dict__, "host": "elsewhere", "token": "y" * 32})
    taken.release()
    lease.acquire(run, holder=other)
    with pytest.raises(lease.LeaseHeldError, match="elsewhere"):  # another host: live lease
        lease.acquire(run)
