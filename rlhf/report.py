"""The run report: one self-contained HTML page summarising a run, from the files its stages wrote.

It reports any run directory: a pipeline run with `run.json` (the quickstart's), an `eval --out` directory,
a `train --output-dir` run or an `online --out` run (`rlhf.report_inputs.find_run` tells them apart). The page
(`build_report`) has, in order, the sections the run has inputs for:

1. the verdict: one sentence per trained reward and per held-out / ground-truth metric (up, down or no change:
   whether the 95% CI of eval's paired difference excludes zero, with the numbers), the same for each VBench
   dimension (`eval --vbench`), and a plain warning when a trained reward rose while a held-out reward,
   ground-truth metric or VBench dimension fell;
2. base vs tuned videos: one row per prompt group (`rlhf.report_inputs.prompt_group`: a shapes-world
   colour-size combination, any other prompt on its own), the same prompt and seed side by side, seeds spread
   evenly over the rows, small videos upscaled by a whole factor with pixelated rendering, and the scores of
   the row's videos beside them;
3. the evaluation table: per candidate and reward, kind, base and tuned means, difference, 95% CI, win/tie
   rate; 0/1 metrics (the world oracle's per-attribute accuracy) in percent and points;
4. online runs: one row per round (mean rewards of its rollout, pairs kept, implicit accuracy, loss) and a
   plot of the mean rewards over the rounds;
5. training curves from `logs/metrics.jsonl` as inline SVG plots (loss, implicit accuracy, reward margin,
   lr, then every other logged number, reward terms included); several runs (online rounds, eval candidates)
   share each plot, one line per run, the legend under the plot; a series that never changes is a number;
6. the preference pairs with the widest and the narrowest margins: the rollout store's videos, else a strip of
   the frames saved in the sample file, with the pair's scores (an online run: its last round's).

Everything is embedded (videos as `data:video/mp4;base64` URIs, frame strips as base64 PNG, plots as inline
SVG, CSS and a tiny status script inline), so the page opens offline and can be mailed or archived as one
file. Every piece of text that comes from a file (prompts, paths, reward names, warnings) is HTML-escaped.
A section whose input is missing or unreadable is replaced by a note; a directory that holds no run, and a
missing or corrupt eval a pipeline run names, are errors (`UserError`).
"""

from __future__ import annotations

import base64
import html
import io as _io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rlhf.errors import UserError
from rlhf.report_inputs import (  # noqa: F401 - run.json helpers are part of this module's API
    METRICS_FILE,
    ROUNDS_FILE,
    RUN_FILE,
    RUN_KIND,
    STAGES,
    RunSources,
    evenly,
    find_run,
    groups_of,
    load_eval,
    read_json_object,
    read_metrics,
    read_run_manifest,
    write_run_manifest,
)

REPORT_FILE = "report.html"
# Training metrics plotted first, in this order; every other numeric key follows.
PRIMARY_METRICS = ("loss", "implicit_accuracy", "reward_margin", "lr")
# Shown together in one plot (policy vs reference denoising errors on chosen / rejected).
ERROR_METRICS = ("policy_err_w", "policy_err_l", "ref_err_w", "ref_err_l")
NOT_PLOTTED = ("step",)
# Small videos are shown a whole number of times larger, up to about this many pixels on their longer side.
VIDEO_TARGET_PX = 192
VIDEO_MAX_PX = 400  # larger videos are shown shrunk to this
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def esc(value: Any) -> str:
    """HTML-escape any value for text and (double- or single-quoted) attribute positions."""
    return html.escape(str(value), quote=True)


# ---- media ---------------------------------------------------------------------------------------


