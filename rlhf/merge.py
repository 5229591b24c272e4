"""Fuse LoRA adapters into a ContentV checkpoint's transformer and write a complete release checkpoint.

Formula. For every base weight `<module>.weight` (a linear layer, `(out, in)`) that adapter i adapts
with `lora_A` `(r_i, in)` and `lora_B` `(out, r_i)`:

    W' = W + sum_i w_i * scale_i * (B_i @ A_i),    scale_i = lora_alpha_i / r_i
                                                   (lora_alpha_i / sqrt(r_i) with `use_rslora`)

computed in float32 (float64 for float64 weights) and cast back to the stored dtype. `r` and `lora_alpha`
are taken per module from `rank_pattern` / `alpha_pattern` when these match, with peft's rule. `w_i` is
the user's weight of adapter i (default 1): the same multiplier as diffusers'
`set_adapters([...], weights=[...])`, so the merged model computes what the base model with the adapters
attached computes, up to float rounding.

Streaming design. The model is never instantiated and no shard is ever loaded whole, so merging needs
about one shard's worth of memory, not the model's size:

1. Everything is validated before anything is written: the safetensors headers of the transformer
   shards (tensor names, dtypes, shapes, byte offsets; no tensor data) form an index against which every
   LoRA module of every adapter is checked (base weight present, shape, float dtype). Adapters are small
   and are read whole.
2. The checkpoint is assembled in a hidden temporary sibling of the output directory. Files outside
   `transformer/` are hard-linked (copied across filesystems); `transformer/config.json` and any shard
   index are copied. A shard that no adapter touches is hard-linked too. A touched shard is copied
   (a kernel-side file copy), then the byte range of each adapted tensor is overwritten with its merged
   value: dtype and shape are unchanged, so the header (names, offsets, `__metadata__` such as
   `{"format": "pt"}`) stays byte-identical and every other tensor keeps its exact bytes. One shard is
   open (memory-mapped by safetensors) at a time and one base tensor is read from it at a time, so peak
   memory is the adapters, at most one shard's mapping (of which only the adapted tensors' pages are
   read) and a few float32 copies of the largest adapted matrix.
3. The temporary directory is renamed into place; on any error it is removed, so the output directory
   is either absent (or left as it was) or complete. A merge killed outright (kill -9, power loss) cannot
   remove it: each staging (`.<out>.<random>.partial`) and set-aside (`.<out>.<random>.old`) directory has a
   sibling owner file (`<dir>.owner`: pid and host), and the next merge into the same output deletes those
   whose owner is not a live process on this host, before it stages anything.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from rlhf.base_model import check_adapter_base, identity
from rlhf.errors import UserError, one_line
from rlhf.lora import DIFFUSERS_WEIGHTS, PEFT_CONFIG, PEFT_WEIGHTS
from rlhf.models.family import family_for
from rlhf.models.loader import check_model_dir
from rlhf.outputs import MODEL, check_output, staged_dir
from rlhf.progress import Progress

logger = logging.getLogger("contentv-rlhf")
TRANSFORMER = "transformer"
PEFT_MODEL_PREFIX = "base_model.model."  # keys of an adapter saved from a PeftModel wrapper
DIFFUSERS_PREFIX = "transformer."  # keys and metadata of `pytorch_lora_weights.safetensors`
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
MERGEABLE_DTYPES = ("F16", "BF16", "F32", "F64")
# adapter_config.json options under which the update is not `scale * B @ A` on a linear weight, or which
# carry weights other than lora_A/lora_B. Any of them set (truthy) is refused.
UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "a bias on lora_B",
    "fan_in_fan_out": "fan_in_fan_out (transposed Conv1D weights)",
    "modules_to_save": "fully trained modules (modules_to_save)",
    "trainable_token_indices": "trainable tokens",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
}
_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<which>[AB])\.weight")


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear layer of an adapter; its update of the base weight is `scale * (up @ down)`."""

    down: torch.Tensor  # lora_A, (r, in)
    up: torch.Tensor  # lora_B, (out, r)
    scale: float  # lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora

    @property
    def shape(self) -> tuple[int, int]:
        """Shape `(out, in)` of the base weight this module updates."""
        return (self.up.shape[0], self.down.shape[1])


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA adapter read from disk: base weight name (`<module>.weight`) -> its module."""

    path: Path  # the weight file that was read (named in error messages)
    modules: dict[str, LoraModule]


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors shard (from the header alone)."""

    shard: Path
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets of the tensor's data in the file
    end: int
    name: str | None = None  # its name in the shard, where the index names it otherwise (an expert's folder prefix)


