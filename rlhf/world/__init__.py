"""The shapes world: a procedural text-to-video world with a pretrained generator, learned rewards and an oracle.

- `scene`: colours, shapes, directions, prompts, the held-out combinations, the renderer;
- `oracle`: reads colour, shape, direction and cleanliness off a clip's frames (the ground truth);
- `metrics`: the oracle as a scorer (`world_oracle`) for `eval`'s ground-truth metrics;
- `degrade`: spoilt renders, to teach the quality reward;
- `pretrain`: trains the generator (ContentV's classes and layout) and the rewards from a seed.

The trained weights ship under `weights/` (installed with the package): `MODEL_DIR` is a ContentV-layout
checkpoint loaded by the same code as ContentV-8B; `CLIP_DIR` an open_clip `local-dir:` folder;
`AESTHETIC_HEAD` a head in the LAION improved-predictor layout.
"""

from pathlib import Path

WEIGHTS = Path(__file__).resolve().parent / "weights"
MODEL_DIR = WEIGHTS / "model"
CLIP_DIR = WEIGHTS / "rewards" / "clip"
AESTHETIC_HEAD = WEIGHTS / "rewards" / "aesthetic_head.pth"
PRETRAIN_LOG = WEIGHTS / "pretrain_log.json"
