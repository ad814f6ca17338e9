"""`train.ema` in-process: the EMA a run saves equals a recomputation from the weights after
every step, a killed and resumed run's EMA equals the uninterrupted run's bit for bit, a
skipped (non-finite) step leaves it unchanged, inline evaluation uses it and gives the raw
weights back to training, and export and `evaluate` use it (or the raw weights) and say so."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import smolvla_ray.train.trainer as trainer
from smolvla_ray.checkpoint.discovery import fetch_checkpoint, list_checkpoints
from smolvla_ray.checkpoint.export import export_checkpoint
from smolvla_ray.checkpoint.format import EMA, MANIFEST, STATE
from smolvla_ray.cli import app
from smolvla_ray.evaluation.offline import evaluate
from smolvla_ray.policy.modeling import SmolVLAPolicy
from smolvla_ray.run_layout import run_uri
from smolvla_ray.train.ema import WeightEMA
from smolvla_ray.train.metrics import read_metrics
from tests.inprocess import train_in_process
from tests.train.test_trainer import TRAIN, spec_for

EMA_ON = {"enable": True, "decay": 0.9, "start_step": 3, "update_every": 2}


def checkpoint_files(storage: Path, name: str, step: int) -> dict[str, Any]:
    """`trainable` and (when there) `ema` tensors of checkpoint `step`, its manifest, and
    the trainable parameters' names in the trainer's order."""
    infos = {i.step: i for i in list_checkpoints(run_uri(str(storage), name))}
    with tempfile.TemporaryDirectory() as tmp:
        local = fetch_checkpoint(infos[step].uri, Path(tmp))
        out = {"trainable": load_file(str(local / "trainable.safetensors"))}
        if (local / EMA).exists():
            out["ema"] = load_file(str(local / EMA))
        out["manifest"] = json.loads((local / MANIFEST).read_text())["files"]
        out["names"] = json.loads((local / STATE).read_text())["param_names"]
        return out


def record_weights(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[torch.Tensor], bool]]:
    """The trainable weights before the first step (finite: None), then after every step with
    whether it was applied, recorded around the trainer's `train_step`."""
    seen: list[tuple[list[torch.Tensor], bool]] = []
    real = trainer.train_step

    def step(ddp, *args, **kwargs):
        if not seen:
            seen.append(([p.detach().clone() for p in ddp.module.params], True))
        result = real(ddp, *args, **kwargs)
        seen.append(([p.detach().clone() for p in ddp.module.params], bool(result.finite)))
        return result

    monkeypatch.setattr(trainer, "train_step", step)
    return seen