@dataclass
class MergeSummary:
    """What `merge_adapters` did."""

    out_dir: Path
    adapters: int
    merged_weights: int  # distinct base weight matrices changed
    shards_rewritten: int
    shards_total: int
    bytes_rewritten: int = 0  # size of the rewritten shards
    files_linked: int = 0
    bytes_linked: int = 0
    files_copied: int = 0
    bytes_copied: int = 0
    seconds: float = 0.0

    def describe(self) -> str:
        return (
            f"merged {self.adapters} adapter(s) into {self.merged_weights} weight matrices; rewrote "
            f"{self.shards_rewritten} of {self.shards_total} transformer shard(s) ({_mb(self.bytes_rewritten)})\n"
            f"unchanged files: {self.files_linked} hard-linked ({_mb(self.bytes_linked)}), "
            f"{self.files_copied} copied ({_mb(self.bytes_copied)})\n"
            f"wrote {self.out_dir} in {self.seconds:.1f}s"
        )


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def read_adapter(adapter_dir: str | Path) -> LoraAdapter:
    """Read a LoRA adapter: peft format (`adapter_config.json` + `adapter_model.safetensors`) preferred,
    else diffusers' `pytorch_lora_weights.safetensors` with its embedded adapter metadata.

    Raises:
        UserError: missing files, an adapter type other than plain LoRA, or weights inconsistent with
            the config.
    """
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise UserError(f"{adapter_dir}: adapter directory not found")
    config_path, weights_path = adapter_dir / PEFT_CONFIG, adapter_dir / PEFT_WEIGHTS
    if config_path.is_file() and weights_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"{config_path}: not readable JSON ({one_line(err)})") from None
        tensors = {key.removeprefix(PEFT_MODEL_PREFIX): value for key, value in _load_tensors(weights_path).items()}
        config_source = config_path
    elif (adapter_dir / DIFFUSERS_WEIGHTS).is_file():
        weights_path = config_source = adapter_dir / DIFFUSERS_WEIGHTS
        config, tensors = _read_diffusers_adapter(weights_path)
    else:
        raise UserError(f"{adapter_dir}: no LoRA adapter found (expected {PEFT_CONFIG} + {PEFT_WEIGHTS}, "
                        f"or {DIFFUSERS_WEIGHTS})")
    _check_adapter_config(config, config_source)
    return LoraAdapter(weights_path, _lora_modules(tensors, config, weights_path))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable safetensors file ({one_line(err)})") from None


def _read_diffusers_adapter(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    try:
        with safe_open(path, framework="pt") as reader:
            metadata = reader.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path}: not a readable safetensors file ({one_line(err)})") from None
    if not metadata.get(DIFFUSERS_METADATA_KEY):
        # Without it lora_alpha is unknown, and guessing alpha = r silently changes the update's scale.
        raise UserError(f"{path}: no `{DIFFUSERS_METADATA_KEY}` in the file's metadata, so lora_alpha is "
                        f"unknown; give an adapter with {PEFT_CONFIG} + {PEFT_WEIGHTS}")
    try:
        config = {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in json.loads(metadata[DIFFUSERS_METADATA_KEY]).items()}
    except (ValueError, AttributeError) as err:
        raise UserError(f"{path}: `{DIFFUSERS_METADATA_KEY}` is not a JSON object ({one_line(err)})") from None
    tensors = _load_tensors(path)
    others = [key for key in tensors if not key.startswith(DIFFUSERS_PREFIX)]
    if others:
        raise UserError(f"{path}: holds LoRA weights of components other than the transformer (e.g. "
                        f"{others[0]!r}); merge fuses transformer LoRA only")
    return config, {key.removeprefix(DIFFUSERS_PREFIX): value for key, value in tensors.items()}


def _check_adapter_config(config: dict, source: Path) -> None:
    if not isinstance(config, dict):
        raise UserError(f"{source}: expected a JSON object (a peft LoraConfig)")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise UserError(f"{source}: peft_type is {peft_type!r}; merge fuses LoRA adapters only")
    for option, what in UNSUPPORTED_OPTIONS.items():
        if config.get(option):
            raise UserError(f"{source}: {option} is set ({what}); merge fuses plain LoRA only (W + scale * B @ A)")
    if config.get("bias", "none") != "none":
        raise UserError(f"{source}: bias is {config['bias']!r}; merge supports bias 'none' only")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, int | float):
        raise UserError(f"{source}: expected a positive integer `r` and a number `lora_alpha`, "
                        f"got r={rank!r}, lora_alpha={alpha!r}")


