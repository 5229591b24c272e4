"""`merge`: fused checkpoints compute what base + adapters compute, stream shard by shard, reject bad input."""

import json
import os
import shutil
import struct
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import rlhf.merge
import rlhf.video
from rlhf.lora import (
    DEFAULT_LORA_TARGETS,
    DIFFUSERS_WEIGHTS,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    add_lora,
    load_adapter,
    read_peft_weights,
    save_adapter,
)
from rlhf.merge import merge_adapters, read_safetensors_header
from rlhf.models.loader import load_contentv
from rlhf.video import read_video, write_mp4
from tests.conftest import call_cli
from tests.conftest import tiny_forward as forward

SHARD = Path("transformer") / "diffusion_pytorch_model.safetensors"
# (rank, alpha) of the adapters built with `add_lora`; alpha != rank so a lost scale would show.
LORA_SHAPES = {"a": (4, 8.0), "b": (2, 3.0)}


def fresh_transformer(model_dir, dtype="fp32"):
    return load_contentv(model_dir, dtype=dtype, load_vae=False, load_text_encoders=False).transformer


def make_adapter(model_dir: Path, out: Path, seed: int, config: LoraConfig | None = None, rank=4, alpha=8.0) -> Path:
    """An adapter with random non-zero lora_B and perturbed lora_A, saved by our `save_adapter`."""
    transformer = fresh_transformer(model_dir)
    if config is None:
        add_lora(transformer, rank=rank, alpha=alpha)
    else:
        transformer.add_adapter(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
            elif "lora_A" in name:
                param.add_(torch.randn(param.shape, generator=g) * 0.1)
    return save_adapter(transformer, out)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    targets = list(DEFAULT_LORA_TARGETS)
    made = {name: make_adapter(tiny_model_dir, root / name, seed, rank=rank, alpha=alpha)
            for seed, (name, (rank, alpha)) in enumerate(LORA_SHAPES.items(), start=1)}
    made["patterns"] = make_adapter(tiny_model_dir, root / "patterns", 3, LoraConfig(
        r=4, lora_alpha=8, target_modules=targets,
        rank_pattern={"attn.to_q": 2, "transformer_blocks.1.attn.to_k": 3}, alpha_pattern={"to_v": 5}))
    made["rslora"] = make_adapter(tiny_model_dir, root / "rslora", 4, LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, use_rslora=True))
    return made


def lora_modules(adapter: Path) -> set[str]:
    return {k.removesuffix(".lora_A.weight") for k in read_peft_weights(adapter) if k.endswith(".lora_A.weight")}


def header_bytes(path: Path) -> bytes:
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        return struct.pack("<Q", length) + file.read(length)


def copy_model(model_dir: Path, out: Path, transformer: torch.nn.Module | None = None, **save_kwargs) -> Path:
    """A copy of the model dir (hard links) whose transformer is re-saved with `save_kwargs`."""
    shutil.copytree(model_dir, out, copy_function=os.link, ignore=shutil.ignore_patterns("transformer"))
    (transformer or fresh_transformer(model_dir)).save_pretrained(out / "transformer", **save_kwargs)
    return out


@pytest.fixture(scope="module")
def sharded_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return copy_model(tiny_model_dir, tmp_path_factory.mktemp("sharded") / "model", max_shard_size="100KB")


@pytest.mark.parametrize("name", ["a", "patterns", "rslora"])
def test_merged_model_equals_base_plus_adapter(tiny_model_dir, adapters, tmp_path, name):
    summary = merge_adapters(tiny_model_dir, [adapters[name]], tmp_path / "out")
    reference = fresh_transformer(tiny_model_dir)
    base = forward(reference)
    load_adapter(reference, adapters[name])
    expected = forward(reference)
    merged = forward(fresh_transformer(tmp_path / "out"))
    assert (expected - base).abs().max() > 0.02 * base.abs().max()  # the adapter changes the output
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert summary.merged_weights == len(lora_modules(adapters[name])) == 15  # the last block has no to_add_out
    assert (summary.shards_rewritten, summary.shards_total, summary.adapters) == (1, 1, 1)
    if name == "patterns":  # the patterns really gave other ranks
        lora = read_peft_weights(adapters[name])
        assert lora["transformer_blocks.0.attn.to_q.lora_A.weight"].shape[0] == 2
        assert lora["transformer_blocks.1.attn.to_k.lora_A.weight"].shape[0] == 3


