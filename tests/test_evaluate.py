"""The one evaluator: sharding over ranks, the written layout, and where `mmpo eval` writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmpo.cli import main
from mmpo.evaluate import default_eval_dir, run_evaluation, write_evaluation

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs" / "quickstart.yaml")


class Squares:
    """Items 0..n-1; the prediction of i is i*i; records what each call was given."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.calls: list[tuple[list[int], int]] = []

    def items(self) -> list[int]:
        return list(range(self.n))

    def predict(self, items: list[int], offset: int) -> list[dict]:
        self.calls.append((list(items), offset))
        return [
            {"id": str(i), "input": i, "prediction": i * i, "answer": None, "even": float(i % 2 == 0), "_raw": i}
            for i in items
        ]

    def summarize(self, items: list[int], rows: list[dict]) -> dict[str, float]:
        return {
            "mean": sum(r["prediction"] for r in rows) / len(rows),
            "raw_in_order": float([r["_raw"] for r in rows] == items),
        }

    def write_artifacts(self, out_dir: Path, items, rows) -> dict[str, str]:
        (out_dir / "pic.txt").write_text("x")
        return {"pic": str(out_dir / "pic.txt")}


@pytest.mark.parametrize(("n", "world"), [(7, 1), (7, 2), (7, 3), (2, 3), (0, 2)])
def test_sharded_rows_equal_one_process(n, world):
    """Every rank predicts its contiguous share (a rank without items still runs one, dropped);
    the gathered rows are those of one process, in order."""
    single = run_evaluation(Squares(n))
    assert single.metrics.get("raw_in_order", 1.0) == 1.0  # private keys reach the metrics
    evaluators = [Squares(n) for _ in range(world)]
    local: list[list[dict]] = []
    for r in range(world):  # each rank's own rows, as the collective would receive them
        run_evaluation(evaluators[r], rank=r, world_size=world, gather=lambda rows: local.append(rows) or [rows])
    gathered = [row for part in local for row in part]
    assert [row["id"] for row in gathered] == [row["id"] for row in single.rows] == [str(i) for i in range(n)]
    if n:
        calls = [e.calls[0] for e in evaluators]
        assert all(len(items) >= 1 for items, _ in calls)  # every rank ran the same collectives
        assert [off for (items, off), part in zip(calls, local) if part] == [
            int(part[0]["id"]) for part in local if part
        ]


def test_written_layout_drops_private_keys(tmp_path):
    ev = Squares(3)
    out = write_evaluation(tmp_path / "eval", run_evaluation(ev), ev, "ckpt")
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert rows[1] == {"id": "1", "input": 1, "prediction": 1, "answer": None, "even": 0.0}
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == {
        "checkpoint": "ckpt",
        "mean": 5 / 3,
        "raw_in_order": 1.0,
    }
    assert out["pic"] == str(tmp_path / "eval" / "pic.txt")


def test_default_folder_is_next_to_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    assert default_eval_dir(str(run), tmp_path / "cfgrun") == run / "eval"
    assert default_eval_dir(str(run / "sft" / "model"), tmp_path) == run / "sft" / "eval_model"
    assert default_eval_dir(None, tmp_path / "cfgrun") == tmp_path / "cfgrun" / "eval_base"


@pytest.mark.slow
def test_two_checkpoints_with_one_config_do_not_overwrite_each_other(tmp_path):
    from mmpo.cli import tiny_main

    a, b = tmp_path / "a", tmp_path / "b"
    for folder, seed in ((a, 0), (b, 1)):
        tiny_main("qwen2_vl", str(folder / "model"), seed=seed)
    common = ["eval.num_samples=3", "rollout.max_new_tokens=3", f"output_dir={tmp_path / 'cfg'}"]
    for folder in (a, b):  # output_dir comes from the config, not the command line: next to the checkpoint
        assert main(["eval", QUICK, f"checkpoint={folder}", *common[:2]]) == 0
    ra = (a / "eval" / "predictions.jsonl").read_text()
    rb = (b / "eval" / "predictions.jsonl").read_text()
    assert ra and rb
    assert json.loads((a / "eval" / "metrics.json").read_text())["checkpoint"] == str(a / "model")
    assert json.loads((b / "eval" / "metrics.json").read_text())["checkpoint"] == str(b / "model")
    row = json.loads(ra.splitlines()[0])
    assert {"id", "input", "prediction", "answer"} <= set(row) and row["input"].strip()