def _pattern_value(patterns: dict | None, module: str, default: float) -> float:
    """peft's `rank_pattern`/`alpha_pattern` rule: the first pattern (a regex) matching the end of the name."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def lora_rank_and_scale(config: dict, module: str) -> tuple[int, float]:
    """Rank and scale of `module` (e.g. `transformer_blocks.0.attn.to_q`) under a peft LoRA config dict."""
    rank = int(_pattern_value(config.get("rank_pattern"), module, config["r"]))
    alpha = float(_pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"]))
    return rank, (alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank)


def _unexpected_key_hint(key: str) -> str:
    if "lora_magnitude_vector" in key:
        return "DoRA is not supported"
    if "lora_embedding_" in key:
        return "LoRA on embeddings is not supported"
    if ".lora_" in key and key.endswith(".bias"):
        return "LoRA biases are not supported"
    return "expected <module>.lora_A.weight and <module>.lora_B.weight"


def _lora_modules(tensors: dict[str, torch.Tensor], config: dict, path: Path) -> dict[str, LoraModule]:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _LORA_KEY.fullmatch(key)
        if match is None:
            raise UserError(f"{path}: unexpected tensor {key!r} ({_unexpected_key_hint(key)})")
        pairs.setdefault(match["module"], {})[match["which"]] = tensor
    if not pairs:
        raise UserError(f"{path}: holds no LoRA weights")
    modules = {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            have, lack = ("A", "B") if "A" in pair else ("B", "A")
            raise UserError(f"{path}: {module} has lora_{have} but no lora_{lack}")
        down, up = pair["A"], pair["B"]
        if down.ndim != 2 or up.ndim != 2:
            raise UserError(f"{path}: {module}: only LoRA on linear layers can be merged (lora_A has shape "
                            f"{tuple(down.shape)}; convolution LoRA is not supported)")
        rank, scale = lora_rank_and_scale(config, module)
        if down.shape[0] != rank or up.shape[1] != rank:
            raise UserError(f"{path}: {module}: the adapter config gives rank {rank} but lora_A is "
                            f"{tuple(down.shape)} and lora_B is {tuple(up.shape)}")
        modules[f"{module}.weight"] = LoraModule(down=down, up=up, scale=scale)
    return modules


# ---------------------------------------------------------------------------------------------------------
# Merging one weight


def lora_delta(module: LoraModule, weight: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`weight * scale * (B @ A)`: the module's update of its base weight, `(out, in)` in `dtype`."""
    return (module.up.to(dtype) @ module.down.to(dtype)) * (weight * module.scale)


def merge_weight(weight: torch.Tensor, updates: Sequence[tuple[float, LoraModule]]) -> torch.Tensor:
    """`W + sum_i w_i * scale_i * (B_i @ A_i)` in float32 (float64 for float64 `W`), cast to `W`'s dtype."""
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    merged = weight.to(compute, copy=True)
    for adapter_weight, module in updates:
        merged += lora_delta(module, adapter_weight, compute)
    return merged.to(weight.dtype)


# ---------------------------------------------------------------------------------------------------------
# The transformer's shards


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor name -> dtype, shape and absolute byte range, from the file's header (no tensor data)."""
    try:
        with safe_open(path, framework="pt"):
            pass  # let safetensors validate the header (sizes, offsets) before it is trusted here
        with open(path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(length))
    except (SafetensorError, OSError, ValueError, struct.error) as err:
        raise UserError(f"{path}: not a readable safetensors file ({one_line(err)})") from None
    header.pop("__metadata__", None)
    start = 8 + length
    return {
        key: TensorInfo(path, entry["dtype"], tuple(entry["shape"]), start + entry["data_offsets"][0],
                        start + entry["data_offsets"][1])
        for key, entry in header.items()
    }


def _index_transformer(transformer_dir: Path, prefix: str = "") -> tuple[list[Path], dict[str, TensorInfo]]:
    """The shards of `transformer_dir` and their tensors by name (`prefix` + the shard's name for the tensor)."""
    bins = sorted(p for p in transformer_dir.iterdir() if p.name.endswith(".bin"))
    if bins:
        raise UserError(f"{bins[0]}: .bin transformer weights are not supported by merge; save the transformer "
                        "as safetensors (save_pretrained(..., safe_serialization=True))")
    shards = sorted(p for p in transformer_dir.iterdir() if p.name.endswith(".safetensors") and p.is_file())
    index: dict[str, TensorInfo] = {}
    for shard in shards:
        for key, info in read_safetensors_header(shard).items():
            if prefix:
                key, info = prefix + key, TensorInfo(info.shard, info.dtype, info.shape, info.begin, info.end, key)
            if key in index:
                raise UserError(f"{shard}: tensor {key!r} is also in {index[key].shard.name}")
            index[key] = info
    return shards, index