@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")
def test_weighted_merge_of_two_adapters(tiny_model_dir, adapters, tmp_path):
    out = tmp_path / "out"
    merge_adapters(tiny_model_dir, [adapters["a"], adapters["b"]], out, weights=[0.5, 1.5])
    reference = fresh_transformer(tiny_model_dir)
    # diffusers' loader: `rlhf.lora.load_adapter` refuses a second adapter (its target check looks for
    # nn.Linear modules, which the first adapter has wrapped).
    for name in ("a", "b"):
        reference.load_lora_adapter(str(adapters[name]), weight_name=DIFFUSERS_WEIGHTS, prefix="transformer",
                                    adapter_name=name)
    reference.set_adapters(["a", "b"], weights=[0.5, 1.5])
    expected = forward(reference)
    torch.testing.assert_close(forward(fresh_transformer(out)), expected, rtol=1e-5,
                               atol=1e-5 * expected.abs().max().item())

    # One matrix, the formula written out: W + sum_i w_i * alpha_i / r_i * B_i @ A_i.
    module = "transformer_blocks.0.attn.to_q"
    expected_w = load_file(tiny_model_dir / SHARD)[f"{module}.weight"].clone()
    for name, weight in (("a", 0.5), ("b", 1.5)):
        lora = read_peft_weights(adapters[name])
        rank, alpha = LORA_SHAPES[name]
        expected_w += weight * alpha / rank * (lora[f"{module}.lora_B.weight"] @ lora[f"{module}.lora_A.weight"])
    merged_w = load_file(out / SHARD)[f"{module}.weight"]
    torch.testing.assert_close(merged_w, expected_w, rtol=0, atol=1e-6)
    assert (merged_w - load_file(tiny_model_dir / SHARD)[f"{module}.weight"]).abs().max() > 0.01


def test_bf16_model_stays_bf16_and_merges_in_fp32(tiny_model_dir, adapters, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path / "bf16", fresh_transformer(tiny_model_dir, dtype="bf16"))
    merge_adapters(model, [adapters["a"]], tmp_path / "out")
    base, merged = load_file(model / SHARD), load_file(tmp_path / "out" / SHARD)
    lora = read_peft_weights(adapters["a"])
    rank, alpha = LORA_SHAPES["a"]
    changed = 0
    for key, weight in base.items():
        assert weight.dtype == merged[key].dtype == torch.bfloat16
        module = key.removesuffix(".weight")
        if f"{module}.lora_A.weight" in lora:
            delta = (lora[f"{module}.lora_B.weight"] @ lora[f"{module}.lora_A.weight"]) * (alpha / rank)
            assert torch.equal(merged[key], (weight.float() + delta).to(torch.bfloat16)), key
            assert not torch.equal(merged[key], weight)
            changed += 1
        else:
            assert torch.equal(merged[key], weight), key
    assert changed == 15
    # Same header (names, offsets) and metadata: only tensor bytes were rewritten.
    assert header_bytes(tmp_path / "out" / SHARD) == header_bytes(model / SHARD)
    with safe_open(tmp_path / "out" / SHARD, framework="pt") as reader:
        assert reader.metadata() == {"format": "pt"}


