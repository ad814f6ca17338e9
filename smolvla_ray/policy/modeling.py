"""SmolVLA: the policy LeRobot 0.6.1 trains, with its module names, numerics and call shapes.

`SmolVLAPolicy.forward` takes the batch LeRobot's forward takes after its preprocessor.
Besides LeRobot's joint forward (kept as the reference), it runs the *no-grad prefix*: when no
VLM parameter is trainable, image and language tokens never attend to the state or action
tokens and depend on nothing trainable, so their per-layer keys/values are computed once
under `torch.no_grad()` and only the state token and the actions carry an autograd graph
(docs/design.md, invariant 3). Losses and gradients equal the joint forward's.
"""

from __future__ import annotations

import functools
import math
from collections import deque
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smolvla_ray.keys import (
    ACTION,
    ACTION_DIM_MASK,
    FEATURES_SUFFIX,
    OBS_LANGUAGE_ATTENTION_MASK,
    OBS_LANGUAGE_TOKENS,
    OBS_STATE,
    PADDING_MASK_SUFFIX,
)
from smolvla_ray.policy.backbone import SmolVLMWithExpert
from smolvla_ray.policy.config import PolicyConfig
from smolvla_ray.policy.flow import (
    make_att_2d_masks,
    pad_vector,
    resize_with_pad,
    sample_noise,
    sample_time,
    sinusoidal_embedding,
)
from smolvla_ray.policy.freezing import apply_requires_grad, trainable_parameters
from smolvla_ray.policy.layers import PrefixCache, run_layers
from smolvla_ray.policy.pretrained import load_pretrained, save_pretrained

PrefixMode = Literal["auto", "joint", "no_grad"]


@functools.cache
def _scale_in(value: float, dtype: torch.dtype) -> float:
    """`value` rounded to `dtype`, as a Python number. LeRobot multiplies the image
    embeddings by a 0-d tensor of that dtype on their device; a pre-rounded Python scalar
    gives the same products without a host-to-device copy (a sync) per camera and step."""
    return torch.tensor(value, dtype=dtype).item()


