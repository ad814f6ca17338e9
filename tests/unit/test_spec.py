"""The job spec: sections, cross-field checks, --set overrides, secrets, schema, loading."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from smolvla_ray.policy.config import PolicyConfig
from smolvla_ray.spec import (
    ENV_STORAGE_OPTIONS,
    MASK,
    JobSpec,
    PolicySpec,
    SchedulerSpec,
    SpecError,
    apply_overrides,
    json_schema,
    load_spec,
    spec_from_dict,
)

SECRET = "s3cr3t-Value-9f8e7d"
ACCESS_KEY = "AKIAEXAMPLE12345"


def minimal(**sections: Any) -> dict[str, Any]:
    """The smallest valid spec, with `sections` merged over it one level deep."""
    data: dict[str, Any] = {
        "name": "job",
        "policy": {"preset": "tiny"},
        "data": {"uri": "./dataset"},
        "train": {"steps": 100, "batch_size": 2},
        "checkpoint": {"storage": "./runs"},
    }
    for key, value in sections.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and key in data else value
    return data


def error_of(data: dict[str, Any], overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(SpecError) as info:
        spec_from_dict(data, overrides)
    return str(info.value)


def test_minimal_spec_takes_defaults():
    spec = spec_from_dict(minimal())
    assert spec.train.optimizer.lr == 1e-4
    assert spec.train.optimizer.betas == (0.9, 0.95)
    assert spec.train.scheduler.warmup_steps == 1000
    assert spec.train.scheduler.decay_steps == 30000
    assert spec.train.seed == 1000
    assert spec.scaling.num_workers == 1 and not spec.scaling.use_gpu
    assert spec.checkpoint.keep_last == 3 and spec.checkpoint.upload_mode == "async"
    assert spec.failure.max_failures == 0 and spec.failure.on_nonfinite == "stop"
    assert spec.data.cache_max_bytes == 20 * 1024**3
    assert spec.resolved_precision() == "fp32" and spec.resolved_frozen_dtype() == "fp32"
    assert spec.global_batch_size == 2
    assert not spec.train.ema.enable and spec.train.ema.decay == 0.999
    assert spec.train.ema.start_step == 0 and spec.train.ema.update_every == 1


def test_spec_module_imports_no_heavy_libraries():
    code = (
        "import sys, smolvla_ray.spec; "
        "print(sorted({'torch', 'ray', 'transformers'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- every section rejects unknown keys ---------------------------------------------------


def _sections(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted paths of JobSpec and every section model below it."""
    from smolvla_ray.spec.job import schema_child

    paths = [prefix]
    for name, field in model.model_fields.items():
        child = schema_child(field.annotation)
        if isinstance(child, type):
            paths += _sections(child, f"{prefix}{name}.")
    return paths


@pytest.mark.parametrize("section", _sections(JobSpec))
def test_unknown_key_rejected_everywhere(section: str):
    data = minimal(data={"uri": "./d", "episodes": {"start": 0, "stop": 2}})
    node = data
    for part in section.rstrip(".").split(".") if section else []:
        node = node.setdefault(part, {})
    node["bogus_key"] = 1
    message = error_of(data)
    assert f"{section}bogus_key: unknown field" in message
    assert "valid keys at" in message


def test_unknown_key_suggests_close_match():
    message = error_of(minimal(train={"stpes": 5}))
    assert "train.stpes: unknown field; did you mean steps?" in message