def _plan_updates(
    adapters: Sequence[LoraAdapter], weights: Sequence[float], index: dict[str, TensorInfo], transformer_dir: Path
) -> dict[str, list[tuple[float, LoraModule]]]:
    """Base weight name -> [(w_i, module of adapter i)], after checking every module against the index."""
    updates: dict[str, list[tuple[float, LoraModule]]] = {}
    for adapter, adapter_weight in zip(adapters, weights, strict=True):
        missing = [key for key in adapter.modules if key not in index]
        if missing:
            raise UserError(f"{adapter.path}: {len(missing)} LoRA module(s) have no base weight in {transformer_dir} "
                            f"(e.g. {missing[0]!r}); adapter from another base model?")
        for key, module in adapter.modules.items():
            info = index[key]
            if info.shape != module.shape:
                raise UserError(f"{adapter.path}: the LoRA update of {key!r} has shape {module.shape} but the base "
                                f"weight in {info.shard} is {info.shape}; adapter from another base model?")
            if info.dtype not in MERGEABLE_DTYPES:
                raise UserError(f"{info.shard}: {key!r} is stored as {info.dtype}; merge supports "
                                f"{', '.join(MERGEABLE_DTYPES)} weights")
            updates.setdefault(key, []).append((adapter_weight, module))
    return updates


def _rewrite_shard(
    src: Path, dst: Path, keys: Sequence[str], index: dict[str, TensorInfo],
    updates: dict[str, list[tuple[float, LoraModule]]],
) -> None:
    """Copy `src` to `dst`, then overwrite the data of each key in `keys` with its merged value in place."""
    shutil.copyfile(src, dst)
    with safe_open(src, framework="pt", device="cpu") as reader, open(dst, "r+b") as out:
        for key in sorted(keys, key=lambda k: index[k].begin):  # in file order
            info = index[key]
            merged = merge_weight(reader.get_tensor(info.name or key), updates[key])
            data = merged.contiguous().reshape(-1).view(torch.uint8).numpy()  # little-endian, as safetensors
            if data.nbytes != info.end - info.begin:
                raise RuntimeError(f"{src}: merged {key} has {data.nbytes} bytes, the file holds "
                                   f"{info.end - info.begin}")
            out.seek(info.begin)
            out.write(data)


# ---------------------------------------------------------------------------------------------------------
# The output directory


def _link_or_copy(src: Path, dst: Path, summary: MergeSummary) -> None:
    size = src.stat().st_size
    try:
        os.link(src, dst)  # follows a symlinked source (e.g. a hub cache snapshot) to its file
    except OSError:  # another filesystem, or links not permitted
        shutil.copy2(src, dst)
        summary.files_copied += 1
        summary.bytes_copied += size
    else:
        summary.files_linked += 1
        summary.bytes_linked += size


def _copy(src: Path, dst: Path, summary: MergeSummary) -> None:
    shutil.copy2(src, dst)
    summary.files_copied += 1
    summary.bytes_copied += src.stat().st_size


def _write_checkpoint(
    model_dir: Path, staging: Path, shards: Sequence[Path], index: dict[str, TensorInfo],
    updates: dict[str, list[tuple[float, LoraModule]]], summary: MergeSummary,
    folders: Sequence[str] = (TRANSFORMER,),
) -> None:
    # 1. Everything but the transformer's shards: linked, or copied under transformer/ (each of `folders`).
    shard_set = set(shards)
    for root, dirs, files in os.walk(model_dir, followlinks=True):
        dirs.sort()
        relative = Path(root).relative_to(model_dir)
        (staging / relative).mkdir(exist_ok=True)
        for name in sorted(files):
            src, dst = Path(root) / name, staging / relative / name
            if src in shard_set:
                continue
            if relative.parts[:1] and relative.parts[0] in folders:
                _copy(src, dst, summary)
            else:
                _link_or_copy(src, dst, summary)
    # 2. The shards, one at a time.
    keys_by_shard: dict[Path, list[str]] = {}
    for key in updates:
        keys_by_shard.setdefault(index[key].shard, []).append(key)
    with Progress(total=len(shards), desc="merging transformer shards", unit="shard") as progress:
        for shard in shards:
            dst = staging / shard.parent.name / shard.name
            if shard in keys_by_shard:
                _rewrite_shard(shard, dst, keys_by_shard[shard], index, updates)
                summary.shards_rewritten += 1
                summary.bytes_rewritten += dst.stat().st_size
            else:
                _link_or_copy(shard, dst, summary)
            progress.update()


