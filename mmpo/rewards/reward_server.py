"""``reward_server``: score images with any HTTP endpoint (a reward model served elsewhere).

Protocol (one request per chunk of ``batch_size`` rows, chunks in order)::

    POST <url>        Content-Type: application/json  (+ the configured ``headers``)
    {"images": ["<base64 PNG>", ...], "prompts": ["...", ...], "metas": [{...}, ...]}

    200 OK            {"scores": [0.73, ...]}     (or {"rewards": [...]})

``images[i]`` is row i of the batch as an 8-bit RGB PNG (``round(255 * clamp(x, 0, 1))``,
lossless), base64 with the standard alphabet and no ``data:`` prefix; ``prompts`` and
``metas`` are the rows' prompts and per-prompt dicts (metas must be JSON-serialisable). The
answer holds one finite number per image, in order; higher is better.

Failures: connection errors, timeouts (``timeout_s``, per connect and per read), HTTP 429 and
5xx are retried ``retries`` times (``retries + 1`` attempts), sleeping ``backoff_s * 2**k``
before retry ``k + 1``; then :class:`RewardServerError` names the URL, the attempts and the last
error. Any other non-2xx status and any malformed answer (not JSON, no ``scores`` list, wrong
length, a non-numeric / NaN / infinite score) fail at once with a RewardServerError naming the
URL and what was wrong.

To serve your own scorer, :func:`serve_scores` is a minimal reference server (stdlib only)::

    server = serve_scores(lambda images, prompts, metas: my_model(images, prompts), port=8000, token=TOKEN)
    # config: rewards: [{name: reward_server, url: "http://127.0.0.1:8000/",
    #                    headers: {Authorization: "Bearer TOKEN"}}]
    server.shutdown(); server.server_close()

It refuses strangers and bad requests (bearer token, read timeout, body size limit; see its docstring).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from mmpo.errors import DataError, MMPOError
from mmpo.rewards.image_component import (
    IMAGE_REWARDS,
    ImageReward,
    Metas,
    OptionError,
    check_batch,
    float_option,
    int_option,
    str_option,
)

log = logging.getLogger(__name__)


class RewardServerError(MMPOError, RuntimeError):
    """A reward server could not be reached, or answered something unusable."""


def encode_png(images: torch.Tensor) -> list[str]:
    """images [N, 3, H, W] in [0, 1] -> N base64 strings of 8-bit RGB PNGs."""
    from PIL import Image

    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(a)).save(buf, format="PNG", compress_level=1)
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def decode_png(strings: Sequence[str]) -> torch.Tensor:
    """N base64 PNGs (all the same size) -> images [N, 3, H, W] float32 in [0, 1]."""
    from PIL import Image

    arrs = [np.asarray(Image.open(io.BytesIO(base64.b64decode(s))).convert("RGB")) for s in strings]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 255


@IMAGE_REWARDS.register("reward_server")
@dataclass
class RewardServer(ImageReward):
    """Scores from an HTTP reward server (protocol in the module docstring).

    Options: ``url`` (http(s)://...), ``timeout_s`` (default 30), ``retries`` (default 3),
    ``backoff_s`` (default 0.5), ``batch_size`` (rows per request, default 32), ``headers``
    (extra HTTP headers, e.g. ``{Authorization: "Bearer ..."}``).
    """

    url: str
    timeout_s: float = 30.0
    retries: int = 3
    backoff_s: float = 0.5
    batch_size: int = 32
    headers: dict | None = None
    _session: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        str_option(self.url, "url")
        if not self.url.startswith(("http://", "https://")):
            raise OptionError("url", f"must start with http:// or https://, got {self.url!r}")
        self.timeout_s = float_option(self.timeout_s, "timeout_s", 1e-6)
        self.retries = int_option(self.retries, "retries", 0)
        self.backoff_s = float_option(self.backoff_s, "backoff_s", 0.0)
        self.batch_size = int_option(self.batch_size, "batch_size")
        headers = {} if self.headers is None else self.headers
        if not isinstance(headers, Mapping) or not all(isinstance(x, str) for kv in headers.items() for x in kv):
            raise OptionError("headers", f"must be a mapping of header name to string value, got {self.headers!r}")
        self.headers = dict(headers)

    def meta_keys(self) -> None:
        """Any: every prompt row's keys are sent to the server."""
        return None

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metas: Metas) -> torch.Tensor:
        """images [N, 3, H, W] in [0, 1] -> scores [N] float32 on the images' device."""
        metas = check_batch(images, prompts, metas)
        encoded, scores = encode_png(images), []
        for s in range(0, len(encoded), self.batch_size):
            e = s + self.batch_size
            try:
                rows = {"images": encoded[s:e], "prompts": list(prompts[s:e]), "metas": [dict(m) for m in metas[s:e]]}
                body = json.dumps(rows)
            except (TypeError, ValueError) as exc:
                raise DataError(f"reward_server {self.url}: metas must be JSON-serialisable ({exc})") from None
            scores += self._post(body, len(encoded[s:e]))
        return torch.tensor(scores, dtype=torch.float32, device=images.device)

    def _post(self, body: str, n: int) -> list[float]:
        """POST one chunk of n rows, retrying transient failures -> n scores."""
        import requests

        if self._session is None:
            self._session = requests.Session()
        headers = {"Content-Type": "application/json", **self.headers}
        attempts, last = self.retries + 1, ""
        for attempt in range(1, attempts + 1):
            try:
                resp = self._session.post(self.url, data=body.encode("utf-8"), headers=headers, timeout=self.timeout_s)
            except (requests.ConnectionError, requests.Timeout) as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code == 429 or resp.status_code >= 500:
                    last = f"HTTP {resp.status_code}: {resp.text[:200]!r}"
                elif not 200 <= resp.status_code < 300:
                    why = f"answered HTTP {resp.status_code}: {resp.text[:300]!r}"
                    raise RewardServerError(f"reward server {self.url} {why}")
                else:
                    return self._parse(resp, n)
            if attempt < attempts:
                delay = self.backoff_s * 2 ** (attempt - 1)
                msg = "reward server %s: attempt %d/%d failed (%s); retrying in %.2fs"
                log.warning(msg, self.url, attempt, attempts, last, delay)
                time.sleep(delay)
        raise RewardServerError(f"reward server {self.url} failed after {attempts} attempt(s); last error: {last}")

    def _parse(self, resp: Any, n: int) -> list[float]:
        """Validate a 2xx answer -> n finite floats (RewardServerError naming the URL otherwise)."""
        try:
            data = resp.json()
        except ValueError:
            raise RewardServerError(f"reward server {self.url} answered non-JSON: {resp.text[:200]!r}") from None
        scores = data.get("scores", data.get("rewards")) if isinstance(data, dict) else None
        if not isinstance(scores, list):
            got = f"keys {sorted(data)}" if isinstance(data, dict) else type(data).__name__
            why = f'must answer {{"scores": [...]}} (or "rewards"), got {got}'
            raise RewardServerError(f"reward server {self.url} {why}")
        if len(scores) != n:
            raise RewardServerError(f"reward server {self.url} returned {len(scores)} scores for {n} images")
        for i, v in enumerate(scores):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise RewardServerError(f"reward server {self.url}: score {i} is {v!r}; scores must be finite numbers")
        return [float(v) for v in scores]


