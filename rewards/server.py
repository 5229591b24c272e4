"""`contentv-rlhf reward-server`: load the scorers of a rewards YAML once and serve their scores over HTTP.

Standard library HTTP (`http.server.ThreadingHTTPServer`), the safetensors wire format of `rewards.wire`:

    GET  /v1/scorers                             -> {"protocol", "max_request_bytes", "scorers": {name: {"info", ...}}}
    GET  /v1/positions?scorer=NAME&num_frames=T  -> {"positions": [frame indices the scorer reads] or null}
    POST /v1/score?scorer=NAME  (request body)   -> scores body; errors: {"error": "one line"} with 400, 404, 411,
                                                    413 (body over max_request_mb), 500 (the scorer failed)

A request is scored as one batch, exactly as `scorer(frames, prompts, positions=..., num_frames=...)` in-process
(one scorer call at a time: requests queue on a lock, so a GPU holds one batch). Bodies larger than
`max_request_mb` are refused from their Content-Length (413), never stored. It binds to 127.0.0.1 unless
`host` says otherwise; it has no authentication, so serve other machines only on a trusted network.
Module-level imports are light (`--help`); torch loads when the server starts.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from rlhf.config import ConfigError, option
from rlhf.errors import UserError, one_line

logger = logging.getLogger("contentv-rlhf")
MIB = 1 << 20
DRAIN_BYTES = 64 * MIB  # a refused body up to this size is read (1 MiB at a time) and dropped


@dataclass
class RewardServerConfig:
    """`reward-server`: which scorers to serve, where, and the largest request accepted."""

    rewards: str | None = option(None, "Rewards YAML whose scorers are served (the `score` command's format; its "
                                       "device applies).")
    host: str = option("127.0.0.1", "Address to listen on: 127.0.0.1 serves this machine only; 0.0.0.0 (or a "
                                    "LAN address) serves others, without authentication: trusted networks only.")
    port: int = option(8765, "TCP port to listen on; 0 picks a free one (printed when the server is ready).")
    max_request_mb: float = option(256.0, "Largest request body accepted, in MiB; larger ones get 413 unread "
                                          "(a batch of 8 videos x 8 frames x 480x832 RGB in uint8 is 73 MiB).")

    def __post_init__(self) -> None:
        if not self.rewards:
            raise ConfigError("rewards", "is required: the rewards YAML whose scorers to serve")
        if not self.host.strip():
            raise ConfigError("host", "must be an address such as 127.0.0.1")
        if not 0 <= self.port <= 65535:
            raise ConfigError("port", f"must be in [0, 65535], got {self.port}")
        if not 0 < self.max_request_mb <= 1 << 20:
            raise ConfigError("max_request_mb", f"must be in (0, 1048576], got {self.max_request_mb}")


class _Handler(BaseHTTPRequestHandler):
    """One request: routed to the `RewardServer` in `self.server.app`."""

    server_version = "contentv-rlhf-reward-server"
    timeout = 120  # seconds a client may stall while sending; frees the thread of a vanished client

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        route, query = self._route()
        app: RewardServer = self.server.app
        if route == "/v1/scorers":
            self._json(200, app.listing())
        elif route == "/v1/positions":
            try:
                name, num_frames = query["scorer"], int(query["num_frames"])
                if num_frames < 1:
                    raise ValueError
            except (KeyError, ValueError):
                return self._json(400, {"error": "expected ?scorer=NAME&num_frames=T (T >= 1)"})
            if name not in app.scorers:
                return self._json(404, {"error": f"no scorer {name!r}; serving {', '.join(app.scorers)}"})
            self._json(200, {"positions": app.scorers[name].scorer.frame_positions(num_frames)})
        else:
            self._json(404, {"error": f"no route {route}; see GET /v1/scorers"})

    def do_POST(self) -> None:  # noqa: N802
        route, query = self._route()
        app: RewardServer = self.server.app
        if route != "/v1/score":
            self.close_connection = True
            return self._json(404, {"error": f"no route {route}; POST /v1/score?scorer=NAME"})
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            return self._json(411, {"error": "a score request needs a Content-Length"})
        if int(length) > app.max_request_bytes:
            self.close_connection = True
            self._discard(int(length))
            return self._json(413, {"error": f"request body of {length} bytes is over this server's limit of "
                                             f"{app.max_request_bytes} bytes (--max-request-mb); send fewer videos "
                                             "per request (lower batch_size)"})
        body = self.rfile.read(int(length))
        if len(body) != int(length):  # the client went away mid-body
            self.close_connection = True
            return None
        name = query.get("scorer", "")
        if name not in app.scorers:
            return self._json(404, {"error": f"no scorer {name!r}; serving {', '.join(app.scorers)}"})
        status, payload = app.score(name, body)
        if status != 200:
            return self._json(status, payload)
        self._send(200, "application/octet-stream", payload)

    def _discard(self, length: int) -> None:
        """Read and drop a refused body of at most DRAIN_BYTES (closing on unread bytes could reset the connection
        before the client reads the 413); a larger one stays unread."""
        if length <= DRAIN_BYTES:
            while length > 0 and (chunk := self.rfile.read(min(length, MIB))):
                length -= len(chunk)

    def _route(self) -> tuple[str, dict[str, str]]:
        parts = urllib.parse.urlsplit(self.path)
        return parts.path.rstrip("/") or "/", dict(urllib.parse.parse_qsl(parts.query))

    def _json(self, status: int, data: Any) -> None:
        self._send(status, "application/json", json.dumps(data).encode())

    def _send(self, status: int, kind: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        logger.debug("reward-server %s: " + format, self.address_string(), *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stalled client never blocks shutdown

    def __init__(self, address: tuple[str, int], app: RewardServer):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.app = app
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One log line (not socketserver's traceback on stderr) for a client that vanished mid-answer."""
        import sys

        logger.warning("reward-server: request from %s failed: %s", client_address[0], one_line(sys.exc_info()[1]))