def _check_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    if weights is None or len(weights) == 0:
        return [1.0] * count
    if len(weights) != count:
        raise UserError(f"--weight: got {len(weights)} value(s) for {count} adapter(s); give one --weight per "
                        "--adapter (in the same order) or none (all 1.0)")
    bad = [w for w in weights if not math.isfinite(w)]
    if bad:
        raise UserError(f"--weight: {bad[0]} is not a finite number")
    return [float(w) for w in weights]


def merge_adapters(
    model_dir: str | Path,
    adapters: Sequence[str | Path],
    out_dir: str | Path,
    weights: Sequence[float] | None = None,
    overwrite: bool = False,
    family: str | None = None,
) -> MergeSummary:
    """Write `out_dir`: the checkpoint at `model_dir` with the LoRA `adapters` fused into its transformer.

    Args:
        adapters: adapter directories (peft or diffusers format), merged in this order.
        weights: one multiplier per adapter (default 1.0 each), as `set_adapters(..., weights=...)`.
        overwrite: replace `out_dir` if it exists and is not empty.
        family: the model family of `model_dir` (default: the one its model_index.json names).

    Nothing is written until every input is validated; the checkpoint is built in a temporary sibling
    of `out_dir` and renamed into place (see the module docstring).

    Raises:
        UserError: a missing or malformed model or adapter, an adapter that does not fit the
            transformer, a wrong number of weights, an `out_dir` that is an input or holds anything but a model
            checkpoint, or one without `overwrite` (rlhf/outputs.py); a failed write (full disk, permissions).
    """
    start = time.perf_counter()
    adapter_dirs = [Path(a) for a in adapters]
    if not adapter_dirs:
        raise UserError("--adapter: at least one adapter directory is required")
    adapter_weights = _check_weights(weights, len(adapter_dirs))
    model_dir = check_model_dir(model_dir, vae=False, text_encoders=False, family=family)
    out = check_output(out_dir, field="--out", kind=MODEL, inputs={"model": model_dir, "adapter": adapter_dirs},
                       overwrite=overwrite)
    loaded = [read_adapter(d) for d in adapter_dirs]
    base = identity(model_dir, family)
    for adapter_dir in adapter_dirs:
        check_adapter_base(adapter_dir, model_dir, base)
    # A family of several experts (Wan2.2 A14B: transformer/, transformer_2/) trains one module holding them, so
    # its adapter names each weight under its expert's folder: the index prefixes the tensors the same way.
    model_family = family_for(model_dir, family)
    folders = model_family.transformer_folders
    if len(folders) > 1:
        for adapter_dir, adapter in zip(adapter_dirs, loaded, strict=True):
            if adapter.path.name == DIFFUSERS_WEIGHTS:  # read_adapter found no peft files
                # The export holds one file per expert, each keyed as a one-transformer LoRA (for WanPipeline's
                # load_lora_weights), so it does not say which folder its weights belong to.
                files = ", ".join(sorted(p.name for p in adapter_dir.glob("*.safetensors")))
                raise UserError(f"{adapter_dir}: holds only the diffusers LoRA export ({files}), without "
                                f"{PEFT_CONFIG} + {PEFT_WEIGHTS}; merging into a {model_family.name} model "
                                f"({' and '.join(f'{f}/' for f in folders)}) needs those peft files: give the "
                                f"adapter folder the trainer wrote")
    transformer_dir = model_dir / TRANSFORMER
    shards, index = [], {}
    for folder in folders:
        folder_shards, folder_index = _index_transformer(model_dir / folder, f"{folder}." if len(folders) > 1 else "")
        shards += folder_shards
        index.update(folder_index)
    updates = _plan_updates(loaded, adapter_weights, index, transformer_dir if len(folders) == 1 else model_dir)
    summary = MergeSummary(out_dir=out, adapters=len(loaded), merged_weights=len(updates), shards_rewritten=0,
                           shards_total=len(shards))

    with staged_dir(out, "the merged checkpoint") as staging:
        _write_checkpoint(model_dir, staging, shards, index, updates, summary, folders)
    summary.seconds = time.perf_counter() - start
    return summary
