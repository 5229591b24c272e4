"""A tiny random VideoReward (VideoAlign) checkpoint in the released layout, and test videos, built offline.

Two folders, as a user has them after downloading the real model:

- `base/`: the layout of Qwen/Qwen2-VL-2B-Instruct (hub-format flat `config.json`, `model.safetensors` with the
  transformers-4.45 key names `visual.*` / `model.*` / `lm_head.weight`, `preprocessor_config.json`, a byte-level
  Qwen2 tokenizer with Qwen2's 14 special tokens, `chat_template.json` holding Qwen2-VL's chat template);
- `reward/`: the layout of KlingTeam/VideoReward (`model_config.json` with `data_config`, `training_args`,
  `model_config`, `peft_lora_config`, `inference_config`; `checkpoint-<step>/model.pth`, the full state dict of the
  PEFT-wrapped `Qwen2VLRewardModelBT`: `base_model.model.` prefixes, LoRA on every language-model Linear as
  `*.base_layer.*` + `*.lora_A.default.weight` / `*.lora_B.default.weight`, the embedding resized to the tokenizer
  with the three reward tokens added, `rm_head.weight` of shape (1, hidden); `checkpoint-<step>/tokenizer/`).

Sizes are tiny (hidden 32, 2 layers, LoRA r 4) and every tensor is drawn from one seeded generator in sorted key
order, so the same files come out on every run: `weights_digest` pins them, and the scores VideoAlign's own code
computed on them (recorded in tests/test_rewards_videoreward.py) stay valid. Runs with the project's torch and
transformers only; the folders also load in VideoAlign's environment (transformers 4.45).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

SEED = 1234
STEP = 7  # the released checkpoint is checkpoint-11352; any step names the same layout
HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE = 32, 2, 4, 2, 64
VISION = dict(depth=1, embed_dim=32, hidden_size=HIDDEN, mlp_ratio=2, num_heads=2, in_chans=3, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu")
LORA_R, LORA_ALPHA = 4, 8  # scaling alpha / r = 2, as the released r 64, alpha 128
CONFIG_VOCAB = 320  # > the tokenizer's 273 tokens: VideoAlign's resize shrinks the embedding (151936 -> 151660)
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
REWARD_TOKENS = ["<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"]
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Qwen2-VL-2B-Instruct's chat template (its chat_template.json): a default system turn, vision placeholders.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
INFERENCE_CONFIG = {"VQ_mean": 3.6757, "VQ_std": 2.2476, "MQ_mean": 1.1646, "MQ_std": 1.3811,
                    "TA_mean": 2.8105, "TA_std": 2.5121}  # the released checkpoint's values


def byte_vocab() -> dict[str, int]:
    """GPT-2 / Qwen2 byte-level alphabet: byte b -> its printable stand-in character, id b."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {chars[b]: b for b in range(256)}


def base_config() -> dict:
    """config.json in the hub's flat Qwen2-VL format (as Qwen2-VL-2B-Instruct's), tiny sizes."""
    ids = {t: 256 + i for i, t in enumerate(QWEN2_SPECIALS)}
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "hidden_act": "silu",
        "hidden_size": HIDDEN, "initializer_range": 0.02, "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": 32768, "max_window_layers": LAYERS, "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS, "num_key_value_heads": KV_HEADS, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "float32", "use_cache": True,
        "use_sliding_window": False, "vocab_size": CONFIG_VOCAB,
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"], "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"], "vision_config": dict(VISION),
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]},
    }


def model_config(base_dir: str) -> dict:
    """model_config.json as VideoAlign's train_reward.py writes it (the sections and fields inference reads)."""
    return {
        "data_config": {"meta_data": "/path/to/train.csv", "data_dir": "/path/to/videos", "meta_data_test": None,
                        "max_frame_pixels": 200704, "num_frames": None, "fps": 2.0, "p_shuffle_frames": 0.0,
                        "p_color_jitter": 0.0, "eval_dim": ["VQ", "MQ", "TA"],
                        "prompt_template_type": "detailed_special", "add_noise": False, "sample_type": "uniform",
                        "use_tied_data": True},
        "training_args": {"output_dir": "rm_output", "bf16": False},
        "model_config": {"model_name_or_path": base_dir, "model_revision": "main", "output_dim": 1,
                         "use_special_tokens": True, "freeze_vision_tower": False, "freeze_llm": False,
                         "tune_merger": True, "torch_dtype": "float32", "trust_remote_code": False,
                         "attn_implementation": None, "load_in_8bit": False, "load_in_4bit": False,
                         "bnb_4bit_quant_type": "nf4", "use_bnb_nested_quant": False, "reward_token": "special",
                         "loss_type": "btt"},
        "peft_lora_config": {"lora_enable": True, "vision_lora": False, "lora_r": LORA_R, "lora_alpha": LORA_ALPHA,
                             "lora_dropout": 0.05, "lora_target_modules": None,
                             "lora_namespan_exclude": ["lm_head", "rm_head", "embed_tokens", "visual"],
                             "lora_modules_to_save": None, "lora_task_type": "CAUSAL_LM", "use_rslora": False,
                             "num_lora_modules": -1},
        "inference_config": dict(INFERENCE_CONFIG),
    }


