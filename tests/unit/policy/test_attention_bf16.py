"""What bf16 autocast does to the policy's attention (as in LeRobot 0.6.1: the query and key
are cast to float32, but autocast runs the matmuls in bf16 anyway): measured against float32
on a LeRobot-like shape, so the tolerance the docs state is a tested one."""

from __future__ import annotations

import torch

from smolvla_ray.policy.layers import eager_attention

# Measured on this shape: relative error 3.6e-3 (Frobenius), largest difference 0.014 of
# outputs up to 4.6; the bound leaves room for other CPUs' bf16 kernels.
BF16_RELATIVE_BOUND = 1e-2


def inputs(batch: int = 2, length: int = 48, heads: int = 4, kv_heads: int = 2, dim: int = 64):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, length, heads, dim, generator=g)
    k = torch.randn(batch, length, kv_heads, dim, generator=g)
    v = torch.randn(batch, length, kv_heads, dim, generator=g)
    mask = torch.tril(torch.ones(length, length, dtype=torch.bool))[None].expand(batch, -1, -1)
    return q, k, v, mask, heads // kv_heads


def test_fp32_attention_matches_a_float64_reference() -> None:
    q, k, v, mask, groups = inputs()
    out = eager_attention(q, k, v, mask, num_kv_groups=groups)
    exact = eager_attention(q.double(), k.double(), v.double(), mask, num_kv_groups=groups)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, exact.float(), rtol=1e-5, atol=1e-5)


def test_under_bf16_autocast_the_matmuls_run_in_bf16_within_the_stated_bound() -> None:
    q, k, v, mask, groups = inputs()
    reference = eager_attention(q, k, v, mask, num_kv_groups=groups)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = eager_attention(q, k, v, mask, num_kv_groups=groups)
    assert low.dtype == torch.bfloat16  # the float32 cast does not keep autocast out
    error = ((low.float() - reference).norm() / reference.norm()).item()
    assert 0 < error < BF16_RELATIVE_BOUND, error


def test_fp32_attention_keeps_autocast_out_and_equals_float32() -> None:
    """`train.attention_fp32`: under bf16 autocast the attention is exactly the float32 one
    (for bf16 inputs: the float32 attention of those bf16 values)."""
    q, k, v, mask, groups = inputs()
    reference = eager_attention(q, k, v, mask, num_kv_groups=groups)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        exact = eager_attention(q, k, v, mask, num_kv_groups=groups, fp32=True)
    assert exact.dtype == torch.float32
    assert torch.equal(exact, reference)


def test_the_spec_setting_reaches_the_policy_attention(tmp_path, demo_dataset: str) -> None:
    from smolvla_ray.build import open_dataset
    from smolvla_ray.settings import RunSettings
    from smolvla_ray.spec import spec_from_dict
    from smolvla_ray.train.trainer import WorkerContext, _build
    from tests.inprocess import single_process_group
    from tests.integration.conftest import tiny_spec_dict

    for flag in (False, True):
        settings = RunSettings.from_spec(spec_from_dict(
            tiny_spec_dict(
                demo_dataset, tmp_path, "attention", scaling={"num_workers": 1},
                train={"steps": 1, "batch_size": 2, "attention_fp32": flag},
            )
        ))  # fmt: skip
        with single_process_group():
            worker = _build(settings, WorkerContext(), open_dataset(settings, storage_options={}))
        assert worker.policy.model.vlm_with_expert.attention_fp32 is flag