def test_cli_writes_release_checkpoint_that_generates_like_the_adapter(
    tiny_model_dir, adapters, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "merged"
    code, stdout, stderr = call_cli(capsys, "merge", "--model", tiny_model_dir, "--adapter", adapters["a"],
                                    "--out", out)
    assert code == 0, stderr
    assert "merged 1 adapter(s) into 15 weight matrices; rewrote 1 of 1 transformer shard(s)" in stdout
    assert "hard-linked" in stdout and f"wrote {out}" in stdout
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temporary directory left behind

    files = sorted(p.relative_to(tiny_model_dir) for p in tiny_model_dir.rglob("*") if p.is_file())
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) == files
    for rel in files:
        src, dst = (tiny_model_dir / rel).stat(), (out / rel).stat()
        if rel == SHARD:
            assert dst.st_ino != src.st_ino and (out / rel).read_bytes() != (tiny_model_dir / rel).read_bytes()
            continue
        assert (out / rel).read_bytes() == (tiny_model_dir / rel).read_bytes(), rel
        if rel.parts[0] == "transformer":  # config.json: a copy the release can own
            assert dst.st_ino != src.st_ino, rel
        else:
            assert dst.st_ino == src.st_ino and dst.st_nlink >= 2, rel
    parts = load_contentv(out)  # every component loads from the release checkpoint
    assert parts.transformer is not None and parts.vae is not None and parts.prompt_encoder is not None

    # Frames as generate hands them to the encoder, and as decoded from the mp4. H.264 turns a one-level
    # difference of one input pixel into differences of 10-25 levels over a block (and on into the frames
    # predicted from it), so the exact comparison is made before encoding; the decoded videos are only
    # checked to be much closer to each other than to the base model's. libx264 (through PyAV) is not
    # byte-reproducible under CPU load: identical frames came out as another stream in 5 of 40 encodes, which
    # decodes up to ~0.9 levels (mean) apart, while base and adapter decode 5-7 levels apart; hence half.
    frames: dict[str, np.ndarray] = {}

    def recording_write_mp4(path, video_frames, **kwargs):
        frames[Path(path).stem] = video_frames.astype(np.int16)
        return write_mp4(path, video_frames, **kwargs)

    monkeypatch.setattr(rlhf.video, "write_mp4", recording_write_mp4)
    small = ["--prompt", "a red fox", "--frames", 5, "--height", 32, "--width", 32, "--steps", 3, "--dtype", "fp32",
             "--seed", 7]
    decoded = {}
    for name, args in (("base", ["--model", tiny_model_dir]),
                       ("adapter", ["--model", tiny_model_dir, "--adapter", adapters["a"]]),
                       ("merged", ["--model", out])):
        code, _, stderr = call_cli(capsys, "generate", *args, "--out", tmp_path / f"{name}.mp4", *small)
        assert code == 0, stderr
        decoded[name] = read_video(tmp_path / f"{name}.mp4").astype(np.int16)
    assert frames["merged"].shape == (5, 32, 32, 3)
    assert np.abs(frames["merged"] - frames["adapter"]).max() <= 2
    assert np.abs(frames["base"] - frames["adapter"]).max() > 10  # the adapter visibly changes the video
    assert np.abs(decoded["merged"] - decoded["adapter"]).mean() < 0.5 * np.abs(decoded["base"] - decoded["adapter"]).mean()