# -- field checks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"name": "Bad Name"}, "name: must be 1-63 of a-z 0-9 . _ -"),
        ({"name": "My_Job!"}, "e.g. 'my_job'"),
        (
            {"train": {"steps": 0}},
            "train.steps: Input should be greater than or equal to 1 (got 0)",
        ),
        ({"train": {"batch_size": -1}}, "train.batch_size"),
        ({"train": {"precision": "fp16"}}, "train.precision: Input should be 'auto', 'fp32'"),
        ({"scaling": {"num_workers": 0}}, "scaling.num_workers"),
        ({"checkpoint": {"storage": "./r", "keep_last": 0}}, "checkpoint.keep_last"),
        ({"failure": {"max_failures": -2}}, "failure.max_failures"),
        ({"data": {"uri": "s4://bucket/d"}}, "unknown URL scheme 's4://'; did you mean"),
        ({"checkpoint": {"storage": "https://x/y"}}, "checkpoint.storage: http(s) storage is"),
        ({"data": {"uri": "./d", "episodes": []}}, "data.episodes: episodes is an empty list"),
        ({"data": {"uri": "./d", "episodes": [0, 2, 2]}}, "lists [2] more than once"),
        ({"data": {"uri": "./d", "episodes": [-1]}}, "must be >= 0"),
        ({"data": {"uri": "./d", "episodes": {"start": 5, "stop": 5}}}, "stop=5 must exceed"),
        ({"data": {"uri": "./d", "cameras": ["top", "top"]}}, "names a camera twice"),
        ({"data": {"uri": "./d", "cameras": ["observation.images.top"]}}, "'top'"),
        ({"policy": {"preset": "tiny", "pretrained": "x/y"}}, "exactly one of pretrained"),
        ({"policy": {}}, "exactly one of pretrained"),
        ({"train": {"optimizer": {"betas": [0.9, 1.5]}}}, "train.optimizer.betas"),
        (
            {"train": {"ema": {"enable": True, "decay": 1.0}}},
            "train.ema.decay: decay 1.0 must be in (0, 1), e.g. 0.999",
        ),
        ({"train": {"ema": {"decay": 0}}}, "to turn the EMA off set train.ema.enable: false"),
        ({"train": {"ema": {"update_every": 0}}}, "train.ema.update_every: Input should be"),
        ({"train": {"ema": {"start_step": -1}}}, "train.ema.start_step: Input should be"),
        (
            {"train": {"ema": {"enable": True, "start_step": 100}}},
            "train.ema.start_step=100 is not below train.steps=100: the EMA would only copy",
        ),
    ],
)
def test_bad_fields_name_field_and_fix(sections: dict[str, Any], expected: str):
    data = minimal()
    data.update(sections)
    if "train" in sections:
        data["train"] = {"steps": 100, "batch_size": 2, **sections["train"]}
    assert expected in error_of(data)


def test_episode_range_and_byte_size_strings():
    spec = spec_from_dict(
        minimal(data={"episodes": {"start": 2, "stop": 5}, "cache_max_bytes": "500MiB"})
    )
    assert (spec.data.episodes.start, spec.data.episodes.stop) == (2, 5)
    assert spec.data.cache_max_bytes == 500 * 1024**2


# -- cross-field checks -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        (
            {"checkpoint": {"every_steps": 500}},
            "checkpoint.every_steps=500 exceeds train.steps=100; lower it or set it to null",
        ),
        (
            {"train": {"precision": "bf16"}},
            "train.precision='bf16' needs scaling.use_gpu=true (got false)",
        ),
        (
            {"train": {"frozen_dtype": "bf16"}},
            "train.frozen_dtype='bf16' needs bf16 autocast",
        ),
        (
            {
                "policy": {
                    "pretrained": "lerobot/smolvla_base",
                    "chunk_size": 10,
                    "n_action_steps": 20,
                }
            },
            "policy: n_action_steps=20 exceeds chunk_size=10; lower n_action_steps",
        ),
        (
            {"policy": {"preset": "tiny", "n_action_steps": 20}},
            "n_action_steps=20 exceeds chunk_size=10",
        ),
        (
            {"train": {"scheduler": {"warmup_steps": 50, "decay_steps": 10}}},
            "train.scheduler: warmup_steps=50 exceeds decay_steps=10",
        ),
        (
            {"train": {"scheduler": {"type": "constant", "warmup_steps": 5}}},
            "train.scheduler: warmup_steps has no effect with type 'constant'",
        ),
        (
            {"policy": {"preset": "tiny", "prefix_mode": "no_grad", "train_expert_only": False}},
            "prefix_mode='no_grad' needs a frozen VLM but train_expert_only=False",
        ),
        (
            {"scaling": {"resources_per_worker": {"GPU": 1}}},
            "scaling.resources_per_worker.GPU=1.0 contradicts scaling.use_gpu=False",
        ),
        (
            {"scaling": {"use_gpu": True, "resources_per_worker": {"GPU": 0.5}}},
            "scaling.resources_per_worker.GPU=0.5: each worker drives exactly one GPU",
        ),
        (
            {"scaling": {"use_gpu": True, "resources_per_worker": {"CPU": 8, "GPU": 2}}},
            "scaling.resources_per_worker.GPU=2.0: each worker drives exactly one GPU",
        ),
        (
            {"checkpoint": {"keep_best": 2}},
            "checkpoint.keep_best ranks checkpoints by an evaluation metric, but there is no "
            "eval section",
        ),
        (
            {"checkpoint": {"keep_best": 1, "every_steps": 30}, "eval": {"every_steps": 20}},
            "checkpoint.every_steps=30 is not a multiple of eval.every_steps=20",
        ),
        (
            {"checkpoint": {"every_steps": 20}, "eval": {"every_steps": 30, "mode": "async"}},
            "eval.every_steps=30 is not a multiple of checkpoint.every_steps=20",
        ),
        (
            {"eval": {"every_steps": 30, "mode": "async"}},
            "eval.mode=async evaluates checkpoints, and checkpoint.every_steps is null",
        ),
        (
            {"eval": {"metric": "eval/accuracy"}},
            "'eval/accuracy' is not an evaluation metric",
        ),
        ({"eval": {"split": 1.0}}, "eval.split"),
    ],
)
def test_cross_field_checks(sections: dict[str, Any], expected: str):
    data = minimal()
    for key, value in sections.items():
        data[key] = value if key == "policy" else {**data.get(key, {}), **value}
    assert expected in error_of(data)


