"""Image augmentation: deterministic per (seed, step, frame), bounded, and real."""

from __future__ import annotations

import torch

from smolvla_ray.data.augment import augment_batch, augment_image
from smolvla_ray.spec.sections import AugmentSpec


def batch() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "observation.images.top": torch.rand(4, 3, 24, 32, generator=g),
        "index": torch.tensor([3, 9, 11, 40]),
    }


def test_same_key_same_result_other_key_other_result() -> None:
    spec = AugmentSpec(enable=True)
    b = batch()
    first = augment_batch(b, ["observation.images.top"], spec, seed=1, step=5)
    again = augment_batch(b, ["observation.images.top"], spec, seed=1, step=5)
    other = augment_batch(b, ["observation.images.top"], spec, seed=1, step=6)
    assert torch.equal(first["observation.images.top"], again["observation.images.top"])
    assert not torch.allclose(first["observation.images.top"], other["observation.images.top"])
    assert not torch.allclose(first["observation.images.top"], b["observation.images.top"])
    out = first["observation.images.top"]
    assert out.shape == b["observation.images.top"].shape
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_single_transforms_do_what_they_say() -> None:
    img = torch.full((3, 8, 8), 0.5)
    img[0] = 0.8
    off = {
        k: None
        for k in ("brightness", "contrast", "saturation", "hue", "sharpness", "affine_degrees")
    }
    g = torch.Generator().manual_seed(0)
    bright = augment_image(img, AugmentSpec(**{**off, "brightness": (1.5, 1.5)}), g)
    torch.testing.assert_close(bright, (img * 1.5).clamp(0, 1))
    gray = augment_image(img, AugmentSpec(**{**off, "saturation": (0.0, 0.0)}), g)
    assert torch.allclose(gray[0], gray[1]) and torch.allclose(gray[1], gray[2])
    same = augment_image(img, AugmentSpec(**{**off, "hue": (0.0, 0.0)}), g)
    torch.testing.assert_close(same, img)
    turned = augment_image(img, AugmentSpec(**{**off, "hue": (0.3, 0.3)}), g)
    assert not torch.allclose(turned, img)
    torch.testing.assert_close(turned.mean(dim=0), img.mean(dim=0), atol=1e-5, rtol=0)


def test_disabled_spec_leaves_training_untouched() -> None:
    assert AugmentSpec().enable is False
