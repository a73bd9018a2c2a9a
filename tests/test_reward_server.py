"""reward_server against real local HTTP servers (stdlib, in threads, port 0)."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from mmpo.errors import ConfigError, DataError
from mmpo.rewards.image import build_image_rewards
from mmpo.rewards.reward_server import RewardServer, RewardServerError, decode_png, encode_png, serve_scores


@pytest.fixture
def servers():
    started = []
    yield started
    for s in started:
        s.shutdown()
        s.server_close()


def mean_red(images, prompts, metas):
    """Score = mean red channel + len(prompt) / 100 + metas' bonus."""
    return [float(images[i, 0].mean()) + len(p) / 100 + metas[i].get("bonus", 0) for i, p in enumerate(prompts)]


def batch(n=5):
    imgs = torch.zeros(n, 3, 4, 6)
    for i in range(n):
        imgs[i, 0] = i / 4  # red levels 0, 63.75 -> 64, ... (8-bit PNG)
    return imgs


def custom_server(servers, respond):
    """A server answering the k-th POST with ``respond(k) -> (status, body dict)``; returns (url, call times)."""
    calls = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            calls.append(time.monotonic())
            status, body = respond(len(calls))
            data = json.dumps(body).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:  # the client gave up (timeout)
                pass

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    servers.append(server)
    return f"http://127.0.0.1:{server.server_address[1]}/score", calls


def test_png_round_trip_is_8bit_exact():
    imgs = torch.rand(3, 3, 5, 7)
    back = decode_png(encode_png(imgs))
    assert back.shape == (3, 3, 5, 7) and back.dtype == torch.float32
    torch.testing.assert_close(back, (imgs * 255).round() / 255, atol=1e-7, rtol=0)


def test_round_trip_and_batching(servers):
    seen = []

    def score(images, prompts, metas):
        seen.append(len(prompts))
        return mean_red(images, prompts, metas)

    server = serve_scores(score)
    servers.append(server)
    imgs, prompts = batch(5), ["a", "bb", "ccc", "dddd", "eeeee"]
    metas = [{}, {"bonus": 1.0}, {}, {}, {"bonus": -2.0}]
    expected = [round(i / 4 * 255) / 255 + len(prompts[i]) / 100 + metas[i].get("bonus", 0) for i in range(5)]
    out = RewardServer(url=server.url, batch_size=2)(imgs, prompts, metas)
    assert out.dtype == torch.float32 and out.tolist() == pytest.approx(expected, abs=1e-6)
    assert seen == [2, 2, 1]  # 5 rows in requests of 2
    seen.clear()
    rs = build_image_rewards([{"name": "reward_server", "url": server.url, "weight": 0.5, "headers": {"X-Token": "t"}}])
    out = rs(imgs, prompts, metas)
    assert seen == [5] and out.rewards.tolist() == pytest.approx([0.5 * e for e in expected], abs=1e-6)


