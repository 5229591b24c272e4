"""Which base model an adapter was trained on: a cheap identity of a checkpoint's transformer, recorded in
every adapter the trainers write (`base_model.json`) and checked wherever an adapter meets a base model.

A LoRA update is only meaningful on the weights it was trained against: an adapter applied to another base
of the same shapes loads without complaint and produces garbage. Shapes alone cannot tell two such bases
apart, and hashing an 8B model's weights takes minutes, so the identity is two digests:

- `transformer_config_sha256`: the transformer's `config.json` without diffusers' bookkeeping keys
  (`_class_name`, `_diffusers_version`, ...), canonically serialised;
- `weights_sample_sha256`: for up to `SAMPLED_TENSORS` matrices spread evenly over the sorted tensor names of
  the safetensors shards, the name, the shape and the first `SAMPLED_VALUES` values rounded to bf16 (so a
  bf16 checkpoint and its fp32 copy agree). This reads the shard headers and at most 8 x 4096 values (256 KB)
  of tensor data, whatever the model's size. Checkpoints stored as `.bin` are identified by their files' names
  and sizes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from pathlib import Path
from typing import Any

import torch

from rlhf import io
from rlhf.errors import UserError, one_line

logger = logging.getLogger("contentv-rlhf")
RECORD = "base_model.json"
FORMAT = "contentv-rlhf.base-model"
VERSION = 1
SAMPLED_TENSORS = 8
SAMPLED_VALUES = 4096
_FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_warned: set[tuple[str, str]] = set()  # (adapter, model) pairs already warned about in this process
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1}


def _config_digest(transformer_dir: Path) -> str:
    path = transformer_dir / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not readable JSON ({one_line(err)})") from None
    kept = {k: v for k, v in config.items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def _safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(byte offset of the data section, header without `__metadata__`)."""
    try:
        with open(path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(length))
    except (OSError, ValueError, struct.error) as err:
        raise UserError(f"{path}: not a readable safetensors file ({one_line(err)})") from None
    header.pop("__metadata__", None)
    return 8 + length, header


def _weights_digest(transformer_dir: Path) -> str:
    digest = hashlib.sha256()
    shards = sorted(transformer_dir.glob("*.safetensors"))
    if not shards:  # .bin checkpoints: reading any tensor means unpickling a whole shard
        for path in sorted(transformer_dir.glob("*.bin")):
            digest.update(f"{path.name}:{path.stat().st_size}".encode())
        return digest.hexdigest()
    tensors: dict[str, tuple[Path, int, dict[str, Any]]] = {}
    for shard in shards:
        start, header = _safetensors_header(shard)
        for name, entry in header.items():
            tensors[name] = (shard, start, entry)
    # Matrices carry the learned weights; vectors are often constant at init (norm scales, biases).
    names = sorted(n for n, (_, _, e) in tensors.items() if len(e.get("shape", ())) >= 2) or sorted(tensors)
    count = min(SAMPLED_TENSORS, len(names))
    picked = [names[round(i * (len(names) - 1) / max(1, count - 1))] for i in range(count)]
    for name in dict.fromkeys(picked):
        shard, start, entry = tensors[name]
        dtype, (begin, end) = entry["dtype"], entry["data_offsets"]
        size = min(end - begin, SAMPLED_VALUES * _DTYPE_BYTES.get(dtype, 1))
        with open(shard, "rb") as file:
            file.seek(start + begin)
            data = file.read(size)
        if dtype in _FLOAT_DTYPES and data:
            values = torch.frombuffer(bytearray(data), dtype=_FLOAT_DTYPES[dtype]).to(torch.bfloat16)
            data = values.view(torch.int16).numpy().tobytes()
        digest.update(f"{name}:{entry['shape']}:".encode())
        digest.update(data)
    return digest.hexdigest()


def identity(model_dir: str | Path, family: str | None = None) -> dict[str, Any]:
    """The record written into adapters: format, the model's path (for messages), its model family (`family`, or
    the folder's) and the two digests."""
    from rlhf.models.family import family_for
    from rlhf.models.loader import check_model_dir

    model_dir = check_model_dir(model_dir, vae=False, text_encoders=False, family=family)  # names a missing part
    transformer_dir = model_dir / "transformer"
    return {
        "format": FORMAT, "version": VERSION, "model": str(model_dir.resolve()),
        "family": family_for(model_dir, family).name,
        "transformer_config_sha256": _config_digest(transformer_dir),
        "weights_sample_sha256": _weights_digest(transformer_dir),
    }


def write_record(adapter_dir: str | Path, record: dict[str, Any]) -> Path:
    return io.write_json(Path(adapter_dir) / RECORD, record)


def check_adapter_base(adapter_dir: str | Path, model_dir: str | Path,
                       model_identity: dict[str, Any] | None = None, family: str | None = None) -> None:
    """Refuse an adapter whose `base_model.json` names another base than `model_dir`; warn when it has none.

    Raises:
        UserError: an unreadable record, or one of another model family (records without a family predate the
            other families: ContentV), or whose transformer config or sampled weights differ.
    """
    path = Path(adapter_dir) / RECORD
    if not Path(adapter_dir).is_dir():
        return  # the adapter loader names a missing directory
    if not path.exists():
        if (str(adapter_dir), str(model_dir)) in _warned:
            return
        _warned.add((str(adapter_dir), str(model_dir)))
        logger.warning("%s: the adapter has no %s (written by an older version or another tool), so it cannot "
                       "be checked to come from the base model %s", adapter_dir, RECORD, model_dir)
        return
    try:
        recorded = json.loads(path.read_text())
        if not isinstance(recorded, dict) or recorded.get("format") != FORMAT:
            raise ValueError(f"format is not {FORMAT!r}")
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a base-model record ({one_line(err)})") from None
    current = model_identity or identity(model_dir, family)
    recorded_family = recorded.get("family", "contentv")
    if recorded_family != current["family"]:
        raise UserError(f"{path}: the adapter was trained on a {recorded_family} model ({recorded.get('model')}), "
                        f"but {model_dir} is a {current['family']} model; an adapter applies to its own family only")
    for key, what in (("transformer_config_sha256", "transformer config differs from that"),
                      ("weights_sample_sha256", "transformer weights differ from those")):
        if recorded.get(key) != current[key]:
            raise UserError(f"{path}: the adapter was trained on another base model ({recorded.get('model')}): "
                            f"its {what} of {model_dir}")
