"""`contentv-rlhf compare`: a local web page that shows the base model and LoRA adapters side by side."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import logging
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf.config import ConfigError, add_config_arguments, config_from_args, option
from rlhf.errors import UserError
from rlhf.options import ModelOptions, VideoOptions, in_range

if TYPE_CHECKING:
    from rewards.config import RewardsConfig

logger = logging.getLogger("contentv-rlhf")
HELP = ("Serve a local page (Gradio) where a prompt and a seed give the base model's and each adapter's video "
        "side by side, from the same noise, with reward scores under each.")
EXAMPLES = """\
  pip install -e '.[app]'    # Gradio, once
  contentv-rlhf compare --config configs/world/compare.yaml --adapter quickstart-out/train/adapter
  contentv-rlhf compare --model /models/ContentV-8B --adapter runs/dpo-r0/adapter --adapter runs/grpo-r0/adapter \\
      --rewards configs/rewards.yaml --frames 49 --steps 30 --port 7861
  # then open http://127.0.0.1:7860/ (or the --port given); Ctrl-C stops the server
"""
MAX_PORT = 65535
INSTALL_HINT = "pip install -e '.[app]'"


@dataclass
class CompareConfig(ModelOptions, VideoOptions):
    """`compare`: the model and sampling sections plus the adapters, the rewards and the page's port."""

    # Every adapter of `adapters` gets its own column: ModelOptions' single adapter is no option here (init=False
    # keeps it out of __init__, the YAML keys and the flags), and the text encoders stay for the next prompt.
    adapter: str | None = dataclasses.field(default=None, init=False)
    adapter_scale: float = dataclasses.field(default=1.0, init=False)
    free_text_encoders: bool = dataclasses.field(default=False, init=False)
    adapters: list[str] = option([], "LoRA adapter directories shown beside the base model, in this order "
                                     "(on the command line: repeat --adapter DIR, or --adapters A,B).")
    rewards: str | None = option(None, "Rewards YAML (the `score` command's format): each reward's score and "
                                       "their weighted sum are shown under every video. None: videos only.")
    prompt: str = option("", "Example prompt the page's prompt box starts with (a real value, sent as typed); "
                             "empty: an empty box with a hint.")
    port: int = option(7860, f"Port of the page, served on 127.0.0.1 only (1..{MAX_PORT}; must be free).")

    def __post_init__(self) -> None:
        ModelOptions.__post_init__(self)
        VideoOptions.__post_init__(self)
        if not self.adapters:
            raise ConfigError("adapters", "needs at least one LoRA adapter directory (--adapter DIR)")
        in_range("port", self.port, 1, MAX_PORT)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, CompareConfig)
    parser.add_argument("--adapter", action="append", dest="adapter_dirs", metavar="DIR",
                        help="A LoRA adapter directory (peft or diffusers format) to show beside the base model; "
                             "repeat for several (replaces the config's `adapters`).")


def port_problem(port: int) -> str | None:
    """Why the page cannot be served on 127.0.0.1:`port` (None when the port is free)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is free
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as err:
            return f"cannot be served on 127.0.0.1:{port} ({err.strerror or err}); pick another --port"
    return None


def check_inputs(config: CompareConfig) -> RewardsConfig | None:
    """Everything that can be checked before a model is loaded; returns the parsed rewards config (or None)."""
    from rewards.config import load_rewards_config
    from rlhf.base_model import check_adapter_base
    from rlhf.lora import DIFFUSERS_WEIGHTS, PEFT_CONFIG, PEFT_WEIGHTS
    from rlhf.models.loader import check_model_dir

    check_model_dir(config.model, family=config.family)
    for path in config.adapters:
        adapter = Path(path)
        if not adapter.is_dir():
            raise UserError(f"{path}: adapter directory not found")
        if not ((adapter / PEFT_CONFIG).is_file() and (adapter / PEFT_WEIGHTS).is_file()
                or (adapter / DIFFUSERS_WEIGHTS).is_file()):
            raise UserError(f"{path}: no LoRA adapter found (expected {PEFT_CONFIG} + {PEFT_WEIGHTS}, "
                            f"or {DIFFUSERS_WEIGHTS})")
        check_adapter_base(path, config.model, family=config.family)  # an adapter trained on another base is refused now
    rewards = load_rewards_config(config.rewards, "rewards") if config.rewards else None
    if problem := port_problem(config.port):
        raise UserError(f"port {config.port} {problem}")
    if importlib.util.find_spec("gradio") is None:
        raise UserError(f"the compare page needs Gradio, an optional extra: {INSTALL_HINT}")
    return rewards


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Stop on SIGTERM as on Ctrl-C, so the server closes and the temporary videos are removed."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args: argparse.Namespace) -> int:
    if args.adapter_dirs:
        if hasattr(args, "adapters"):
            raise UserError("give the adapters with --adapter (repeated) or with --adapters, not both")
        args.adapters = list(args.adapter_dirs)  # a list: no splitting at commas inside a path
    config = config_from_args(CompareConfig, args)
    rewards = check_inputs(config)

    from rlhf.compare import Comparer, disable_telemetry, serve

    disable_telemetry()
    start = time.perf_counter()
    logger.info("compare: loading %s with %d adapter(s)%s", config.model, len(config.adapters),
                f" and the rewards of {config.rewards}" if rewards else "")
    with tempfile.TemporaryDirectory(prefix="contentv-compare-") as out, sigterm_as_interrupt():
        comparer = Comparer(config, rewards, out)
        logger.info("compare: ready in %.1fs", time.perf_counter() - start)
        serve(comparer, config.port)
    return 0
