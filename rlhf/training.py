"""Infrastructure shared by every trainer: accelerate, the LoRA policy, optimiser, checkpoints, logging.

A trainer (dpo/trainer.py, ...) owns only its data and its step; everything around the step lives here:

    run = TrainingRun(options, lora, ...)          # accelerator, run dir, trackers
    policy = run.load_policy(model_dir, dtype)      # transformer + fresh LoRA, grad checkpointing
    run.prepare(policy)                             # optimiser, lr schedule, DDP wrap, resume
    for step in run.steps(): ...                    # the trainer's loop body
        run.optimizer_step(...)                     # clip, non-finite guard, step, schedule
        run.log(step, metrics); run.maybe_checkpoint(step)
    run.finish(summary)                             # adapter (peft + diffusers), config, summary.json

Randomness is stateless per step (`step_generator`), so resuming at step N reproduces the data order,
noise and sigmas of an uninterrupted run; the torch RNG state (dropout) is checkpointed per rank.

Parallel layouts (rlhf/sharding.py): single process and DDP; FSDP2 and DeepSpeed ZeRO-2 through
`accelerate launch --config_file configs/accelerate/{fsdp,zero2}.yaml`. Trainers stay layout-agnostic by
going through `accumulation(last)`, `backward(loss)` and `optimizer_step(...)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from rlhf import devices, io, sharding
from rlhf.base_model import check_adapter_base, identity, write_record
from rlhf.checkpointing import RESOLVED_POLICIES, ActivationProbe, choose_policy, enable_checkpointing
from rlhf.clock import seconds_since_command_start
from rlhf.compiling import CompileTimer, compile_blocks
from rlhf.config import save_config
from rlhf.errors import UserError, one_line
from rlhf.flops import StepFlops, count_flops, peak_flops, utilisation
from rlhf.lora import add_lora, lora_state_dict, module_keys, peft_keys, save_adapter
from rlhf.options import LoraOptions, TrainingOptions

logger = logging.getLogger("contentv-rlhf")
CHECKPOINT_PREFIX = "step-"
OPTIMIZER_FILE = "optimizer.pt"  # full optimiser state keyed by parameter name (single, DDP, FSDP)
DEEPSPEED_DIR = "deepspeed"  # DeepSpeed's own partitioned checkpoint (ZeRO)
TRAINER_TENSORS_FILE = "trainer_tensors.safetensors"  # a trainer's own state (run.trainer_tensors), if any
METRICS_FILE = "metrics.jsonl"
ADAPTER_DIR = "adapter"
# What a run writes into its output_dir; any of them there means the directory holds a run.
RUN_ENTRIES = (ADAPTER_DIR, "checkpoints", "logs", "summary.json")
# Hidden leftovers of a killed run: the adapter's staging directories (ours and save_adapter's).
STAGING_ENTRIES = (f".{ADAPTER_DIR}.staging", f"..{ADAPTER_DIR}.staging.tmp", f".{ADAPTER_DIR}.tmp")
REMOVED_SUFFIX = ".removed"  # a checkpoint being deleted (hidden, so `latest` never picks it)
REPLACED_PREFIX = ".replaced-run-"  # an overwritten run's entries, moved aside before they are deleted
# LoRA settings that fix the shapes and meaning of the checkpointed weights: the checkpoint's adapter_config.json
# key for each.
SHAPE_SETTINGS = {"lora_rank": "r", "lora_alpha": "lora_alpha", "lora_targets": "target_modules"}
# Config fields that do not change what any step computes (where to write, how often to log or checkpoint, when
# to stop, how to save memory or time): a resume may change them. Every other field is a trajectory setting,
# recorded in each checkpoint and compared on resume (`_check_trajectory`). max_steps is one too under a
# linear or cosine schedule, whose decay it sets. The base `model` is compared by content instead
# (`check_adapter_base` on the checkpoint's base_model.json), so a base moved to another folder still resumes.
UNRECORDED_SETTINGS = frozenset({
    "output_dir", "resume_from", "overwrite", "allow_changed_settings", "max_steps", "max_seconds", "save_every",
    "save_every_seconds", "keep_last", "log_every", "report_to", "max_nonfinite_steps", "max_skipped_fraction", "log_utilisation",
    "device", "compile", "gradient_checkpointing", "checkpoint_policy", "model",
})
LOCK_FILE = ".run.lock"  # holds the PID of the process training into the run directory (flock'd while it runs)


class TrainingDiverged(UserError):
    """Too many consecutive non-finite losses."""


def run_entries(output_dir: str | Path) -> list[str]:
    """The entries of a training run present in `output_dir` (none: no run there)."""
    return [name for name in RUN_ENTRIES if (Path(output_dir) / name).exists()]


def holds_run(output_dir: str | Path) -> bool:
    return bool(run_entries(output_dir))


def _setting_text(value: Any) -> str:
    """A LoRA setting as compared and shown: module lists in sorted order, numbers as written (8 == 8.0)."""
    return ",".join(sorted(value)) if isinstance(value, list | tuple | set) else f"{float(value):g}"


def _recorded_value(value: Any) -> Any:
    """A setting as recorded and compared: a path to an existing file or folder resolved (the same pairs named two
    ways are one setting), a file's content digested too (a prompt list edited in place is another setting)."""
    if not isinstance(value, str) or not value or not os.path.exists(value):
        return value
    resolved = os.path.realpath(value)
    if os.path.isfile(resolved) and os.path.getsize(resolved) <= 2**26:
        with open(resolved, "rb") as file:
            return f"{resolved} (sha256 {hashlib.sha256(file.read()).hexdigest()[:16]})"
    return resolved


