"""Trackers (`trainer.report_to`), for real and offline: a wandb offline run folder, an MLflow local
store, a Trackio local project, TensorBoard events; read back with each tracker's own formats.

The runs happen in subprocesses: Trackio fixes its storage folder (``TRACKIO_DIR``) at import,
and every connection they open is recorded (a Python audit hook, and ``strace`` for child
processes such as ``wandb-core`` where it works) to check that none leaves the machine.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from mmpo.config import REPORT_TO, load_config
from mmpo.errors import ConfigError
from mmpo.trackers import BACKENDS, IDS_FILE
from mmpo.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs" / "quickstart.yaml")
ALL = ["tensorboard", "wandb", "mlflow", "trackio"]
#: records every connect() of a process tree (seccomp-bpf: only those calls stop the process), then -o FILE
STRACE = ["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=connect", "-o"]

# Runs the rest of argv as python code (``-c``-style) after installing an audit hook that
# appends every non-loopback connection or name lookup to $NET_LOG.
GUARD = """
import os, sys
_log = os.environ["NET_LOG"]
def _local(host):
    host = str(host)
    return host in ("", "localhost", "::1") or host.startswith("127.")
def _hook(event, args):
    if event == "socket.connect" and isinstance(args[1], tuple) and not _local(args[1][0]):
        bad = args[1]
    elif event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr") and not _local(args[0]):
        bad = args[0]
    else:
        return
    with open(_log, "a") as fh:
        fh.write(f"{event} {bad!r}\\n")
sys.addaudithook(_hook)
code, sys.argv = sys.argv[1], sys.argv[1:]
exec(compile(code, "<test>", "exec"))
"""

TRAIN = "from mmpo.cli import main; raise SystemExit(main(sys.argv[1:]))"

# Three Tracker sessions on one run folder: steps 1-2, a resume from step 2 (step 3), then a fresh start.
RESUME = """
import json
from pathlib import Path
from mmpo.tracking import Tracker
run = Path(sys.argv[1])
names = ["wandb", "mlflow", "trackio"]
ids = []
for start, steps in ((0, (1, 2)), (2, (3,)), (0, (1,))):
    tracker = Tracker(run, total_steps=3, start_step=start, progress=False, report_to=names, config={"seed": start})
    for step in steps:
        tracker.log(step, {"loss": 0.5 * step + start})
    tracker.close()
    ids.append(json.loads((run / "trackers.json").read_text()))
print("IDS=" + json.dumps(ids))
"""


def _strace_works() -> bool:
    if shutil.which("strace") is None:
        return False
    probe = subprocess.run([*STRACE, os.devnull, "true"], capture_output=True)
    return probe.returncode == 0


def _offline_env(tmp: Path) -> dict[str, str]:
    """The environment of a run: no tracker settings of the caller; wandb offline with its data
    folders under ``tmp``, Trackio's store under ``tmp/trackio``, no telemetry, no Hub."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_", "TRACKIO_"))}
    env.update(
        OMP_NUM_THREADS="1",
        NET_LOG=str(tmp / "net.log"),
        WANDB_MODE="offline",
        WANDB_DATA_DIR=str(tmp / "wandb-data"),
        WANDB_CACHE_DIR=str(tmp / "wandb-cache"),
        WANDB_CONFIG_DIR=str(tmp / "wandb-config"),
        TRACKIO_DIR=str(tmp / "trackio"),
        MLFLOW_DISABLE_TELEMETRY="true",
        HF_HUB_OFFLINE="1",
    )
    return env


