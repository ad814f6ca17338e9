"""Image augmentation: a pure function of (seed, epoch, index, camera) run in the loader's
processes, so batches are the same whatever num_workers and after a resume; bounded; real."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from smolvla_ray.data.augment import MixtureAugmenter, SampleAugmenter, augment_image
from smolvla_ray.data.loader import ShardedLoader
from smolvla_ray.data.samples import FrameDataset
from smolvla_ray.keys import ACTION
from smolvla_ray.spec.sections import AugmentSpec

from .conftest import Demo

SEED = 3


@pytest.fixture(scope="module")
def dataset(demo_v30: Demo) -> FrameDataset:
    return FrameDataset(demo_v30.root, episodes=range(2), chunk_size=4)  # 41 frames


def augmenter(dataset: FrameDataset) -> SampleAugmenter:
    return SampleAugmenter(AugmentSpec(enable=True), tuple(dataset.camera_keys), seed=SEED)


def loader(dataset: FrameDataset, **kwargs) -> ShardedLoader:
    return ShardedLoader(
        dataset, batch_size=4, seed=SEED, sample_transform=augmenter(dataset), **kwargs
    )


def take(loader: ShardedLoader, count: int) -> list[dict]:
    it = iter(loader)
    return [next(it) for _ in range(count)]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], torch.Tensor):
                assert torch.equal(x[key], y[key]), key
            else:
                assert x[key] == y[key], key


def test_augmented_batches_are_the_same_whatever_num_workers_and_after_a_resume(
    dataset: FrameDataset,
) -> None:
    per_epoch = loader(dataset).batches_per_epoch
    total = per_epoch + 2  # into the second epoch
    reference = take(loader(dataset, num_workers=0), total)
    assert_same_batches(take(loader(dataset, num_workers=2), total), reference)

    stop = per_epoch // 2  # mid-epoch
    first = loader(dataset, num_workers=2)
    assert_same_batches(take(first, stop), reference[:stop])
    cursor = json.loads(json.dumps(first.cursor()))  # what a checkpoint stores
    resumed = loader(dataset, num_workers=1, cursor=cursor)
    assert_same_batches(take(resumed, total - stop), reference[stop:])

    # Each image is the augmenter's output for its row and epoch: nothing else goes in.
    camera = dataset.camera_keys[0]
    rows = {int(dataset.frames.index[r]): r for r in range(len(dataset))}
    batch = reference[per_epoch]  # the first batch of epoch 1
    for i, index in enumerate(batch["index"].tolist()):
        alone = augmenter(dataset)(dataset[rows[index]], 1)[camera]
        assert torch.equal(batch[camera][i], alone)


def test_two_epochs_augment_the_same_row_differently(dataset: FrameDataset) -> None:
    sample = dataset[5]
    first, second = augmenter(dataset)(sample, 0), augmenter(dataset)(sample, 1)
    for key in dataset.camera_keys:
        assert not torch.allclose(first[key], second[key]), key
        assert not torch.allclose(first[key], sample[key]), key
        assert first[key].shape == sample[key].shape and first[key].dtype == torch.float32
        assert first[key].min() >= 0.0 and first[key].max() <= 1.0
    assert torch.equal(first[ACTION], sample[ACTION])  # only images change
    # The two cameras of one frame draw differently too.
    top, wrist = dataset.camera_keys
    draw = augmenter(dataset)({"index": sample["index"], top: sample[top], wrist: sample[top]}, 0)
    assert not torch.equal(draw[top], draw[wrist])


def test_uint8_frames_are_refused() -> None:
    spec = AugmentSpec(enable=True)
    sample = {"index": torch.tensor(0), "cam": torch.zeros(3, 4, 4, dtype=torch.uint8)}
    with pytest.raises(TypeError, match="augmentation needs float images"):
        SampleAugmenter(spec, ("cam",), seed=0)(sample, 0)


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


def test_one_datasets_key_is_the_one_it_always_was(dataset: FrameDataset) -> None:
    """Augmented single-dataset runs resume exactly across the mixture change: each image
    still draws from blake2b("aug:{seed}:{epoch}:{index}:{camera}"), computed here by hand."""
    sample, epoch = dataset[7], 2
    out = augmenter(dataset)(sample, epoch)
    for camera in dataset.camera_keys:
        key = f"aug:{SEED}:{epoch}:{int(sample['index'])}:{camera}".encode()
        digest = hashlib.blake2b(key, digest_size=8).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        expected = augment_image(sample[camera], AugmentSpec(enable=True), g)
        assert torch.equal(out[camera], expected), camera


def test_a_mixture_keys_by_dataset_and_leaves_a_lacking_camera_alone() -> None:
    """Two datasets' frames with the same index and camera name draw apart; a camera the
    sample's dataset lacks (not in its list) is passed through untouched."""
    cameras = (("observation.images.top", "observation.images.top"),)
    mix = MixtureAugmenter(
        AugmentSpec(enable=True), (("a", cameras), ("b", cameras[:0])), seed=SEED
    )
    image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    sample = {"index": torch.tensor(4), "observation.images.top": image}
    a = mix({**sample, "dataset_index": torch.tensor(0)}, 0)["observation.images.top"]
    renamed = MixtureAugmenter(
        AugmentSpec(enable=True), (("a", cameras), ("c", cameras)), seed=SEED
    )
    c = renamed({**sample, "dataset_index": torch.tensor(1)}, 0)["observation.images.top"]
    assert not torch.equal(a, image) and not torch.equal(a, c)
    b = mix({**sample, "dataset_index": torch.tensor(1)}, 0)["observation.images.top"]
    assert b is image  # b lacks the camera: its fill stays as it is