def trajectory_settings(config: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """The settings a checkpoint records and a resume must keep: every config field but UNRECORDED_SETTINGS
    (max_steps under a decaying schedule), plus `inputs`, digests of what the trainer reads (e.g. its pairs)."""
    fields = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {}
    settings = {k: _recorded_value(v) for k, v in fields.items() if k not in UNRECORDED_SETTINGS}
    if fields.get("lr_scheduler", "constant") != "constant":
        settings["max_steps"] = fields["max_steps"]
    # Through JSON, so that the settings compare equal to those read back from a checkpoint (tuples, 8 vs 8.0).
    return json.loads(io.dumps({**settings, **inputs}))


def check_deepspeed_files(folder: Path) -> None:
    """Read every torch file of a DeepSpeed checkpoint with torch's weights_only unpickler (tensors, containers and
    the few DeepSpeed classes its ZeRO checkpoints hold) before DeepSpeed, which unpickles with any object allowed,
    loads them: a file that would run code fails here instead (raises, quoted as a corrupt checkpoint)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    for file in sorted(folder.rglob("*.pt")):
        with torch.serialization.safe_globals([ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]):
            torch.load(file, map_location="cpu", weights_only=True)


def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _shown(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_held_locks: dict[Path, int] = {}  # lock file -> open descriptor holding its flock, in this process


def _lock_holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"PID {pid}" if pid.isdigit() else "a process whose PID is not recorded yet"


def lock_run_dir(output_dir: Path) -> None:
    """Hold an exclusive flock on `output_dir/LOCK_FILE` until `release_run_locks`, with this PID written in it.

    The OS drops a killed process's flock, so a file left by `kill -9` never blocks a rerun. A process that
    re-locks a directory it holds (an earlier run in it failed without `finish`) replaces its own lock.

    Raises:
        UserError: another live process holds the lock (named by its PID).
    """
    path = output_dir / LOCK_FILE
    if path in _held_locks:
        os.close(_held_locks.pop(path))
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise UserError(f"{output_dir}: another train process ({_lock_holder(path)}) is training into this "
                            "run directory; wait for it to end or choose another output_dir") from None
        try:
            current = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)  # the holder removed the file as it released it: lock the file that is there now
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held_locks[path] = fd


def release_run_locks() -> None:
    """Release (and remove) every run-directory lock this process holds; the file goes before the flock, so no
    process can lock a file that is about to vanish."""
    for path, fd in list(_held_locks.items()):
        path.unlink(missing_ok=True)
        os.close(fd)
        del _held_locks[path]


def step_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator determined by (seed, *keys): per-step randomness that needs no saved state."""
    digest = hashlib.sha256(":".join(map(str, (seed, *keys))).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def lr_lambda(options: TrainingOptions):
    def factor(step: int) -> float:
        if step < options.warmup_steps:
            return (step + 1) / (options.warmup_steps + 1)
        progress = (step - options.warmup_steps) / max(1, options.max_steps - options.warmup_steps)
        if options.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        if options.lr_scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def mark_trainable(transformer: torch.nn.Module) -> None:
    """Only the LoRA weights of the adapter "default" train; everything else (base, "reference") is frozen."""
    for name, param in transformer.named_parameters():
        param.requires_grad_("lora_" in name and ".default." in name)


def reset_single_process_state() -> None:
    """Forget accelerate's per-process state unless a distributed launch owns it.

    accelerate keeps one state per process and refuses a second `Accelerator` with another precision or device;
    a second run in the same process (a notebook, a benchmark, the tests) would otherwise fail on it.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if PartialState._shared_state and PartialState().distributed_type == DistributedType.NO:
        AcceleratorState._reset_state(reset_partial_state=True)


class TrainingRun:
    """One training run in `options.output_dir` (see the module docstring for the call order)."""

    def __init__(self, options: TrainingOptions, lora: LoraOptions, device: str, config: Any):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        self.options, self.lora, self.config = options, lora, config
        self.output_dir = Path(options.output_dir)
        # A run directory is continued (resume_from) or replaced (overwrite), never trained into afresh: that
        # would mix two runs' checkpoints, metrics and adapters.
        found = run_entries(self.output_dir)
        if found and not options.resume_from and not options.overwrite:
            raise UserError(f"{self.output_dir}: already holds a training run ({', '.join(found)}); pass "
                            "--resume-from latest to continue it or --overwrite to replace it")
        target = devices.resolve_device(device)
        reset_single_process_state()
        self.accelerator = Accelerator(
            cpu=target.type == "cpu",
            mixed_precision=options.mixed_precision,
            log_with=None if options.report_to == "none" else options.report_to,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.logs_dir)),
        )
        self.layout = sharding.layout_of(self.accelerator)
        if self.layout == "deepspeed" and self.accelerator.mixed_precision == "no":
            # DeepSpeed skips a step on inf/NaN gradients only in bf16/fp16 (in fp32 it would apply it).
            raise UserError("DeepSpeed launches need mixed_precision: bf16 (or fp16) in the training config, "
                            "so that non-finite steps are skipped")
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process
        # The LoRA init (and dropout) draw from the global RNG: seed it so a run does not depend on what
        # ran before it in the same process (resumes restore the RNG state from the checkpoint).
        devices.manual_seed_all(options.seed)
        self.step = 0
        self.nonfinite_in_row = 0
        self.skipped_steps = 0
        self.history: list[dict[str, float]] = []
        # Digests of the data a trainer reads, recorded with the settings (set by the trainer before `prepare`).
        self.inputs: dict[str, Any] = {}
        # Trajectory settings changed by resumes with allow_changed_settings, carried from checkpoint to checkpoint.
        self.changed_settings: list[dict[str, Any]] = []
        self.unlogged_change: dict[str, Any] | None = None  # this resume's change, logged with its first step
        # (setting, steps): a trainer whose steps come in rounds (GRPO) resumes only at a round's start.
        self.round_steps: tuple[str, int] = ("", 1)
        # A trainer's own tensors, saved with each checkpoint and restored in place on resume (DiffusionNFT's old
        # policy); identical on every process. Registered before `prepare`, which resumes.
        self.trainer_tensors: dict[str, torch.Tensor] = {}
        self.reference_adapter = False
        self.model_dir: Path | None = None
        self.base_identity: dict[str, Any] | None = None  # written into every adapter (rlhf/base_model.py)
        self.compile_timer: CompileTimer | None = None  # started when options.compile
        self.step_flops: dict[str, StepFlops] = {}  # per kind of step, counted on its first step
        self.step_kind = "step"
        self.peak_flops: float | None = None  # the device's peak FLOP/s, measured or published (prepare)
        self.steps_done = 0
        self.out_of_time = False  # max_seconds spent: the step just ended is the last
        self.last_checkpoint_seconds = 0.0  # since the command's start (save_every_seconds)
        # checkpoint_policy auto: measured during the first step, resolved after it (_resolve_checkpointing).
        self.activation_probe: ActivationProbe | None = None
        self.checkpoint_policy: str = "none"  # what the blocks run with now

    # ---- directories -------------------------------------------------------------------------
    @property
    def logs_dir(self) -> Path:
        return self.output_dir / "logs"

    @property
    def checkpoints_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    # ---- model, optimiser --------------------------------------------------------------------
    def load_policy(self, model_dir: str | Path, dtype: str, init_adapter: str | Path | None = None,
                    reference_adapter: bool = False, quantize: str = "none",
                    family: str | None = None) -> torch.nn.Module:
        """The transformer in `dtype` (frozen) with a trainable fp32 LoRA adapter named "default".

        `quantize` stores the frozen block weights in 8 or 4 bits (rlhf/lowmem.py); the LoRA trains on top and
        the reference (adapters off) runs on the same quantised weights. Single-process runs only.

        The adapter starts at zero, or from `init_adapter` (a previous round's adapter) when given. With
        `reference_adapter`, `init_adapter` is also attached, frozen, as the adapter "reference", so the
        reference model is "base + init adapter" instead of the base (see `reference_mode`). `family` names the
        model family (default: the one `model_dir`'s model_index.json names).
        """
        from diffusers.training_utils import cast_training_params
        from peft.utils import set_peft_model_state_dict

        from rlhf.lora import load_adapter, read_peft_weights
        from rlhf.models.family import family_for
        from rlhf.models.loader import load_model

        if quantize != "none" and self.accelerator.num_processes > 1:
            # DDP broadcasts, and FSDP/DeepSpeed shard, the frozen weights as plain tensors.
            raise UserError(f"quantize: {quantize} is supported in single-process runs only (one device: what "
                            f"it is for), not in this {self.accelerator.num_processes}-process {self.layout} launch")
        model_family = family_for(model_dir, family)
        if len(model_family.transformer_folders) > 1 and self.accelerator.num_processes > 1:
            # Checked before the (large) weights load. Each process sends its samples to the expert of their
            # sigma, so processes run different experts' blocks in a step: the experts' blocks have the same
            # shapes, so FSDP's per-block all-gathers and ZeRO's gradient buckets would pair one expert's weights
            # with the other's without an error, and DDP would wait for the gradients of an expert a process left
            # unused.
            raise UserError(f"{model_dir}: a two-expert {model_family.name} model trains in single-process launches "
                            f"only, not in this {self.accelerator.num_processes}-process {self.layout} launch (each "
                            f"process routes its samples to the expert of their timestep, so the processes' "
                            f"collectives would mix or miss the two experts' weights)")
        parts = load_model(model_dir, dtype=dtype, device=self.device, load_vae=False, load_text_encoders=False,
                           quantize=quantize, family=family)
        transformer = parts.transformer
        self.model_dir, self.base_identity = Path(model_dir), identity(model_dir, family)
        if self.lora.lora_targets is None:  # the family's default, resolved before any checkpoint records it
            self.lora.lora_targets = list(parts.family.lora_targets)
        if init_adapter is not None:
            check_adapter_base(init_adapter, model_dir, self.base_identity)
        add_lora(transformer, self.lora.lora_rank, self.lora.lora_alpha, self.lora.lora_dropout,
                 self.lora.lora_targets)
        if init_adapter is not None:
            weights = read_peft_weights(init_adapter)
            result = set_peft_model_state_dict(transformer, weights, adapter_name="default")
            if result.unexpected_keys or len(weights) != len(lora_state_dict(transformer)):
                raise UserError(f"{init_adapter}: its LoRA layout differs from lora_rank/lora_targets of this run")
        self.reference_adapter = reference_adapter
        if reference_adapter:
            if init_adapter is None:
                raise UserError("reference: 'init' needs an init_adapter (the previous round's adapter)")
            load_adapter(transformer, init_adapter, adapter_name="reference")
            transformer.set_adapters(["default"])
        mark_trainable(transformer)
        cast_training_params(transformer, dtype=torch.float32)
        if self.options.gradient_checkpointing:
            self.checkpoint_policy = self.options.checkpoint_policy
            if self.checkpoint_policy == "auto":  # full until the first step has measured the activations
                self.checkpoint_policy = "full"
                if not self.options.compile:  # the probe's hooks would run inside the compiled blocks
                    self.activation_probe = ActivationProbe(transformer)
            enable_checkpointing(transformer, self.checkpoint_policy)
        transformer.train()
        if self.options.compile:  # after checkpointing: the checkpoint calls the compiled blocks
            compiled = compile_blocks(transformer)
            self.compile_timer = CompileTimer().start()
            logger.info("compile: %d transformer blocks wrapped in torch.compile (compiled during the first steps, "
                        "logged as compile_seconds)", compiled)
        return transformer

    @contextlib.contextmanager
    def reference_mode(self) -> Iterator[torch.nn.Module]:
        """The reference model for the block: the policy with its trained adapter switched off (base), or
        switched to the frozen "reference" adapter. Run reference passes before the policy's forward."""
        model = self.unwrapped
        if self.reference_adapter:
            model.set_adapters(["reference"])
        else:
            model.disable_adapters()
        # peft flips requires_grad when it switches adapters. Keep the trained adapter's flags: FSDP2 picks
        # its gradient dtype from the trainable parameters at its first forward, which is this one.
        mark_trainable(model)
        try:
            yield model
        finally:
            if self.reference_adapter:
                model.set_adapters(["default"])
            else:
                model.enable_adapters()
            mark_trainable(model)

    def prepare(self, policy: torch.nn.Module) -> torch.nn.Module:
        """Build the optimiser and schedule, wrap for DDP/FSDP/DeepSpeed, and resume if asked.

        Returns the wrapped policy."""
        params = [p for p in policy.parameters() if p.requires_grad]
        o = self.options
        if o.use_8bit_adam:
            if self.layout != "replicated":
                # Its state is not sharded with the parameters, and this pairing is untested.
                raise UserError(f"use_8bit_adam: not supported with {self.layout} launches (ZeRO/FSDP shard the "
                                "optimiser state already); launch single-process or with DDP")
            try:
                import bitsandbytes as bnb
            except ImportError:
                raise UserError("use_8bit_adam: bitsandbytes is not installed (pip install bitsandbytes)") from None
            optimizer_cls = bnb.optim.AdamW8bit
        else:
            optimizer_cls = torch.optim.AdamW
        optimizer = optimizer_cls(params, lr=o.learning_rate, betas=(o.adam_beta1, o.adam_beta2),
                                  weight_decay=o.weight_decay, eps=o.adam_epsilon)
        # The scheduler is stepped by us once per optimiser step (accelerate would step it per process).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o))
        if self.layout == "deepspeed":
            self._configure_deepspeed()
        self.policy, self.optimizer = self.accelerator.prepare(policy, optimizer)
        # FSDP2 replaces the parameters by sharded ones: collect them again from the wrapped model.
        self.params = [p for p in self.unwrapped.parameters() if p.requires_grad]
        if o.resume_from:
            self._resume(o.resume_from)
        if o.log_utilisation and not o.compile:
            self.peak_flops, how = self._peak_flops()
            logger.info("utilisation: MFU / HFU against %.3g TFLOP/s (%s)", self.peak_flops / 1e12, how)
        # Only now, with every input checked, does the run directory get written to: locked first, so that a second
        # process training into it stops here instead of mixing two runs' checkpoints and metrics.
        self._lock()
        if self.is_main:
            if o.overwrite:
                self._set_aside_previous_run()
            self._remove_replaced_runs()
            self._truncate_metrics(self.step)
            self._remove_later_checkpoints(self.step)
            self.logs_dir.mkdir(parents=True, exist_ok=True)
        if o.report_to != "none":
            # Events a killed run logged after its checkpoint are purged, so each step is in tensorboard once.
            resumed = {"tensorboard": {"purge_step": self.step}} if o.resume_from and o.report_to == "tensorboard" \
                else {}
            self.accelerator.init_trackers("contentv-rlhf", init_kwargs=resumed)
        return self.policy

    def _lock(self) -> None:
        """Lock the run directory (main process), then check again that it may be trained into: a run may have
        finished there since `__init__` looked. Every process raises if the main one could not."""
        problem = None
        if self.is_main:
            try:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                lock_run_dir(self.output_dir)
                found = run_entries(self.output_dir)
                if found and not self.options.resume_from and not self.options.overwrite:
                    problem = (f"{self.output_dir}: a run was written here while this one started ({', '.join(found)}); "
                               "pass --resume-from latest to continue it or --overwrite to replace it")
            except UserError as err:
                problem = str(err)
        failed = self.accelerator.reduce(torch.tensor(float(problem is not None), device=self.device),
                                         reduction="sum").item()
        if failed:
            raise UserError(problem or f"{self.output_dir}: the main process could not lock the run directory")

    def _peak_flops(self) -> tuple[float, str]:
        """Peak FLOP/s of the step's compute dtype: autocast's, else that of the frozen base weights."""
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.options.mixed_precision)
        if dtype is None:
            dtype = next((p.dtype for p in self.unwrapped.parameters() if p.is_floating_point()), torch.float32)
        return peak_flops(self.device, dtype, (2048, 2048, 2048), seconds=0.5)

    # ---- utilisation -------------------------------------------------------------------------
    @contextlib.contextmanager
    def counting(self, kind: str = "step") -> Iterator[None]:
        """Around the work of one optimiser step (all its micro-batches) of a `kind` (steps of one kind do the
        same FLOPs: DPO's are all alike; a GRPO round's first step also samples). The first step of each kind
        runs under torch's FLOP counter; `end_step` then logs every step of that kind with its TFLOP and
        utilisation. That first step's own time includes the counter's overhead."""
        self.step_kind = kind
        with contextlib.ExitStack() as stack:
            if self.activation_probe is not None and not self.activation_probe.measured:
                stack.enter_context(self.activation_probe.measuring())
            if self.peak_flops is not None and kind not in self.step_flops:
                self.step_flops[kind] = stack.enter_context(count_flops(self.unwrapped))
            yield

    def _resolve_checkpointing(self) -> None:
        """checkpoint_policy auto, after the step that measured the activations: keep the fastest policy whose
        activations fit in the device's free memory now (rlhf/checkpointing.py), the same on every process."""
        probe = self.activation_probe
        if probe is None or not probe.measured:
            return
        self.activation_probe = None
        with self.accelerator.autocast():
            estimate = probe.measure()
        available = devices.available_memory_bytes(self.device)
        choice = choose_policy(estimate, available)
        # Every process runs the most frugal choice of any (their free memory may differ).
        level = torch.tensor([RESOLVED_POLICIES.index(choice)], device=self.device)
        choice = RESOLVED_POLICIES[int(self.accelerator.gather(level).max())]
        logger.info("checkpoint_policy auto: %s (one step's block activations: none %.3g GB, selective %.3g GB; "
                    "free memory %s)", choice, estimate.step_bytes("none") / 1e9, estimate.step_bytes("selective") / 1e9,
                    "unknown" if available is None else f"{available / 1e9:.3g} GB")
        if choice != self.checkpoint_policy:
            enable_checkpointing(self.unwrapped, choice)
            self.checkpoint_policy = choice
            self.step_flops.clear()  # the next step is counted again: its recompute changed

    def _utilisation_metrics(self, seconds: float) -> dict[str, float]:
        flops = self.step_flops.get(self.step_kind)
        if flops is None or self.peak_flops is None:
            return {}
        return {"model_tflop": flops.model / 1e12, "hardware_tflop": flops.hardware / 1e12,
                "mfu": utilisation(flops.model, seconds, self.peak_flops),
                "hfu": utilisation(flops.hardware, seconds, self.peak_flops)}

    def _set_aside_previous_run(self) -> None:
        """overwrite: move the old run's entries into one hidden directory (each move is a rename, so a kill
        leaves every entry either in place or set aside), to be deleted by `_remove_replaced_runs`."""
        old = [self.output_dir / name for name in RUN_ENTRIES + STAGING_ENTRIES]
        old = [path for path in old if path.exists() or path.is_symlink()]
        if not old:
            return
        aside = Path(tempfile.mkdtemp(prefix=REPLACED_PREFIX, dir=self.output_dir))
        for path in old:
            os.replace(path, aside / path.name)
        logger.info("overwrite: replacing the run in %s (%s)", self.output_dir, ", ".join(p.name for p in old))

    def _remove_replaced_runs(self) -> None:
        """Delete runs set aside by an overwrite (this one's, or a killed one's)."""
        if self.output_dir.is_dir():
            for aside in self.output_dir.glob(f"{REPLACED_PREFIX}*"):
                shutil.rmtree(aside, ignore_errors=True)

    def _remove_later_checkpoints(self, step: int) -> None:
        """Checkpoints of this run after `step` (where it continues) belong to the timeline it abandons: resuming
        from an older checkpoint, `latest` must not later pick one of them up (its steps were cut from the logs)."""
        if not self.checkpoints_dir.is_dir():
            return
        for later in sorted(self.checkpoints_dir.glob(f"{CHECKPOINT_PREFIX}*")):
            if later.name > f"{CHECKPOINT_PREFIX}{step:07d}":
                logger.info("removing %s: this run continues from step %d", later, step)
                # Renamed first: a kill during the deletion must not leave a partial step-* for `latest`.
                os.replace(later, self.checkpoints_dir / f".{later.name}{REMOVED_SUFFIX}")
        for removed in self.checkpoints_dir.glob(f".{CHECKPOINT_PREFIX}*{REMOVED_SUFFIX}"):
            shutil.rmtree(removed, ignore_errors=True)
        for unfinished in self.checkpoints_dir.glob(f".{CHECKPOINT_PREFIX}*.tmp"):  # a killed run's checkpoint
            shutil.rmtree(unfinished, ignore_errors=True)

    def _truncate_metrics(self, step: int) -> None:
        """Keep the metrics of steps before `step` (where this run starts), so that a run resumed after a kill
        logs each step once; a line torn by the kill is dropped. Rewritten atomically. The kept records seed
        `history`, so summary.json averages the same steps as an uninterrupted run."""
        path = self.logs_dir / METRICS_FILE
        if not path.exists():
            return
        io.remove_stale_temporaries(self.logs_dir)  # a rewrite the kill interrupted
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] < step:
                kept.append(record)
        io.write_text(path, "".join(io.dumps(record) + "\n" for record in kept))
        self.history = kept

    def _configure_deepspeed(self) -> None:
        """The DeepSpeed engine owns accumulation and clipping: give it this run's values."""
        o, plugin = self.options, self.accelerator.state.deepspeed_plugin
        config = plugin.deepspeed_config
        micro = getattr(self.config, "batch_size", 1)
        config["train_micro_batch_size_per_gpu"] = micro
        config["gradient_accumulation_steps"] = o.gradient_accumulation_steps
        config["train_batch_size"] = micro * o.gradient_accumulation_steps * self.accelerator.num_processes
        config["gradient_clipping"] = o.max_grad_norm
        config.setdefault("steps_per_print", 2**62)

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.policy)

    def steps(self) -> Iterator[int]:
        """Optimiser step indices still to run (after a resume, from the checkpoint's step), until max_steps or,
        with max_seconds, the step that ends past the time budget."""
        self.steps_done = self.step
        for step in range(self.step, self.options.max_steps):
            self.step = step
            yield step
            if self.out_of_time:
                logger.info("max_seconds: %.0f s spent after %d steps; training stops here",
                            seconds_since_command_start(), step + 1)
                break

    @contextlib.contextmanager
    def accumulation(self, last: bool) -> Iterator[None]:
        """Around a micro-batch's forward and backward: no gradient sync across processes unless `last`."""
        if self.layout == "deepspeed":
            # accelerate tells the engine whether this backward ends the accumulation (and steps).
            self.accelerator.sync_gradients = last
            try:
                yield
            finally:
                self.accelerator.sync_gradients = True
        elif last:
            yield
        else:
            with self.accelerator.no_sync(self.policy):
                yield

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss, scaled for gradient accumulation."""
        if self.layout == "deepspeed":
            # The engine divides by its gradient_accumulation_steps and steps the optimiser at the boundary.
            self.accelerator.backward(loss)
        else:
            self.accelerator.backward(loss / self.options.gradient_accumulation_steps)

    def optimizer_step(self, loss_is_finite: bool, batch_ids: list[str]) -> float | None:
        """Clip, step and schedule, unless any process saw a non-finite loss or gradient; returns the grad norm."""
        if self.layout == "deepspeed":
            # The engine has stepped already (in the last backward) or skipped a non-finite step itself.
            applied = not self.optimizer.step_was_skipped
            return self._after_step(applied, batch_ids, self.policy.get_global_grad_norm())
        finite = torch.tensor(float(loss_is_finite), device=self.device)
        grads_finite = all(torch.isfinite(sharding.local(p.grad)).all() for p in self.params if p.grad is not None)
        finite = self.accelerator.reduce(finite * float(grads_finite), reduction="sum")
        if finite.item() < self.accelerator.num_processes:
            self.optimizer.zero_grad(set_to_none=True)
            return self._after_step(False, batch_ids)
        grad_norm = None
        if self.options.max_grad_norm > 0:
            grad_norm = self.accelerator.clip_grad_norm_(self.params, self.options.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self._after_step(True, batch_ids, grad_norm)

    def _after_step(self, applied: bool, batch_ids: list[str], grad_norm: Any = None) -> float | None:
        if not applied:
            self.skipped_steps += 1
            self.nonfinite_in_row += 1
            logger.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", self.step,
                           self.nonfinite_in_row)
            if self.nonfinite_in_row >= self.options.max_nonfinite_steps:
                raise TrainingDiverged(
                    f"training stopped at step {self.step}: {self.nonfinite_in_row} consecutive non-finite "
                    f"losses (last batch: {', '.join(batch_ids[:6])}); lower learning_rate, check the inputs"
                )
            return None
        self.nonfinite_in_row = 0
        self.scheduler.step()
        if grad_norm is None:
            return None
        return float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)

    def end_step(self, step: int, totals: dict[str, float], finite: bool, batch_ids: list[str], started: float,
                 progress, shown: dict[str, str]) -> None:
        """After the micro-batches' backward passes: optimiser step, metrics, progress, checkpoint.

        `totals` are the step's metrics averaged over micro-batches; `shown` maps progress-bar labels to keys.
        """
        grad_norm = self.optimizer_step(finite, batch_ids)
        if grad_norm is not None:
            totals["grad_norm"] = grad_norm
        totals["step_seconds"] = time.perf_counter() - started
        totals["command_seconds"] = seconds_since_command_start()  # wall time from the command's start to here
        totals.update(self._utilisation_metrics(totals["step_seconds"]))
        if self.compile_timer is not None:  # the part of step_seconds spent compiling
            totals["compile_seconds"] = self.compile_timer.take()
        self.log(step, totals)
        self._resolve_checkpointing()
        progress.update(1)
        progress.set_postfix(**{label: totals[key] for label, key in shown.items()})
        self.steps_done = step + 1
        self.out_of_time = self._budget_spent()
        self.maybe_checkpoint(step)

    # ---- logging -----------------------------------------------------------------------------
    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Average `metrics` over processes; write metrics.jsonl and the trackers (main process)."""
        keys = sorted(metrics)
        values = torch.tensor([float(metrics[k]) for k in keys], device=self.device, dtype=torch.float64)
        values = self.accelerator.reduce(values, reduction="mean")
        record = {"step": step, **{k: float(v) for k, v in zip(keys, values.tolist(), strict=True)}}
        record["lr"] = self.scheduler.get_last_lr()[0]
        memory = devices.peak_memory_bytes(self.device)
        if memory is not None:
            record["peak_memory_gb"] = memory / 2**30
        self.history.append(record)
        change, self.unlogged_change = self.unlogged_change, None
        if not self.is_main or (step % self.options.log_every and change is None):
            return
        with io.writing(self.logs_dir / METRICS_FILE, "the metrics"), open(self.logs_dir / METRICS_FILE, "a") as fh:
            fh.write(io.dumps({**record, **({"changed_settings": change} if change else {})}) + "\n")
        if self.options.report_to != "none":
            self.accelerator.log(record, step=step)

    # ---- checkpoints -------------------------------------------------------------------------
    def _budget_spent(self) -> bool:
        """Whether max_seconds have passed; every process stops at the same step (the slowest decides)."""
        if self.options.max_seconds is None:
            return False
        spent = float(seconds_since_command_start() >= self.options.max_seconds)
        return self.accelerator.reduce(torch.tensor(spent, device=self.device), reduction="sum").item() > 0

    def maybe_checkpoint(self, step: int) -> None:
        """After optimiser step `step` (0-based) completed: checkpoint every `save_every` steps and after the
        last step (a run killed while writing its adapter resumes with nothing left to train)."""
        done, every = step + 1, self.options.save_every
        if done == self.options.max_steps or self.out_of_time or (every and done % every == 0) or self._timed(done):
            self.save_checkpoint(done)
            self.last_checkpoint_seconds = seconds_since_command_start()

    def _timed(self, done: int) -> bool:
        """Whether save_every_seconds have passed since the last checkpoint (or the command's start) at a step
        that ends a round; every process decides the same (the slowest's clock)."""
        every = self.options.save_every_seconds
        if every is None or done % self.round_steps[1]:
            return False
        due = float(seconds_since_command_start() - self.last_checkpoint_seconds >= every)
        return self.accelerator.reduce(torch.tensor(due, device=self.device), reduction="sum").item() > 0

    def local_parameter_bytes(self) -> int:
        """Bytes of model parameters this process holds (a shard of each under FSDP)."""
        from rlhf.lowmem import tensor_bytes

        return sum(tensor_bytes(sharding.local(p)) for p in self.unwrapped.parameters())

    def adapter_weights(self) -> dict[str, torch.Tensor]:
        """The trained adapter's full fp32 weights under peft's keys (collective; complete on rank 0)."""
        return peft_keys(sharding.gather_trainable(self.unwrapped, self.layout))

    def save_checkpoint(self, done: int) -> Path:
        """Adapter, optimiser, scheduler, per-rank RNG and counters, written atomically (tmp dir + rename). A failed
        write (full disk, permissions) removes the tmp dir and raises UserError naming the checkpoint and the cause;
        the run resumes from the previous checkpoint once the cause is fixed."""
        final = self.checkpoints_dir / f"{CHECKPOINT_PREFIX}{done:07d}"
        tmp = self.checkpoints_dir / f".{final.name}.tmp"
        try:
            with io.writing(final, "the checkpoint"):
                self._write_checkpoint(done, tmp, final)
        except BaseException:
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def _write_checkpoint(self, done: int, tmp: Path, final: Path) -> None:
        accelerator = self.accelerator
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        io.save_torch(tmp / f"rng_rank{accelerator.process_index}.pt",
                      {"cpu": torch.get_rng_state(), "accelerator": devices.rng_state(self.device)})
        weights = self.adapter_weights()
        if self.layout == "deepspeed":
            # Each rank writes its optimiser partition; the frozen base is not saved.
            self.policy.save_checkpoint(str(tmp / DEEPSPEED_DIR), tag="state", exclude_frozen_parameters=True)
            optimizer_state = None
        else:
            optimizer_state = sharding.gather_optimizer(self.unwrapped, self.optimizer.optimizer)
        if self.is_main:
            self._write_adapter(tmp / ADAPTER_DIR, weights)
            if optimizer_state is not None:
                io.save_torch(tmp / OPTIMIZER_FILE, optimizer_state)
            io.save_torch(tmp / "scheduler.pt", self.scheduler.state_dict())
            if self.trainer_tensors:
                io.save_tensors(tmp / TRAINER_TENSORS_FILE,
                                {k: v.detach().cpu().contiguous() for k, v in self.trainer_tensors.items()})
            io.write_json(tmp / "trainer_state.json", {
                "step": done, "nonfinite_in_row": self.nonfinite_in_row, "skipped_steps": self.skipped_steps,
                "num_processes": accelerator.num_processes, "layout": self.layout,
                "method": getattr(self.config, "method", None),
                "settings": trajectory_settings(self.config, self.inputs), "changed_settings": self.changed_settings,
            })
        accelerator.wait_for_everyone()
        if self.is_main:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in sorted(self.checkpoints_dir.glob(f"{CHECKPOINT_PREFIX}*"))[: -self.options.keep_last]:
                hidden = self.checkpoints_dir / f".{old.name}{REMOVED_SUFFIX}"
                os.replace(old, hidden)  # never a partial step-* dir, whenever a kill strikes
                shutil.rmtree(hidden)
            logger.info("checkpoint: %s", final)
        accelerator.wait_for_everyone()


    def _find_checkpoint(self, spec: str) -> Path | None:
        """The checkpoint to resume; None for 'latest' in a run killed before its first checkpoint."""
        if spec == "latest":
            found = sorted(self.checkpoints_dir.glob(f"{CHECKPOINT_PREFIX}*"))
            if found:
                return found[-1]
            if not holds_run(self.output_dir):  # likely a mistyped output_dir: do not start a new run there
                raise UserError(f"resume_from: no checkpoint found in {self.checkpoints_dir}")
            if self.is_main:
                logger.info("resume_from latest: %s has no checkpoint yet; starting again at step 0", self.output_dir)
            return None
        path = Path(spec)
        if not path.is_dir():
            raise UserError(f"resume_from: checkpoint directory {path} not found")
        return path

    def _resume(self, spec: str) -> None:
        from safetensors.torch import load_file

        path = self._find_checkpoint(spec)
        if path is None:
            return
        rank, processes = self.accelerator.process_index, self.accelerator.num_processes
        optimizer_file = DEEPSPEED_DIR if self.layout == "deepspeed" else OPTIMIZER_FILE
        required = ("trainer_state.json", "adapter/adapter_model.safetensors", optimizer_file, "scheduler.pt",
                    f"rng_rank{rank}.pt", *([TRAINER_TENSORS_FILE] if self.trainer_tensors else []))
        missing = [name for name in required if not (path / name).exists()]
        if missing:
            saved = (path / DEEPSPEED_DIR).is_dir() != (self.layout == "deepspeed")
            hint = " (DeepSpeed checkpoints resume only under DeepSpeed, and others not under it)" if saved else ""
            raise UserError(f"{path}: incomplete checkpoint ({', '.join(missing)} missing){hint}")
        state = {}
        try:
            state = json.loads((path / "trainer_state.json").read_text())
            self._check_same_settings(path, state)
            self._check_trajectory(path, state)
            if self.layout == "deepspeed" and state.get("num_processes") != processes:
                raise UserError(f"{path}: a DeepSpeed checkpoint of {state.get('num_processes')} processes "
                                f"cannot resume with {processes} (its optimiser state is partitioned)")
            weights = module_keys(load_file(str(path / "adapter" / "adapter_model.safetensors")))
            trainable = {name for name, p in self.unwrapped.named_parameters() if p.requires_grad}
            if set(weights) != trainable:
                raise ValueError("adapter weights do not match this run's LoRA configuration")
            if self.layout == "deepspeed":
                check_deepspeed_files(path / DEEPSPEED_DIR)
                loaded, _ = self.policy.load_checkpoint(str(path / DEEPSPEED_DIR), tag="state",
                                                        load_module_strict=False, load_lr_scheduler_states=False)
                if loaded is None:
                    raise ValueError("DeepSpeed found no state in it")
            else:
                optimizer_state = torch.load(path / OPTIMIZER_FILE, weights_only=True)
                sharding.load_trainable(self.unwrapped, weights, self.optimizer.optimizer, optimizer_state)
            self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
            # weights_only: a checkpoint from elsewhere must not run code while it loads (tensors and plain
            # containers only).
            rng = torch.load(path / f"rng_rank{rank}.pt", weights_only=True)
            if self.trainer_tensors:
                saved = load_file(str(path / TRAINER_TENSORS_FILE))
                if saved.keys() != self.trainer_tensors.keys() or any(
                        saved[k].shape != v.shape for k, v in self.trainer_tensors.items()):
                    raise ValueError(f"{TRAINER_TENSORS_FILE} does not match this run's trainer state")
                with torch.no_grad():
                    for key, tensor in self.trainer_tensors.items():
                        tensor.copy_(saved[key])
        except UserError:
            raise
        except Exception as err:  # torch/safetensors/json raise many types for a damaged file
            raise UserError(f"{path}: corrupt checkpoint ({one_line(err)})") from None
        if self.model_dir is not None:
            check_adapter_base(path / ADAPTER_DIR, self.model_dir, self.base_identity)
        if state.get("num_processes") != processes:
            logger.warning("resuming a %s-process checkpoint with %d processes: data order changes",
                           state.get("num_processes"), processes)
        torch.set_rng_state(rng["cpu"])
        devices.set_rng_state(self.device, rng["accelerator"])
        self.step = int(state["step"])
        setting, steps = self.round_steps
        if self.step % steps:  # refused here, before prepare writes to the run directory
            raise UserError(f"resume_from: the checkpoint is at step {self.step}, inside a round of {setting} {steps}; "
                            "resume with the run's own settings")
        self.nonfinite_in_row = int(state["nonfinite_in_row"])
        self.skipped_steps = int(state["skipped_steps"])
        if self.is_main:
            logger.info("resumed from %s at step %d", path, self.step)

    def _check_same_settings(self, path: Path, state: dict[str, Any]) -> None:
        """A checkpoint resumes only under the method and LoRA settings it was trained with: name the one that
        differs (otherwise the weights would not fit, or would silently mean something else)."""
        method = getattr(self.config, "method", None)
        if state.get("method") not in (None, method):
            raise UserError(f"{path}: the checkpoint was trained with method {state['method']}, this run has "
                            f"method {method}; resume with the checkpoint's settings or start a new run")
        config_path = path / ADAPTER_DIR / "adapter_config.json"
        saved = json.loads(config_path.read_text()) if config_path.exists() else {}
        for setting, key in SHAPE_SETTINGS.items():
            if key in saved and _setting_text(saved[key]) != _setting_text(getattr(self.lora, setting)):
                raise UserError(f"{path}: the checkpoint was trained with {setting} {_setting_text(saved[key])}, "
                                f"this run has {setting} {_setting_text(getattr(self.lora, setting))}; resume with "
                                "the checkpoint's settings or start a new run")

    def _check_trajectory(self, path: Path, state: dict[str, Any]) -> None:
        """A resume continues the checkpoint's trajectory: refuse another learning rate, beta, pairs dataset, ...
        (every recorded setting), naming each that differs, unless allow_changed_settings; then the change is
        recorded in the checkpoints, summary.json and the first resumed step's metrics record."""
        self.changed_settings = list(state.get("changed_settings") or [])
        saved = state.get("settings")
        if not isinstance(saved, dict):
            logger.warning("%s: the checkpoint records no settings (written by an older version), so a change of "
                           "learning rate, data or loss settings cannot be detected", path)
            return
        current = trajectory_settings(self.config, self.inputs)
        differing = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
        if not differing:
            return
        change = {k: {"checkpoint": saved.get(k), "now": current.get(k)} for k in differing}
        if not getattr(self.options, "allow_changed_settings", False):
            shown = "; ".join(f"{k} (checkpoint: {_shown(saved.get(k))}, now: {_shown(current.get(k))})"
                              for k in differing[:4])
            more = f" and {len(differing) - 4} more" if len(differing) > 4 else ""
            raise UserError(f"{path}: the checkpoint was trained with other settings: {shown}{more}; resume with the "
                            "checkpoint's settings, pass --allow-changed-settings to continue with these (recorded "
                            "in summary.json), or start a new run")
        logger.warning("resuming %s with changed settings: %s", path, ", ".join(differing))
        self.unlogged_change = change
        self.changed_settings.append({"step": int(state.get("step", 0)), "settings": change})

    def _write_adapter(self, adapter_dir: Path, weights: dict[str, torch.Tensor],
                       summary: dict[str, Any] | None = None) -> Path:
        """The adapter (peft + diffusers formats) with the base model's record and, for the final adapter, the
        training config and summary: assembled in a hidden sibling and renamed into place whole."""
        staging = adapter_dir.with_name(f".{adapter_dir.name}.staging")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            with io.writing(adapter_dir, "the adapter"):
                save_adapter(self.unwrapped, staging, state=weights)
                if self.base_identity is not None:
                    write_record(staging, self.base_identity)
                if summary is not None:
                    save_config(self.config, staging / "training_config.yaml")
                    io.write_json(staging / "summary.json", summary)
                if adapter_dir.exists():
                    shutil.rmtree(adapter_dir)
                staging.rename(adapter_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone after the rename; what a failed write left otherwise
        return adapter_dir

    # ---- the end -----------------------------------------------------------------------------
    def finish(self, summary: dict[str, Any]) -> Path:
        """Save the final adapter (peft + diffusers formats), the config and summary.json."""
        self.accelerator.wait_for_everyone()
        self._check_skipped()
        adapter_dir = self.output_dir / ADAPTER_DIR
        weights = self.adapter_weights()
        if self.is_main:
            self._write_adapter(adapter_dir, weights, summary)
            last = self.history[-10:]
            keys = sorted({k for record in last for k in record} - {"step"})
            # Over the finite numbers only: a skipped step's NaN loss (null once read back from metrics.jsonl) would
            # make the whole mean NaN; a resume's changed_settings record is no metric.
            averaged = {k: sum(v) / len(v) for k in keys if (v := [r[k] for r in last if _finite_number(r.get(k))])}
            io.write_json(self.output_dir / "summary.json", {
                **summary, "steps": self.options.max_steps, "steps_done": self.steps_done,
                "stopped_by_max_seconds": self.out_of_time, "skipped_steps": self.skipped_steps,
                "last_10_steps_mean": averaged, "adapter": str(adapter_dir),
                "layout": self.layout, "num_processes": self.accelerator.num_processes,
                "rank0_parameter_bytes": self.local_parameter_bytes(),
                "rank0_optimizer_bytes": sharding.local_optimizer_bytes(self.optimizer),
                "checkpoint_policy": self.checkpoint_policy, "changed_settings": self.changed_settings,
                **({"compile_seconds": self.compile_timer.seconds} if self.compile_timer else {}),
            })
        if self.compile_timer is not None:
            self.compile_timer.stop()
        release_run_locks()
        # No rank tears the process group down while another still works in it (gloo aborts on that).
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return adapter_dir

    def _check_skipped(self) -> None:
        """A run whose steps were mostly skipped as non-finite trained nothing worth an adapter: it ends with exit 2
        and no adapter instead of an untrained one (every process decides alike: the skips are agreed on)."""
        done, skipped, limit = self.steps_done, self.skipped_steps, self.options.max_skipped_fraction
        if done and (skipped == done or skipped > limit * done):
            raise TrainingDiverged(
                f"training ended with {skipped} of {done} steps skipped as non-finite (more than "
                f"max_skipped_fraction {limit:g} of them); no adapter written: lower learning_rate, beta or "
                "lora_alpha, or check the inputs")


class BareRun:
    """The parts of `TrainingRun` that the step functions (`dpo_step`, `reward_gradient_step`) read, around a
    model the caller built and wrapped with LoRA, without accelerate or a run directory: for the benchmarks and
    tests that time or check one step."""

    def __init__(self, model: torch.nn.Module, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
        self.policy = self.unwrapped = model
        self.device = torch.device(device)
        self.reference_adapter = False
        self.accelerator = _Autocast(self.device, dtype)

    reference_mode = TrainingRun.reference_mode


class _Autocast:
    """`accelerator.autocast()` of a `BareRun`: mixed precision in `dtype` on `device`."""

    def __init__(self, device: torch.device, dtype: torch.dtype | None):
        self.device, self.dtype = device, dtype

    def autocast(self) -> contextlib.AbstractContextManager:
        return devices.autocast(self.device, self.dtype)