def data_uri(mime: str, payload: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def display_size(width: int, height: int) -> tuple[int, int, bool]:
    """(width, height, pixelated) to show a `width` x `height` video at: a small one enlarged by the largest whole
    factor that keeps it within VIDEO_TARGET_PX (pixelated, so its pixels stay sharp squares), a large one
    shrunk to VIDEO_MAX_PX."""
    longest = max(width, height, 1)
    if longest <= VIDEO_TARGET_PX:
        factor = max(1, VIDEO_TARGET_PX // longest)
        return width * factor, height * factor, factor > 1
    scale = min(1.0, VIDEO_MAX_PX / longest)
    return round(width * scale), round(height * scale), False


def video_tag(path: Path, title: str, size: tuple[int, int, bool] | None = None, controls: bool = True) -> str:
    """An autoplaying, looping, muted `<video>` with the mp4 embedded, at `size` (`display_size`) when given,
    with the browser's controls (which cover the frame's lower part) unless `controls` is False; a note if the
    file is missing."""
    try:
        payload = path.read_bytes()
    except OSError as err:
        return f'<div class="missing">video not available: {esc(path)} ({esc(err.strerror or err)})</div>'
    dims = ""
    if size is not None:
        width, height, pixelated = size
        dims = f' width="{width}" height="{height}"' + (' data-pixelated="1"' if pixelated else "")
    return (f'<video class="clip" src="{data_uri("video/mp4", payload)}" title="{esc(title)}"{dims} '
            f'autoplay loop muted playsinline{" controls" if controls else ""} preload="auto"></video>')


def frame_strip_png(frames, max_height: int = 160, min_height: int = 96, gap: int = 2) -> bytes:
    """(F, H, W, 3) uint8 frames side by side as one PNG; small frames upscaled (nearest), big ones shrunk."""
    import numpy as np
    from PIL import Image

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected (F, H, W, 3) frames, got {frames.shape}")
    count, height, width = frames.shape[:3]
    if height < min_height:
        scale, resample = math.ceil(min_height / height), Image.NEAREST
    else:
        scale, resample = min(1.0, max_height / height), Image.BILINEAR
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    strip = Image.new("RGB", (count * size[0] + (count - 1) * gap, size[1]), (255, 255, 255))
    for i, frame in enumerate(frames.astype(np.uint8)):
        strip.paste(Image.fromarray(frame).resize(size, resample), (i * (size[0] + gap), 0))
    buffer = _io.BytesIO()
    strip.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


# ---- inline SVG plots ----------------------------------------------------------------------------


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round tick values covering [low, high] (1, 2, 2.5, 5 x 10^k steps)."""
    span = high - low
    raw = span / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    ticks = []
    for k in range(math.floor(low / step), math.ceil(high / step) + 1):
        value = k * step
        if low - step * 1e-9 <= value <= high + step * 1e-9:
            ticks.append(value)
    return ticks


def _tick_labels(ticks: Sequence[float]) -> list[str]:
    """One style per axis: scientific when any tick is tiny or huge, else up to 4 significant digits."""
    scientific = any(t and (abs(t) >= 1e4 or abs(t) < 1e-3) for t in ticks)
    return ["0" if t == 0 else f"{t:.2e}" if scientific else f"{t:.4g}" for t in ticks]


def _rolling_mean(values: list[float], window: int) -> list[float]:
    out, total, queue = [], 0.0, []
    for value in values:
        queue.append(value)
        total += value
        if len(queue) > window:
            total -= queue.pop(0)
        out.append(total / len(queue))
    return out


def svg_line_plot(series: Mapping[str, Sequence[tuple[float, float]]], title: str, *, x_label: str = "step",
                  width: int = 420, height: int = 230) -> str:
    """A small line plot as inline SVG (no external resources, no xmlns needed inside HTML).

    `series` maps a legend name to (x, y) points; non-finite points are dropped. A long noisy series is drawn
    faint with its rolling mean on top. Returns `<svg class="plot" ...>` markup, every label escaped.
    """
    clean = {name: [(float(x), float(y)) for x, y in points if math.isfinite(x) and math.isfinite(y)]
             for name, points in series.items()}
    clean = {name: points for name, points in clean.items() if points}
    left, right, top, bottom = 62, 12, 26, 38
    inner_w, inner_h = width - left - right, height - top - bottom
    legend_rows = len(clean) if len(clean) > 1 else 0
    total_h = height + (14 * legend_rows + 6 if legend_rows else 0)  # the legend goes under the plot, never on it
    parts = [f'<svg class="plot" width="{width}" height="{total_h}" viewBox="0 0 {width} {total_h}" role="img" '
             f'aria-label="{esc(title)}">',
             f'<text x="{width / 2:.1f}" y="16" text-anchor="middle" class="plot-title">{esc(title)}</text>']
    if not clean:
        parts.append(f'<text x="{width / 2:.1f}" y="{height / 2:.1f}" text-anchor="middle" class="axis">'
                     'no finite values</text></svg>')
        return "".join(parts)
    xs = [x for points in clean.values() for x, _ in points]
    ys = [y for points in clean.values() for _, y in points]
    x_lo, x_hi = min(xs), max(xs)
    y_lo, y_hi = min(ys), max(ys)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    if y_hi == y_lo:
        pad = abs(y_lo) * 0.1 or 1.0
        y_lo, y_hi = y_lo - pad, y_hi + pad
    else:
        pad = (y_hi - y_lo) * 0.05
        y_lo, y_hi = y_lo - pad, y_hi + pad

    def px(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * inner_w

    def py(y: float) -> float:
        return top + (y_hi - y) / (y_hi - y_lo) * inner_h

    parts.append(f'<rect x="{left}" y="{top}" width="{inner_w}" height="{inner_h}" class="frame"/>')
    ticks = _nice_ticks(y_lo, y_hi)
    for tick, label in zip(ticks, _tick_labels(ticks), strict=True):
        y = py(tick)
        parts.append(f'<line x1="{left}" x2="{left + inner_w}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" class="axis">{esc(label)}</text>')
    ticks = _nice_ticks(x_lo, x_hi)
    for tick, label in zip(ticks, _tick_labels(ticks), strict=True):
        x = px(tick)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + inner_h}" class="grid"/>'
                     f'<text x="{x:.1f}" y="{top + inner_h + 16}" text-anchor="middle" class="axis">{esc(label)}</text>')
    parts.append(f'<text x="{left + inner_w / 2:.1f}" y="{height - 4}" text-anchor="middle" class="axis">'
                 f'{esc(x_label)}</text>')
    for index, (name, points) in enumerate(clean.items()):
        color = COLORS[index % len(COLORS)]
        points = sorted(points)
        smooth = len(points) > 50
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        opacity = ' stroke-opacity="0.35"' if smooth else ""
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.5"{opacity}>'
                     f'<title>{esc(name)}</title></polyline>')
        if smooth:
            window = max(5, len(points) // 30)
            means = _rolling_mean([y for _, y in points], window)
            coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for (x, _), y in zip(points, means, strict=True))
            parts.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2">'
                         f'<title>{esc(name)} (rolling mean of {window})</title></polyline>')
        elif len(points) <= 40:
            parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{color}">'
                      f'<title>{esc(name)} step {x:g}: {y:.6g}</title></circle>'
                      for x, y in points]
    if legend_rows:  # under the x-axis label, outside the plotting area
        for index, name in enumerate(clean):
            ly, color = height + 12 + 14 * index, COLORS[index % len(COLORS)]
            parts.append(f'<line x1="{left + 8}" x2="{left + 24}" y1="{ly - 4}" y2="{ly - 4}" stroke="{color}" '
                         f'stroke-width="2"/><text x="{left + 28}" y="{ly}" class="legend">{esc(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


# ---- sections ------------------------------------------------------------------------------------


class SkipSection(Exception):
    """A section's input is missing or unreadable: the page shows this note instead of the section."""


def _num(value: Any, spec: str = ".5g") -> str:
    if value is None:
        return "–"
    try:
        return format(float(value), spec)
    except (TypeError, ValueError):
        return esc(value)


def _trend_class(low: Any, high: Any) -> str:
    """'up' / 'down' when a 95% CI excludes zero, '' otherwise."""
    try:
        if float(low) > 0:
            return "up"
        if float(high) < 0:
            return "down"
    except (TypeError, ValueError):
        pass
    return ""


KIND_ORDER = ("trained", "logged", "truth", "held_out", "vbench")
KIND_NAMES = {"trained": "trained reward", "logged": "logged reward", "truth": "ground truth",
              "held_out": "held-out reward", "vbench": "VBench dimension"}
VERDICT_KINDS = ("trained", "truth", "held_out", "vbench")  # a `logged` entry (weight 0) was not trained on: no verdict
GUARDED_KINDS = ("truth", "held_out", "vbench")  # a fall in these while a trained reward rises: possible hacking


def reward_order(kinds: Mapping[str, str], names) -> list[str]:
    """`combined` first, then trained, logged, ground-truth and held-out rewards, each alphabetically."""
    def key(name: str) -> tuple:
        kind = kinds.get(name, "")
        return (name != "combined", KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER), name)

    return sorted(names, key=key)


def _finite(row: Mapping[str, Any], *keys: str) -> list[float] | None:
    try:
        values = [float(row[k]) for k in keys]
    except (KeyError, TypeError, ValueError):
        return None
    return values if all(math.isfinite(v) for v in values) else None


def verdict_sentence(reward: str, kind: str, row: Mapping[str, Any], accuracy: bool) -> tuple[str, str]:
    """(trend, HTML sentence) of one reward's paired comparison: trend "up" / "down" when the 95% CI of the
    difference excludes zero, else "same"; the sentence gives the means, the difference and the CI."""
    values = _finite(row, "base_mean", "candidate_mean", "mean_diff", "ci_low", "ci_high")
    if values is None:
        return "same", f'<b>{esc(reward)}</b> ({esc(KIND_NAMES.get(kind, kind))}): no comparison recorded.'
    base, tuned, diff, low, high = values
    trend = "up" if low > 0 else "down" if high < 0 else "same"
    if accuracy:
        means = f"{base:.1%} &rarr; {tuned:.1%}"
        change, ci = f"{diff * 100:+.1f} points", f"95% CI {low * 100:+.1f} to {high * 100:+.1f} points"
    else:
        means = f"{base:.4g} &rarr; {tuned:.4g}"
        change, ci = f"{diff:+.3g}", f"95% CI {low:+.3g} to {high:+.3g}"
    label = {"up": "up", "down": "down", "same": "no change"}[trend]
    why = f"{ci}" if trend != "same" else f"{ci} includes 0"
    return trend, (f'<b>{esc(reward)}</b> ({esc(KIND_NAMES.get(kind, kind))}): '
                   f'<span class="verdict {trend}">{label}</span>, {change} ({means}; {why}).')


def _names(names: Sequence[str]) -> str:
    return ", ".join(f"<b>{esc(n)}</b>" for n in names)


def verdict_section(result: Mapping[str, Any]) -> str:
    """Per candidate: a sentence per trained reward (`combined` first), ground-truth metric, held-out reward and
    VBench dimension, and a plain warning when a trained reward went up while a held-out reward, ground-truth
    metric or VBench dimension went down."""
    kinds = {**result["rewards"], "combined": "trained"}
    accuracy = accuracy_metrics(result)
    several = len(result["comparisons"]) > 1
    parts = []
    for model, rows in result["comparisons"].items():
        if not isinstance(rows, dict) or not rows:
            continue
        trends: dict[str, str] = {}
        lines = []
        for kind in VERDICT_KINDS:
            for reward in reward_order(kinds, [r for r in rows if kinds.get(r) == kind]):
                row = rows[reward] if isinstance(rows[reward], dict) else {}
                trends[reward], sentence = verdict_sentence(reward, kind, row, reward in accuracy)
                lines.append(f'<li class="{trends[reward]}">{sentence}</li>')
        if not lines:
            continue
        n = next(iter(rows.values())).get("n", "?") if isinstance(next(iter(rows.values())), dict) else "?"
        who = f'{esc(model)} <code>{esc(result["candidates"].get(model, ""))}</code>' if several else "The tuned model"
        rose = [r for r, t in trends.items() if t == "up" and kinds.get(r) == "trained"]
        fell = [r for r, t in trends.items() if t == "down" and kinds.get(r) in GUARDED_KINDS]
        if rose and fell:
            parts.append(f'<div class="warning">&#9888; Warning: {who if several else "the tuned model"} scores higher '
                         f'on the reward(s) it was trained on ({_names(rose)}) but lower on {_names(fell)}, which '
                         'it was never trained on. It learned to please its reward rather than to get better: '
                         'possible reward hacking.</div>')
        parts.append(f'<p class="hint">{who} against the base, on the same {esc(n)} (prompt, seed) pairs. Up or '
                     'down: the 95% confidence interval of the difference excludes zero; no change: it '
                     'includes zero.</p><ul class="verdicts">' + "".join(lines) + "</ul>")
    if not parts:
        raise SkipSection("eval.json has no comparisons")
    return "".join(parts)


def accuracy_metrics(result: Mapping[str, Any]) -> set[str]:
    """The rewards whose every score in eval.json is 0 or 1 (e.g. the world oracle's per-attribute accuracy):
    their means are accuracies, shown in percent and their differences in points."""
    found = set()
    per_model = [m for m in (result.get("scores") or {}).values() if isinstance(m, dict)]
    for reward in {r for m in per_model for r in m}:
        try:
            values = [float(v) for m in per_model for row in m.get(reward) or [] for v in row]
        except (TypeError, ValueError):
            continue
        if values and all(v in (0.0, 1.0) for v in values):
            found.add(reward)
    return found


def _mean(value: Any, accuracy: bool) -> str:
    return _num(value, ".1%") if accuracy else _num(value)


def _diff(value: Any, accuracy: bool) -> str:
    """A difference: points (of a percentage) for an accuracy, 3 significant digits otherwise."""
    if not accuracy:
        return _num(value, "+.3g")
    try:
        return f"{float(value) * 100:+.1f} pts"
    except (TypeError, ValueError):
        return "–"


def eval_table_section(result: Mapping[str, Any]) -> str:
    kinds = result["rewards"]
    accuracy = accuracy_metrics(result)
    parts = ['<p class="hint">Paired over the same prompts and seeds. <b>trained</b>: optimised for '
             '(<b>combined</b> is their weighted sum); <b>logged</b>: trained-reward entry with weight 0; '
             '<b>truth</b>: ground truth no reward sees (the shapes world\'s oracle: the share of videos whose '
             'colour, size, direction, or colour and size together (<i>taught</i>) it reads as the prompt asked); '
             '<b>held_out</b>: never trained on; <b>vbench</b>: VBench\'s formula for that dimension (higher is '
             'better; dynamic_degree is the share of moving videos). A drop in truth, held_out or vbench while a '
             'trained reward rises hints at reward hacking. Accuracies in percent, their differences in points. Green / red: the 95% CI of the '
             'difference excludes zero.</p>']
    for model, rows in result["comparisons"].items():
        if not isinstance(rows, dict) or not rows:
            continue
        n = next(iter(rows.values())).get("n", "?")
        parts.append(f'<h3>{esc(model)} <code>{esc(result["candidates"].get(model, ""))}</code></h3>'
                     f'<p class="hint">n = {esc(n)} (prompt, seed) pairs</p>')
        parts.append('<table class="eval"><thead><tr><th>reward</th><th>kind</th><th>base mean</th>'
                     '<th>tuned mean</th><th>diff</th><th>95% CI</th><th>win</th><th>tie</th><th>loss</th>'
                     '</tr></thead><tbody>')
        for reward in reward_order(kinds, rows):
            row = rows[reward]
            trend = _trend_class(row.get("ci_low"), row.get("ci_high"))
            kind = kinds.get(reward, "?")
            acc = reward in accuracy
            parts.append(
                f'<tr class="{trend}"><td>{esc(reward)}</td><td><span class="kind {esc(kind)}">{esc(kind)}</span>'
                f'</td><td>{_mean(row.get("base_mean"), acc)}</td><td>{_mean(row.get("candidate_mean"), acc)}</td>'
                f'<td class="diff">{_diff(row.get("mean_diff"), acc)}</td>'
                f'<td>[{_diff(row.get("ci_low"), acc)}, {_diff(row.get("ci_high"), acc)}]</td>'
                f'<td>{_num(row.get("win_rate"), ".0%")}</td><td>{_num(row.get("tie_rate"), ".0%")}</td>'
                f'<td>{_num(row.get("loss_rate"), ".0%")}</td></tr>')
        parts.append("</tbody></table>")
    if len(parts) == 1:
        raise SkipSection("eval.json has no comparisons")
    return "".join(parts)


def _eval_video_scores(result: Mapping[str, Any], model: str, p: int, s: int) -> dict[str, float]:
    """Every reward's score of one (model, prompt, seed) video, `combined` first when computable."""
    per_reward = result.get("scores", {}).get(model, {})
    scores = {}
    for reward, table in per_reward.items():
        try:
            scores[reward] = float(table[p][s])
        except (IndexError, KeyError, TypeError, ValueError):
            continue
    weights = result.get("weights") or {}
    if weights and all(name in scores for name in weights):
        scores = {"combined": sum(w * scores[name] for name, w in weights.items()), **scores}
    return scores


def _row_scores(result: Mapping[str, Any], models: Sequence[str], p: int, s: int, accuracy: set[str]) -> str:
    """The scores of one row's videos as one table: a column per model, the difference to the base in brackets;
    a 0/1 metric as a tick or a cross."""
    kinds = {**result["rewards"], "combined": "trained"}
    scores = {model: _eval_video_scores(result, model, p, s) for model in models}
    names = [r for r in reward_order(kinds, scores[models[0]]) if kinds.get(r) != "logged"]
    head = "".join(f"<th>{esc(_model_label(result, m))}</th>" for m in models)
    rows = []
    for reward in names:
        cells = []
        for model in models:
            value = scores[model].get(reward)
            if value is None:
                cells.append("<td>–</td>")
            elif reward in accuracy:
                cells.append(f'<td class="{"right" if value else "wrong"}">{"&#10003;" if value else "&#10007;"}</td>')
            else:
                base = scores[models[0]].get(reward)
                delta = ""
                if model != models[0] and base is not None:
                    diff = value - base
                    delta = f' <span class="{"up" if diff > 0 else "down" if diff < 0 else ""}">({diff:+.3g})</span>'
                cells.append(f"<td>{_num(value, '.3g')}{delta}</td>")
        rows.append(f'<tr><td title="{esc(KIND_NAMES.get(kinds.get(reward, ""), ""))}">{esc(reward)}</td>'
                    f'{"".join(cells)}</tr>')
    return f'<table class="scores"><thead><tr><th></th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _model_label(result: Mapping[str, Any], model: str) -> str:
    """"tuned" for an eval's only candidate, the candidate's name when there are several."""
    return "tuned" if model != "base" and len(result["candidates"]) == 1 else model


def _saved_prompts(videos: Mapping[str, Any]) -> set[int]:
    indices = set()
    for per in videos.values():
        for key in per if isinstance(per, dict) else ():
            try:
                indices.add(int(key))
            except ValueError:
                continue
    return indices


def eval_videos_section(result: Mapping[str, Any], eval_dir: Path) -> str:
    """One row per prompt group with saved videos: a prompt of the group, one seed (spread evenly over the
    rows), every model's video of that prompt and seed side by side, and their scores."""
    videos = result.get("videos") or {}
    models = ["base", *result["candidates"]]
    prompts = [str(p) for p in result.get("prompts") or []]
    seeds = result.get("seeds") or []
    saved = _saved_prompts(videos)
    if not saved:
        raise SkipSection("eval saved no videos (eval --save-videos 0)")
    groups = groups_of(prompts)
    shown = [(group, [i for i in indices if i in saved]) for group, indices in groups.items()]
    missing = [group for group, indices in shown if not indices]
    shown = [(group, indices) for group, indices in shown if indices]
    if not shown:  # videos of prompts eval.json does not list
        shown = [(f"prompt {p}", [p]) for p in sorted(saved)]
    sampling = result.get("sampling") or {}
    try:
        size = display_size(int(sampling["width"]), int(sampling["height"]))
    except (KeyError, TypeError, ValueError):
        size = None
    accuracy = accuracy_metrics(result)
    enlarged = f", shown {size[0] // int(sampling['width'])}x larger with sharp pixels" if size and size[2] else ""
    parts = [f'<p class="hint">One row per prompt group ({len(shown)} of {len(groups)} with saved videos): the '
             f'base model and the tuned one from the same initial noise (same prompt and seed){enlarged}. Seeds '
             'are spread evenly over the rows. Beside them, every video\'s scores (the difference to the base in '
             'brackets; a 0/1 ground-truth metric as &#10003; / &#10007;).</p>']
    if missing:
        listed = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        parts.append(f'<p class="note">No videos saved for {len(missing)} group(s): {esc(listed)} (eval saves '
                     'the videos of --save-videos prompts, spread over the groups).</p>')
    parts.append('<div class="vrows">')
    for row, (group, indices) in enumerate(shown):
        p = indices[row % len(indices)]
        prompt = prompts[p] if p < len(prompts) else f"prompt {p}"
        count = min(len((videos.get(m) or {}).get(str(p), [])) for m in models)
        if count == 0:
            count = max(len((videos.get(m) or {}).get(str(p), [])) for m in models)
        s = evenly(row, len(shown), count)
        seed = seeds[s] if s < len(seeds) else s
        cells = []
        for model in models:
            label = _model_label(result, model)
            caption = f'<figcaption title="{esc(result["candidates"].get(model, ""))}">{esc(label)}</figcaption>'
            paths = (videos.get(model) or {}).get(str(p), [])
            if s >= len(paths):
                cells.append(f'<figure class="cell">{caption}<div class="missing">no video saved</div></figure>')
                continue
            media = video_tag(eval_dir / paths[s], f"{prompt} | {model} | seed {seed}", size, controls=False)
            cells.append(f'<figure class="cell">{caption}{media}</figure>')
        parts.append(f'<div class="vrow"><div class="vlabel"><div class="group-name">{esc(group)}</div>'
                     f'<q>{esc(prompt)}</q><div class="hint">seed {esc(seed)}</div></div>{"".join(cells)}'
                     f'{_row_scores(result, models, p, s, accuracy)}</div>')
    parts.append("</div>")
    return "".join(parts)


def _pair_dimensions(columns: Sequence[str], summary: Mapping[str, Any]) -> list[str]:
    dims = summary.get("dimensions")
    if isinstance(dims, list):
        return [str(d) for d in dims]
    return [c[len("chosen_"):] for c in columns
            if c.startswith("chosen_") and not c.endswith("_z") and c not in ("chosen_id", "chosen_score")]


def pick_examples(pairs: Sequence[Mapping[str, Any]], count: int) -> tuple[list[Mapping], list[Mapping]]:
    """The `count` widest-margin pairs and the `count` narrowest ones (no pair shown twice)."""
    finite = [p for p in pairs if isinstance(p.get("margin"), (int, float)) and math.isfinite(p["margin"])]
    ranked = sorted(finite, key=lambda p: p["margin"], reverse=True)
    widest = ranked[:count]
    narrowest = [p for p in reversed(ranked[count:])][:count]
    return widest, narrowest


def _sample_media(store, sample_id: str, title: str) -> str:
    """The store's mp4 of a sample if present, else its saved frames as a PNG strip, else a note."""
    if store is None:
        return '<div class="missing">rollout store not available</div>'
    video = store.video_path(sample_id)
    if video.exists():
        return video_tag(video, title)
    try:
        tensors = store.load_sample(sample_id)
    except UserError as err:
        return f'<div class="missing">{esc(err)}</div>'
    if "frames" not in tensors:
        return '<div class="missing">no video or decoded frames saved for this sample</div>'
    png = frame_strip_png(tensors["frames"].numpy())
    return (f'<img class="frames" src="{data_uri("image/png", png)}" alt="{esc(title)}" title="{esc(title)}">'
            f'<div class="hint">{len(tensors["frames"])} saved frames</div>')


def pairs_section(pairs_dir: Path, store_dir: Path | None, count: int) -> str:
    from datasets import load_from_disk

    if not pairs_dir.exists():
        raise SkipSection(f"pairs dataset {pairs_dir} not found")
    summary: dict[str, Any] = {}
    try:
        summary = json.loads((pairs_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    try:
        dataset = load_from_disk(str(pairs_dir))
    except (OSError, ValueError) as err:
        raise SkipSection(f"{pairs_dir}: not a readable pairs dataset ({err})") from None
    pairs = dataset.to_list()
    if not pairs:
        raise SkipSection(f"{pairs_dir}: the pairs dataset is empty")
    notes = []
    if store_dir is None and isinstance(summary.get("metadata"), dict) and summary["metadata"].get("store"):
        store_dir = Path(summary["metadata"]["store"])
    store, prompts = None, {}
    if store_dir is None:
        notes.append("no rollout store named in run.json or the pairs' summary.json: scores only")
    else:
        from rollouts.store import RolloutStore

        try:
            store = RolloutStore(store_dir)
            store.read_meta()
            prompts = store.read_prompts()
        except UserError as err:
            store = None
            notes.append(f"rollout store unavailable ({err}): scores only")
    dims = _pair_dimensions(dataset.column_names, summary)
    weights = summary.get("weights") or {}
    widest, narrowest = pick_examples(pairs, count)
    counts = summary.get("counts") or {}
    parts = [f'<p class="hint">{len(pairs)} pairs from {esc(counts.get("prompts", "?"))} prompts; scores are '
             'raw with the normalised z in brackets; the combined score is the weighted sum of the z.</p>']
    parts += [f'<p class="note">{esc(n)}</p>' for n in notes]
    for heading, group in (("Widest margins", widest), ("Narrowest margins", narrowest)):
        if not group:
            continue
        parts.append(f'<h3>{heading}</h3><div class="groups">')
        for pair in group:
            prompt = prompts.get(pair["prompt_id"], "")
            parts.append(f'<div class="card"><h4>{esc(pair["prompt_id"])}: <q>{esc(prompt)}</q> '
                         f'<span class="margin">margin {_num(pair["margin"], ".4g")}</span></h4><div class="pair">')
            for side in ("chosen", "rejected"):
                sid = pair[f"{side}_id"]
                rows = [f'<tr><td>combined</td><td>{_num(pair[f"{side}_score"], ".4g")}</td></tr>']
                for dim in dims:
                    raw, z = pair.get(f"{side}_{dim}"), pair.get(f"{side}_{dim}_z")
                    weight = weights.get(dim)
                    label = f"{dim} (w={weight:g})" if isinstance(weight, (int, float)) else dim
                    rows.append(f'<tr><td>{esc(label)}</td><td>{_num(raw, ".4g")} ({_num(z, "+.3g")})</td></tr>')
                media = _sample_media(store, sid, f"{side}: {sid} | {prompt}")
                parts.append(f'<figure class="cell {side}"><figcaption>{side} <code>{esc(sid)}</code>'
                             f'</figcaption>{media}<table class="scores">{"".join(rows)}</table></figure>')
            parts.append("</div></div>")
        parts.append("</div>")
    return "".join(parts)


def _train_metrics(train_dir: Path) -> tuple[list[dict[str, float]], int, Path]:
    metrics_path = train_dir / METRICS_FILE
    if not metrics_path.exists():
        raise SkipSection(f"{metrics_path} not found")
    try:
        records, bad = read_metrics(metrics_path)
    except OSError as err:
        raise SkipSection(f"{metrics_path}: unreadable ({err})") from None
    if not records:
        raise SkipSection(f"{metrics_path}: no metrics logged")
    return records, bad, metrics_path


def _metric_groups(keys: list[str]) -> list[tuple[str, list[str]]]:
    """(plot title, metrics drawn in it): the primary metrics, reward terms, denoising errors, the rest."""
    groups: list[tuple[str, list[str]]] = [(k, [k]) for k in PRIMARY_METRICS if k in keys]
    errors = [k for k in ERROR_METRICS if k in keys]
    others = [k for k in keys if k not in PRIMARY_METRICS and k not in ERROR_METRICS]
    groups += [(k, [k]) for k in others if "reward" in k]  # reward terms right after the main curves
    if errors:
        groups.append(("denoising errors (policy vs reference)", errors))
    groups += [(k, [k]) for k in others if "reward" not in k]
    return groups


def training_section(trains: Mapping[str, Path]) -> str:
    """Curves of one or more training runs (label -> run directory); with several, each plot has one line
    per run (and metric). A run without metrics gets a note; none with metrics skips the section."""
    runs: dict[str, list[dict[str, float]]] = {}
    parts, notes = [], []
    for label, train_dir in trains.items():
        try:
            records, bad, metrics_path = _train_metrics(train_dir)
        except SkipSection as note:
            if len(trains) == 1:
                raise
            notes.append(f"{label}: {note}")
            continue
        runs[label] = records
        summary = read_json_object(train_dir / "summary.json") or {}
        facts = [f"{len(records)} logged steps (last: {records[-1]['step']})"]
        facts += [f"{key}: {summary[key]}" for key in ("method", "steps", "steps_done", "stopped_by_max_seconds",
                                                       "skipped_steps", "pairs", "prompts") if key in summary]
        prefix = f"{label}: " if len(trains) > 1 else ""
        parts.append(f'<p class="hint">{esc(prefix + "; ".join(facts))}</p>')
        if bad:
            parts.append(f'<p class="note">{bad} unreadable line(s) in {esc(metrics_path)} skipped</p>')
    if not runs:
        raise SkipSection("; ".join(notes))
    parts += [f'<p class="note">{esc(note)}</p>' for note in notes]
    keys: list[str] = []
    for records in runs.values():
        for record in records:
            keys += [k for k, v in record.items() if k not in keys and k not in NOT_PLOTTED
                     and isinstance(v, (int, float)) and not isinstance(v, bool)]
    plots, constants = [], []
    for title, names in _metric_groups(keys):
        series = {}
        for label, records in runs.items():
            for name in names:
                line = name if len(runs) == 1 else label if len(names) == 1 else f"{label} {name}"
                series[line] = [(r["step"], r[name]) for r in records if isinstance(r.get(name), (int, float))]
        values = {line: constant_value(points) for line, points in series.items() if points}
        if values and all(v is not None for v in values.values()):  # a flat line says nothing a number does not
            constants += [(line, value, len(series[line])) for line, value in values.items()]
        else:
            plots.append(svg_line_plot(series, title))
    parts.append(f'<div class="plots">{"".join(plots)}</div>')
    if constants:
        cells = "".join(f'<tr><td>{esc(line)}</td><td class="constant">{_num(value, ".6g")}</td>'
                        f'<td class="hint">the same at all {count} logged steps</td></tr>'
                        for line, value, count in constants)
        parts.append(f'<h3>Constant during training</h3><table class="constants">{cells}</table>')
    return "".join(parts)


def constant_value(points: Sequence[tuple[float, float]]) -> float | None:
    """The value of a series whose finite values are all equal (to 1e-9 of their size), else None."""
    ys = [float(y) for _, y in points if math.isfinite(float(y))]
    if not ys or len(ys) != len(points):
        return None
    low, high = min(ys), max(ys)
    return ys[0] if high - low <= 1e-9 * max(abs(low), abs(high)) else None


def rounds_section(online_dir: Path) -> str:
    """An online run's rounds.json as a table, and the mean rewards per round as a plot."""
    path = online_dir / ROUNDS_FILE
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SkipSection(f"{path} not found: no round has finished yet") from None
    except (OSError, ValueError) as err:
        raise SkipSection(f"{path}: unreadable ({err})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows) or not rows:
        raise SkipSection(f"{path}: no rounds recorded")
    rewards = sorted({name for row in rows for name in (row.get("mean_rewards") or {})})
    head = "".join(f"<th>{esc(name)}</th>" for name in rewards)
    parts = ['<p class="hint">Per round: the mean reward of its rollout (sampled with the previous round\'s '
             'adapter), the pairs kept, and the last training steps\' implicit accuracy and loss.</p>',
             f'<table class="eval"><thead><tr><th>round</th>{head}<th>pairs</th><th>implicit accuracy</th>'
             '<th>loss</th></tr></thead><tbody>']
    for row in rows:
        means = row.get("mean_rewards") or {}
        cells = "".join(f"<td>{_num(means.get(name))}</td>" for name in rewards)
        parts.append(f'<tr><td>{esc(row.get("round", "?"))}</td>{cells}<td>{esc(row.get("pairs", "–"))}</td>'
                     f'<td>{_num(row.get("implicit_accuracy"), ".3f")}</td><td>{_num(row.get("loss"))}</td></tr>')
    parts.append("</tbody></table>")
    series = {name: [(row["round"], row["mean_rewards"][name]) for row in rows
                     if isinstance(row.get("round"), int) and isinstance((row.get("mean_rewards") or {}).get(name),
                                                                        (int, float))]
              for name in rewards}
    parts.append(f'<div class="plots">{svg_line_plot(series, "mean reward per round", x_label="round")}</div>')
    return "".join(parts)


# ---- page ----------------------------------------------------------------------------------------

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1d2433; background: #f5f6f8; }
header { background: #1d2433; color: #fff; padding: 16px 28px; }
header h1 { margin: 0 0 4px; font-size: 22px; }
header code { color: #c9d4ff; }
nav a { color: #c9d4ff; margin-right: 16px; }
main { padding: 8px 28px 40px; max-width: 1500px; }
section { background: #fff; border-radius: 8px; padding: 12px 20px 18px; margin: 16px 0; box-shadow: 0 1px 3px #0002; }
h2 { margin: 4px 0 8px; font-size: 19px; } h3 { font-size: 16px; margin: 14px 0 6px; } h4 { margin: 4px 0 8px; }
code { font-size: 12px; background: #eef0f4; padding: 1px 4px; border-radius: 3px; word-break: break-all; }
header code { background: transparent; }
.hint { color: #5b6475; margin: 4px 0 8px; }
.note { background: #eef3fb; border-left: 4px solid #6b8fd6; padding: 6px 10px; margin: 6px 0; }
.warning { background: #fff4e5; border-left: 5px solid #e8590c; padding: 8px 12px; margin: 8px 0; font-weight: 600; color: #8a3200; }
table.eval { border-collapse: collapse; margin: 4px 0 12px; }
table.eval th, table.eval td { padding: 3px 10px; border-bottom: 1px solid #e3e6eb; text-align: right; font-variant-numeric: tabular-nums; }
table.eval th:first-child, table.eval td:first-child, table.eval th:nth-child(2), table.eval td:nth-child(2) { text-align: left; }
table.eval thead th { background: #f0f2f5; }
tr.up td.diff, span.up { color: #1b7f3b; font-weight: 600; } tr.down td.diff, span.down { color: #c92a2a; font-weight: 600; }
tr.up { background: #ebfbee; } tr.down { background: #fff0f0; }
.kind { font-size: 11px; padding: 1px 6px; border-radius: 8px; background: #e9ecef; }
.kind.trained { background: #dbe4ff; } .kind.held_out { background: #fff3bf; } .kind.logged { background: #e9ecef; }
.kind.truth { background: #d3f9d8; } .kind.vbench { background: #f3d9fa; }
.card { border: 1px solid #e3e6eb; border-radius: 6px; padding: 8px 12px; margin: 10px 0; }
.groups > .card { margin: 0; }
figure.cell { margin: 0; }
figure.cell figcaption { font-weight: 600; margin-bottom: 4px; }
figure.chosen figcaption { color: #1b7f3b; } figure.rejected figcaption { color: #c92a2a; }
.groups { display: flex; flex-wrap: wrap; gap: 14px 28px; align-items: flex-start; }
.pair figure.cell { width: 288px; } .pair video.clip { width: 100%; height: auto; }
video.clip { display: block; max-width: 100%; background: #000; border-radius: 4px; }
video.clip[data-pixelated] { image-rendering: pixelated; image-rendering: crisp-edges; }
.vrows { display: flex; flex-direction: column; gap: 6px; }
.vrow { display: flex; gap: 14px; align-items: flex-start; border-top: 1px solid #e3e6eb; padding-top: 6px; }
.vrow figure.cell figcaption { margin-bottom: 2px; }
.vlabel { width: 150px; flex: none; } .group-name { font-weight: 700; font-size: 16px; }
ul.verdicts { margin: 4px 0 6px; padding-left: 20px; } ul.verdicts li { margin: 0; }
.verdict { font-weight: 700; } .verdict.up { color: #1b7f3b; } .verdict.down { color: #c92a2a; } .verdict.same { color: #5b6475; }
td.right { color: #1b7f3b; font-weight: 700; } td.wrong { color: #c92a2a; font-weight: 700; }
table.constants td { padding: 1px 10px 1px 0; } td.constant { font-variant-numeric: tabular-nums; font-weight: 600; }
img.frames { max-width: 100%; image-rendering: pixelated; border-radius: 4px; }
table.scores { font-size: 12px; border-collapse: collapse; margin-top: 4px; font-variant-numeric: tabular-nums; }
table.scores td, table.scores th { padding: 0 8px 0 0; text-align: left; line-height: 1.25; }
.pair { display: flex; gap: 10px; align-items: flex-start; }
.margin { font-weight: normal; color: #5b6475; margin-left: 8px; }
.missing { color: #8a3200; background: #fff4e5; padding: 8px; border-radius: 4px; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; }
svg.plot { background: #fff; border: 1px solid #e3e6eb; border-radius: 4px; }
svg.plot .frame { fill: none; stroke: #9aa3b2; } svg.plot .grid { stroke: #e9ecef; }
svg.plot .axis { font-size: 10px; fill: #5b6475; } svg.plot .legend { font-size: 11px; fill: #1d2433; }
svg.plot .plot-title { font-size: 13px; font-weight: 600; fill: #1d2433; }
"""

# Fills <pre id="report-status"> with what loaded, for headless checks (tests) and quick debugging.
STATUS_SCRIPT = """
(function () {
  function update() {
    var videos = document.querySelectorAll("video");
    var loaded = 0, failed = 0;
    videos.forEach(function (v) {
      if (v.readyState >= 1 && v.duration > 0) loaded++;
      if (v.error) failed++;
    });
    var images = document.querySelectorAll("img.frames");
    var decoded = 0;
    images.forEach(function (i) { if (i.complete && i.naturalWidth > 0) decoded++; });
    document.getElementById("report-status").textContent = JSON.stringify({
      videos: videos.length, videos_loaded: loaded, videos_failed: failed,
      images: images.length, images_decoded: decoded, plots: document.querySelectorAll("svg.plot").length
    });
  }
  document.querySelectorAll("video").forEach(function (v) {
    v.addEventListener("loadedmetadata", update);
    v.addEventListener("error", update);
  });
  window.addEventListener("load", update);
  update();
})();
"""


TITLES = {"pipeline": "run", "eval": "evaluation", "train": "training run", "online": "online run"}


def _sections(sources: RunSources, result: Mapping[str, Any] | None, eval_dir: Path | None,
              examples: int) -> list[tuple[str, str, Any]]:
    """(anchor, title, builder) of every section this kind of run has; a pipeline run lists them all and notes
    the stages its run.json leaves out."""
    pipeline = sources.kind == "pipeline"
    sections: list[tuple[str, str, Any]] = []
    if result is not None:
        sections += [("verdict", "Verdict: did training help?", lambda: verdict_section(result)),
                     ("videos", "Base vs tuned videos", lambda: eval_videos_section(result, eval_dir)),
                     ("eval", "Evaluation: base vs tuned", lambda: eval_table_section(result))]
    if sources.rounds is not None:
        sections.append(("rounds", "Online rounds", lambda: rounds_section(sources.rounds)))
    if sources.trains or pipeline:
        sections.append(("training", "Training curves",
                         lambda: training_section(sources.trains) if sources.trains
                         else _skip("no train stage in run.json")))
    if sources.pairs is not None or pipeline:
        sections.append(("pairs", "Preference pairs: widest and narrowest margins",
                         lambda: pairs_section(sources.pairs, sources.store, examples) if sources.pairs is not None
                         else _skip("no pairs stage in run.json")))
    return sections


def _facts(sources: RunSources, result: Mapping[str, Any] | None) -> list[str]:
    """The header's one-line summary of the run, each piece escaped."""
    if result is not None:
        facts = [f"model <code>{esc(result.get('model', '?'))}</code>",
                 f"{len(result.get('prompts') or [])} held-out prompts x {len(result.get('seeds') or [])} seeds"]
        sampling = result.get("sampling") or {}
        if sampling:
            facts.append(esc(", ".join(f"{k} {v}" for k, v in sampling.items())))
        return facts
    if sources.kind == "online":
        return [f"{len(sources.trains)} round(s) with a training run"]
    summary = read_json_object(next(iter(sources.trains.values())) / "summary.json") if sources.trains else None
    return [esc(f"{key} {summary[key]}") for key in ("method", "steps", "model") if summary and key in summary]


def build_report(run_dir: str | os.PathLike, examples: int = 2) -> str:
    """The report page of the run in `run_dir` (see the module docstring); UserError if it holds no run."""
    sources = find_run(run_dir)
    result, eval_dir = load_eval(sources.eval) if sources.eval is not None else (None, None)
    sections = _sections(sources, result, eval_dir, examples)
    body = []
    for anchor, title, build in sections:
        try:
            content = build()
        except SkipSection as note:
            content = f'<p class="note">Section skipped: {esc(note)}</p>'
        body.append(f'<section id="{anchor}"><h2>{esc(title)}</h2>{content}</section>')
    # eval.json's own warnings say what the verdict's warning says (computed from the same comparisons); they
    # are shown only when there is no verdict.
    verdict = any(anchor == "verdict" and "Section skipped" not in text for (anchor, _, _), text
                  in zip(sections, body, strict=True))
    warnings = "" if verdict else "".join(f'<div class="warning">&#9888; {esc(w)}</div>'
                                          for w in (result or {}).get("warnings") or [])
    nav = "".join(f'<a href="#{a}">{esc(t.split(":")[0])}</a>' for a, t, _ in sections)
    root = Path(run_dir).resolve()
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>contentv-rlhf report: {esc(root.name)}</title><style>{CSS}</style></head>"
        f"<body><header><h1>contentv-rlhf {esc(TITLES[sources.kind])} report</h1><div><code>{esc(root)}</code>"
        f"</div><div>{' | '.join(_facts(sources, result))}</div><nav>{nav}</nav></header><main>{warnings}"
        f'{"".join(body)}<pre id="report-status" hidden></pre></main><script>{STATUS_SCRIPT}</script></body>'
        "</html>\n"
    )


def _skip(note: str):
    raise SkipSection(note)


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, examples: int = 2) -> Path:
    """Build the report of `run_dir` and write it atomically to `out` (default `run_dir/report.html`)."""
    from rlhf.io import write_text

    page = build_report(run_dir, examples=examples)
    return write_text(Path(out) if out is not None else Path(run_dir) / REPORT_FILE, page)