def _shapes(vocab: int) -> dict[str, tuple[int, ...]]:
    """transformers-4.45 names and shapes of Qwen2VLForConditionalGeneration's weights (lm_head tied, left out)."""
    from transformers import Qwen2VLConfig, Qwen2VLModel

    config = Qwen2VLConfig(**{**base_config(), "vocab_size": vocab})
    with torch.device("meta"):
        model = Qwen2VLModel(config)
    shapes = {}
    for key, tensor in model.state_dict().items():  # transformers 5 nests: visual.*, language_model.*
        old = key if key.startswith("visual.") else "model." + key.removeprefix("language_model.")
        shapes[old] = tuple(tensor.shape)
    return shapes


def _draw(key: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if key.endswith("norm.weight") or ".norm1." in key or ".norm2." in key or "ln_q.weight" in key or \
            key.endswith("layernorm.weight"):
        return 1.0 + 0.1 * noise if key.endswith("weight") else 0.1 * noise
    if len(shape) == 1:  # biases
        return 0.1 * noise
    fan_in = 1
    for side in shape[1:]:
        fan_in *= side
    return noise / fan_in ** 0.5


def reward_state_dict(vocab: int) -> dict[str, torch.Tensor]:
    """model.pth's content: the PEFT-wrapped reward model's full state dict, drawn from `SEED`."""
    keys: dict[str, tuple[int, ...]] = {}
    for key, shape in _shapes(vocab).items():
        module, _, leaf = key.rpartition(".")
        if key.startswith("model.layers.") and module.split(".")[-1] in LORA_TARGETS:
            keys[f"{module}.base_layer.{leaf}"] = shape
            if leaf == "weight":
                keys[f"{module}.lora_A.default.weight"] = (LORA_R, shape[1])
                keys[f"{module}.lora_B.default.weight"] = (shape[0], LORA_R)
        else:
            keys[key] = shape
    keys["rm_head.weight"] = (1, HIDDEN)
    generator = torch.Generator().manual_seed(SEED)
    state = {f"base_model.model.{k}": _draw(k, keys[k], generator) for k in sorted(keys)}
    state["base_model.model.lm_head.weight"] = state["base_model.model.model.embed_tokens.weight"]  # tied
    return state


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the sorted keys, shapes and float32 bytes of a state dict (first 16 hex digits)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().float().contiguous()
        digest.update(f"{key}{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def _tokenizer(specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(vocab=byte_vocab(), merges=[]))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=specials[1:], model_max_length=32768)


def _save_tokenizer(tokenizer, folder: Path) -> None:
    """tokenizer.json from `tokenizers`, and the hub's Qwen2 tokenizer_config.json / vocab.json / merges.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
    specials = [t for t in QWEN2_SPECIALS + REWARD_TOKENS if t in tokenizer.get_vocab()]
    decoder = {str(tokenizer.convert_tokens_to_ids(t)): {"content": t, "lstrip": False, "normalized": False,
                                                          "rstrip": False, "single_word": False, "special": True}
               for t in specials}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False, "added_tokens_decoder": decoder, "additional_special_tokens": specials[1:],
        "bos_token": None, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 32768, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}, indent=2))
    (folder / "vocab.json").write_text(json.dumps(byte_vocab(), ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def build_tiny_videoreward(root: str | Path) -> tuple[Path, Path]:
    """Write `root/base` and `root/reward` (see the module docstring); returns the two folders."""
    from safetensors.torch import save_file

    root = Path(root)
    base, reward = root / "base", root / "reward"
    base.mkdir(parents=True, exist_ok=True)
    (reward / f"checkpoint-{STEP}").mkdir(parents=True, exist_ok=True)
    (base / "config.json").write_text(json.dumps(base_config(), indent=2))
    (base / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"}, indent=2))
    (base / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))
    _save_tokenizer(_tokenizer(QWEN2_SPECIALS), base)
    tokenizer = _tokenizer(QWEN2_SPECIALS + REWARD_TOKENS)
    state = reward_state_dict(len(tokenizer))
    # The base weights only have to load (VideoAlign overwrites them all with model.pth): the same draw, LoRA merged
    # away, at the config's vocabulary size.
    base_state = {k.removeprefix("base_model.model."): v for k, v in state.items() if "lora_" not in k}
    base_state = {k.replace(".base_layer.", "."): v for k, v in base_state.items() if not k.startswith("rm_head")}
    embed = base_state["model.embed_tokens.weight"]
    base_state["model.embed_tokens.weight"] = torch.cat([embed, embed.new_zeros(CONFIG_VOCAB - len(embed), HIDDEN)])
    base_state.pop("lm_head.weight")
    save_file({k: v.contiguous() for k, v in base_state.items()}, base / "model.safetensors", metadata={"format": "pt"})
    (reward / "model_config.json").write_text(json.dumps(model_config(str(base)), indent=4))
    torch.save(state, reward / f"checkpoint-{STEP}" / "model.pth")
    _save_tokenizer(tokenizer, reward / f"checkpoint-{STEP}" / "tokenizer")
    return base, reward


def tiny_videos() -> list[torch.Tensor]:
    """Three `(T, H, W, 3)` uint8 videos (T 12, 16, 16 at 64x80), integer arithmetic only: identical everywhere."""
    videos = []
    for index, frames in enumerate([12, 16, 16]):
        t = torch.arange(frames).view(-1, 1, 1, 1)
        y = torch.arange(64).view(1, -1, 1, 1)
        x = torch.arange(80).view(1, 1, -1, 1)
        c = torch.arange(3).view(1, 1, 1, -1)
        value = (x * (3 + index) + y * (5 + 2 * c) + t * (7 + 4 * index) + (x * y) // (9 + c + index)) % 256
        videos.append(value.to(torch.uint8))
    return videos
