"""Flow-matching pieces shared by training and sampling (docs/design.md, "LeRobot facts")."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def sample_time(batch_size: int, device: torch.device | str) -> Tensor:
    """`Beta(1.5, 1.0) * 0.999 + 0.001`, sampled on the CPU as LeRobot does."""
    dist = torch.distributions.Beta(torch.tensor(1.5), torch.tensor(1.0))
    return (dist.sample((batch_size,)) * 0.999 + 0.001).to(dtype=torch.float32, device=device)


def sample_noise(shape: tuple[int, ...], device: torch.device | str) -> Tensor:
    """Standard-normal float32 noise (the flow's t=1 end)."""
    return torch.normal(0.0, 1.0, size=shape, dtype=torch.float32, device=device)


def sinusoidal_embedding(
    time: Tensor, dimension: int, min_period: float, max_period: float
) -> Tensor:
    """Sine-cosine embedding of scalar times (B,) -> (B, dimension), float64 where possible."""
    if dimension % 2 != 0:
        raise ValueError(f"time embedding width {dimension} must be even")
    if time.ndim != 1:
        raise ValueError(f"time must have shape (batch,), got {tuple(time.shape)}")
    dtype = torch.float32 if time.device.type == "mps" else torch.float64
    fraction = torch.linspace(0.0, 1.0, dimension // 2, dtype=dtype, device=time.device)
    period = min_period * (max_period / min_period) ** fraction
    scaled = (1.0 / period * 2 * math.pi)[None, :] * time[:, None]
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1)


def make_att_2d_masks(pad_masks: Tensor, att_masks: Tensor) -> Tensor:
    """Block attention: a token sees valid tokens whose cumulative block mark is <= its own."""
    cumsum = torch.cumsum(att_masks, dim=1)
    blocks = cumsum[:, None, :] <= cumsum[:, :, None]
    pads = pad_masks[:, None, :] * pad_masks[:, :, None]
    return blocks & pads


def pad_vector(vector: Tensor, width: int) -> Tensor:
    """Zero-pad the last dimension to `width` (left unchanged when already as wide)."""
    if vector.shape[-1] >= width:
        return vector
    return F.pad(vector, (0, width - vector.shape[-1]))


def resize_with_pad(img: Tensor, height: int, width: int, *, pad_value: float = 0.0) -> Tensor:
    """Resize (B, C, H, W) keeping the aspect ratio, padding on the left and top."""
    cur_h, cur_w = img.shape[2:]
    if (cur_h, cur_w) == (height, width):
        return img
    ratio = max(cur_w / width, cur_h / height)
    new_h, new_w = int(cur_h / ratio), int(cur_w / ratio)
    resized = F.interpolate(img, size=(new_h, new_w), mode="bilinear", align_corners=False)
    return F.pad(resized, (max(0, width - new_w), 0, max(0, height - new_h), 0), value=pad_value)