def test_an_eval_section_takes_lerobots_split_and_keep_best_follows_it():
    spec = spec_from_dict(
        minimal(eval={"every_steps": 25}, checkpoint={"keep_best": 2, "every_steps": 50})
    )
    assert spec.eval is not None and spec.eval.split == 0.1 and spec.eval.mode == "inline"
    assert spec.eval.metric == "eval/action_mse" and spec.eval.metric_mode == "min"
    assert spec.eval_batch_size() == 2  # train.batch_size unless eval.batch_size says
    assert spec_from_dict(minimal()).eval is None


def test_bf16_accepted_on_gpu():
    spec = spec_from_dict(
        minimal(train={"precision": "bf16"}, scaling={"use_gpu": True, "num_workers": 2})
    )
    assert spec.resolved_precision() == "bf16" and spec.resolved_frozen_dtype() == "bf16"
    auto = spec_from_dict(minimal(scaling={"use_gpu": True}))
    assert auto.resolved_precision() == "bf16"


# -- scheduler rescaling --------------------------------------------------------------------


def test_scheduler_rescales_like_lerobot():
    from smolvla_ray.train.optim import resolve_schedule

    sched = SchedulerSpec()
    assert resolve_schedule(sched.warmup_steps, sched.decay_steps, 20_000) == (666, 20_000)
    assert resolve_schedule(sched.warmup_steps, sched.decay_steps, 30_000) == (1000, 30_000)
    assert resolve_schedule(sched.warmup_steps, sched.decay_steps, 100_000) == (1000, 30_000)
    assert resolve_schedule(10, 60, 50) == (8, 50)


# -- policy section -------------------------------------------------------------------------


def test_config_updates_apply_to_a_policy_config():
    policy = PolicySpec(
        preset="tiny",
        freeze_vision_encoder=False,
        train_state_proj=False,
        chunk_size=8,
        n_action_steps=4,
        overrides={"num_steps": "5", "tokenizer_max_length": 32},
    )
    updates = policy.config_updates()
    assert updates == {
        "freeze_vision_encoder": False,
        "train_state_proj": False,
        "chunk_size": 8,
        "n_action_steps": 4,
        "num_steps": 5,
        "tokenizer_max_length": 32,
    }
    config = PolicyConfig.model_validate({**PolicyConfig.preset("tiny").model_dump(), **updates})
    assert config.chunk_size == 8 and config.num_steps == 5 and not config.freeze_vision_encoder
    assert config.train_expert_only  # None keeps the preset's value
    assert PolicySpec(pretrained="lerobot/smolvla_base").config_updates() == {}


def test_policy_config_updates_carry_optimizer_and_scheduler():
    spec = spec_from_dict(minimal(train={"optimizer": {"lr": 3e-4}}))
    updates = spec.policy_config_updates()
    assert updates["optimizer_lr"] == 3e-4 and updates["scheduler_decay_steps"] == 30000
    PolicyConfig.preset("tiny", **updates)


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("num_stepz", "'num_stepz' is not a PolicyConfig field; did you mean num_steps"),
        ("optimizer_lr", "'optimizer_lr' is not a policy override; set train.optimizer.lr"),
        (
            "scheduler_warmup_steps",
            "'scheduler_warmup_steps' is not a policy override; set train.scheduler.warmup_steps",
        ),
        ("chunk_size", "set policy.chunk_size"),
        ("train_expert_only", "set policy.train_expert_only"),
        ("freeze_vision_encoder", "set policy.freeze_vision_encoder"),
        ("train_state_proj", "set policy.train_state_proj"),
        ("device", "set scaling.use_gpu"),
    ],
)
def test_policy_overrides_reject_unknown_and_homed_fields(key: str, expected: str):
    message = error_of(minimal(policy={"preset": "tiny", "overrides": {key: 1}}))
    assert "policy.overrides:" in message and expected in message