def _run_guarded(tmp: Path, code: str, args: list[str]) -> str:
    """Run ``code`` under the network guard (and strace when it works); returns stdout+stderr.
    Fails when the process fails or any connection left the machine."""
    cmd = [sys.executable, "-c", GUARD, code, *args]
    trace = tmp / "strace.log"
    if _strace_works():
        cmd = [*STRACE, str(trace), *cmd]
    proc = subprocess.run(cmd, cwd=ROOT, env=_offline_env(tmp), capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    net = tmp / "net.log"
    assert not net.exists(), net.read_text()
    if trace.exists():
        outside = [
            line
            for line in trace.read_text().splitlines()
            if re.search(r"AF_INET6?", line) and not re.search(r'inet_addr\("127\.|inet_pton\(AF_INET6, "::1"', line)
        ]
        assert outside == [], outside
    return output


# -- wandb's run file: the LevelDB log format it writes (records of wandb.proto's Record) ---------


def _wandb_records(path: Path) -> list[Any]:
    """Every record of a ``run-<id>.wandb`` file: a 7-byte header (``:W&B``, magic 0xBEE1,
    version), then 32 KiB blocks of chunks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _wandb_history(records: list[Any]) -> list[dict[str, Any]]:
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            )
    return rows


def _same(a: Any, b: Any) -> bool:
    """Equal metric values (NaN/None equal to each other)."""
    nan_a = a is None or (isinstance(a, float) and math.isnan(a))
    nan_b = b is None or (isinstance(b, float) and math.isnan(b))
    if nan_a or nan_b:
        return nan_a and nan_b
    return a == pytest.approx(b, rel=1e-12, abs=0.0)


def _numeric(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "step" and (v is None or isinstance(v, (int, float)))}


@pytest.mark.slow
def test_training_run_reports_to_every_tracker_offline(
    tmp_path: Path, tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    output = _run_guarded(
        tmp_path,
        TRAIN,
        ["train", QUICK, f"output_dir={run}", "trainer.max_steps=2", *tiny_overrides, f"trainer.report_to={ALL}"],
    )
    # nothing of the trackers' own start-up or shutdown lines reaches the terminal
    for noise in ("wandb:", "Trackio", "trackio show", "INFO mlflow", "alembic"):
        assert noise not in output, noise
    metrics = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in metrics] == [0, 1, 2]
    samples = {s: pq.read_table(run / "samples" / f"step_{s:08d}.parquet").to_pylist() for s in (1, 2)}
    assert all(rows and all(r["media"] for r in rows) for rows in samples.values())
    ids = json.loads((run / IDS_FILE).read_text())
    assert sorted(ids) == ["mlflow", "trackio", "wandb"]

    # -- wandb: an offline run folder under the run folder, named after it ----------------------
    (folder,) = (run / "wandb").glob(f"offline-run-*-{ids['wandb']['id']}")
    records = _wandb_records(folder / f"run-{ids['wandb']['id']}.wandb")
    (run_record,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run_record.project, run_record.display_name) == ("mmpo", "run")
    config = {u.key: json.loads(u.value_json) for u in run_record.config.update}
    config.update({u.key: json.loads(u.value_json) for r in records if r.HasField("config") for u in r.config.update})
    assert config["trainer"]["max_steps"] == 2 and config["trainer"]["report_to"] == ALL
    history = [row for row in _wandb_history(records) if "samples" not in {k.split("/")[0] for k in row}]
    assert len(history) == len(metrics)
    for row, record in zip(history, metrics):
        assert row["step"] == record["step"]
        for key, value in _numeric(record).items():
            assert _same(row.get(key), value), (record["step"], key)
    # one run_table artifact per step: its table lists the logged rows and their images, whose
    # bytes are those of the Parquet file's media
    tables = [
        r.artifact for r in records if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "run_table"
    ]
    assert len(tables) == 2
    for step, artifact in zip((1, 2), tables):
        files = {c.path: Path(c.local_path) for c in artifact.manifest.contents}
        table = json.loads(files["samples.table.json"].read_text())
        assert table["columns"][:7] == ["step", "prompt_id", "group", "prompt", "completion", "reward", "advantage"]
        assert "media_0" in table["columns"] and len(table["data"]) == len(samples[step])
        col = {c: i for i, c in enumerate(table["columns"])}
        for row, want in zip(table["data"], samples[step]):
            assert row[col["step"]] == step and row[col["prompt"]] == want["prompt"]
            assert _same(row[col["reward"]], want["reward"]) and _same(row[col["advantage"]], want["advantage"])
            image = row[col["media_0"]]
            assert image["_type"] == "image-file"
            assert files[image["path"]].read_bytes() == (run / "samples" / want["media"][0]).read_bytes()

    # -- MLflow: the local store in the run folder, read back with MlflowClient ------------------
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow.telemetry
    from mlflow.tracking import MlflowClient

    mlflow.telemetry.set_telemetry_client()  # reads the variable again: no telemetry from this process
    assert ids["mlflow"]["tracking_uri"] == f"sqlite:///{run}/mlflow.db"
    client = MlflowClient(tracking_uri=ids["mlflow"]["tracking_uri"])
    ml_run = client.get_run(ids["mlflow"]["run_id"])
    assert ml_run.info.run_name == "run" and ml_run.info.status == "FINISHED"
    assert ml_run.data.params["trainer.max_steps"] == "2" and ml_run.data.params["seed"] == "0"
    for key in {k for r in metrics for k in _numeric(r)}:
        got = {m.step: m.value for m in client.get_metric_history(ml_run.info.run_id, key)}
        want = {r["step"]: r[key] for r in metrics if key in r}
        assert sorted(got) == sorted(want), key
        assert all(_same(got[s], want[s]) for s in want), key
    artifacts = run / "mlartifacts" / ml_run.info.run_id / "artifacts"
    for step in (1, 2):
        table = json.loads((artifacts / "samples" / f"step_{step:08d}.json").read_text())
        col = {c: i for i, c in enumerate(table["columns"])}
        assert len(table["data"]) == len(samples[step])
        for row, want in zip(table["data"], samples[step]):
            assert row[col["prompt"]] == want["prompt"] and _same(row[col["reward"]], want["reward"])
            assert row[col["media"]] == [f"samples/{m}" for m in want["media"]]
            assert (artifacts / row[col["media"]][0]).read_bytes() == (run / "samples" / want["media"][0]).read_bytes()
            assert row[col["image"]]["type"] == "image" and (artifacts / row[col["image"]]["filepath"]).is_file()

    # -- Trackio: the local project's SQLite database -------------------------------------------
    db = sqlite3.connect(tmp_path / "trackio" / "mmpo.db")
    rows = db.execute("SELECT step, metrics FROM metrics WHERE run_id = ? ORDER BY id", (ids["trackio"]["run_id"],))
    logged = [(step, json.loads(text)) for step, text in rows]
    (name,) = db.execute("SELECT DISTINCT run_name FROM metrics").fetchone()
    assert name == "run"
    scalars = [(s, m) for s, m in logged if "samples" not in m]
    assert [s for s, _ in scalars] == [r["step"] for r in metrics]
    for (_, got), record in zip(scalars, metrics):
        for key, value in _numeric(record).items():
            assert _same(got.get(key), value), key
    tables = [(s, m["samples"]) for s, m in logged if "samples" in m]
    assert [s for s, _ in tables] == [1, 2]
    for step, table in tables:
        assert table["_type"] == "trackio.table" and len(table["_value"]) == len(samples[step])
        for row, want in zip(table["_value"], samples[step]):
            assert row["prompt"] == want["prompt"] and _same(row["reward"], want["reward"])
            (image,) = row["media"]
            assert image["_type"] == "trackio.image"
            stored = tmp_path / "trackio" / "media" / image["file_path"]
            assert stored.read_bytes() == (run / "samples" / want["media"][0]).read_bytes()
    (config_text,) = db.execute("SELECT config FROM configs WHERE run_id = ?", (ids["trackio"]["run_id"],)).fetchone()
    assert json.loads(config_text)["trainer"]["max_steps"] == 2

    # -- TensorBoard: still the default scalars -------------------------------------------------
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [
        (r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in metrics if "loss" in r
    ]
    assert "samples/text_summary" in acc.Tags()["tensors"]


@pytest.mark.slow
def test_a_resumed_run_continues_the_same_tracker_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    output = _run_guarded(tmp_path, RESUME, [str(run)])
    fresh, resumed, again = json.loads(output.split("IDS=")[1].splitlines()[0])
    assert resumed == fresh  # the same wandb id, MLflow run and Trackio run
    for name in ("wandb", "mlflow", "trackio"):
        assert again[name] != fresh[name], name  # a fresh start (start_step 0) opens new runs

    # wandb: both sessions of the first run carry its id; the second holds step 3
    first = sorted((run / "wandb").glob(f"offline-run-*-{fresh['wandb']['id']}"))
    assert len(first) in (1, 2)  # two sessions within one second share a folder name
    steps = sorted(
        row["step"] for folder in first for f in folder.glob("*.wandb") for row in _wandb_history(_wandb_records(f))
    )
    assert steps == [1, 2, 3]

    # MLflow: one run holds steps 1-3 (step 3 logged by the resumed session), the fresh start another
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow.telemetry
    from mlflow.tracking import MlflowClient

    mlflow.telemetry.set_telemetry_client()
    client = MlflowClient(tracking_uri=fresh["mlflow"]["tracking_uri"])
    history = client.get_metric_history(fresh["mlflow"]["run_id"], "loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 1.0), (3, 3.5)]
    assert [(m.step, m.value) for m in client.get_metric_history(again["mlflow"]["run_id"], "loss")] == [(1, 0.5)]
    assert client.get_run(fresh["mlflow"]["run_id"]).info.status == "FINISHED"

    # Trackio: the resumed session wrote into the first run
    db = sqlite3.connect(tmp_path / "trackio" / "mmpo.db")
    rows = db.execute("SELECT run_id, step, metrics FROM metrics ORDER BY id").fetchall()
    got = [(run_id, step, json.loads(text)["loss"]) for run_id, step, text in rows]
    first_id, again_id = fresh["trackio"]["run_id"], again["trackio"]["run_id"]
    assert got == [(first_id, 1, 0.5), (first_id, 2, 1.0), (first_id, 3, 3.5), (again_id, 1, 0.5)]


def test_tracker_names_match_the_config_choices() -> None:
    assert tuple(BACKENDS) == REPORT_TO


def test_report_to_is_checked_at_load(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(QUICK, [f"trainer.report_to={ALL}"])
    assert cfg.trainer.report_to == ALL
    with pytest.raises(ConfigError, match=r"trainer\.report_to\[0\].*Did you mean 'wandb'"):
        load_config(QUICK, ["trainer.report_to=[wandbb]"])
    with pytest.raises(ConfigError, match=r"trainer\.report_to\[1\].*repeats the tracker 'mlflow'"):
        load_config(QUICK, ["trainer.report_to=[mlflow,mlflow]"])

    # a tracker whose package is absent is refused with the command that installs it
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError) as info:
        load_config(QUICK, ["trainer.report_to=[tensorboard,wandb]"])
    text = str(info.value)
    assert "trainer.report_to[1]" in text and "pip install 'mmpo[wandb]'" in text and "override" in text
    assert load_config(QUICK, ["trainer.report_to=[mlflow]"]).trainer.report_to == ["mlflow"]


def test_missing_tracker_stops_train_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mmpo.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trackio" else real(name, *a))
    run = tmp_path / "run"
    assert main(["train", QUICK, f"output_dir={run}", "trainer.report_to=[trackio]"]) != 0
    err = " ".join(capsys.readouterr().err.split())  # the CLI wraps its message at 100 columns
    assert "trainer.report_to[0]" in err and "pip install 'mmpo[trackio]'" in err
    assert not run.exists()


def test_mlflow_file_store_when_the_uri_names_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`MLFLOW_TRACKING_URI=file:...` (MLflow's plain-folder store, opt-in since MLflow 3): metrics
    and the logged rollouts land in that folder and read back through MlflowClient."""
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{store}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow.telemetry
    from mlflow.tracking import MlflowClient

    from mmpo.samples import SampleLog, SampleRow
    from mmpo.tracking import Tracker

    mlflow.telemetry.set_telemetry_client()
    run = tmp_path / "run"
    tracker = Tracker(run, total_steps=2, progress=False, report_to=["mlflow"], config={"seed": 3})
    for step in (1, 2):
        tracker.log(step, {"loss": 0.25 * step, "reward_mean": step / 10})
    SampleLog(run, 4, tracker).write(2, [SampleRow("p0", 0, "2+2?", "4", 1.0, 0.5, {"accuracy": 1.0})])
    tracker.close()

    ids = json.loads((run / "trackers.json").read_text())["mlflow"]
    assert ids["tracking_uri"] == f"file:{store}"
    client = MlflowClient(tracking_uri=f"file:{store}")
    assert [(m.step, m.value) for m in client.get_metric_history(ids["run_id"], "loss")] == [(1, 0.25), (2, 0.5)]
    assert client.get_run(ids["run_id"]).data.params["seed"] == "3"
    assert client.get_run(ids["run_id"]).info.status == "FINISHED"
    # the store is a plain folder: <experiment>/<run>/metrics/loss, and the step's table as an artifact
    assert list(store.glob(f"*/{ids['run_id']}/metrics/loss"))
    table = next(store.glob(f"*/{ids['run_id']}/artifacts/samples/step_00000002.json"))
    assert "2+2?" in table.read_text()
