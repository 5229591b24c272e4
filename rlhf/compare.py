"""The compare app: base model and LoRA adapters side by side, from the same noise, with reward scores.

`Comparer` holds one `VideoGenerator` with every adapter attached under its own name (as `eval` does) and,
for a prompt and a seed, samples the base (adapters disabled) and each adapter from the same initial noise
and the same prompt embeddings, decodes, scores every video with the rewards config and writes the mp4s.
`build_app` puts it behind a local Gradio page (the optional extra `[app]`); `serve` runs that page until
interrupted. Nothing is fetched from the internet: analytics and the version check are off, the theme's
fonts are Gradio's bundled ones, and models load from local paths only.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf.errors import UserError

if TYPE_CHECKING:
    import gradio
    import numpy as np

    from rewards.config import RewardsConfig
    from rlhf.commands.compare import CompareConfig

logger = logging.getLogger("contentv-rlhf")
BASE = "base"
COMBINED = "combined"  # the rewards config's weighted sum, as `eval` names it
PROMPT_HINT = "Type a prompt, then press Generate (or Enter)"
MAX_UI_SEED = 2**53 - 1  # the page sends numbers as JavaScript doubles: integers beyond this are rounded


@dataclass(frozen=True)
class CompareResult:
    """One model's video for the prompt and seed: its label, mp4, decoded frames and reward scores."""

    label: str
    video_path: Path
    frames: np.ndarray  # (T, H, W, 3) uint8, as written to `video_path`
    scores: dict[str, float]  # reward name -> score, plus COMBINED when a rewards config is given


def adapter_labels(paths: Sequence[str]) -> list[str]:
    """Display names of adapters: the paths as given, with ` (2)`, ` (3)` added to repeated ones."""
    labels, seen = [], {}
    for path in paths:
        seen[path] = seen.get(path, 0) + 1
        labels.append(path if seen[path] == 1 else f"{path} ({seen[path]})")
    return labels


class Comparer:
    """The base model and its adapters, ready to sample one video each for a prompt and a seed."""

    def __init__(self, config: CompareConfig, rewards: RewardsConfig | None, out_dir: str | Path):
        from rewards.build import build_scorers
        from rlhf.generation import VideoGenerator
        from rlhf.lora import load_adapter

        self.config = config
        self.out_dir = Path(out_dir)
        self.generator = VideoGenerator(config, max_sequence_length=config.max_sequence_length)
        # peft names adapters like module attributes: internal names, the paths are only labels.
        self.adapters = {f"adapter{i}": label for i, label in enumerate(adapter_labels(config.adapters))}
        for name, path in zip(self.adapters, config.adapters, strict=True):
            load_adapter(self.generator.transformer, path, adapter_name=name)
        self.generator.transformer.requires_grad_(False)
        self.scorers = build_scorers(rewards) if rewards is not None else {}
        self.calls = 0

    @property
    def labels(self) -> list[str]:
        """Column titles in page order: the base model, then the adapters in the order given."""
        return [BASE, *self.adapters.values()]

    def _use(self, adapter: str | None) -> None:
        from rlhf.lora import use_adapter

        use_adapter(self.generator.transformer, adapter)

    def compare(self, prompt: str, seed: int) -> list[CompareResult]:
        """Sample the base and every adapter from the noise of `seed`, score and write each video."""
        import torch

        from rewards.build import score_videos
        from rlhf.options import uses_guidance
        from rlhf.video import to_scorer_frames, to_uint8_frames, write_mp4

        if not prompt.strip():
            raise UserError("the prompt is empty: type what the videos should show")
        if not 0 <= seed <= MAX_UI_SEED:
            raise UserError(f"the seed must be an integer in 0..{MAX_UI_SEED}, got {seed}")
        # Encoded and decoded exactly as `generate` does (prompt and negative prompt in one batch, one video per
        # decode), so a column's video is the one `generate --adapter` writes for this prompt and seed.
        guided = uses_guidance(self.config.guidance)
        embeds = self.generator.encode_prompts([prompt, self.config.negative_prompt] if guided else [prompt])
        cond, uncond = embeds.select(0), (embeds.select(1) if guided else None)
        decoded = []
        for adapter in [None, *self.adapters]:  # the same cond, uncond and seed: the same initial noise
            self._use(adapter)
            latents = self.generator.sample_latents(cond, uncond, [seed], self.config, progress=False)
            decoded.append(self.generator.decode(latents))  # (1, 3, T, H, W) in [-1, 1]
        videos = torch.cat(decoded)  # (M, 3, T, H, W)
        scores: dict[str, torch.Tensor] = {}
        if self.scorers:
            frames = to_scorer_frames(videos)  # (M, T, 3, H, W) in [0, 1]
            scores = score_videos(self.scorers, frames, [prompt] * len(videos))
            scores[COMBINED] = sum(weight * scores[name] for name, (_, weight) in self.scorers.items())
        self.calls += 1
        results = []
        for index, label in enumerate(self.labels):
            frames_uint8 = to_uint8_frames(videos[index])  # (T, H, W, 3)
            path = write_mp4(self.out_dir / f"{self.calls:05d}-{index}.mp4", frames_uint8, fps=self.config.fps)
            results.append(CompareResult(label, path, frames_uint8,
                                         {name: float(values[index]) for name, values in scores.items()}))
        return results