def test_sharded_transformer_keeps_its_layout(tiny_model_dir, sharded_model_dir, adapters, tmp_path):
    src = sharded_model_dir / "transformer"
    shards = sorted(src.glob("*.safetensors"))
    assert len(shards) >= 3 and (src / "diffusion_pytorch_model.safetensors.index.json").is_file()
    summary = merge_adapters(sharded_model_dir, [adapters["a"]], tmp_path / "out")
    dst = tmp_path / "out" / "transformer"
    assert sorted(os.listdir(dst)) == sorted(os.listdir(src))
    targets = {f"{module}.weight" for module in lora_modules(adapters["a"])}
    touched = [shard for shard in shards if targets & read_safetensors_header(shard).keys()]
    assert len(touched) >= 2 and (summary.shards_rewritten, summary.shards_total) == (len(touched), len(shards))
    for name in ("config.json", "diffusion_pytorch_model.safetensors.index.json"):
        assert (dst / name).read_bytes() == (src / name).read_bytes()
    for shard in shards:
        assert header_bytes(dst / shard.name) == header_bytes(shard)
    # Same weights as merging the unsharded transformer, and the model loads from the shards.
    merge_adapters(tiny_model_dir, [adapters["a"]], tmp_path / "unsharded")
    merged = {}
    for shard in shards:
        merged.update(load_file(dst / shard.name))
    unsharded = load_file(tmp_path / "unsharded" / SHARD)
    assert merged.keys() == unsharded.keys()
    assert all(torch.equal(merged[key], unsharded[key]) for key in merged)
    torch.testing.assert_close(forward(fresh_transformer(tmp_path / "out")),
                               forward(fresh_transformer(tmp_path / "unsharded")))

    # An adapter whose modules all live in one shard rewrites that shard only; the others are hard-linked.
    one_shard = shards[1]
    keys = read_safetensors_header(one_shard)
    lora = {k: v for k, v in read_peft_weights(adapters["a"]).items()
            if k.rsplit(".", 2)[0] + ".weight" in keys}
    assert lora
    partial = tmp_path / "partial_adapter"
    partial.mkdir()
    shutil.copy(adapters["a"] / PEFT_CONFIG, partial)
    save_file(lora, partial / PEFT_WEIGHTS)
    summary = merge_adapters(sharded_model_dir, [partial], tmp_path / "partial")
    assert (summary.shards_rewritten, summary.merged_weights) == (1, len(lora) // 2)
    for shard in shards:
        same_file = (tmp_path / "partial" / "transformer" / shard.name).stat().st_ino == shard.stat().st_ino
        assert same_file == (shard != one_shard), shard.name


def test_merge_holds_one_shard_at_a_time(sharded_model_dir, adapters, tmp_path, monkeypatch):
    """Peak memory is about one shard plus the adapters, never the whole transformer.

    Measured with the torch profiler, which records every tensor storage created or freed during the merge:
    the files safetensors memory-maps (a whole shard or adapter file each, counted here as if resident,
    though only the pages of adapted tensors are touched) and the allocator's temporaries (float32 copies,
    deltas). A counting wrapper around the merge's `safe_open` checks the mechanism: one shard open at a
    time, only adapted tensors read, one of them alive at a time.
    """
    shards = sorted((sharded_model_dir / "transformer").glob("*.safetensors"))
    sizes = [shard.stat().st_size for shard in shards]
    targets = {f"{m}.weight" for name in ("a", "b") for m in lora_modules(adapters[name])}
    largest_adapted = max(info.end - info.begin for shard in shards
                          for key, info in read_safetensors_header(shard).items() if key in targets)
    adapter_bytes = sum((adapters[name] / PEFT_WEIGHTS).stat().st_size for name in ("a", "b"))
    counts = {"open": 0, "max_open": 0, "live": 0, "max_live": 0, "reads": 0}

    def release(nbytes: int) -> None:
        counts["live"] -= nbytes

    real_safe_open = rlhf.merge.safe_open

    class CountingSafeOpen:
        def __init__(self, path, framework, device="cpu"):
            self.from_model = Path(path).parent == sharded_model_dir / "transformer"
            self.handle = real_safe_open(path, framework=framework, device=device)

        def __enter__(self):
            self.handle.__enter__()
            if self.from_model:
                counts["open"] += 1
                counts["max_open"] = max(counts["max_open"], counts["open"])
            return self

        def __exit__(self, *exc):
            if self.from_model:
                counts["open"] -= 1
            return self.handle.__exit__(*exc)

        def metadata(self):
            return self.handle.metadata()

        def get_tensor(self, key):
            tensor = self.handle.get_tensor(key)
            if self.from_model:
                nbytes = tensor.numel() * tensor.element_size()
                counts["reads"] += 1
                counts["live"] += nbytes
                counts["max_live"] = max(counts["max_live"], counts["live"])
                weakref.finalize(tensor, release, nbytes)
            return tensor

    monkeypatch.setattr(rlhf.merge, "safe_open", CountingSafeOpen)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        merge_adapters(sharded_model_dir, [adapters["a"], adapters["b"]], tmp_path / "out")
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    events = sorted((e for e in json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
                     if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    assert events, "the profiler recorded no allocations"
    held = peak = 0
    for event in events:
        held += event["args"]["Bytes"]
        peak = max(peak, held)

    assert counts["reads"] == len(targets) and counts["max_open"] == 1
    assert counts["max_live"] <= largest_adapted
    assert peak > adapter_bytes
    # One shard plus a few adapted matrices (float32 copy, delta, scaled delta) besides the adapters ...
    assert peak - adapter_bytes <= max(sizes) + 5 * largest_adapted
    # ... which is well below the whole transformer (4 shards here).
    assert peak - adapter_bytes < sum(sizes) / 2


def test_adapter_formats_give_the_same_merge(tiny_model_dir, adapters, tmp_path):
    peft_dir = adapters["patterns"]
    merge_adapters(tiny_model_dir, [peft_dir], tmp_path / "from_peft")
    expected = (tmp_path / "from_peft" / SHARD).read_bytes()
    # diffusers format only: the config (rank/alpha patterns included) comes from the embedded metadata.
    only_diffusers = tmp_path / "only_diffusers"
    only_diffusers.mkdir()
    shutil.copy(peft_dir / DIFFUSERS_WEIGHTS, only_diffusers)
    merge_adapters(tiny_model_dir, [only_diffusers], tmp_path / "from_diffusers")
    assert (tmp_path / "from_diffusers" / SHARD).read_bytes() == expected
    # keys without peft's `base_model.model.` prefix (adapters saved by older versions or by other tools).
    unprefixed = tmp_path / "unprefixed"
    unprefixed.mkdir()
    shutil.copy(peft_dir / PEFT_CONFIG, unprefixed)
    save_file(read_peft_weights(peft_dir), unprefixed / PEFT_WEIGHTS)
    merge_adapters(tiny_model_dir, [unprefixed], tmp_path / "from_unprefixed")
    assert (tmp_path / "from_unprefixed" / SHARD).read_bytes() == expected


def test_overwrite_replaces_and_weight_zero_is_the_base_model(tiny_model_dir, adapters, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()  # an empty directory needs no --overwrite
    args = ["merge", "--model", tiny_model_dir, "--adapter", adapters["a"], "--out", out]
    assert call_cli(capsys, *args)[0] == 0
    assert (out / SHARD).read_bytes() != (tiny_model_dir / SHARD).read_bytes()
    code, _, stderr = call_cli(capsys, *args, "--weight", 0, "--overwrite")
    assert code == 0, stderr
    assert (out / SHARD).read_bytes() == (tiny_model_dir / SHARD).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _write_adapter(adapter_dir: Path, source: Path, tensors: dict[str, torch.Tensor], **config_changes) -> Path:
    adapter_dir.mkdir()
    config = json.loads((source / PEFT_CONFIG).read_text())
    (adapter_dir / PEFT_CONFIG).write_text(json.dumps({**config, **config_changes}))
    save_file(tensors, adapter_dir / PEFT_WEIGHTS)
    return adapter_dir


BAD_INPUTS = {
    "missing model": "model directory not found",
    "missing adapter": "nope: adapter directory not found",
    "unknown module": "1 LoRA module(s) have no base weight in",
    "shape mismatch": "has shape (32, 7) but the base weight in",
    "dora": "use_dora is set (DoRA",
    "bin weights": ".bin transformer weights are not supported",
    "weight count": "--weight: got 2 value(s) for 1 adapter(s)",
    "out exists": "exists and is not a model checkpoint (no model_index.json)",
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_writes_nothing(tiny_model_dir, adapters, tmp_path, capsys, case):
    model, adapter, extra = tiny_model_dir, adapters["a"], []
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    out = tmp_path / "outputs" / "merged"
    out.parent.mkdir()
    lora_a, lora_b = "transformer_blocks.0.attn.to_q.lora_A.weight", "transformer_blocks.0.attn.to_q.lora_B.weight"
    if case == "missing model":
        model = inputs / "no_model"
    elif case == "missing adapter":
        adapter = inputs / "nope"
    elif case == "unknown module":
        adapter = _write_adapter(inputs / "bogus", adapters["a"], {
            "transformer_blocks.0.attn.to_zz.lora_A.weight": torch.randn(4, 32),
            "transformer_blocks.0.attn.to_zz.lora_B.weight": torch.randn(32, 4)})
    elif case == "shape mismatch":
        adapter = _write_adapter(inputs / "wrong_shape", adapters["a"], {lora_a: torch.randn(4, 7),
                                                                         lora_b: torch.randn(32, 4)})
    elif case == "dora":
        adapter = _write_adapter(inputs / "dora", adapters["a"], read_peft_weights(adapters["a"]), use_dora=True)
    elif case == "bin weights":
        model = copy_model(tiny_model_dir, inputs / "bin_model", safe_serialization=False)
    elif case == "weight count":
        extra = ["--weight", 0.5, "--weight", 1]
    elif case == "out exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")

    code, stdout, stderr = call_cli(capsys, "merge", "--model", model, "--adapter", adapter, "--out", out, *extra)
    assert code == 2
    assert stdout == ""
    assert stderr.startswith("contentv-rlhf merge: error: ") and stderr.count("\n") == 1, stderr
    assert BAD_INPUTS[case] in stderr
    if case == "unknown module":
        assert "to_zz.weight" in stderr and "another base model" in stderr
    if case == "shape mismatch":
        assert "(32, 32)" in stderr and "another base model" in stderr
    # Nothing written: no output directory, no temporary sibling; an existing one is left as it was.
    if case == "out exists":
        assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
        assert os.listdir(out.parent) == ["merged"]
    else:
        assert os.listdir(out.parent) == []