class RewardServer:
    """Built scorers behind an HTTP endpoint; `serve_forever()` in this thread, `shutdown()` from another."""

    def __init__(self, scorers: Mapping[str, Any], host: str = "127.0.0.1", port: int = 0,
                 max_request_bytes: int = 256 * MIB):
        self.scorers, self.max_request_bytes = dict(scorers), int(max_request_bytes)
        self._lock = threading.Lock()
        self._server = _Server((host, port), self)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def listing(self) -> dict[str, Any]:
        from rewards.scoring import _plain
        from rewards.wire import PROTOCOL

        return {"protocol": PROTOCOL, "max_request_bytes": self.max_request_bytes,
                "scorers": {name: {"info": _plain(s.scorer.info()), "differentiable": s.scorer.differentiable}
                            for name, s in self.scorers.items()}}

    def score(self, name: str, body: bytes) -> tuple[int, Any]:
        """`(200, answer bytes)`, or `(status, {"error": ...})` for a bad request (400) or a failed scorer (500)."""
        import torch

        from rewards.wire import decode_request, encode_scores

        scorer = self.scorers[name].scorer
        try:
            request = decode_request(body)
            with self._lock, torch.no_grad():
                scores = scorer(request.frames.to(scorer.device or "cpu"), request.prompts,
                                positions=request.positions, num_frames=request.num_frames)
        except (ValueError, UserError) as err:
            return 400, {"error": one_line(err, 400)}
        except Exception as err:  # a bug or an out-of-memory in the scorer: the server keeps serving
            logger.exception("reward-server: scorer %r failed", name)
            return 500, {"error": f"scorer {name!r} failed: {type(err).__name__}: {one_line(err, 300)}"}
        return 200, encode_scores(scores.float().cpu())

    def serve_forever(self) -> None:
        self._server.serve_forever(poll_interval=0.2)

    def shutdown(self) -> None:
        """Stop `serve_forever` (call from another thread) and close the socket."""
        self._server.shutdown()
        self.close()

    def close(self) -> None:
        """Close the listening socket."""
        self._server.server_close()


def serve(config: RewardServerConfig) -> int:
    """Check the rewards YAML, bind, load the scorers, print the URL, and serve until interrupted."""
    from rewards.build import build_scorers
    from rewards.config import load_rewards_config

    rewards = load_rewards_config(config.rewards, field="rewards")
    remote = [name for name, entry in rewards.scorers.items() if entry and "remote" in entry]
    if remote:
        raise UserError(f"{config.rewards}: scorer(s) {', '.join(remote)} are remote themselves; a reward server "
                        "serves scorers it loads")
    try:
        server = RewardServer({}, config.host, config.port, int(config.max_request_mb * MIB))
    except OSError as err:
        raise UserError(f"host/port: cannot listen on {config.host}:{config.port} "
                        f"({err.strerror or one_line(err)})") from None
    try:
        server.scorers = build_scorers(rewards)
        print(f"reward-server: serving {', '.join(server.scorers)} on {server.url} "
              f"(requests up to {config.max_request_mb:g} MiB); Ctrl-C stops it", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        print("reward-server: stopped", flush=True)
    finally:
        server.close()
    return 0
