"""A scorer entry served by `contentv-rlhf reward-server`: `{remote: http://host:port}` in any rewards YAML.

    scorers:
      clip: {remote: "http://127.0.0.1:8765", weight: 1.0}              # the server's scorer named clip
      judge: {remote: "http://gpu-box:8765", scorer: vlm_judge, weight: 0.5, retries: 5}

Built with the other scorers, a `RemoteScorer` asks the server once which scorers it serves (`GET /v1/scorers`:
the scorer's `info`, so a store scored remotely and one scored in-process record the same producer), then for
each batch sends only the frames the remote scorer reads (`GET /v1/positions` says which, cached per video
length) and reads back its float32 scores unchanged (`rewards.wire`): a remote score equals the in-process score
of the same frames on the same device and batch, bit for bit. Everything that calls scorers (`score`, `online`,
GRPO, `eval`, `compare`) works with it unchanged; it is not differentiable.

A server that does not answer (refused, reset mid-request, timed out, 502-504) is retried `retries` times with
waits of `backoff_s`, `2 * backoff_s`, ...; then, like any other refusal (a request over the server's size
limit, 413; a bad request, 4xx; a scorer failure, 500), a UserError of one line names the entry and the URL.
"""

from __future__ import annotations

import http.client
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rewards.base import ModelCache, Scorer, check_inputs
from rlhf.config import ConfigError, option
from rlhf.errors import UserError, one_line

logger = logging.getLogger("contentv-rlhf")
RETRIED_STATUSES = frozenset({502, 503, 504})  # a proxy or an overloaded server: worth another try