TOKEN_ENV = "MMPO_REWARD_SERVER_TOKEN"  # serve_scores' bearer token when none is passed


def serve_scores(
    score_fn: Callable[[torch.Tensor, list[str], list[dict]], Any],
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    token: str | None = None,
    read_timeout_s: float = 10.0,
    max_body_bytes: int = 64 << 20,
) -> ThreadingHTTPServer:
    """Serve ``score_fn(images [N, 3, H, W] float32 in [0, 1], prompts, metas) -> N scores`` over the protocol.

    A reference server (stdlib ``http.server``) running in a daemon thread; ``port=0`` picks a free
    port. Returns the server, with ``server.url`` (``http://host:port/``); stop it with
    ``server.shutdown(); server.server_close()``. Calls to ``score_fn`` are serialised by a lock.

    Guards: with ``token`` (default ``$MMPO_REWARD_SERVER_TOKEN``; unset or empty: no check) every
    request needs ``Authorization: Bearer <token>`` (the client's ``headers`` option), else 401.
    Each socket read waits at most ``read_timeout_s`` and the whole body must arrive within it
    (else 408 and the connection is closed), so a stalled or slow client holds its thread no longer
    than that. The body needs a ``Content-Length`` (411 without one; 400 when not a non-negative
    integer) of at most ``max_body_bytes`` (413, body left unread). A body that is not the JSON
    object of the protocol answers 400, an exception in ``score_fn`` 500, all as ``{"error": "..."}``.
    """
    if token is None:
        token = os.environ.get(TOKEN_ENV) or None
    if token is not None and (not isinstance(token, str) or not token or token != token.strip()):
        raise ValueError("serve_scores: token must be a non-empty string without surrounding spaces")
    if not read_timeout_s > 0:
        raise ValueError(f"serve_scores: read_timeout_s must be > 0, got {read_timeout_s!r}")
    if int(max_body_bytes) < 1:
        raise ValueError(f"serve_scores: max_body_bytes must be >= 1, got {max_body_bytes!r}")
    expected = hashlib.sha256(f"Bearer {token}".encode()).digest() if token else None
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        timeout = read_timeout_s  # socket timeout for every read (StreamRequestHandler.setup)

        def _reply(self, status: int, payload: dict, close: bool = False) -> None:
            body = json.dumps(payload).encode("utf-8")
            if close:  # the request's body (if any) was not read: the connection cannot be reused
                self.close_connection = True
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if status == 401:
                    self.send_header("WWW-Authenticate", "Bearer")
                if close:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
            except OSError:  # the client left
                self.close_connection = True

        def _authorized(self) -> bool:
            if expected is None:
                return True
            got = hashlib.sha256(self.headers.get("Authorization", "").strip().encode("utf-8", "replace")).digest()
            return hmac.compare_digest(got, expected)

        def _read_body(self) -> bytes | None:
            """The request body (None once an error answer is sent): bounded in size and time."""
            if self.headers.get("Transfer-Encoding"):
                self._reply(411, {"error": "Transfer-Encoding is not supported; send a Content-Length"}, close=True)
                return None
            raw = self.headers.get_all("Content-Length") or []
            if not raw:
                self._reply(411, {"error": "a Content-Length header is required"}, close=True)
                return None
            if len(set(raw)) > 1 or not raw[0].strip().isdigit():
                self._reply(400, {"error": f"bad Content-Length {', '.join(raw)!r}"}, close=True)
                return None
            length = int(raw[0])
            if length > max_body_bytes:
                self._reply(413, {"error": f"body of {length} bytes exceeds the limit of {max_body_bytes}"}, close=True)
                return None
            deadline, chunks, got = time.monotonic() + read_timeout_s, [], 0
            try:
                while got < length:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError
                    self.connection.settimeout(left)
                    chunk = self.rfile.read1(min(length - got, 1 << 20))
                    if not chunk:
                        self.close_connection = True  # the client closed early: no one to answer
                        return None
                    chunks.append(chunk)
                    got += len(chunk)
            except TimeoutError:
                msg = f"the body did not arrive within {read_timeout_s} s ({got} of {length} bytes)"
                self._reply(408, {"error": msg}, close=True)
                return None
            finally:
                self.connection.settimeout(read_timeout_s)
            return b"".join(chunks)

        def do_POST(self) -> None:  # noqa: N802 - http.server naming
            if not self._authorized():
                return self._reply(401, {"error": "missing or wrong bearer token"}, close=True)
            body = self._read_body()
            if body is None:
                return None
            try:
                req = json.loads(body)
                if not isinstance(req, dict) or not isinstance(req.get("images"), list):
                    raise ValueError('expected a JSON object with an "images" list')
                images = decode_png(req["images"]) if req["images"] else torch.zeros(0, 3, 1, 1)
                n = images.shape[0]
                prompts, metas = req.get("prompts") or [""] * n, req.get("metas") or [{} for _ in range(n)]
            except Exception as exc:  # noqa: BLE001 - report any malformed request to the client
                return self._reply(400, {"error": f"bad request: {type(exc).__name__}: {exc}"})
            try:
                with lock:
                    scores = torch.as_tensor(score_fn(images, prompts, metas), dtype=torch.float64).reshape(-1).tolist()
            except Exception as exc:  # noqa: BLE001
                return self._reply(500, {"error": f"{type(exc).__name__}: {exc}"})
            self._reply(200, {"scores": scores})

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep test output quiet
            log.debug("reward server: " + format, *args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    server.url = f"http://{host}:{server.server_address[1]}/"  # type: ignore[attr-defined]
    name = f"serve_scores:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, name=name, daemon=True).start()
    return server


__all__ = ["TOKEN_ENV", "RewardServer", "RewardServerError", "decode_png", "encode_png", "serve_scores"]
