"""The SmolVLM backbone and the Llama action expert, built offline.

`SmolVLMWithExpert` keeps LeRobot's attribute names (`vlm`, `lm_expert`) so that state-dict
keys are LeRobot's (`model.vlm_with_expert.vlm.model.text_model.layers.0...`). The layer
arithmetic that joins the two towers lives in `layers.py`.
"""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, SmolVLMConfig, SmolVLMForConditionalGeneration

from smolvla_ray.policy.config import BASE_VLM_NAME, TINY_VLM_DIR, TINY_VLM_NAME, PolicyConfig
from smolvla_ray.policy.freezing import apply_modes


def base_vlm_config() -> SmolVLMConfig:
    """SmolVLM2-500M-Video-Instruct's architecture (docs/design.md, "LeRobot facts"), in
    code, so the `base` preset builds with no hub access."""
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


def vlm_weights_dir(vlm_model_name: str) -> Path:
    """A local directory with the VLM's `config.json` and safetensors weights: the directory
    `vlm_model_name` names, or a hub id's snapshot in the Hugging Face cache (fetched once;
    with `HF_HUB_OFFLINE=1` only an already cached snapshot is used)."""
    source = resolve_vlm_source(vlm_model_name)
    directory = Path(source).expanduser()
    if not directory.is_dir():
        parts = source.split("/")
        if len(parts) != 2 or not all(parts) or source.startswith((".", "/", "~")):
            raise FileNotFoundError(
                f"vlm_model_name={vlm_model_name!r} (load_vlm_weights=true) is neither a local "
                "directory nor a hub id like 'HuggingFaceTB/SmolVLM2-500M-Video-Instruct'"
            )
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, HFValidationError

        try:
            directory = Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors"]))
        except (HfHubHTTPError, HFValidationError, OSError) as err:  # OSError: not cached
            raise FileNotFoundError(
                f"vlm_model_name={vlm_model_name!r} (load_vlm_weights=true): could not fetch the "
                f"VLM weights from the hub ({type(err).__name__}: {err}); without network, "
                "download them once into the Hugging Face cache or name a local directory"
            ) from err
    if not any(directory.glob("*.safetensors")):
        raise FileNotFoundError(
            f"vlm_model_name={vlm_model_name!r} (load_vlm_weights=true): {directory} holds no "
            "*.safetensors weights; save the VLM there with save_pretrained, or set "
            "load_vlm_weights: false to build it from its config with random weights"
        )
    return directory


def load_pretrained_vlm(vlm_model_name: str) -> SmolVLMForConditionalGeneration:
    """SmolVLM with its pretrained weights, read as LeRobot 0.6.1 reads them
    (`from_pretrained(..., torch_dtype="bfloat16")`): every weight is rounded to bfloat16
    and `config.dtype` becomes bfloat16. A tensor the weights lack is an error (transformers
    would leave it random)."""
    directory = vlm_weights_dir(vlm_model_name)
    vlm_config = AutoConfig.from_pretrained(directory)
    if not isinstance(vlm_config, SmolVLMConfig):
        raise ValueError(
            f"vlm_model_name={vlm_model_name!r} is a {type(vlm_config).__name__}, not SmolVLM"
        )
    vlm, info = SmolVLMForConditionalGeneration.from_pretrained(
        directory, config=vlm_config, dtype=torch.bfloat16, output_loading_info=True
    )
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ValueError(
            f"the VLM weights in {directory} lack {len(missing)} tensor(s), e.g. {missing[:5]}; "
            f"vlm_model_name={vlm_model_name!r} must hold a complete SmolVLM checkpoint"
        )
    head, embed = vlm.lm_head, vlm.model.text_model.embed_tokens
    if head.weight is embed.weight:  # tied: same values, own tensor (our state dict is untied)
        head.weight = nn.Parameter(embed.weight.detach().clone())
    vlm.config.tie_word_embeddings = vlm.config.text_config.tie_word_embeddings = False
    return vlm.train()  # from_pretrained returns eval mode; a config-built VLM is in train


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
    """The truncated SmolVLM (`vlm`) beside the smaller Llama action expert (`lm_expert`).

    `config.load_vlm_weights` starts the VLM from its pretrained weights (`vlm_model_name`);
    `fetch_vlm_weights=False` skips that, for callers that load every tensor next."""

    def __init__(self, config: PolicyConfig, *, fetch_vlm_weights: bool = True) -> None:
        super().__init__()
        # Float32 attention under autocast (layers.eager_attention); a run-time choice of the
        # trainer (`train.attention_fp32`), not part of the saved config.
        self.attention_fp32 = False
        if config.load_vlm_weights and fetch_vlm_weights:
            self.vlm = load_pretrained_vlm(config.vlm_model_name)
            vlm_config = self.vlm.config
        else:
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
        # With loaded VLM weights LeRobot keeps the VLM in bfloat16 and the expert is born
        # bfloat16 too (from_config follows the copied text config's dtype), all but the
        # cross-attention k/v projections; it then trains in those dtypes. We keep the very
        # same values but hold every tensor in float32, as in the random-init path: one dtype
        # for checkpoints, exports and the frozen fingerprint; `train.precision` picks bf16.
        self.to(torch.float32)

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
