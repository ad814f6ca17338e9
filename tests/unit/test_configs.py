"""Every job spec in configs/ loads and validates, and the shipped ones say what they claim."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from smolvla_ray.spec import load_spec
from smolvla_ray.train.optim import resolve_schedule

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ALL = sorted(CONFIGS.glob("*.yaml")) + sorted(CONFIGS.glob("*.yml"))
FIELD_LINE = re.compile(r"^\s*[a-z_]+:(\s|$)")


def test_configs_exist():
    names = {p.name for p in ALL}
    assert {"tiny-demo.yaml", "so100-finetune.yaml", "libero-finetune.yaml"} <= names


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_config_validates(path: Path):
    spec = load_spec(path)
    assert spec.name == path.stem  # the file name is the job name
    assert spec.public_dict()["name"] == spec.name


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_config_has_no_inline_credentials(path: Path):
    data = yaml.safe_load(path.read_text())
    options = data.get("storage_options") or {}
    assert set(options) <= {"endpoint_url", "region_name", "client_kwargs", "anon"}


def uncomment_fields(text: str) -> str:
    """The spec with every commented-out `# field: value` line made live."""
    lines = []
    for line in text.splitlines():
        body = line.lstrip()
        if body.startswith("# ") and FIELD_LINE.match(body[2:]):
            line = line[: len(line) - len(body)] + body[2:]
        lines.append(line)
    return "\n".join(lines)


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_commented_fields_show_the_real_defaults(path: Path, tmp_path: Path):
    """Optional fields appear as `# field: default` lines; uncommented, they must load and
    change nothing (storage_options lines are examples, not defaults)."""
    live = tmp_path / path.name
    live.write_text(uncomment_fields(path.read_text()))
    assert live.read_text() != path.read_text()
    original, uncommented = load_spec(path), load_spec(live)
    skip = {"storage_options"}
    assert uncommented.model_dump(exclude=skip) == original.model_dump(exclude=skip)


def test_tiny_demo_is_the_cpu_demo():
    spec = load_spec(CONFIGS / "tiny-demo.yaml")
    assert spec.policy.preset == "tiny" and spec.data.uri == "./demo-output/dataset"
    assert spec.scaling.num_workers == 2 and not spec.scaling.use_gpu
    assert spec.checkpoint.storage == "./demo-output/runs"
    assert spec.checkpoint.every_steps == 20 and spec.checkpoint.keep_last == 2
    assert spec.train.batch_size == 4 and spec.train.log_every == 5
    assert spec.train.optimizer.lr == 1e-3 and spec.train.scheduler.warmup_steps == 10
    assert spec.data.num_loader_workers == 1
    # The schedule fits the run: no rescaling hides the 10 warmup steps.
    sched = spec.train.scheduler
    assert resolve_schedule(sched.warmup_steps, sched.decay_steps, spec.train.steps) == (
        10,
        spec.train.steps,
    )


@pytest.mark.parametrize("name", ["so100-finetune.yaml", "libero-finetune.yaml"])
def test_gpu_configs_follow_lerobot(name: str):
    spec = load_spec(CONFIGS / name)
    assert spec.policy.pretrained == "lerobot/smolvla_base"
    assert spec.scaling.use_gpu and spec.resolved_precision() == "bf16"
    assert spec.global_batch_size == 64
    assert spec.checkpoint.storage.startswith("s3://") and spec.data.uri.startswith("s3://")
    assert spec.failure.max_failures == 3 and spec.checkpoint.keep_last == 3
    assert spec.train.optimizer.lr == 1e-4  # LeRobot's SmolVLA preset


def test_so100_settings():
    spec = load_spec(CONFIGS / "so100-finetune.yaml")
    assert spec.train.steps == 20_000 and spec.checkpoint.every_steps == 2000
    sched = spec.train.scheduler
    assert resolve_schedule(sched.warmup_steps, sched.decay_steps, spec.train.steps) == (
        666,
        20_000,
    )


def test_libero_settings():
    spec = load_spec(CONFIGS / "libero-finetune.yaml")
    assert spec.data.cameras == ["image", "image2"]
    assert spec.policy.chunk_size == 50 and spec.policy.n_action_steps == 10


def _doc_examples() -> list[str]:
    text = (CONFIGS.parent / "docs" / "job-spec.md").read_text()
    blocks = text.split("```yaml\n")[1:]
    return [b.split("```", 1)[0] for b in blocks if b.startswith("name:")]


def test_docs_describe_every_field():
    from smolvla_ray.spec import JobSpec
    from smolvla_ray.spec.job import schema_child

    text = (CONFIGS.parent / "docs" / "job-spec.md").read_text()
    missing = []

    def walk(model, prefix=""):
        for name, field in model.model_fields.items():
            if f"`{name}`" not in text:
                missing.append(prefix + name)
            child = schema_child(field.annotation)
            if isinstance(child, type):
                walk(child, f"{prefix}{name}.")

    walk(JobSpec)
    assert not missing, f"docs/job-spec.md does not describe {missing}"


@pytest.mark.parametrize("example", _doc_examples(), ids=lambda e: e.split("\n")[0])
def test_doc_examples_validate(example: str, tmp_path: Path):
    path = tmp_path / "example.yaml"
    path.write_text(example)
    load_spec(path)