def format_scores(result: CompareResult, base: CompareResult) -> str:
    """A Markdown table of a video's reward scores, with the difference to the base model's."""
    if not result.scores:
        return "*No rewards configured (pass `--rewards FILE`).*"
    with_diff = result is not base
    lines = ["| reward | score | vs base |" if with_diff else "| reward | score |",
             "|---|---:|---:|" if with_diff else "|---|---:|"]
    for name, value in result.scores.items():
        shown = f"**{name}**" if name == COMBINED else name
        row = f"| {shown} | {_number(value)} |"
        if with_diff:
            diff = value - base.scores[name]
            row += f" {'+' if diff >= 0 else ''}{_number(diff)} |" if math.isfinite(diff) else " n/a |"
        lines.append(row)
    return "\n".join(lines)


def _number(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else "n/a"


def respond(comparer: Comparer, prompt: str | None, seed: float | None) -> tuple[list[CompareResult] | None, str]:
    """The page's answer to Generate: the videos and a status line, or None and one message for a user mistake
    (an empty prompt, a seed that is no integer in range), logged as one line: no traceback, and the page keeps
    its columns and labels. Other errors are bugs and propagate."""
    start = time.perf_counter()
    try:
        if seed is None or seed != int(seed):
            raise UserError(f"the seed must be an integer in 0..{MAX_UI_SEED}")
        results = comparer.compare(prompt or "", int(seed))
    except UserError as err:
        logger.warning("compare: not generated: %s (prompt %r, seed %r)", err, prompt, seed)
        return None, f"**Not generated:** {err}."
    status = f"Seed {int(seed)}: {len(results)} videos in {time.perf_counter() - start:.1f} s."
    logger.info("compare: %s (%r)", status, prompt)
    return results, status


def build_app(comparer: Comparer) -> gradio.Blocks:
    """The page: prompt, seed and a generate button above one column per model (video, then scores)."""
    import gradio as gr

    config = comparer.config
    rewards = ", ".join(comparer.scorers) if comparer.scorers else "none"
    intro = (f"### Base vs adapters\nModel `{config.model}`; every column samples from the same noise (the seed) "
             f"and the same prompt: {config.frames} frames of {config.width}x{config.height}, {config.steps} steps, "
             f"guidance {config.guidance:g}. Rewards: {rewards}.")

    def generate(prompt: str | None, seed: float | None) -> list[Any]:
        results, status = respond(comparer, prompt, seed)
        if results is None:  # a user mistake: one message, the columns keep what they show
            return [gr.update() for _ in range(2 * len(comparer.labels))] + [status]
        return ([str(r.video_path) for r in results] + [format_scores(r, results[0]) for r in results]
                + [status])

    with gr.Blocks(title="contentv-rlhf compare", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(intro)
        with gr.Row(equal_height=True):
            # The config's example prompt as a real value, or an empty box whose hint reads as an instruction.
            prompt = gr.Textbox(label="Prompt", value=config.prompt, placeholder=PROMPT_HINT, scale=4, elem_id="prompt")
            seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, maximum=MAX_UI_SEED, elem_id="seed")
            button = gr.Button("Generate", variant="primary", elem_id="generate")
        videos, tables = [], []
        with gr.Row():
            for index, label in enumerate(comparer.labels):
                with gr.Column(min_width=200):
                    videos.append(gr.Video(label=label, interactive=False, autoplay=True, loop=True,
                                           buttons=["download"], elem_id=f"video-{index}"))
                    tables.append(gr.Markdown(elem_id=f"scores-{index}"))
        status = gr.Markdown(elem_id="status")
        outputs = [*videos, *tables, status]
        button.click(generate, [prompt, seed], outputs)
        prompt.submit(generate, [prompt, seed], outputs)
    return app


LOCAL_NAMES = ("127.0.0.1", "localhost")  # names of the page's address; the server binds 127.0.0.1 only


def foreign_request(headers: Mapping[str, str], port: int) -> str | None:
    """Why a request is not from a page of this server (None when it is).

    Binding to 127.0.0.1 keeps other machines out, not other web pages in the user's browser: a site whose name
    the attacker re-points at 127.0.0.1 (DNS rebinding) sends its own name as Host, and a cross-origin form or
    fetch sends its own Origin. Both would start the model and read its videos; only our own names pass.
    """
    hosts = {f"{name}:{port}" for name in LOCAL_NAMES} | (set(LOCAL_NAMES) if port == 80 else set())
    host = headers.get("host", "")
    if host.lower() not in hosts:
        return f"Host {host[:100]!r} is not this server's (http://127.0.0.1:{port})"
    origin = headers.get("origin")
    if origin is not None and origin.lower() not in {f"http://{h}" for h in hosts}:
        return f"Origin {origin[:100]!r} is not this page's"
    return None


class LocalOnly:
    """ASGI middleware: answer 403 to every request `foreign_request` refuses (HTTP and websockets)."""

    def __init__(self, app: Any, port: int):
        self.app, self.port = app, port

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            if problem := foreign_request(headers, self.port):
                logger.warning("compare: refused %s %s: %s", scope.get("method", "websocket"), scope.get("path"),
                               problem)
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                body = f"refused: {problem}\n".encode()
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def launch(app: gradio.Blocks, port: int, allowed_paths: Sequence[str]) -> None:
    """Start serving `app` on http://127.0.0.1:`port` (returns; `app.block_thread()` waits)."""
    from starlette.middleware import Middleware

    # The page never leaves this machine: no share link, no server-side rendering (a Node server), no MCP, and
    # requests from other sites or names are refused (LocalOnly).
    app.launch(server_name="127.0.0.1", server_port=port, share=False, inbrowser=False, show_error=True,
               quiet=True, prevent_thread_lock=True, ssr_mode=False, mcp_server=False, pwa=False,
               allowed_paths=list(allowed_paths), app_kwargs={"middleware": [Middleware(LocalOnly, port=port)]})


def serve(comparer: Comparer, port: int) -> None:
    """Serve the page on http://127.0.0.1:`port` until interrupted (Ctrl-C)."""
    app = build_app(comparer)
    app.queue(default_concurrency_limit=1)  # one model: requests take turns
    launch(app, port, [str(comparer.out_dir)])
    print(f"compare: serving http://127.0.0.1:{port}/ (Ctrl-C to stop)", flush=True)
    try:
        app.block_thread()
    finally:
        app.close()


def disable_telemetry() -> None:
    """Turn off Gradio's analytics and version check and the hub's telemetry (before gradio is imported)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