def test_rewards_key_and_headers_are_sent(servers):
    got = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            got.update(auth=self.headers["Authorization"], prompts=req["prompts"], metas=req["metas"])
            got["n"] = len(req["images"])
            data = json.dumps({"rewards": [1, 2.5]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    servers.append(server)
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    out = RewardServer(url=url, headers={"Authorization": "Bearer x"})(batch(2), ["p", "q"], [{"color": "red"}, {}])
    assert out.tolist() == [1.0, 2.5]
    assert got == {"auth": "Bearer x", "prompts": ["p", "q"], "metas": [{"color": "red"}, {}], "n": 2}


def test_retries_after_two_503s(servers):
    def flaky(k):
        return (503, {"error": "busy"}) if k <= 2 else (200, {"scores": [0.5, 0.25]})

    url, calls = custom_server(servers, flaky)
    out = RewardServer(url=url, retries=3, backoff_s=0.01)(batch(2), ["a", "b"], [{}, {}])
    assert out.tolist() == [0.5, 0.25]
    assert len(calls) == 3
    assert calls[1] - calls[0] >= 0.01 and calls[2] - calls[1] >= 0.02  # exponential backoff 0.01, 0.02


def test_gives_up_after_retries(servers):
    url, calls = custom_server(servers, lambda k: (503, {"error": "down"}))
    with pytest.raises(RewardServerError, match=rf"server {url} failed after 3 attempt\(s\); last error: HTTP 503"):
        RewardServer(url=url, retries=2, backoff_s=0.0)(batch(1), ["a"], [{}])
    assert len(calls) == 3


def test_timeout_raises_after_retries(servers):
    def slow(k):
        time.sleep(0.5)
        return 200, {"scores": [1.0]}

    url, calls = custom_server(servers, slow)
    t0 = time.monotonic()
    with pytest.raises(RewardServerError, match=rf"{url} failed after 2 attempt\(s\); last error: ReadTimeout"):
        RewardServer(url=url, timeout_s=0.2, retries=1, backoff_s=0.0)(batch(1), ["a"], [{}])
    assert len(calls) == 2 and time.monotonic() - t0 < 2.0


def test_connection_refused_is_retried():
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = server.server_address[1]
    server.server_close()  # nothing listens there any more
    with pytest.raises(RewardServerError, match=rf":{port}/ failed after 2 attempt\(s\); last error: ConnectionError"):
        RewardServer(url=f"http://127.0.0.1:{port}/", retries=1, backoff_s=0.0)(batch(1), ["a"], [{}])


def test_invalid_answers_name_the_url(servers):
    server = serve_scores(lambda images, prompts, metas: [1.0] * (len(prompts) + 1))  # one score too many
    servers.append(server)
    with pytest.raises(RewardServerError, match=rf"reward server {server.url} returned 4 scores for 3 images"):
        RewardServer(url=server.url)(batch(3), ["a", "b", "c"], [{}] * 3)
    answers = iter(
        [
            (200, {"scores": [1.0, float("nan")]}),
            (200, {"scores": [1.0, "high"]}),
            (200, {"score": [1.0, 2.0]}),
            (404, {"error": "no such path"}),
        ]
    )
    url, calls = custom_server(servers, lambda k: next(answers))
    rew = RewardServer(url=url, retries=3, backoff_s=0.0)
    for pattern in [
        rf"reward server {url}: score 1 is nan; scores must be finite numbers",
        rf"reward server {url}: score 1 is 'high'",
        rf"reward server {url} must answer {{\"scores\": \[...\]}} \(or \"rewards\"\), got keys \['score'\]",
        rf"reward server {url} answered HTTP 404",
    ]:
        with pytest.raises(RewardServerError, match=pattern):
            rew(batch(2), ["a", "b"], [{}, {}])
    assert len(calls) == 4  # none of these is retried


def test_scorer_exception_is_a_500(servers):
    def broken(images, prompts, metas):
        raise RuntimeError("model not loaded")

    server = serve_scores(broken)
    servers.append(server)
    with pytest.raises(RewardServerError, match=r"after 1 attempt\(s\); last error: HTTP 500: .*model not loaded"):
        RewardServer(url=server.url, retries=0)(batch(1), ["a"], [{}])


def test_option_and_data_errors():
    with pytest.raises(ConfigError, match=r"task.rewards\[0\].url: must start with http:// or https://"):
        build_image_rewards([{"name": "reward_server", "url": "localhost:8000"}])
    with pytest.raises(ConfigError, match=r"task.rewards\[0\].retries: must be an integer >= 0"):
        build_image_rewards([{"name": "reward_server", "url": "http://x/", "retries": -1}])
    with pytest.raises(ConfigError, match=r"task.rewards\[0\].headers: must be a mapping"):
        build_image_rewards([{"name": "reward_server", "url": "http://x/", "headers": {"X": 1}}])
    with pytest.raises(DataError, match="metas must be JSON-serialisable"):
        RewardServer(url="http://127.0.0.1:9/")(batch(1), ["a"], [{"t": torch.zeros(1)}])