def url_problem(url: str) -> str | None:
    """What is wrong with a reward server URL (None for `http://host[:port]`, with no path beyond `/`)."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number in range)
    except ValueError as err:
        return f"is not a URL ({err})"
    if parts.scheme != "http" or not parts.hostname:
        return f"expects http://host:port (the reward server speaks plain HTTP), got {url!r}"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return f"expects only http://host:port, without a path or query, got {url!r}"
    return None


@dataclass
class RemoteOptions:
    """Options of a scorer entry served by a `contentv-rlhf reward-server`."""

    remote: str | None = option(None, "URL of the reward server, http://host:port (`contentv-rlhf reward-server`).")
    scorer: str | None = option(None, "Name of the scorer on the server (default: this entry's name).")
    timeout_s: float = option(600.0, "Seconds to wait for one answer before counting the attempt as failed.")
    retries: int = option(3, "Further attempts when the server does not answer (refused, reset, timed out).")
    backoff_s: float = option(1.0, "Wait before the first retry, doubled before each next one.")

    def __post_init__(self) -> None:
        if not self.remote:
            raise ConfigError("remote", "is required: http://host:port of a contentv-rlhf reward-server")
        if problem := url_problem(self.remote):
            raise ConfigError("remote", problem)
        if not self.scorer:
            raise ConfigError("scorer", "must name a scorer of the server")
        if not 0 < self.timeout_s <= 86_400:
            raise ConfigError("timeout_s", f"must be in (0, 86400] seconds, got {self.timeout_s}")
        if not 0 <= self.retries <= 100:
            raise ConfigError("retries", f"must be in [0, 100], got {self.retries}")
        if not 0 <= self.backoff_s <= 600:
            raise ConfigError("backoff_s", f"must be in [0, 600] seconds, got {self.backoff_s}")


class RemoteScorer(Scorer):
    """A scorer of a reward server, called over HTTP; scores equal the server's scorer's exactly."""

    name = "remote"
    Options = RemoteOptions

    def __init__(self, options: RemoteOptions, cache: ModelCache | None = None):
        super().__init__(options, cache)
        self.url = options.remote.rstrip("/")
        listing = json.loads(self.call("GET", "/v1/scorers"))
        served = listing.get("scorers", {})
        if options.scorer not in served:
            raise UserError(f"{self.url} serves no scorer {options.scorer!r} (it serves {', '.join(served) or 'none'}); "
                            "set scorer: to one of those")
        self.remote_info: dict[str, Any] = served[options.scorer]["info"]
        self.max_request_bytes = int(listing["max_request_bytes"])
        self._positions: dict[int, list[int] | None] = {}

    def call(self, method: str, path: str, body: bytes | None = None) -> bytes:
        """The answer body of `method path`, retrying a server that does not answer; UserErrors otherwise."""
        url, options = self.url + path, self.options
        last: BaseException | None = None
        for attempt in range(options.retries + 1):
            if attempt:
                time.sleep(options.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(url, data=body, method=method,
                                             headers={"Content-Type": "application/octet-stream"})
            try:
                with urllib.request.urlopen(request, timeout=options.timeout_s) as answer:
                    return answer.read()
            except urllib.error.HTTPError as err:
                message = _error_text(err)
                if err.code not in RETRIED_STATUSES:
                    raise UserError(f"{self._who()}: {method} {url} answered {err.code}: {message}") from None
                last = RuntimeError(f"HTTP {err.code}: {message}")
            except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
                last = getattr(err, "reason", None) if isinstance(err, urllib.error.URLError) else err
                last = last if isinstance(last, BaseException) else err
            logger.warning("%s: %s %s failed (%s); attempt %d of %d", self._who(), method, url,
                           one_line(last, 120), attempt + 1, options.retries + 1)
        raise UserError(f"{self._who()}: no answer from {url} after {options.retries + 1} attempt(s) "
                        f"({type(last).__name__}: {one_line(last, 160)}); is `contentv-rlhf reward-server` running "
                        "there?") from None

    def _who(self) -> str:
        """`remote scorer 'clip'` once `build_scorers` has named the entry (its errors already carry the name)."""
        return f"remote scorer {self.__dict__['name']!r}" if "name" in self.__dict__ else "reward server"

    def frame_positions(self, num_frames: int) -> list[int] | None:
        if num_frames not in self._positions:
            query = urllib.parse.urlencode({"scorer": self.options.scorer, "num_frames": num_frames})
            self._positions[num_frames] = json.loads(self.call("GET", f"/v1/positions?{query}"))["positions"]
        return self._positions[num_frames]

    def forward(self, frames: torch.Tensor, prompts: Sequence[str], positions: Sequence[int] | None = None,
                num_frames: int | None = None) -> torch.Tensor:
        from rewards.wire import decode_scores, encode_request

        check_inputs(frames, prompts)
        if positions is None:
            positions, num_frames = list(range(frames.shape[1])), frames.shape[1]
        elif num_frames is None or len(positions) != frames.shape[1]:
            raise ValueError(f"positions needs num_frames and one position per frame ({frames.shape[1]}), got "
                             f"{len(positions)} position(s) and num_frames {num_frames}")
        needed = self.frame_positions(num_frames)
        if needed is not None:  # send each frame the scorer reads once; the server picks them as in-process
            where = {int(p): i for i, p in enumerate(positions)}
            keep = sorted(set(needed))
            if missing := [p for p in keep if p not in where]:
                raise ValueError(f"scorer {self.name!r} reads frames {needed} of a {num_frames}-frame video; the "
                                 f"frames given are at {list(positions)} (missing {missing})")
            frames, positions = frames[:, [where[p] for p in keep]], keep
        body = encode_request(frames.detach().cpu(), list(prompts), positions, num_frames)
        if len(body) > self.max_request_bytes:
            raise UserError(f"{self._who()}: a request of {len(body)} bytes ({frames.shape[0]} videos) is over the "
                            f"limit of {self.url} ({self.max_request_bytes} bytes); lower batch_size or start the "
                            "server with a larger --max-request-mb")
        query = urllib.parse.urlencode({"scorer": self.options.scorer})
        try:
            answer = self.call("POST", f"/v1/score?{query}", body)
        except UserError as err:  # mid-run: what `score` has written stays
            raise UserError(f"{err}; scores stored so far are kept, rerun to go on") from None
        try:
            scores = decode_scores(answer, frames.shape[0])
        except ValueError as err:
            raise UserError(f"{self._who()}: {self.url} sent a bad answer ({err})") from None
        return scores.to(frames.device)

    def info(self) -> dict[str, Any]:
        return dict(self.remote_info)


def _error_text(err: urllib.error.HTTPError) -> str:
    """The server's one-line `{"error": ...}` message, else the HTTP reason."""
    try:
        return one_line(json.loads(err.read() or b"{}").get("error") or err.reason, 400)
    except (ValueError, AttributeError, OSError):
        return one_line(str(err.reason), 400)
