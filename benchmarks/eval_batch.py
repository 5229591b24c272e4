"""`eval` wall time against its `batch_size`: the shipped world eval (configs/world/eval.yaml) end to end.

Runs `run_eval` (model and reward loading, sampling with batched CFG, decoding, the trained, held-out and
ground-truth scorers, mp4s for the report, the statistics) once per batch size on the same prompts and seeds,
with one candidate adapter (a LoRA whose update is zero: the candidate samples as much as a trained one), and
prints per batch size the seconds, videos per second (base and candidate videos both count) and the speed-up
over batch size 1. It also checks that the scores do not depend on the batch size (largest difference).

    python benchmarks/eval_batch.py [--prompts 16] [--seeds 4] [--batch-sizes 1,4,16,64] [--record]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import emit_rows  # noqa: E402

WORLD_EVAL = ROOT / "configs" / "world" / "eval.yaml"


def zero_adapter(model: str, out: Path) -> str:
    """A rank-4 LoRA on the world transformer with its initial (zero) update, saved as an adapter."""
    from rlhf.lora import add_lora, save_adapter
    from rlhf.models.loader import load_model

    transformer = load_model(model, dtype="fp32", load_vae=False, load_text_encoders=False).transformer
    add_lora(transformer, rank=4, alpha=4)
    return str(save_adapter(transformer, out))


def eval_config(work: Path, adapter: str, prompts: list[str], args: argparse.Namespace, batch_size: int) -> Any:
    from rlhf.evaluation import EvalConfig

    settings = yaml.safe_load(WORLD_EVAL.read_text())
    settings = {key: str(ROOT / value) if key in ("model", "rewards", "held_out_rewards", "ground_truth")
                else value for key, value in settings.items() if key != "prompts"}
    prompt_file = work / "prompts.txt"
    prompt_file.write_text("".join(f"{prompt}\n" for prompt in prompts))
    settings.update(prompts=str(prompt_file), adapters=[adapter], seeds=args.seeds, device=args.device,
                    out=str(work / f"eval_b{batch_size}"), batch_size=batch_size, save_videos=1)
    return EvalConfig(**settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16, help="first N prompts of the eval config's prompt file")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per prompt")
    parser.add_argument("--batch-sizes", default="1,4,16,64", help="comma-separated eval batch sizes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--note", default="", help="measurement conditions, recorded with every row "
                        "(e.g. 'measured under load (another job running)')")
    parser.add_argument("--record", action="store_true", help="append the rows to benchmarks/RESULTS.md")
    args = parser.parse_args()

    import numpy as np
    import torch

    from rlhf.cli import configure_logging
    from rlhf.evaluation import run_eval

    configure_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = yaml.safe_load(WORLD_EVAL.read_text())
    prompts = (ROOT / settings["prompts"]).read_text().split("\n")
    prompts = [line for line in prompts if line.strip()][: args.prompts]
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    started = time.perf_counter()
    rows, first_scores = [], None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        adapter = zero_adapter(str(ROOT / settings["model"]), work / "adapter")
        for batch_size in batch_sizes:
            config = eval_config(work, adapter, prompts, args, batch_size)
            start = time.perf_counter()
            result = run_eval(config)
            seconds = time.perf_counter() - start
            scores = np.array([result["scores"][model][reward] for model in sorted(result["scores"])
                               for reward in sorted(result["scores"][model])])
            first_scores = scores if first_scores is None else first_scores
            videos = 2 * len(prompts) * args.seeds  # base and candidate
            rows.append({
                "benchmark": "eval_batch", "batch_size": batch_size, "videos": videos,
                "seconds": round(seconds, 1), "videos_per_second": round(videos / seconds, 3),
                "max_score_difference_vs_first": float(np.nanmax(np.abs(scores - first_scores))),
                "sampling": result["sampling"], "device": args.device, "threads": torch.get_num_threads(),
                **({"note": args.note} if args.note else {}),
            })
    for row in rows:
        row["speedup_vs_first"] = round(rows[0]["seconds"] / row["seconds"], 2)
    emit_rows("eval_batch", rows, time.perf_counter() - started, args.record)


if __name__ == "__main__":
    main()
