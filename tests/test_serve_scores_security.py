"""``serve_scores`` refuses strangers and malformed requests (a real server, raw sockets, no mocks).

Each bad request gets its 4xx and the server still answers a good one afterwards; a client that
stalls (slow loris) is disconnected after ``read_timeout_s`` while other clients are served.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import torch

from mmpo.rewards.reward_server import TOKEN_ENV, RewardServer, encode_png, serve_scores

TOKEN = "s3cret-token"
TIMEOUT_S = 1.0
MAX_BODY = 100_000


def mean_red(images: torch.Tensor, prompts: list[str], metas: list[dict]) -> list[float]:
    return images[:, 0].mean(dim=(1, 2)).tolist()


@pytest.fixture(scope="module")
def server():
    srv = serve_scores(mean_red, token=TOKEN, read_timeout_s=TIMEOUT_S, max_body_bytes=MAX_BODY)
    yield srv
    srv.shutdown()
    srv.server_close()


def _good_body() -> bytes:
    images = torch.zeros(2, 3, 4, 4)
    images[1, 0] = 1.0
    return json.dumps({"images": encode_png(images), "prompts": ["a", "b"], "metas": [{}, {}]}).encode()


def _request(body: bytes | None, headers: dict[str, str]) -> bytes:
    lines = ["POST / HTTP/1.1", "Host: 127.0.0.1"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def _exchange(srv, data: bytes, wait_s: float = 10.0) -> tuple[int | None, dict, float]:
    """Send ``data`` on a fresh connection, read to EOF -> (status or None, JSON answer, seconds to EOF)."""
    t0 = time.monotonic()
    with socket.create_connection(srv.server_address, timeout=wait_s) as s:
        s.sendall(data)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    elapsed = time.monotonic() - t0
    if not got:
        return None, {}, elapsed
    head, _, body = got.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body else {}, elapsed


def _good(srv) -> list[float]:
    body = _good_body()
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Length": str(len(body)), "Connection": "close"}
    status, answer, _ = _exchange(srv, _request(body, headers))
    assert status == 200, answer
    return answer["scores"]


def test_a_good_request_with_the_token_is_scored(server):
    assert _good(server) == pytest.approx([0.0, 1.0])
    client = RewardServer(url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, retries=0)
    images = torch.zeros(3, 3, 4, 4)
    images[:, 0] = torch.tensor([0.0, 0.4, 1.0])[:, None, None]
    assert client(images, ["x"] * 3, [{}] * 3).tolist() == pytest.approx([0.0, round(0.4 * 255) / 255, 1.0])


@pytest.mark.parametrize("auth", [None, "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer"])
def test_requests_without_the_token_get_401(server, auth):
    body = _good_body()
    headers = {"Content-Length": str(len(body))}
    if auth is not None:
        headers["Authorization"] = auth
    status, answer, _ = _exchange(server, _request(body, headers))
    assert status == 401 and "token" in answer["error"]
    assert _good(server) == pytest.approx([0.0, 1.0])


def _auth(**headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}", **headers}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (_request(b"{}", _auth(**{"Content-Length": "-1"})), 400),
        (_request(b"{}", _auth(**{"Content-Length": "abc"})), 400),
        (_request(b"{}", _auth(**{"Content-Length": "+2"})), 400),
        (_request(b"{}", _auth()), 411),  # no Content-Length
        (_request(b"2\r\n{}\r\n0\r\n\r\n", _auth(**{"Transfer-Encoding": "chunked"})), 411),
        (_request(b"{}", _auth(**{"Content-Length": str(MAX_BODY + 1)})), 413),
        (_request(b"{}", _auth(**{"Content-Length": "99999999999999999999"})), 413),
        (_request(b"not json", _auth(**{"Content-Length": "8"})), 400),
        (_request(b"[1, 2]", _auth(**{"Content-Length": "6"})), 400),
        (_request(b'{"images": ["bm90IGEgcG5n"]}', _auth(**{"Content-Length": "28"})), 400),  # not a PNG
    ],
)
def test_malformed_requests_get_a_4xx_and_the_server_goes_on(server, data, expected):
    status, answer, elapsed = _exchange(server, data)
    assert status == expected and answer["error"]
    assert elapsed < TIMEOUT_S  # answered at once, not after a read timeout
    assert _good(server) == pytest.approx([0.0, 1.0])


def test_a_body_shorter_than_its_content_length_gets_408_after_the_timeout(server):
    status, answer, elapsed = _exchange(server, _request(b'{"images": []', _auth(**{"Content-Length": "500"})))
    assert status == 408 and "13 of 500 bytes" in answer["error"]
    assert TIMEOUT_S * 0.9 <= elapsed < TIMEOUT_S + 3
    assert _good(server) == pytest.approx([0.0, 1.0])


def test_slow_loris_connections_are_closed_after_the_timeout_while_others_are_served(server):
    """Three stalled clients (half a header block; headers then no body; a body dripped a byte at a
    time) are dropped after about ``read_timeout_s`` while good requests go through meanwhile."""
    half = b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    no_body = _request(None, _auth(**{"Content-Length": "50"}))
    socks = [socket.create_connection(server.server_address, timeout=10) for _ in range(3)]
    socks[0].sendall(half)
    socks[1].sendall(no_body)
    socks[2].sendall(no_body)
    t0, closed_after = time.monotonic(), {}

    def drip() -> None:  # one byte every TIMEOUT_S / 4: never a single read timeout, but too slow overall
        try:
            while time.monotonic() - t0 < TIMEOUT_S + 3:
                socks[2].sendall(b" ")
                time.sleep(TIMEOUT_S / 4)
        except OSError:
            pass

    def wait_closed(i: int) -> None:
        data = b""
        while chunk := socks[i].recv(65536):
            data += chunk
        closed_after[i] = (time.monotonic() - t0, data)

    threads = [threading.Thread(target=drip)] + [threading.Thread(target=wait_closed, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    served = []
    while time.monotonic() - t0 < TIMEOUT_S * 0.8:  # the stalled clients hold no one up
        served.append(_good(server))
    for t in threads:
        t.join(timeout=10)
    for s in socks:
        s.close()
    assert len(served) >= 2 and all(v == pytest.approx([0.0, 1.0]) for v in served)
    assert sorted(closed_after) == [0, 1, 2]
    for i in range(3):
        elapsed, data = closed_after[i]
        assert TIMEOUT_S * 0.9 <= elapsed < TIMEOUT_S + 3, (i, elapsed)
    assert closed_after[0][1] == b""  # the request line never ended: dropped without an answer
    assert closed_after[1][1].startswith(b"HTTP/1.0 408") and closed_after[2][1].startswith(b"HTTP/1.0 408")
    assert _good(server) == pytest.approx([0.0, 1.0])


def test_token_from_the_environment_and_bad_settings(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    srv = serve_scores(mean_red, read_timeout_s=TIMEOUT_S)
    try:
        body = _good_body()
        status, _, _ = _exchange(srv, _request(body, {"Content-Length": str(len(body))}))
        assert status == 401
        ok = {"Authorization": "Bearer from-env", "Content-Length": str(len(body))}
        status, answer, _ = _exchange(srv, _request(body, ok))
        assert status == 200 and answer["scores"] == pytest.approx([0.0, 1.0])
    finally:
        srv.shutdown()
        srv.server_close()
    monkeypatch.delenv(TOKEN_ENV)
    open_srv = serve_scores(mean_red, read_timeout_s=TIMEOUT_S)  # no token anywhere: open, as before
    try:
        body = _good_body()
        status, _, _ = _exchange(open_srv, _request(body, {"Content-Length": str(len(body))}))
        assert status == 200
    finally:
        open_srv.shutdown()
        open_srv.server_close()
    for kwargs in ({"token": ""}, {"token": " padded "}, {"read_timeout_s": 0}, {"max_body_bytes": 0}):
        with pytest.raises(ValueError, match="serve_scores"):
            serve_scores(mean_red, **kwargs)
