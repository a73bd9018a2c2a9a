"""Secrets stay out of run folders: ``${env:NAME}`` resolved at load, redacted in ``config.yaml``,
the trackers' config and error messages (mmpo.redact); a real run's folder holds no secret byte."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from mmpo.cli import main
from mmpo.config import load_config, save_config
from mmpo.errors import ConfigError
from mmpo.redact import MASK, redact, resolve_env, scrub

ROOT = Path(__file__).resolve().parents[1]
SECRET = "s3cr3t-token-8f2e1c"
LITERAL = "literal-key-77aa01"


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_env_reference_resolves_whole_and_inside_a_string(monkeypatch):
    monkeypatch.setenv("H18_TOKEN", SECRET)
    monkeypatch.setenv("H18_HOST", "example.org")
    data = {"a": {"url": "http://${env:H18_HOST}:8000/", "headers": {"Authorization": "Bearer ${env:H18_TOKEN}"}}}
    out = resolve_env(data)
    assert out == {"a": {"url": "http://example.org:8000/", "headers": {"Authorization": f"Bearer {SECRET}"}}}
    # written back as written, so the saved config reads the variable again
    assert redact(out) == data


def test_missing_variable_names_the_key_and_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("H18_NOT_SET", raising=False)
    cfg = _write(tmp_path / "c.yaml", {"task": {"name": "synthetic_vqa"}, "model": {"path": "${env:H18_NOT_SET}"}})
    with pytest.raises(ConfigError, match=r"key 'model\.path' reads the environment variable H18_NOT_SET"):
        load_config(cfg)


def test_malformed_reference_is_a_config_error(tmp_path):
    cfg = _write(tmp_path / "c.yaml", {"task": {"name": "synthetic_vqa"}, "model": {"path": "${env:1bad}"}})
    with pytest.raises(ConfigError, match=r"model\.path.*not a valid reference"):
        load_config(cfg)


def test_header_and_token_values_are_masked_other_values_kept():
    data = {
        "rewards": [{"name": "reward_server", "url": "http://x/", "headers": {"X-Api-Key": LITERAL}}],
        "options": {"api_key": LITERAL, "hf_token": LITERAL, "password": LITERAL, "prompt": "a red image"},
        "n": 3,
    }
    out = redact(data)
    assert out["rewards"][0] == {"name": "reward_server", "url": "http://x/", "headers": {"X-Api-Key": MASK}}
    assert out["options"] == {"api_key": MASK, "hf_token": MASK, "password": MASK, "prompt": "a red image"}
    assert out["n"] == 3


def test_saved_config_keeps_the_reference_and_loads_again(tmp_path, monkeypatch):
    monkeypatch.setenv("H18_TOKEN", SECRET)
    src = _write(
        tmp_path / "c.yaml",
        {"task": {"name": "synthetic_vqa"}, "rollout": {"engine_options": {"api_key": "${env:H18_TOKEN}"}}},
    )
    cfg = load_config(src)
    assert cfg.rollout.engine_options["api_key"] == SECRET
    saved = save_config(cfg, tmp_path / "run" / "config.yaml")
    text = saved.read_text()
    assert SECRET not in text and "${env:H18_TOKEN}" in text
    assert load_config(saved).rollout.engine_options["api_key"] == SECRET


def test_error_messages_are_scrubbed(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("H18_TOKEN", SECRET)
    # a wrong type shows the value in the message: the CLI prints the reference instead
    cfg = _write(tmp_path / "c.yaml", {"task": {"name": "synthetic_vqa"}, "seed": "${env:H18_TOKEN}"})
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "seed" in err and SECRET not in err and "${env:H18_TOKEN}" in err
    assert scrub(f"token {SECRET} here") == "token ${env:H18_TOKEN} here"


def _scoring_server(token: str) -> tuple[ThreadingHTTPServer, list[str]]:
    """A reward server answering 0.5 per image when the bearer token matches, 401 otherwise."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(self.headers.get("Authorization", ""))
            ok = self.headers.get("Authorization") == f"Bearer {token}"
            data = json.dumps({"scores": [0.5] * len(body["images"])} if ok else {"error": "no"}).encode()
            self.send_response(200 if ok else 401)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server, seen


@pytest.mark.slow
def test_a_real_run_folder_holds_no_secret(tmp_path, monkeypatch):
    """flow_grpo on the tiny pipeline, scored by a reward server behind a bearer token read from
    the environment (and a literal API-key header): the server saw the token, and no file of the
    run folder (config, metrics, TensorBoard events, Parquet rollouts, the MLflow store, the
    report) contains either secret."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("H18_TOKEN", SECRET)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    server, seen = _scoring_server(SECRET)
    run = tmp_path / "run"
    try:
        rewards = (
            f"task.rewards=[{{name: reward_server, url: 'http://127.0.0.1:{server.server_address[1]}/', "
            "headers: {Authorization: 'Bearer ${env:H18_TOKEN}', X-Api-Key: " + LITERAL + "}}]"
        )
        args = [
            "train",
            str(ROOT / "configs" / "flow_grpo.yaml"),
            f"output_dir={run}",
            rewards,
            "task.sampling.num_steps=2",
            "task.sampling.eval_num_steps=2",
            "task.sampling.height=16",
            "task.sampling.width=16",
            "rollout.group_size=2",
            "rollout.prompts_per_step=1",
            "eval.num_samples=2",
            "eval.batch_size=2",
            "trainer.max_steps=1",
            "trainer.report_to=[tensorboard,mlflow]",
        ]
        assert main(args) == 0
    finally:
        server.shutdown()
        server.server_close()
    assert seen and set(seen) == {f"Bearer {SECRET}"}
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["reward_mean"] == pytest.approx(0.5)
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" for p in files) and any("tfevents" in p.name for p in files)
    assert (run / "mlflow.db").is_file()
    for path in files:
        data = path.read_bytes()
        for secret in (SECRET, LITERAL):
            assert secret.encode() not in data, f"{secret} found in {path}"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    headers = saved["task"]["rewards"][0]["headers"]
    assert headers == {"Authorization": "Bearer ${env:H18_TOKEN}", "X-Api-Key": MASK}
