"""Which scorer class a config name picks: a plain `{name: "module:Class"}` mapping, imported lazily.

A config entry is either a name from `SCORERS` or names its class explicitly with
`class: "package.module:ClassName"`, a subclass of `rewards.base.Scorer` importable from `sys.path`.
Nothing here imports torch, so config loading (and `--help`) stays fast until a scorer is used.
"""

from __future__ import annotations

import difflib
import importlib

from rlhf.errors import UserError

SCORERS: dict[str, str] = {
    "clip": "rewards.clip:ClipScorer",
    "aesthetic": "rewards.aesthetic:AestheticScorer",
    "motion": "rewards.motion:MotionScorer",
    "consistency": "rewards.consistency:ConsistencyScorer",
    "brightness": "rewards.analytic:BrightnessScorer",
    "contrast": "rewards.analytic:ContrastScorer",
    "colorfulness": "rewards.analytic:ColorfulnessScorer",
    "frame_diff_motion": "rewards.analytic:FrameDiffMotionScorer",
    "vlm_judge": "rewards.vlm_judge:VlmJudgeScorer",
    "videoreward": "rewards.videoreward:VideoRewardScorer",
    "world_oracle": "rlhf.world.metrics:OracleScorer",  # ground truth of the shapes world (eval only)
}


def scorer_class(spec: str, source: str = "rewards.scorers") -> type:
    """The Scorer subclass for a registry name or a `module:Class` path; UserErrors name `source`."""
    if ":" not in spec:
        if spec not in SCORERS:
            close = difflib.get_close_matches(spec, SCORERS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UserError(f"{source}: unknown scorer {spec!r}; {hint}known scorers: {', '.join(SCORERS)} "
                            "(or give class: 'package.module:ClassName' for your own)")
        spec = SCORERS[spec]
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name.isidentifier():
        raise UserError(f"{source}: class {spec!r} should look like 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"{source}: cannot import module {module_name!r} for class {spec!r} ({err}); "
                        "is its package installed or on PYTHONPATH?") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise UserError(f"{source}: module {module_name!r} has no attribute {class_name!r} (class {spec!r})")
    from rewards.base import Scorer

    if not (isinstance(cls, type) and issubclass(cls, Scorer)):
        raise UserError(f"{source}: {spec!r} is not a subclass of rewards.base.Scorer")
    return cls
