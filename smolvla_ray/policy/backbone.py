"""The SmolVLM backbone and the Llama action expert, built offline.

`SmolVLMWithExpert` keeps LeRobot's attribute names (`vlm`, `lm_expert`) so that state-dict
keys are LeRobot's (`model.vlm_with_expert.vlm.model.text_model.layers.0...`). The layer
arithmetic that joins the two towers lives in `layers.py`.
"""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path

from torch import nn
from transformers import AutoConfig, AutoModel, SmolVLMConfig, SmolVLMForConditionalGeneration

from smolvla_ray.policy.config import BASE_VLM_NAME, TINY_VLM_DIR, TINY_VLM_NAME, PolicyConfig
from smolvla_ray.policy.freezing import apply_modes


def base_vlm_config() -> SmolVLMConfig:
    """SmolVLM2-500M-Video-Instruct's architecture (REFERENCE.md section 2), in code, so the
    `base` preset builds with no hub access."""
    return SmolVLMConfig(
        scale_factor=4,
        image_token_id=49190,
        pad_token_id=2,
        tie_word_embeddings=False,
        text_config={
            "model_type": "llama",
            "hidden_size": 960,
            "intermediate_size": 2560,
            "num_hidden_layers": 32,
            "num_attention_heads": 15,
            "num_key_value_heads": 5,
            "head_dim": 64,
            "vocab_size": 49280,
            "rope_theta": 100000.0,
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 8192,
            "pad_token_id": 2,
            "tie_word_embeddings": False,
        },
        vision_config={
            "model_type": "smolvlm_vision",
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "image_size": 512,
            "patch_size": 16,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
        },
    )


def resolve_vlm_source(vlm_model_name: str) -> str:
    """Where the tokenizer (and, for non-built-in names, the VLM config) comes from; a tiny
    VLM path written on another machine resolves to this installation's copy."""
    if vlm_model_name == TINY_VLM_NAME or Path(vlm_model_name).name == TINY_VLM_DIR.name:
        return str(TINY_VLM_DIR)
    return vlm_model_name


def load_vlm_config(vlm_model_name: str) -> SmolVLMConfig:
    """The VLM's config: built-in for LeRobot's default backbone and the tiny one, else a local
    directory or (only with network) a hub id."""
    if vlm_model_name == BASE_VLM_NAME:
        return base_vlm_config()
    source = resolve_vlm_source(vlm_model_name)
    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as err:
        raise FileNotFoundError(
            f"vlm_model_name={vlm_model_name!r}: no SmolVLM config found there ({err}); use a "
            f"local directory with config.json, {BASE_VLM_NAME!r}, or {TINY_VLM_NAME!r}"
        ) from err
    if not isinstance(config, SmolVLMConfig):
        raise ValueError(
            f"vlm_model_name={vlm_model_name!r} is a {type(config).__name__}, not a SmolVLM config"
        )
    return config


@cache
def load_tokenizer(vlm_model_name: str):  # -> PreTrainedTokenizerBase
    """The VLM's tokenizer (cached per process: workers build it once)."""
    from transformers import AutoTokenizer

    source = resolve_vlm_source(vlm_model_name)
    try:
        return AutoTokenizer.from_pretrained(source)
    except OSError as err:
        raise FileNotFoundError(
            f"no tokenizer for vlm_model_name={vlm_model_name!r} ({err}); without network, point "
            "vlm_model_name at a local directory holding tokenizer.json"
        ) from err