def test_policy_override_values_are_type_checked():
    message = error_of(minimal(policy={"preset": "tiny", "overrides": {"num_steps": 0}}))
    assert "policy.overrides: num_steps=0: Input should be greater than or equal to 1" in message
    message = error_of(
        minimal(policy={"pretrained": "x/y", "overrides": {"attention_mode": "bogus"}})
    )
    assert "attention_mode='bogus'" in message


def test_preset_checks_the_whole_policy_config():
    message = error_of(
        minimal(policy={"preset": "tiny", "overrides": {"use_delta_joint_actions_aloha": True}})
    )
    assert "with preset 'tiny'" in message and "use_delta_joint_actions_aloha" in message


# -- --set overrides ------------------------------------------------------------------------


def test_set_overrides():
    spec = spec_from_dict(
        minimal(),
        [
            "train.steps=50",
            "scaling.num_workers=2",
            "policy.overrides.num_steps=5",
            "data.episodes=[0,1,2]",
            "train.optimizer.lr=3e-4",
            "checkpoint.every_steps=null",
            "storage_options.endpoint_url=http://127.0.0.1:9000",
            "scaling.resources_per_worker.CPU=2",
            "data.cameras=[top, wrist]",
        ],
    )
    assert spec.train.steps == 50 and spec.scaling.num_workers == 2
    assert spec.policy.overrides == {"num_steps": 5}
    assert spec.data.episodes == [0, 1, 2] and spec.data.cameras == ["top", "wrist"]
    assert spec.train.optimizer.lr == 3e-4 and spec.checkpoint.every_steps is None
    assert spec.storage_options["endpoint_url"] == "http://127.0.0.1:9000"
    assert spec.scaling.resources_per_worker == {"CPU": 2.0}


def test_apply_overrides_copies_and_creates_sections():
    data = minimal()
    out = apply_overrides(data, ["failure.max_failures=3", "data.episodes.start=1"])
    assert out["failure"] == {"max_failures": 3} and out["data"]["episodes"] == {"start": 1}
    assert "failure" not in data  # the input is not modified


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.stepz=5", "--set train.stepz: no field 'stepz'; did you mean steps? valid keys"),
        ("trian.steps=5", "no field 'trian'; did you mean train? valid keys at the top level"),
        ("train.steps.x=5", "--set train.steps.x: train.steps is a single value and has no 'x'"),
        ("train.optimizer.momentum=0.9", "valid keys at train.optimizer: type, lr, betas"),
        ("train.steps", "expected key.path=value"),
        ("train..steps=1", "expected key.path=value"),
        ("train.steps=[1", "is not a valid YAML value"),
    ],
)
def test_bad_set_override_names_the_path(override: str, expected: str):
    assert expected in error_of(minimal(), (override,))


def test_set_override_value_is_validated():
    assert "train.steps: Input should be greater than or equal to 1 (got -3)" in error_of(
        minimal(), ("train.steps=-3",)
    )


# -- secrets --------------------------------------------------------------------------------


def secret_spec() -> JobSpec:
    return spec_from_dict(
        minimal(
            storage_options={
                "key": ACCESS_KEY,
                "secret": SECRET,
                "endpoint_url": "http://127.0.0.1:9000",
                "anon": False,
                "client_kwargs": {"region_name": "us-east-1", "aws_session_token": SECRET},
            }
        )
    )


def test_secrets_do_not_leak():
    spec = secret_spec()
    dumped = spec.model_dump(mode="json")
    assert dumped["storage_options"]["secret"] == MASK
    assert dumped["storage_options"]["client_kwargs"]["aws_session_token"] == MASK
    texts = [
        repr(spec),
        str(spec),
        json.dumps(dumped),
        spec.model_dump_json(),
        json.dumps(spec.public_dict()),
        repr(spec.storage_options),
    ]
    for text in texts:
        assert SECRET not in text and ACCESS_KEY not in text
    # Well-known non-secret options stay readable.
    assert dumped["storage_options"]["endpoint_url"] == "http://127.0.0.1:9000"
    assert spec.public_dict()["storage_options"] == {
        "endpoint_url": "http://127.0.0.1:9000",
        "anon": False,
        "client_kwargs": {"region_name": "us-east-1"},
    }


def test_storage_options_plain_reveals_secrets():
    plain = secret_spec().storage_options_plain(environ={})
    assert plain["key"] == ACCESS_KEY and plain["secret"] == SECRET
    assert plain["client_kwargs"] == {"region_name": "us-east-1", "aws_session_token": SECRET}


def test_public_dict_validates_back():
    spec = secret_spec()
    again = JobSpec.model_validate(spec.public_dict())
    assert again.public_dict() == spec.public_dict()


