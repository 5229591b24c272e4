"""Where a command writes: one set of rules for the output of every command, checked before any work.

1. A symlinked output is resolved first: the checks below and any replacement act on the real path, and a
   replacement never follows a link into `rmtree`.
2. An output may not be, lie inside, or contain any of the command's inputs (a model, an adapter, a store,
   pairs, a prompt or rewards file): writing it would destroy what the command reads.
3. It must be creatable and writable (`io.output_path_problem`).
4. An existing output is replaced only with `--overwrite`, and only when it holds this command's own kind of
   output, recognised by its manifest file (`OutputKind`); anything else is refused, with `--overwrite` or not.
   A kind that shares its folder with other files (a training run) instead refuses a folder holding one of its
   entries without being its kind: the run would write over it.

Folder outputs other than resumable ones are built in a hidden staging sibling (`.<out>.<random>.partial`,
with a `.owner` file naming the pid and host that build it) and renamed into place whole (`staged_dir`); the
next run into the same output deletes the staging a killed run left (`remove_stale_staging`). A file output's
killed writer leaves `.<stem>.tmp-<pid><suffix>` (rlhf/io.py), removed by `remove_stale_temporaries_of`.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from rlhf.errors import UserError
from rlhf.io import TMP_MARKER, output_path_problem, writing

logger = logging.getLogger("contentv-rlhf")
STAGING_SUFFIXES = (".partial", ".old")  # our temporary siblings of an output: being built, set aside
OWNER_SUFFIX = ".owner"  # beside each of them: {"pid", "host"} of the process that made it
InputPaths = Mapping[str, "str | os.PathLike | Iterable[str | os.PathLike] | None"]


def _is_mp4(path: Path) -> bool:
    with open(path, "rb") as file:
        return file.read(8)[4:8] == b"ftyp"  # the ISO base media file's first box


def _is_report(path: Path) -> bool:
    with open(path, "rb") as file:
        return b"<title>contentv-rlhf report" in file.read(4096)


def _is_training_run(path: Path) -> bool:
    # rlhf/training.py's names (not imported: it pulls in torch): checkpoints/step-NNNNNNN/trainer_state.json.
    return (path / "logs").exists() or any((path / "checkpoints").glob("step-*/trainer_state.json"))


@dataclass(frozen=True)
class OutputKind:
    """What a command writes, and how an existing output of that kind is recognised.

    A kind is recognised by `recognise(path)` where given, which `manifest` then describes; otherwise (folders
    only) by its manifest files, all present. `entries` (shared-folder kinds only): the names the command writes
    into a folder that may hold other files.
    """

    noun: str
    manifest: tuple[str, ...]
    folder: bool = True
    entries: tuple[str, ...] = ()
    recognise: Callable[[Path], bool] | None = None

    def held_by(self, path: Path) -> bool:
        if self.recognise is None:
            return self.folder and all((path / name).exists() for name in self.manifest)
        try:
            return self.recognise(path)
        except OSError:
            return False

    @property
    def manifest_text(self) -> str:
        return " and ".join(self.manifest)


ROLLOUT_STORE = OutputKind("a rollout store", ("store.json",))
# summary.json alone would also match a training run: the dataset's own file tells them apart.
PAIRS_DATASET = OutputKind("a pairs dataset", ("summary.json", "dataset_info.json"))
MODEL = OutputKind("a model checkpoint", ("model_index.json",))
EVAL_RESULTS = OutputKind("an eval", ("eval.json",))
# A run writes logs/ before its first step; its lock file and set-aside runs are hidden, and its own. A folder
# holding only checkpoints our trainer wrote (one copied out of a run, to continue it there) is a run too.
TRAINING_RUN = OutputKind("a training run", ("logs or a checkpoint's trainer_state.json",),
                          entries=("adapter", "checkpoints", "logs", "summary.json"), recognise=_is_training_run)
ONLINE_RUN = OutputKind("an online run", ("rounds.json",), entries=("rounds.json",))
VIDEO = OutputKind("an mp4 video", ("an mp4 header",), folder=False, recognise=_is_mp4)
REPORT = OutputKind("a contentv-rlhf report", ("a report title",), folder=False, recognise=_is_report)


def _paths(value: str | os.PathLike | Iterable[str | os.PathLike] | None) -> list[Path]:
    if value is None or value == "":
        return []
    if isinstance(value, str | os.PathLike):
        return [Path(value)]
    return [Path(v) for v in value if v]


def resolved(path: str | os.PathLike) -> Path:
    """`path` absolute with every symlink resolved (also where it does not exist yet)."""
    return Path(os.path.realpath(os.path.expanduser(path)))


def input_clash(out: Path, inputs: InputPaths) -> str | None:
    """How the resolved output `out` would overwrite one of `inputs` (name -> path(s)), or None."""
    for name, value in inputs.items():
        for path in _paths(value):
            source = resolved(path)
            if source == out:
                relation = "be"
            elif out in source.parents:
                relation = "contain"
            elif source in out.parents:
                relation = "lie inside"
            else:
                continue
            return f"must not {relation} the {name} {path} (an input of this command)"
    return None


def check_output(path: str | os.PathLike, *, field: str, kind: OutputKind, inputs: InputPaths,
                 overwrite: bool, resumable: bool = False) -> Path:
    """Check an output path by the rules of the module docstring; returns it resolved.

    `field` names the output in messages ("field 'out'", "--out"). With `resumable`, an existing output of the
    command's kind is left for the command to resume (it checks its settings); otherwise it is refused without
    `overwrite`. Raises UserError naming the output and what is wrong.
    """
    out = resolved(path)
    shown = f"{field} {path}" + (f" (-> {out})" if Path(path).is_symlink() else "")
    if problem := input_clash(out, inputs):
        raise UserError(f"{shown} {problem}")
    if problem := output_path_problem(out, "dir" if kind.folder else "file"):
        raise UserError(f"{field} {problem}")
    if not out.exists() or (kind.folder and not any(out.iterdir())):
        return out
    if kind.held_by(out):
        if not overwrite and not resumable:
            raise UserError(f"{shown} already holds {kind.noun}; pass --overwrite to replace it")
        return out
    if kind.entries:
        found = [name for name in kind.entries if (out / name).exists()]
        if found:
            raise UserError(f"{shown} holds {', '.join(found)} but is not {kind.noun} (no {kind.manifest_text}); "
                            f"choose another output: {kind.noun} would write over it")
        return out
    raise UserError(f"{shown} exists and is not {kind.noun} (no {kind.manifest_text}); choose another output: "
                    f"--overwrite replaces only {kind.noun}")


# ---- staging ---------------------------------------------------------------------------------------------


def make_owned_dir(out: Path, suffix: str) -> Path:
    """A new hidden sibling of `out` (`.<out>.<random><suffix>`) with its owner file beside it."""
    made = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=suffix, dir=out.parent))
    owner = made.with_name(made.name + OWNER_SUFFIX)
    owner.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    return made


def remove_owned_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.with_name(path.name + OWNER_SUFFIX).unlink(missing_ok=True)


def process_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_staging(out: Path) -> list[Path]:
    """Delete the staging and set-aside directories of `out` that a killed run left; returns them.

    Only directories named as ours (`.<out>.<random>.partial` / `.old`) are considered, and of those only the
    ones with an owner file naming a process that is not running on this host (a run in progress is left
    alone), or empty ones (a kill between creating the directory and its owner file). Orphaned owner files
    go too."""
    removed: list[Path] = []
    if not out.parent.is_dir():
        return removed
    # tempfile.mkdtemp's names: the prefix, 8 random characters, the suffix.
    ours = re.compile(rf"\.{re.escape(out.name)}\.[a-z0-9_]{{8}}({'|'.join(map(re.escape, STAGING_SUFFIXES))})"
                      rf"({re.escape(OWNER_SUFFIX)})?")
    for path in sorted(p for p in out.parent.glob(f".{glob.escape(out.name)}.*") if ours.fullmatch(p.name)):
        if path.suffix == OWNER_SUFFIX:
            if not path.with_suffix("").exists():
                path.unlink(missing_ok=True)
            continue
        if path.suffix not in STAGING_SUFFIXES or path.is_symlink() or not path.is_dir():
            continue
        owner_file = path.with_name(path.name + OWNER_SUFFIX)
        if not owner_file.is_file():
            with contextlib.suppress(OSError):
                path.rmdir()  # only if empty: an unmarked directory with content may not be ours
                removed.append(path)
            continue
        try:
            owner = json.loads(owner_file.read_text())
        except (OSError, ValueError):
            owner = {}
        if isinstance(owner, dict) and owner.get("host") == socket.gethostname() and process_alive(owner.get("pid")):
            continue
        remove_owned_dir(path)
        removed.append(path)
    for path in removed:
        logger.info("removed %s, left by an interrupted run into %s", path, out)
    return removed


def move_into_place(staging: Path, out: Path) -> None:
    """Rename the built `staging` directory to `out`, replacing what is there (checked by `check_output`)."""
    if out.is_dir() and any(out.iterdir()):
        # rename() cannot replace a non-empty directory: move the old one aside, rename, then delete it.
        old = make_owned_dir(out, ".old")
        os.replace(out, old / out.name)
        try:
            os.replace(staging, out)
        except BaseException:
            os.replace(old / out.name, out)  # the old output back where it was
            raise
        finally:
            remove_owned_dir(old)
    else:
        os.replace(staging, out)  # replaces an empty directory
    staging.with_name(staging.name + OWNER_SUFFIX).unlink(missing_ok=True)


@contextlib.contextmanager
def staged_dir(out: Path, what: str) -> Iterator[Path]:
    """Yield a staging directory to build the folder output `out` in; on success it replaces `out` whole.

    A killed run's staging is removed first; on any error this one is removed, and a failed write (full disk,
    no permission, read-only file system) becomes a UserError naming `out` and the cause. `what` completes
    "writing ... failed" ("the pairs dataset").
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    staging: Path | None = None
    try:
        with writing(out, what):
            staging = make_owned_dir(out, ".partial")
            os.chmod(staging, 0o755)  # mkdtemp makes it owner-only; the output should read like any other
            yield staging
            move_into_place(staging, out)
    finally:
        if staging is not None:
            remove_owned_dir(staging)


def remove_stale_temporaries_of(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary siblings of the file output `path` (`.<stem>.tmp-<pid><suffix>`, rlhf/io.py) whose
    writer is no longer running; returns them."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(path.stem)}{re.escape(TMP_MARKER)}(\d+){re.escape(path.suffix)}")
    removed = []
    for sibling in path.parent.glob(f".{glob.escape(path.stem)}{TMP_MARKER}*"):
        match = pattern.fullmatch(sibling.name)
        if match and sibling.is_file() and not process_alive(int(match.group(1))):
            sibling.unlink(missing_ok=True)
            removed.append(sibling)
    for sibling in removed:
        logger.info("removed %s, left by an interrupted run", sibling)
    return removed