class VLAFlowMatching(nn.Module):
    """The network: VLM + expert towers and the state/action/time projections."""

    def __init__(self, config: PolicyConfig, *, fetch_vlm_weights: bool = True) -> None:
        super().__init__()
        self.config = config
        self.vlm_with_expert = SmolVLMWithExpert(config, fetch_vlm_weights=fetch_vlm_weights)
        vlm_hidden = self.vlm_with_expert.text_config.hidden_size
        expert_hidden = self.vlm_with_expert.expert_hidden_size
        self.state_proj = nn.Linear(config.max_state_dim, vlm_hidden)
        self.action_in_proj = nn.Linear(config.max_action_dim, expert_hidden)
        self.action_out_proj = nn.Linear(expert_hidden, config.max_action_dim)
        self.action_time_mlp_in = nn.Linear(expert_hidden * 2, expert_hidden)
        self.action_time_mlp_out = nn.Linear(expert_hidden, expert_hidden)
        apply_requires_grad(
            self.vlm_with_expert,
            self.state_proj,
            freeze_vision_encoder=config.freeze_vision_encoder,
            train_expert_only=config.train_expert_only,
            train_state_proj=config.train_state_proj,
        )

    # -- embeddings -----------------------------------------------------------------------

    def embed_images_and_language(
        self, images: list[Tensor], img_masks: list[Tensor], lang_tokens: Tensor, lang_masks: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Image tokens (x sqrt(hidden)) per camera, then language tokens (x sqrt(hidden)).

        An entry of `images` may already be the vision encoder + connector output
        (B, tokens, hidden), from the feature cache; then the encoder is skipped."""
        towers = self.vlm_with_expert
        embs, pads = [], []
        for img, img_mask in zip(images, img_masks, strict=True):
            img_emb = img if img.ndim == 3 else towers.embed_image(img)
            img_emb = img_emb * _scale_in(img_emb.shape[-1] ** 0.5, img_emb.dtype)
            embs.append(img_emb)
            pads.append(img_mask[:, None].expand(img_emb.shape[0], img_emb.shape[1]))
        lang_emb = towers.embed_language_tokens(lang_tokens)
        embs.append(lang_emb * math.sqrt(lang_emb.shape[-1]))
        pads.append(lang_masks.bool())
        return torch.cat(embs, dim=1), torch.cat(pads, dim=1)

    def embed_state(self, state: Tensor) -> Tensor:
        """The state token, (B, 1, hidden)."""
        state_emb = self.state_proj(state)
        return state_emb[:, None, :] if state_emb.ndim == 2 else state_emb

    def embed_suffix(self, noisy_actions: Tensor, time: Tensor) -> Tensor:
        """Action tokens fused with the flow time through the action-time MLP."""
        action_emb = self.action_in_proj(noisy_actions)
        time_emb = sinusoidal_embedding(
            time,
            self.vlm_with_expert.expert_hidden_size,
            self.config.min_period,
            self.config.max_period,
        ).to(dtype=action_emb.dtype)
        fused = torch.cat([action_emb, time_emb[:, None, :].expand_as(action_emb)], dim=2)
        return self.action_time_mlp_out(F.silu(self.action_time_mlp_in(fused)))

    # -- training -------------------------------------------------------------------------

    def vlm_is_frozen(self) -> bool:
        """True when image and language tokens depend on no trainable parameter."""
        return not any(p.requires_grad for p in self.vlm_with_expert.vlm.parameters())

    def forward(
        self,
        images: list[Tensor],
        img_masks: list[Tensor],
        lang_tokens: Tensor,
        lang_masks: Tensor,
        state: Tensor,
        actions: Tensor,
        noise: Tensor | None = None,
        time: Tensor | None = None,
        *,
        prefix_mode: PrefixMode = "auto",
    ) -> Tensor:
        """Per-element flow-matching losses (B, chunk_size, max_action_dim)."""
        if noise is None:
            noise = sample_noise(tuple(actions.shape), actions.device)
        if time is None:
            time = sample_time(actions.shape[0], actions.device)
        t = time[:, None, None]
        x_t = t * noise + (1 - t) * actions
        u_t = noise - actions
        suffix = self.embed_suffix(x_t, time)
        if prefix_mode == "auto":
            prefix_mode = "no_grad" if self.vlm_is_frozen() else "joint"
        if prefix_mode == "no_grad":
            if not self.vlm_is_frozen():
                raise RuntimeError(
                    "prefix_mode='no_grad' needs a fully frozen VLM (train_expert_only=True); "
                    "with trainable VLM parameters use 'joint'"
                )
            suffix_out = self._expert_with_cached_prefix(
                images, img_masks, lang_tokens, lang_masks, state, suffix
            )
        else:
            suffix_out = self._expert_joint(
                images, img_masks, lang_tokens, lang_masks, state, suffix
            )
        v_t = self.action_out_proj(suffix_out[:, -self.config.chunk_size :].to(torch.float32))
        return F.mse_loss(u_t, v_t, reduction="none")

    def _expert_joint(self, images, img_masks, lang_tokens, lang_masks, state, suffix) -> Tensor:
        """LeRobot's way: one pass over [images, language, state | actions] with autograd."""
        context, context_pad = self.embed_images_and_language(
            images, img_masks, lang_tokens, lang_masks
        )
        prefix = torch.cat([context, self.embed_state(state).to(context.dtype)], dim=1)
        batch, num_context = context_pad.shape
        ones = torch.ones(batch, 1 + suffix.shape[1], dtype=torch.bool, device=suffix.device)
        pad = torch.cat([context_pad, ones], dim=1)
        marks = torch.zeros_like(pad, dtype=torch.int64)
        marks[:, num_context:] = 1  # the state token, then each action token its own block
        mask = make_att_2d_masks(pad, marks)
        positions = torch.cumsum(pad, dim=1) - 1
        num_prefix = prefix.shape[1]
        _, suffix_out, _ = run_layers(
            self.vlm_with_expert,
            vlm_hidden=prefix,
            expert_hidden=suffix,
            vlm_positions=positions[:, :num_prefix],
            expert_positions=positions[:, num_prefix:],
            mask=mask,
        )
        return suffix_out

    def _expert_with_cached_prefix(
        self, images, img_masks, lang_tokens, lang_masks, state, suffix
    ) -> Tensor:
        """The no-grad prefix: image/language K/V without autograd, then state + actions."""
        towers = self.vlm_with_expert
        with torch.no_grad():
            context, context_pad = self.embed_images_and_language(
                images, img_masks, lang_tokens, lang_masks
            )
            context_mask = make_att_2d_masks(
                context_pad, torch.zeros_like(context_pad, dtype=torch.int64)
            )
            context_positions = torch.cumsum(context_pad, dim=1) - 1
            _, _, cache = run_layers(
                towers,
                vlm_hidden=context,
                expert_hidden=None,
                vlm_positions=context_positions,
                expert_positions=None,
                mask=context_mask,
                build_cache=True,
                vlm_output=False,
            )
        state_emb = self.embed_state(state).to(context.dtype)
        batch, num_context = context_pad.shape
        num_new = 1 + suffix.shape[1]
        ones = torch.ones(batch, num_new, dtype=torch.bool, device=suffix.device)
        pad = torch.cat([context_pad, ones], dim=1)
        marks = torch.zeros_like(pad, dtype=torch.int64)
        marks[:, num_context:] = 1
        # Rows of the state and action tokens only: the context rows were done above.
        mask = make_att_2d_masks(pad, marks)[:, num_context:]
        positions = (torch.cumsum(pad, dim=1) - 1)[:, num_context:]
        _, suffix_out, _ = run_layers(
            towers,
            vlm_hidden=state_emb,
            expert_hidden=suffix,
            vlm_positions=positions[:, :1],
            expert_positions=positions[:, 1:],
            mask=mask,
            cache=cache,
            vlm_output=False,
        )
        return suffix_out

    # -- sampling -------------------------------------------------------------------------

    @torch.no_grad()
    def sample_actions(
        self,
        images: list[Tensor],
        img_masks: list[Tensor],
        lang_tokens: Tensor,
        lang_masks: Tensor,
        state: Tensor,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Euler integration from noise (t=1) to actions (t=0) over the cached prefix."""
        batch = state.shape[0]
        if noise is None:
            shape = (batch, self.config.chunk_size, self.config.max_action_dim)
            noise = sample_noise(shape, state.device)
        context, context_pad = self.embed_images_and_language(
            images, img_masks, lang_tokens, lang_masks
        )
        prefix = torch.cat([context, self.embed_state(state).to(context.dtype)], dim=1)
        ones = torch.ones(batch, 1, dtype=torch.bool, device=state.device)
        prefix_pad = torch.cat([context_pad, ones], dim=1)
        marks = torch.zeros_like(prefix_pad, dtype=torch.int64)
        marks[:, -1] = 1
        _, _, cache = run_layers(
            self.vlm_with_expert,
            vlm_hidden=prefix,
            expert_hidden=None,
            vlm_positions=torch.cumsum(prefix_pad, dim=1) - 1,
            expert_positions=None,
            mask=make_att_2d_masks(prefix_pad, marks),
            build_cache=True,
            vlm_output=False,
        )
        chunk = self.config.chunk_size
        suffix_pad = torch.ones(batch, chunk, dtype=torch.bool, device=state.device)
        suffix_mask = make_att_2d_masks(suffix_pad, torch.ones_like(suffix_pad, dtype=torch.int64))
        mask = torch.cat([prefix_pad[:, None, :].expand(batch, chunk, -1), suffix_mask], dim=2)
        positions = prefix_pad.sum(dim=-1)[:, None] + torch.cumsum(suffix_pad, dim=1) - 1
        dt = -1.0 / self.config.num_steps
        x_t = noise
        for step in range(self.config.num_steps):
            time = torch.tensor(1.0 + step * dt, dtype=torch.float32, device=state.device)
            v_t = self._denoise(cache, x_t, time.expand(batch), positions, mask)
            x_t = x_t + dt * v_t
        return x_t

    def _denoise(
        self, cache: PrefixCache, x_t: Tensor, time: Tensor, positions: Tensor, mask: Tensor
    ) -> Tensor:
        suffix = self.embed_suffix(x_t, time)
        _, out, _ = run_layers(
            self.vlm_with_expert,
            vlm_hidden=None,
            expert_hidden=suffix,
            vlm_positions=None,
            expert_positions=positions,
            mask=mask,
            cache=cache,
        )
        return self.action_out_proj(out[:, -self.config.chunk_size :].to(torch.float32))


class SmolVLAPolicy(nn.Module):
    """SmolVLA with LeRobot's interface: `forward`, `predict_action_chunk`, `select_action`.

    `prefix_mode` picks how training runs the prefix: "auto" (the no-grad prefix whenever the
    VLM is frozen), "joint" (LeRobot's way) or "no_grad". With `config.load_vlm_weights` the
    VLM starts from `config.vlm_model_name`'s weights; `fetch_vlm_weights=False` skips that
    when every tensor is loaded next (a `pretrained_model/`).
    """

    name = "smolvla"

    def __init__(
        self,
        config: PolicyConfig,
        *,
        prefix_mode: PrefixMode = "auto",
        fetch_vlm_weights: bool = True,
    ) -> None:
        super().__init__()
        config.validate_features()
        self.config = config
        self.prefix_mode: PrefixMode = prefix_mode
        self.model = VLAFlowMatching(config, fetch_vlm_weights=fetch_vlm_weights)
        self.processor = None  # a PolicyProcessor, set by from_pretrained or the caller
        # A mixture's processors by dataset name (build.build_policy), else None.
        self.mixture_processors: dict | None = None
        self._empty_features: Tensor | None = None  # see _empty_camera_features
        self.feature_resolution = None  # a FeatureResolution, set by the training setup
        self.reset()

    def reset(self) -> None:
        """Clear the action queue (call when the environment resets)."""
        self._action_queue: deque[Tensor] = deque(maxlen=self.config.n_action_steps)

    @classmethod
    def from_pretrained(
        cls,
        source: str,
        *,
        prefix_mode: PrefixMode = "auto",
        config_overrides: dict | None = None,
        revision: str | None = None,
        **storage_options,
    ) -> SmolVLAPolicy:
        """Load a LeRobot `pretrained_model/`: a local path, an fsspec URL, or a hub id at
        `revision` (from the Hugging Face cache). Loading is strict: a missing, unexpected or
        mis-shaped tensor is an error naming it."""
        return load_pretrained(
            cls,
            source,
            prefix_mode=prefix_mode,
            config_overrides=config_overrides,
            revision=revision,
            **storage_options,
        )

    def save_pretrained(self, target: str | Path, **storage_options) -> None:
        """Write a LeRobot `pretrained_model/` that LeRobot 0.6's from_pretrained loads."""
        save_pretrained(self, str(target), **storage_options)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters that training updates, by state-dict name."""
        return trainable_parameters(self)

    # -- batch preparation (LeRobot's prepare_images / prepare_state / prepare_action) -----

    def prepare_images(self, batch: dict[str, Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Each camera resized with padding and scaled to [-1, 1], plus its validity mask."""
        images, masks = [], []
        missing = [
            key
            for key in self.config.image_features
            if key not in batch and f"{key}{FEATURES_SUFFIX}" not in batch
        ]
        if len(missing) > self.config.empty_cameras:
            shape = self.config.image_features[missing[0]].shape
            raise ValueError(
                f"batch is missing camera {missing[0]!r} (expected a float tensor of shape "
                f"(B, {', '.join(map(str, shape))}) in [0, 1]); batch keys: {sorted(batch)}"
            )
        for key in self.config.image_features:
            cached = batch.get(f"{key}{FEATURES_SUFFIX}")
            if cached is not None:  # precomputed vision features: nothing to resize
                images.append(cached)
                masks.append(self._image_mask(batch, key, cached))
                continue
            if key not in batch:
                continue
            img = self._prepare_image(key, batch[key])
            images.append(img)
            masks.append(self._image_mask(batch, key, img))
        # Covered by empty_cameras: -1 images (or, from the cache, their features), masked out.
        cached_mode = any(f"{k}{FEATURES_SUFFIX}" in batch for k in self.config.image_features)
        for _ in missing:
            images.append(
                self._empty_camera_features(images[0])
                if cached_mode
                else torch.full_like(images[0], -1.0)
            )
            masks.append(torch.zeros_like(masks[0]))
        return images, masks

    def _prepare_image(self, key: str, img: Tensor) -> Tensor:
        """One camera's batch of images in [0, 1] (its last observation step), resized with
        padding and scaled to [-1, 1], as the vision encoder takes it."""
        feature = self.config.image_features[key]
        shape = tuple(img.shape)
        img = img[:, -1] if img.ndim == 5 else img
        if img.ndim != 4 or img.shape[1] != feature.shape[0]:
            raise ValueError(
                f"{key} has shape {shape}; expected (B, {', '.join(map(str, feature.shape))})"
            )
        if self.config.resize_imgs_with_padding is not None:
            width, height = self.config.resize_imgs_with_padding
            img = resize_with_pad(img, height, width, pad_value=0)
        return img * 2.0 - 1.0

    @torch.no_grad()
    def empty_camera_features(self, key: str | None = None) -> Tensor:
        """What the frozen vision encoder + connector make of an empty camera: the all -1
        image the video path feeds for camera `key` (the first camera when None), prepared
        as `prepare_images` prepares it; (1, tokens, hidden), on the encoder's device."""
        key = key or next(iter(self.config.image_features))
        towers = self.model.vlm_with_expert
        device = next(towers.vision_model.parameters()).device
        # ConformSample's empty camera: 0 in [0, 1], so -1 once prepared (padding included).
        blank = torch.zeros((1, *self.config.image_features[key].shape), device=device)
        return towers.embed_image(self._prepare_image(key, blank))

    def _empty_camera_features(self, like: Tensor) -> Tensor:
        """`empty_camera_features` shaped like the cached features `like`; computed once
        (the encoder is frozen whenever the feature cache is used)."""
        if self._empty_features is None:
            self._empty_features = self.empty_camera_features()
        features = self._empty_features.to(like.device, like.dtype)
        return features.expand(like.shape[0], *features.shape[1:])

    @staticmethod
    def _image_mask(batch: dict[str, Tensor], key: str, like: Tensor) -> Tensor:
        pad_key = f"{key}{PADDING_MASK_SUFFIX}"
        if pad_key in batch:
            return batch[pad_key].bool()
        return torch.ones(like.shape[0], dtype=torch.bool, device=like.device)

    @torch.no_grad()
    def encode_images(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The frozen vision encoder + connector output per camera, keyed like the batch
        keys the feature cache provides (`<camera key>.features`)."""
        towers = self.model.vlm_with_expert
        # Only the cameras in the batch: a mixture dataset's shards hold the cameras it has.
        return {
            f"{key}{FEATURES_SUFFIX}": towers.embed_image(self._prepare_image(key, batch[key]))
            for key in self.config.image_features
            if key in batch
        }

    def prepare_state(self, batch: dict[str, Tensor]) -> Tensor:
        """The state, last observation step, zero-padded to max_state_dim."""
        state = self._require(batch, OBS_STATE, ("B", self.config.state_dim))
        state = state[:, -1, :] if state.ndim > 2 else state
        if state.ndim != 2 or state.shape[-1] != self.config.state_dim:
            raise ValueError(
                f"{OBS_STATE} has shape {tuple(batch[OBS_STATE].shape)}; expected "
                f"(B, {self.config.state_dim})"
            )
        return pad_vector(state, self.config.max_state_dim)

    def prepare_action(self, batch: dict[str, Tensor]) -> Tensor:
        """The action chunk zero-padded to max_action_dim."""
        expected = ("B", self.config.chunk_size, self.config.action_dim)
        actions = self._require(batch, ACTION, expected)
        if tuple(actions.shape[1:]) != expected[1:]:
            raise ValueError(
                f"{ACTION} has shape {tuple(actions.shape)}; expected (B, "
                f"{self.config.chunk_size}, {self.config.action_dim})"
            )
        return pad_vector(actions, self.config.max_action_dim)

    def _language(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        tokens = self._require(batch, OBS_LANGUAGE_TOKENS, ("B", "L"))
        masks = self._require(batch, OBS_LANGUAGE_ATTENTION_MASK, ("B", "L"))
        if tokens.ndim != 2 or masks.shape != tokens.shape:
            raise ValueError(
                f"{OBS_LANGUAGE_TOKENS} {tuple(tokens.shape)} and {OBS_LANGUAGE_ATTENTION_MASK} "
                f"{tuple(masks.shape)} must both be (B, L)"
            )
        return tokens, masks

    @staticmethod
    def _require(batch: dict[str, Tensor], key: str, shape: tuple) -> Tensor:
        if key not in batch:
            raise ValueError(
                f"batch is missing {key!r} (expected shape ({', '.join(map(str, shape))})); "
                f"batch keys: {sorted(batch)}"
            )
        return batch[key]

    # -- LeRobot's interface --------------------------------------------------------------

    def forward(
        self,
        batch: dict[str, Tensor],
        noise: Tensor | None = None,
        time: Tensor | None = None,
        reduction: Literal["mean", "none"] = "mean",
    ) -> tuple[Tensor, dict[str, float]]:
        """Flow-matching loss of a preprocessed batch: the mean over valid (not padded)
        steps and real action dims, or per sample with `reduction="none"`; and LeRobot's
        `{"loss": float}` (a host sync: the training step calls `per_sample_loss`)."""
        losses, is_pad = self._masked_losses(batch, noise, time)
        if reduction == "none":
            loss = self._per_sample(losses, is_pad, batch.get(ACTION_DIM_MASK))
            return loss, {"loss": loss.detach().mean().item()}
        dims = batch.get(ACTION_DIM_MASK)
        if is_pad is None and dims is None:
            loss = losses.mean()
        elif dims is None:
            loss = losses.sum() / ((~is_pad.bool()).sum() * losses.shape[-1]).clamp_min(1)
        else:
            loss = losses.sum() / _valid_counts(losses, is_pad, dims).sum().clamp_min(1)
        return loss, {"loss": loss.detach().item()}

    def per_sample_loss(
        self, batch: dict[str, Tensor], noise: Tensor | None = None, time: Tensor | None = None
    ) -> Tensor:
        """`forward(..., reduction="none")`'s per-sample losses (B,), without reading
        anything back to the host."""
        losses, is_pad = self._masked_losses(batch, noise, time)
        return self._per_sample(losses, is_pad, batch.get(ACTION_DIM_MASK))

    @staticmethod
    def _per_sample(losses: Tensor, is_pad: Tensor | None, dims: Tensor | None = None) -> Tensor:
        if dims is not None:  # a mixture: each sample's own action dims
            return losses.sum(dim=(1, 2)) / _valid_counts(losses, is_pad, dims).clamp_min(1)
        if is_pad is None:
            return losses.mean(dim=(1, 2))
        valid = ((~is_pad.bool()).sum(dim=1) * losses.shape[-1]).clamp_min(1)
        return losses.sum(dim=(1, 2)) / valid

    def _masked_losses(
        self, batch: dict[str, Tensor], noise: Tensor | None, time: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """Element losses (B, chunk, action_dim), zero at padded steps; and the pad mask."""
        images, img_masks = self.prepare_images(batch)
        state = self.prepare_state(batch)
        lang_tokens, lang_masks = self._language(batch)
        actions = self.prepare_action(batch)
        losses = self.model(
            images,
            img_masks,
            lang_tokens,
            lang_masks,
            state,
            actions,
            noise,
            time,
            prefix_mode=self.prefix_mode,
        )
        losses = losses[:, :, : self.config.action_dim]
        is_pad = batch.get("action_is_pad")
        if is_pad is not None:
            losses = losses * (~is_pad.bool()).unsqueeze(-1)
        dims = batch.get(ACTION_DIM_MASK)
        if dims is not None:  # a mixture's narrower sample: its padded dims carry no loss
            losses = losses * dims.bool().unsqueeze(1)
        return losses, is_pad

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, Tensor], noise: Tensor | None = None) -> Tensor:
        """A normalized action chunk (B, chunk_size, action_dim); switches to eval mode."""
        self.eval()
        images, img_masks = self.prepare_images(batch)
        state = self.prepare_state(batch)
        lang_tokens, lang_masks = self._language(batch)
        actions = self.model.sample_actions(
            images, img_masks, lang_tokens, lang_masks, state, noise
        )
        return actions[:, :, : self.config.action_dim]

    @torch.no_grad()
    def select_action(self, batch: dict[str, Tensor], noise: Tensor | None = None) -> Tensor:
        """One action (B, action_dim), from a queue refilled with `n_action_steps` of a new
        chunk whenever it runs empty."""
        self.eval()
        if not self._action_queue:
            chunk = self.predict_action_chunk(batch, noise)
            self._action_queue.extend(chunk.transpose(0, 1)[: self.config.n_action_steps])
        return self._action_queue.popleft()


def _valid_counts(losses: Tensor, is_pad: Tensor | None, dims: Tensor) -> Tensor:
    """Valid elements per sample (B,): its unpadded steps times its real action dims."""
    steps = (
        (~is_pad.bool()).sum(dim=1)
        if is_pad is not None
        else torch.full((losses.shape[0],), losses.shape[1], device=losses.device)
    )
    return steps * dims.bool().sum(dim=1)
