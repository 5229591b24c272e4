"""`contentv-rlhf` command-line entry point.

Each subcommand lives in `rlhf/commands/<name>.py` and exposes `HELP`, `EXAMPLES`, `add_arguments(parser)`
and `run(args) -> int`. Command modules import torch/diffusers only inside `run`, so `--help` is instant.
Bad input (`UserError`) is printed as one line and exits with status 2; no traceback, no partial output.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import importlib
import logging
import os
import sys

from rlhf import __version__
from rlhf.errors import UserError, one_line, write_failure

# Command name -> module, in the order of the pipeline.
COMMANDS = {
    "quickstart": "rlhf.commands.quickstart",
    "tiny-model": "rlhf.commands.tiny_model",
    "generate": "rlhf.commands.generate",
    "rollout": "rlhf.commands.rollout",
    "score": "rlhf.commands.score",
    "reward-server": "rlhf.commands.reward_server",
    "pairs": "rlhf.commands.pairs",
    "train": "rlhf.commands.train",
    "online": "rlhf.commands.online",
    "merge": "rlhf.commands.merge",
    "eval": "rlhf.commands.eval",
    "compare": "rlhf.commands.compare",
    "report": "rlhf.commands.report",
}


# OS errors that say the machine's state stopped a write (space, quotas, permissions, a read-only mount), not that
# the program is wrong: reported like bad input. Writers remove their staging in their own finally blocks.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
# Loggers of this tool; the root logger (libraries that log through it, e.g. open_clip) stays at WARNING.
OWN_LOGGERS = ("contentv-rlhf", "rlhf", "rewards", "rollouts", "dpo")
_running = 0  # commands running in this process: quickstart and online run their stages through `main`
VERBOSE_HELP = ("Show debug logs of this tool and the info and debug logs of its libraries (by default only their "
                "warnings and errors, e.g. no `INFO root:` lines of open_clip).")
MAX_ERROR_LINE = 2000  # characters of an error line: values inside it are quoted shorter (rlhf.errors.quote)


def environment_problem(err: OSError) -> str | None:
    """One line for an OSError caused by the machine (see ENVIRONMENT_ERRNOS, or no usable temporary directory),
    None for any other (a bug: it keeps its traceback)."""
    if err.errno in ENVIRONMENT_ERRNOS:
        where = err.filename if err.filename is not None else "writing"
        return f"{where}: {write_failure(err)}"
    if isinstance(err, FileNotFoundError) and "No usable temporary directory" in str(err):
        return f"no usable temporary directory; set TMPDIR to a writable folder ({one_line(err, 200)})"
    return None


def shortened(message: str) -> str:
    return message if len(message) <= MAX_ERROR_LINE else message[: MAX_ERROR_LINE - 3] + "..."


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (exit 2) that points at --help instead of dumping the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def unknown_flags_message(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """One line for arguments `parser` does not know, suggesting the nearest flag for each mistyped one
    (as unknown config keys suggest the nearest field)."""
    known = [flag for action in parser._actions for flag in action.option_strings]
    parts, after_flag = [], False
    for extra in extras:
        name = extra.partition("=")[0]
        if not name.startswith("-") or name == "-":
            if not after_flag:  # a value right after an unknown flag is taken to be that flag's
                parts.append(f"unexpected argument {extra!r}")
            after_flag = False
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        parts.append(f"unknown flag {name}" + (f" (did you mean {close[0]}?)" if close else ""))
        after_flag = "=" not in extra
    return "; ".join(parts)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="contentv-rlhf",
        description="Preference post-training (Flow-DPO, reward gradients) for ContentV and other "
        "flow-matching video DiTs, with automatic rewards.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help=VERBOSE_HELP)
    parser.commands = {}  # name -> its sub-parser
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(
            name,
            help=module.HELP.replace("%", "%%"),  # argparse %-formats help strings, not descriptions
            description=module.HELP,
            epilog="examples:\n" + module.EXAMPLES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        # Also after the command; SUPPRESS keeps a `-v` given before it.
        sub.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
        sub.set_defaults(run=module.run)
        parser.commands[name] = sub
    return parser


def configure_logging(verbose: bool = False) -> None:
    """This tool's INFO lines; only warnings and errors of libraries (open_clip's `INFO root:` lines, ...), unless
    `verbose`: then DEBUG for everything."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.DEBUG if verbose else logging.WARNING)  # also when already configured
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        # Library chatter (deprecation notes, "weights not initialised" on tiny models) hides our output.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        if "datasets" in sys.modules:  # imported earlier in this process: the variable is read at import only
            sys.modules["datasets"].disable_progress_bars()
        for name in ("diffusers", "transformers", "peft", "accelerate", "httpx", "urllib3"):
            logging.getLogger(name).setLevel(logging.ERROR)
        # Per-component "Loading weights" bars drown the tool's own progress bars.
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    # Never reach for a hub: every model comes from a local path.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    from rlhf.clock import mark_command_start

    mark_command_start()  # the origin of max_seconds: loading, calibration and data all count
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:  # argparse would say only "unrecognized arguments", with the top-level usage
        command = getattr(args, "command", None)
        sub = parser.commands.get(command) if command else parser
        sub.error(unknown_flags_message(sub, extras))
    args.argv = argv  # commands that relaunch themselves (torchrun) reuse the original arguments
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    global _running
    if not _running:  # a stage run inside another command (quickstart, online) keeps that command's logging
        configure_logging(args.verbose)
    _running += 1
    try:
        return int(args.run(args) or 0)
    except UserError as err:
        print(f"contentv-rlhf {args.command}: error: {shortened(str(err))}", file=sys.stderr)
        return 2
    except OSError as err:
        if (problem := environment_problem(err)) is None:
            raise
        print(f"contentv-rlhf {args.command}: error: {shortened(problem)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"contentv-rlhf {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        _running -= 1


if __name__ == "__main__":
    sys.exit(main())