def test_masked_dump_is_rejected_not_used_as_a_credential():
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(secret_spec().model_dump(mode="json"))
    assert "holds the mask" in str(info.value)


def test_validation_errors_never_echo_secrets():
    bad = minimal(storage_options={"secret": SECRET, "nested": {"token": SECRET}})
    bad["train"]["steps"] = 0
    bad["checkpoint"]["every_steps"] = 5
    assert SECRET not in error_of(bad)
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate({**bad, "bogus": 1})
    assert SECRET not in str(info.value) and SECRET not in repr(info.value)
    # A cross-field error carries the whole input; it must not be echoed either.
    bad["train"]["steps"] = 1
    assert SECRET not in error_of(bad)


def test_env_storage_options_merge_under_the_spec(monkeypatch: pytest.MonkeyPatch):
    env = {"key": "ENVKEY", "secret": "ENVSECRET", "client_kwargs": {"region_name": "eu"}}
    monkeypatch.setenv(ENV_STORAGE_OPTIONS, json.dumps(env))
    spec = spec_from_dict(
        minimal(storage_options={"secret": SECRET, "client_kwargs": {"verify": False}})
    )
    plain = spec.storage_options_plain()
    assert plain["key"] == "ENVKEY"  # from the environment
    assert plain["secret"] == SECRET  # the spec wins
    assert plain["client_kwargs"] == {"region_name": "eu", "verify": False}  # merged deeply
    # The environment's values never enter the spec or its dumps.
    assert "ENVSECRET" not in spec.model_dump_json() and "ENVKEY" not in repr(spec)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_bad_env_storage_options_fail_early_without_echo(
    monkeypatch: pytest.MonkeyPatch, text: str
):
    monkeypatch.setenv(ENV_STORAGE_OPTIONS, text)
    message = error_of(minimal())
    assert ENV_STORAGE_OPTIONS in message and text not in message


# -- schema ---------------------------------------------------------------------------------


def test_json_schema_is_json_and_has_every_section():
    schema = json.loads(json.dumps(json_schema()))
    props = schema["properties"]
    for section in ("name", "policy", "data", "train", "scaling", "checkpoint", "failure"):
        assert section in props
    assert "storage_options" in props
    assert set(schema["required"]) == {"name", "policy", "data", "train", "checkpoint"}
    defs = schema["$defs"]
    assert defs["TrainSpec"]["additionalProperties"] is False
    assert defs["OptimizerSpec"]["properties"]["lr"]["default"] == 1e-4
    assert "description" in defs["DataSpec"]["properties"]["uri"]


# -- loading files ----------------------------------------------------------------------------


def test_load_spec_with_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            name: job
            policy: {preset: tiny}
            data: {uri: ./d}
            train: {steps: 10, batch_size: 2}
            checkpoint: {storage: s3://bucket/runs}
            """
        )
    )
    spec = load_spec(path, ["train.steps=20"])
    assert spec.train.steps == 20 and spec.checkpoint.storage == "s3://bucket/runs"


def test_load_spec_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: job\npolicy: {preset: tiny\n", "invalid YAML at line"),
        ("name: job\n  bad: indent\n", "invalid YAML at line 2"),
        ("- a\n- b\n", "must hold a YAML mapping at the top level, not a list"),
        ("", "is empty"),
    ],
)
def test_load_spec_bad_yaml(tmp_path, text: str, expected: str):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=expected):
        load_spec(path)


def test_load_spec_error_names_the_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: job\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(path) in str(info.value) and "policy: Field required" in str(info.value)


def test_union_errors_collapse_to_one_line():
    message = error_of(minimal(), ("data.episodes=abc",))
    assert "(1 problem(s))" in message
    assert "data.episodes: Input should be a valid list or a valid dictionary" in message
    message = error_of(minimal(), ("data.episodes={start: 0, stop: 3, x: 1}",))
    assert "(1 problem(s))" in message and "data.episodes.x: unknown field" in message
    assert "data.episodes[1]: Input should be a valid integer" in error_of(
        minimal(), ("data.episodes=[0, a]",)
    )


def test_constant_scheduler_spec_survives_its_public_dump():
    """Workers re-validate `public_dict()`, which writes every scheduler field."""
    from smolvla_ray.spec import spec_from_dict

    data = {
        "name": "constant-lr",
        "policy": {"preset": "tiny"},
        "data": {"uri": "/tmp/somewhere"},
        "train": {"steps": 5, "batch_size": 1, "scheduler": {"type": "constant"}},
        "checkpoint": {"storage": "/tmp/runs"},
    }
    spec = spec_from_dict(data)
    assert spec_from_dict(spec.public_dict()).train.scheduler.type == "constant"
