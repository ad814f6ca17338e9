"""Random image augmentation, as LeRobot's `image_transforms` (torchvision v2 transforms
ColorJitter brightness/contrast/saturation/hue, RandomAdjustSharpness, RandomAffine), in
plain torch so no torchvision is needed.

Per image, up to `max_num_transforms` of the enabled transforms are drawn (without
replacement, equal weights, in list order unless `random_order`), each with a parameter
drawn uniformly from its range.

`SampleAugmenter` runs in the loader's background processes, one sample at a time (see
`ShardedLoader`'s `sample_transform`), so augmentation no longer holds up the training
thread. The randomness of one image comes from a generator keyed by
(seed, epoch, dataset index, dataset camera key): a pure function of the sample and its epoch, so a
loader resumed from its cursor, or run with any number of loader processes, augments exactly
as before, and every epoch sees each frame augmented anew. (Earlier versions augmented on the
training thread keyed by the step, so augmented runs differ from theirs.)

`MixtureAugmenter` does the same for a mixture's samples (`data.datasets`), whose datasets
share frame index values and perhaps camera names: its key adds the dataset's name,
(seed, epoch, dataset name, frame index, dataset camera key), and it augments only the
cameras the sample's dataset has. One dataset keeps its key, so its runs resume unchanged.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from smolvla_ray.keys import DATASET_INDEX

if TYPE_CHECKING:
    # Annotations only: the data layer does not depend on the run's settings; anything with
    # these fields (the job spec's `data.augment` section too) is accepted.
    from smolvla_ray.settings import AugmentSettings


def _generator(
    seed: int, epoch: int, index: int, camera: str, *, dataset: str | None = None
) -> torch.Generator:
    # One dataset's key must never change (augmented runs resume exactly); a mixture's adds
    # the dataset's name (no ':' in it), as its datasets share frame index values.
    where = f"{index}:{camera}" if dataset is None else f"{dataset}:{index}:{camera}"
    digest = hashlib.blake2b(f"aug:{seed}:{epoch}:{where}".encode(), digest_size=8)
    return torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") >> 1)


def _gray(img: Tensor) -> Tensor:
    r, g, b = img[0], img[1], img[2]
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(0)


def _blend(a: Tensor, b: Tensor, ratio: float) -> Tensor:
    return (ratio * a + (1.0 - ratio) * b).clamp(0.0, 1.0)


def _hue(img: Tensor, shift: float) -> Tensor:
    """Rotate the hue by `shift` turns (a rotation about the gray axis in RGB space)."""
    angle = shift * 2 * math.pi
    cos, sin = math.cos(angle), math.sin(angle)
    k = 1.0 / 3.0
    sq = math.sqrt(k)
    matrix = torch.tensor(
        [
            [cos + (1 - cos) * k, k * (1 - cos) - sq * sin, k * (1 - cos) + sq * sin],
            [k * (1 - cos) + sq * sin, cos + k * (1 - cos), k * (1 - cos) - sq * sin],
            [k * (1 - cos) - sq * sin, k * (1 - cos) + sq * sin, cos + k * (1 - cos)],
        ],
        dtype=img.dtype,
    )
    return torch.einsum("ij,jhw->ihw", matrix, img).clamp(0.0, 1.0)


def _sharpness(img: Tensor, factor: float) -> Tensor:
    kernel = torch.tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=img.dtype) / 13.0
    blurred = F.conv2d(img.unsqueeze(1), kernel.view(1, 1, 3, 3), padding=1).squeeze(1)
    blurred[:, [0, -1], :] = img[:, [0, -1], :]  # torchvision keeps the border pixels
    blurred[:, :, [0, -1]] = img[:, :, [0, -1]]
    return _blend(img, blurred, factor)


def _affine(img: Tensor, degrees: float, tx: float, ty: float) -> Tensor:
    angle = math.radians(degrees)
    theta = torch.tensor(
        [[math.cos(angle), -math.sin(angle), 2 * tx], [math.sin(angle), math.cos(angle), 2 * ty]],
        dtype=img.dtype,
    )
    grid = F.affine_grid(theta.unsqueeze(0), [1, *img.shape], align_corners=False)
    return F.grid_sample(img.unsqueeze(0), grid, align_corners=False).squeeze(0)


def augment_image(img: Tensor, spec: AugmentSettings, g: torch.Generator) -> Tensor:
    """One (3, H, W) image in [0, 1], augmented."""

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=g))

    enabled = [
        name
        for name in ("brightness", "contrast", "saturation", "hue", "sharpness", "affine_degrees")
        if getattr(spec, name) is not None
    ]
    count = min(spec.max_num_transforms, len(enabled))
    picked = torch.multinomial(torch.ones(len(enabled)), count, generator=g).tolist()
    order = picked if spec.random_order else sorted(picked)
    for choice in order:
        name = enabled[choice]
        low, high = getattr(spec, name)
        value = uniform(low, high)
        if name == "brightness":
            img = (img * value).clamp(0.0, 1.0)
        elif name == "contrast":
            img = _blend(img, _gray(img).mean().expand_as(img), value)
        elif name == "saturation":
            img = _blend(img, _gray(img).expand_as(img), value)
        elif name == "hue":
            img = _hue(img, value)
        elif name == "sharpness":
            img = _sharpness(img, value)
        else:
            max_dx, max_dy = spec.affine_translate
            dx, dy = uniform(-max_dx, max_dx), uniform(-max_dy, max_dy)
            img = _affine(img, value, dx, dy)
    return img


@dataclass(frozen=True)
class SampleAugmenter:
    """Augments every camera image of one sample, given the sample's epoch.

    Keyed by (seed, epoch, index, camera): `index` is the frame's dataset index (the sample's
    `index` column, stable whatever episodes are selected) and `camera` the *dataset's*
    camera key, as the sample holds it in the loader process, before the processor's
    `rename_map` gives it the policy's name. Picklable, so loader processes can run it.
    """

    settings: AugmentSettings
    cameras: tuple[str, ...]
    seed: int

    def __call__(self, sample: Mapping[str, Any], epoch: int) -> dict[str, Any]:
        out = dict(sample)
        index = int(sample["index"])
        for key in self.cameras:
            image = _float_image(sample, key)
            out[key] = augment_image(image, self.settings, _generator(self.seed, epoch, index, key))
        return out


@dataclass(frozen=True)
class MixtureAugmenter:
    """Augments the camera images a mixture sample's dataset has, given the sample's epoch.

    Runs on samples already in the policy's shape (`train/mixture.ConformSample`: images
    under the policy's camera keys, `dataset_index` naming the dataset), so a camera the
    dataset lacks (its -1 fill, masked out) is left alone. `datasets[d]` is dataset d's
    (name, ((policy camera key, dataset camera key), ...)); each image is keyed by
    (seed, epoch, name, index, dataset camera key), so two datasets' frames with the same
    index draw apart. Picklable, so loader processes can run it.
    """

    settings: AugmentSettings
    datasets: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]
    seed: int

    def __call__(self, sample: Mapping[str, Any], epoch: int) -> dict[str, Any]:
        out = dict(sample)
        index = int(sample["index"])
        name, cameras = self.datasets[int(sample[DATASET_INDEX])]
        for key, source in cameras:
            g = _generator(self.seed, epoch, index, source, dataset=name)
            out[key] = augment_image(_float_image(sample, key), self.settings, g)
        return out


def _float_image(sample: Mapping[str, Any], key: str) -> Tensor:
    image = sample[key]
    if not image.is_floating_point():
        # uint8 frames would be clamped and blended in the wrong units.
        raise TypeError(f"{key} is {image.dtype}; augmentation needs float images")
    return image
