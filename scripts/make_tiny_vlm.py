"""Regenerate `smolvla_ray/assets/tiny_smolvlm/`: a tiny SmolVLM config and a BPE tokenizer
trained offline, so tests and demos build the `tiny` policy with no hub access.

The directory holds what transformers' Auto* classes need (config.json, tokenizer.json,
tokenizer_config.json, processor_config.json, preprocessor_config.json), so LeRobot can also
build its own SmolVLA from it (`vlm_model_name=<this directory>`).

Run: .venv/bin/python scripts/make_tiny_vlm.py
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

OUT = Path(__file__).resolve().parents[1] / "smolvla_ray" / "assets" / "tiny_smolvlm"
VOCAB_SIZE = 1024
SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<fake_token_around_image>",
    "<global-img>",
    "<image>",
    "<end_of_utterance>",
]


def corpus() -> list[str]:
    """Robot-instruction-like sentences: enough to give common words their own tokens."""
    verbs = ["pick", "place", "push", "move", "grasp", "put", "stack", "open", "close", "lift"]
    objects = [
        "the red cube",
        "the blue cube",
        "the green ball",
        "a block",
        "the cup",
        "the lid",
        "the drawer",
        "the sponge",
        "the marker",
        "the box",
    ]
    places = [
        "in the bin",
        "on the plate",
        "to the left",
        "to the right",
        "on the table",
        "into the box",
        "next to the cup",
        "onto the shelf",
        "up",
        "down",
    ]
    lines = [f"{v} {o} {p}\n" for v, o, p in itertools.product(verbs, objects, places)]
    lines += ["Grasp a lego block and put it in the bin.\n", "Open the top drawer.\n"]
    return lines


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    tokenizer.save(str(OUT / "tokenizer.json"))
    vocab_size = tokenizer.get_vocab_size()
    pad_id = tokenizer.token_to_id("<|endoftext|>")
    image_id = tokenizer.token_to_id("<image>")

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 8192,
        "bos_token": "<|im_start|>",
        "eos_token": "<end_of_utterance>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "padding_side": "right",
        "add_prefix_space": False,
        "fake_image_token": "<fake_token_around_image>",
        "global_image_token": "<global-img>",
        "image_token": "<image>",
        "end_of_utterance_token": "<end_of_utterance>",
        "extra_special_tokens": {
            "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>",
            "image_token": "<image>",
            "end_of_utterance_token": "<end_of_utterance>",
        },
    }
    config = {
        "architectures": ["SmolVLMForConditionalGeneration"],
        "model_type": "smolvlm",
        "image_token_id": image_id,
        "pad_token_id": pad_id,
        "scale_factor": 2,
        "tie_word_embeddings": False,
        "text_config": {
            "model_type": "llama",
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 6,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "vocab_size": vocab_size,
            "rms_norm_eps": 1e-5,
            "rope_theta": 100000.0,
            "max_position_embeddings": 2048,
            "pad_token_id": pad_id,
            "tie_word_embeddings": False,
        },
        "vision_config": {
            "model_type": "smolvlm_vision",
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 64,
            "patch_size": 8,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
        },
    }
    image_processor = {
        "image_processor_type": "SmolVLMImageProcessor",
        "do_resize": True,
        "size": {"longest_edge": 64},
        "max_image_size": {"longest_edge": 64},
        "do_image_splitting": False,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_pad": True,
        "processor_class": "SmolVLMProcessor",
    }
    processor = {"processor_class": "SmolVLMProcessor", "image_seq_len": 16}
    for name, payload in [
        ("config.json", config),
        ("tokenizer_config.json", tokenizer_config),
        ("preprocessor_config.json", image_processor),
        ("processor_config.json", processor),
    ]:
        (OUT / name).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {OUT} (vocab {vocab_size})")


if __name__ == "__main__":
    main()