def expert_intermediate_size(hidden: int, ffn_multiplier: int = 4, multiple_of: int = 256) -> int:
    """LeRobot's rule for the expert MLP width (720 -> 2048 at full size)."""
    hidden = int(2 * hidden / 3)
    hidden = int(ffn_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class SmolVLMWithExpert(nn.Module):
    """The truncated SmolVLM (`vlm`) beside the smaller Llama action expert (`lm_expert`)."""

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__()
        vlm_config = load_vlm_config(config.vlm_model_name)
        vlm_config.text_config.tie_word_embeddings = False
        self.vlm = SmolVLMForConditionalGeneration(vlm_config)
        text = self.vlm.model.text_model
        if config.num_vlm_layers > 0:
            text.layers = text.layers[: config.num_vlm_layers]
        self.num_vlm_layers = len(text.layers)

        expert_config = copy.deepcopy(vlm_config.text_config)
        hidden = vlm_config.text_config.hidden_size
        expert_config.hidden_size = int(hidden * config.expert_width_multiplier)
        expert_config.intermediate_size = expert_intermediate_size(expert_config.hidden_size)
        expert_config.num_hidden_layers = self.num_vlm_layers
        if config.num_expert_layers > 0:
            if self.num_vlm_layers % config.num_expert_layers != 0:
                raise ValueError(
                    f"num_vlm_layers={self.num_vlm_layers} is not a multiple of "
                    f"num_expert_layers={config.num_expert_layers}"
                )
            expert_config.num_hidden_layers = config.num_expert_layers
        self.lm_expert = AutoModel.from_config(expert_config)
        self.num_expert_layers = len(self.lm_expert.layers)
        self.attention_mode = config.attention_mode
        self.freeze_vision_encoder = config.freeze_vision_encoder
        self.train_expert_only = config.train_expert_only
        self.self_attn_every_n_layers = config.self_attn_every_n_layers
        kv_width = vlm_config.text_config.num_key_value_heads * vlm_config.text_config.head_dim
        expert_kv_width = expert_config.num_key_value_heads * expert_config.head_dim
        if self.attention_mode == "cross_attn":
            # Cross-attention layers project the VLM's keys/values, not expert hidden states.
            for index, layer in enumerate(self.lm_expert.layers):
                if self.is_self_attn_layer(index):
                    continue
                bias = expert_config.attention_bias
                layer.self_attn.k_proj = nn.Linear(kv_width, expert_kv_width, bias=bias)
                layer.self_attn.v_proj = nn.Linear(kv_width, expert_kv_width, bias=bias)
        self.lm_expert.embed_tokens = None  # the expert reads action embeddings, not tokens

        self.text_config = vlm_config.text_config
        self.expert_hidden_size = expert_config.hidden_size
        self.num_attention_heads = vlm_config.text_config.num_attention_heads
        self.num_key_value_heads = vlm_config.text_config.num_key_value_heads
        self.head_dim = vlm_config.text_config.head_dim

    def train(self, mode: bool = True) -> SmolVLMWithExpert:
        """Train mode everywhere, then the frozen towers back to eval (LeRobot's override)."""
        super().train(mode)
        apply_modes(
            self,
            freeze_vision_encoder=self.freeze_vision_encoder,
            train_expert_only=self.train_expert_only,
        )
        return self

    def is_self_attn_layer(self, index: int) -> bool:
        """Joint self-attention at this layer (else expert cross-attends to the VLM)."""
        if self.attention_mode != "cross_attn":
            return True
        return self.self_attn_every_n_layers > 0 and index % self.self_attn_every_n_layers == 0

    @property
    def vision_model(self) -> nn.Module:
        return self.vlm.model.vision_model

    @property
    def text_model(self) -> nn.Module:
        return self.vlm.model.text_model

    def expert_layer(self, index: int) -> nn.Module | None:
        """The expert layer paired with VLM layer `index` (None where a shallower expert
        skips VLM layers, as LeRobot's `get_model_layers`)."""
        multiple = self.num_vlm_layers // self.num_expert_layers
        if multiple > 0 and index > 0 and index % multiple != 0:
            return None
        return self.lm_expert.layers[index // multiple if multiple > 0 else index]

    def embed_image(self, image):  # (B, C, H, W) in [-1, 1] -> (B, tokens, hidden)
        vision = self.vision_model
        hidden = vision(pixel_values=image.to(dtype=vision.dtype)).last_hidden_state
        return self.vlm.model.connector(hidden)

    def embed_language_tokens(self, tokens):
        return self.text_model.get_input_embeddings()(tokens)