def replay(
    seen: list[tuple[list[torch.Tensor], bool]], *, decay: float, start_step: int, every: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The EMA recomputed from the recorded weights: with the textbook formula in float64,
    and as the module computes it (float32 lerp, a scalar weight)."""
    exact = [w.double() for w in seen[0][0]]
    lerped = [w.float().clone() for w in seen[0][0]]
    for step, (weights, applied) in enumerate(seen[1:], start=1):
        if not applied:
            continue
        if step <= start_step:
            exact, lerped = [w.double() for w in weights], [w.float().clone() for w in weights]
        elif step % every == 0:
            pairs = list(zip(exact, lerped, weights, strict=True))
            exact = [decay * e + (1 - decay) * w.double() for e, _, w in pairs]
            lerped = [torch.lerp(e, w.float(), 1 - decay) for _, e, w in pairs]
    return exact, lerped


def test_the_saved_ema_equals_a_recomputation_from_every_steps_weights(
    tmp_path: Path, demo_dataset: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = record_weights(monkeypatch)
    spec = spec_for(demo_dataset, tmp_path, "ema", train={**TRAIN, "ema": EMA_ON})
    state, _ = train_in_process(spec)
    assert state is not None and state.step == 12 and len(seen) == 13
    saved = checkpoint_files(tmp_path, "ema", 12)
    names = saved["names"]
    assert EMA in saved["manifest"]  # covered by the manifest like every file
    exact, lerped = replay(seen, decay=0.9, start_step=3, every=2)
    ema = saved["ema"]
    assert set(ema) == set(names) and all(t.dtype == torch.float32 for t in ema.values())
    for name, e, lerp in zip(names, exact, lerped, strict=True):
        assert torch.equal(ema[name], lerp), name
        torch.testing.assert_close(ema[name].double(), e, rtol=1e-6, atol=1e-7)
    # It is an average, not the last weights.
    assert any(not torch.equal(ema[n], saved["trainable"][n]) for n in names)


def test_a_killed_run_resumes_to_the_same_ema(tmp_path: Path, demo_dataset: str) -> None:
    train = {**TRAIN, "ema": {**EMA_ON, "update_every": 3}}
    whole = spec_for(demo_dataset, tmp_path, "whole", train=train)
    assert train_in_process(whole)[0] is not None
    killed = spec_for(demo_dataset, tmp_path, "killed", train=train)
    assert train_in_process(killed, stop_after=10)[0] is None  # newest checkpoint: 8
    state, _ = train_in_process(killed)
    assert state is not None and state.resumed_from_step == 8
    a, b = checkpoint_files(tmp_path, "whole", 12), checkpoint_files(tmp_path, "killed", 12)
    for kind in ("trainable", "ema"):
        assert set(a[kind]) == set(b[kind])
        for name in a[kind]:
            assert torch.equal(a[kind][name], b[kind][name]), (kind, name)


def test_turning_the_ema_on_at_a_resume_starts_it_from_the_resumed_weights(
    tmp_path: Path, demo_dataset: str, capsys: pytest.CaptureFixture[str]
) -> None:
    train = {**TRAIN, "steps": 8}
    off = spec_for(demo_dataset, tmp_path, "later", train=train)
    assert train_in_process(off, stop_after=4)[0] is None  # checkpoint 4, without an EMA
    on = spec_for(demo_dataset, tmp_path, "later", train={**train, "ema": {"enable": True}})
    capsys.readouterr()
    state, _ = train_in_process(on)
    assert state is not None and state.resumed_from_step == 4
    assert "resume: train.ema.enable: false -> true (the EMA starts from the weights of" in (
        capsys.readouterr().out
    )
    assert "ema" not in checkpoint_files(tmp_path, "later", 4)
    assert set(checkpoint_files(tmp_path, "later", 8)["ema"]) == set(
        checkpoint_files(tmp_path, "later", 4)["trainable"]
    )


def test_a_skipped_non_finite_step_leaves_the_ema_unchanged(
    tmp_path: Path, demo_dataset: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The module: a step that was not applied is a lerp of weight 0, decided on the device.
    param = torch.nn.Parameter(torch.zeros(3))
    ema = WeightEMA([param], decay=0.5)
    with torch.no_grad():
        param.fill_(2.0)
    ema.update(1, torch.tensor(False))
    assert torch.equal(ema.averages[0], torch.zeros(3))
    ema.update(1, torch.tensor(True))
    assert torch.equal(ema.averages[0], torch.ones(3))

    # A run: lr 1e30 makes step 1 finite and every later step non-finite (skipped).
    seen = record_weights(monkeypatch)
    train = {"steps": 4, "log_every": 1, "optimizer": {"lr": 1e30, "grad_clip_norm": 1e30},
             "scheduler": {"warmup_steps": 0, "decay_steps": 1000},
             "ema": {"enable": True, "decay": 0.999}}  # fmt: skip
    spec = spec_for(
        demo_dataset, tmp_path, "skip", train=train, checkpoint={"storage": str(tmp_path)},
        failure={"on_nonfinite": "skip"},
    )  # fmt: skip
    state, _ = train_in_process(spec)
    assert state is not None and state.skipped_steps == 3
    assert [applied for _, applied in seen] == [True, True, False, False, False]
    start, after = seen[0][0], seen[1][0]
    ema_after_step_1 = [torch.lerp(a, b, 1 - 0.999) for a, b in zip(start, after, strict=True)]
    saved = checkpoint_files(tmp_path, "skip", 4)
    for name, expected in zip(saved["names"], ema_after_step_1, strict=True):
        assert torch.equal(saved["ema"][name], expected), name


def test_evaluation_and_export_use_the_ema_and_say_so(
    tmp_path: Path, demo_dataset: str, capsys: pytest.CaptureFixture[str]
) -> None:
    evaluation = {"episodes": [3], "every_steps": 3, "max_samples": 8}
    train = {**TRAIN, "steps": 6, "ema": {"enable": True, "decay": 0.8}}
    with_ema = spec_for(demo_dataset, tmp_path, "with", train=train, eval=evaluation)
    without = spec_for(
        demo_dataset, tmp_path, "without", train={**train, "ema": {"enable": False}},
        eval=evaluation,
    )  # fmt: skip
    capsys.readouterr()
    assert train_in_process(with_ema)[0] is not None
    assert "evaluation at step 3 of the EMA weights: loss" in capsys.readouterr().out
    assert train_in_process(without)[0] is not None
    # Evaluating the EMA gives training its raw weights back, bit for bit: the raw weights
    # equal those of the same run without an EMA.
    ours, plain = checkpoint_files(tmp_path, "with", 6), checkpoint_files(tmp_path, "without", 6)
    for name, tensor in ours["trainable"].items():
        assert torch.equal(tensor, plain["trainable"][name]), name
    run = Path(run_uri(str(tmp_path), "with"))
    table = json.loads((run / "eval" / "eval_000000006.json").read_text())
    assert table["weights"] == "ema"
    assert json.loads((Path(run_uri(str(tmp_path), "without")) / "eval" /
                       "eval_000000006.json").read_text())["weights"] == "raw"  # fmt: skip

    # Export writes the EMA (or, asked, the raw weights), and says which.
    (last,) = [i for i in list_checkpoints(str(run)) if i.step == 6]
    for raw, expected in ((False, ours["ema"]), (True, ours["trainable"])):
        out = tmp_path / f"export-raw-{raw}"
        trained = export_checkpoint(last.uri, str(out), {}, raw_weights=raw)
        assert trained.weights == ("raw" if raw else "ema")
        exported = SmolVLAPolicy.from_pretrained(str(out)).trainable_parameters()
        assert set(exported) == set(expected)
        for name, param in exported.items():
            assert torch.equal(param.detach(), expected[name]), (raw, name)

    # The command says which weights it wrote.
    said = CliRunner().invoke(app, ["export", last.uri, str(tmp_path / "cli-export")])
    assert said.exit_code == 0, said.output
    assert "weights: the EMA of the trained weights (train.ema; --raw-weights" in said.output

    # Offline evaluation of the checkpoint on its held-out episodes: the EMA, recorded as
    # such, reproducing the run's own evaluation of step 6.
    result = evaluate(last.uri, demo_dataset, out=tmp_path / "eval", plot_episodes=0)
    assert result.weights == "ema"
    record = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert record["weights"] == "ema"
    final = next(r for r in read_metrics(str(run)) if r["step"] == 6)
    assert result.summary["eval/loss"] == pytest.approx(final["eval/loss"], rel=1e-6)
    raw = evaluate(last.uri, demo_dataset, out=tmp_path / "raw", plot_episodes=0, raw_weights=True)
    assert raw.weights == "raw" and raw.summary["eval/loss"] != result.summary["eval/loss"]
