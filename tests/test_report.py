"""`mmpo report`: the run report page (mmpo/report), its content, and the page itself in real
headless Chromium: no console error, every picture decodes, the rollout table holds the logged
rows, the plotly curves are drawn, and no request leaves the file."""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from mmpo.cli import main
from mmpo.config import load_config, save_config
from mmpo.evaluate import EvalResult, step_eval_dir, write_evaluation
from mmpo.report import REPORT_FILE, build_report, write_report_safely
from mmpo.report.collect import read_run, split_categories
from mmpo.report.curves import cards, group_of
from mmpo.report.render import evenly, safe_rel, spans
from mmpo.samples import SampleLog, SampleRow, read_samples
from mmpo.tracking import Tracker

ROOT = Path(__file__).resolve().parents[1]
HOSTILE_PROMPT = "<script>window.pwned = 1</script> & what colour?"
HOSTILE_COMPLETION = '<img src="https://example.com/x.png" onerror="window.pwned = 2">A'
needs_chromium = pytest.mark.skipif(
    not (shutil.which("chromium") and shutil.which("chromedriver")),
    reason="needs Debian chromium and chromium-driver (apt-get install chromium chromium-driver)",
)


# -- a run folder made by the real writers --------------------------------------------------------


def _square(colour: tuple[int, int, int], size: int = 24) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


def _figure():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 1.5), dpi=50)
    fig.add_subplot(1, 1, 1).plot([0, 1, 2], [1, 0, 2])
    return fig


class _Evaluator:
    """Two held-out items with fixed predictions (the Evaluator protocol of mmpo.evaluate)."""

    def items(self) -> list[int]:
        return [0, 1]

    def predict(self, items: list[int], offset: int) -> list[dict[str, Any]]:
        return [
            {"id": f"q{i}", "input": f"question {i}?", "prediction": "A", "answer": "A", "accuracy": 1.0} for i in items
        ]

    def summarize(self, items: list[int], rows: list[dict[str, Any]]) -> dict[str, float]:
        return {"accuracy": 1.0, "accuracy/colour": 1.0, "accuracy/count": 0.5}

    def write_artifacts(self, out_dir: Path, items: list[int], rows: list[dict[str, Any]]) -> dict[str, str]:
        path = out_dir / "grid.png"
        _square((0, 128, 255), 32).save(path)
        return {"grid": str(path)}


def make_run(run_dir: Path, steps: int = 3) -> Path:
    """A run folder written by the project's own writers: config.yaml, metrics.jsonl (train
    metrics at every step, evaluation at 0 and at the end, with categories), logged rollouts
    (PNG, GIF, Figure media, hostile text), an in-training evaluation folder and an `mmpo eval`
    folder."""
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [f"output_dir={run_dir}"])
    save_config(cfg, run_dir / "config.yaml")
    tracker = Tracker(run_dir, total_steps=steps, progress=False)
    log = SampleLog(run_dir, limit=8)
    tracker.log(0, {"eval/accuracy": 0.25, "eval/accuracy/colour": 0.5, "eval/accuracy/count": 0.0})
    for step in range(1, steps + 1):
        metrics = {
            "reward_mean": 0.1 * step,
            "reward/accuracy": 0.05 * step,
            "reward/format": 0.5,
            "loss": 1.0 / step,
            "kl": 0.01 * step,
            "entropy": 2.0 - 0.1 * step,
            "step_time_s": 0.5,
        }
        if step == steps:
            metrics.update({"eval/accuracy": 0.75, "eval/accuracy/colour": 1.0, "eval/accuracy/count": 0.5})
        tracker.log(step, metrics)
        rows = [
            SampleRow(
                f"p{step}", 0, HOSTILE_PROMPT, HOSTILE_COMPLETION, 1.0, 0.5, {"accuracy": 1.0}, [_square((255, 0, 0))]
            ),
            SampleRow(f"p{step}", 0, HOSTILE_PROMPT, "B", 0.0, -0.5, {"accuracy": 0.0}, [[_square((0, 255, 0))] * 3]),
            SampleRow("shared", 1, "draw a cat", "an image", 0.25, 0.0, {}, [_figure()]),
        ]
        log.write(step, rows[: 2 + (step % 2)])  # 3 rows at odd steps, 2 at even ones
    tracker.close()
    evaluator = _Evaluator()
    items = evaluator.items()
    rows = evaluator.predict(items, 0)
    result = EvalResult(items, rows, evaluator.summarize(items, rows))
    write_evaluation(step_eval_dir(run_dir, steps), result, evaluator, str(run_dir), step=steps)
    write_evaluation(run_dir / "eval_sft", result, evaluator, "sft-model")
    return run_dir


class _Page(HTMLParser):
    """Tags with their attributes, and the text of the data block."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.data_block = ""
        self._in_data = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_data = tag == "script" and dict(attrs).get("id") == "mmpo-data"

    def handle_data(self, data: str) -> None:
        if self._in_data:
            self.data_block += data

    def handle_endtag(self, tag: str) -> None:
        self._in_data = False


def parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _classes(attrs: dict[str, str | None]) -> list[str]:
    return (attrs.get("class") or "").split()


# -- pieces ---------------------------------------------------------------------------------------


def test_split_categories_by_slash_and_by_suffix_of_a_present_metric() -> None:
    plain, families = split_categories(
        ["accuracy", "accuracy_colour", "accuracy_count", "format", "reward", "reward_std", "score/easy", "rmse"]
    )
    assert plain == ["accuracy", "format", "reward", "reward_std", "rmse"]
    assert families == {"accuracy": ["accuracy_colour", "accuracy_count"], "score": ["score/easy"]}


def test_metrics_are_grouped_by_what_they_measure() -> None:
    assert group_of("reward_mean") == "Reward"
    assert group_of("advantage_abs_mean") == "Reward"
    assert group_of("pg_loss") == "Loss and update"
    assert group_of("ppo_kl") == "KL"
    assert group_of("entropy") == "Entropy"
    assert group_of("rollout_s") == "Timings"
    assert group_of("eval/accuracy_colour") == "Evaluation"
    assert group_of("truncated_frac") == "Rollout"
    records = [{"step": 1, "reward_mean": 1.0, "reward/a": 0.5, "reward/b": 0.5, "eval/acc": 1.0, "eval/acc/x": 1.0}]
    groups = cards(records)
    assert [(c.title, c.keys) for c in groups["Reward"]] == [
        ("reward_mean", ["reward_mean"]),
        ("reward components", ["reward/a", "reward/b"]),
    ]
    assert [c.keys for c in groups["Evaluation"]] == [["eval/acc", "eval/acc/x"]]


def test_evenly_keeps_the_first_and_the_last() -> None:
    assert evenly(list(range(10)), 4) == [0, 3, 6, 9]
    assert evenly([1, 2], 8) == [1, 2]
    assert evenly([1, 2, 3], 1) == [3]


def test_only_plain_relative_paths_are_referenced() -> None:
    assert safe_rel("media/step_00000001_000_0.png") == "media/step_00000001_000_0.png"
    for bad in ("/etc/passwd", "../x.png", "a/../../x.png", "https://example.com/x.png", "//example.com/x", "C:\\x"):
        assert safe_rel(bad) is None, bad


# -- the page's content ---------------------------------------------------------------------------


def test_report_holds_curves_config_rollouts_and_evaluations(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    path = build_report(run)
    assert path == run / REPORT_FILE
    html = path.read_text(encoding="utf-8")
    page = parse(path)
    samples = read_samples(run)
    assert len(samples) == 3 + 2 + 3

    # one rollout row per logged row; only the last step's pictures load at first
    rollout_rows = [a for t, a in page.tags if t == "tr" and "rollout" in _classes(a)]
    assert len(rollout_rows) == len(samples)
    panels = [a["data-step"] for t, a in page.tags if t == "div" and "rollout-step" in _classes(a)]
    assert panels == ["1", "2", "3"]
    media = [a for t, a in page.tags if t == "img" and "media" in _classes(a)]
    assert sorted(a.get("src") or a.get("data-src") for a in media) == sorted(
        f"samples/{m}" for row in samples for m in row["media"]
    )
    assert all(a.get("src", "").startswith("samples/media/step_00000003_") for a in media if "src" in a)

    # untrusted text is escaped: no tag, handler or URL from it reaches the DOM
    assert "<script>window.pwned" not in html and "&lt;script&gt;window.pwned = 1&lt;/script&gt; &amp; what" in html
    assert not any("onerror" in a for _, a in page.tags)
    for tag, attrs in page.tags:
        for name in ("src", "href", "data-src"):
            ref = attrs.get(name)
            if ref is None or ref.startswith("#"):
                continue
            assert not re.match(r"^([a-z][a-z0-9+.-]*:|//)", ref, re.I), (tag, ref)
            assert (run / ref).is_file(), (tag, ref)

    # curves: one figure per card, each trace the logged series
    data = json.loads(page.data_block)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    figures = {f["layout"]["title"]["text"]: f for f in data["figures"]}
    assert len(data["figures"]) == sum(len(c) for c in cards(records).values())
    assert figures["reward_mean"]["data"][0]["x"] == [1, 2, 3]
    assert figures["reward_mean"]["data"][0]["y"] == pytest.approx([0.1, 0.2, 0.3])
    by_category = figures["eval/accuracy by category"]["data"]
    assert [t["name"] for t in by_category] == ["all", "colour", "count"]
    assert by_category[2]["x"] == [0, 3] and by_category[2]["y"] == [0.0, 0.5]
    assert data["config"]["displaylogo"] is False and "sendChartToCloud" in data["config"]["modeBarButtonsToRemove"]

    # evaluations: per checkpoint (steps) and per category, and both evaluation folders
    assert re.search(
        r"<td>count</td><td><span class=\"num\">0</span></td><td><span class=\"num\">0\.5</span></td>", html
    )
    assert "eval/step_00000003 (step 3)" in html and "eval_sft" in html and "checkpoint: sft-model" in html
    assert html.count('<pre class="text short">question 1?</pre>') == 2
    assert 'src="eval_sft/grid.png"' in html and 'href="eval_sft/predictions.jsonl"' in html

    # the resolved config, as written
    config_text = (run / "config.yaml").read_text()
    assert f'<pre class="config">{__import__("html").escape(config_text)}</pre>' in html


def test_diffusion_runs_get_a_grid_of_prompts_across_steps(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    html = build_report(run, kind="denoising").read_text(encoding="utf-8")
    grid = html[html.index('id="images"') :]
    grid = grid[: grid.index("</section>")]
    assert "<th>step 1</th><th>step 2</th><th>step 3</th>" in grid
    # rows: the prompt logged at every step first, then the one logged at odd steps
    assert grid.index("&lt;script&gt;window.pwned") < grid.index("draw a cat")
    cells = re.findall(r'<img class="grid" src="([^"]+)"', grid)
    samples = read_samples(run)
    first = {}
    for row in samples:
        first.setdefault((row["prompt"], row["step"]), f"samples/{row['media'][0]}")
    expected = [first[(HOSTILE_PROMPT, s)] for s in (1, 2, 3)] + [first[("draw a cat", s)] for s in (1, 3)]
    assert cells == expected
    assert 'id="images"' not in build_report(run, kind="token").read_text(encoding="utf-8")


def test_rows_of_one_group_share_their_prompt_and_identical_pictures(tmp_path: Path) -> None:
    assert spans(["a", "a", "b", "a"]) == [2, 0, 1, 1]
    run = tmp_path / "run"
    Tracker(run, total_steps=1, progress=False).close()
    image, other = _square((255, 0, 0)), _square((0, 0, 255))
    rows = [SampleRow("p", 0, "q?", f"c{i}", 1.0, 0.0, {}, [image]) for i in range(3)]
    rows.append(SampleRow("p", 0, "q?", "c3", 0.0, 0.0, {}, [other]))
    rows.append(SampleRow("r", 1, "q2?", "c4", 0.0, 0.0, {}, [other]))
    SampleLog(run, limit=8).write(1, rows)
    page = parse(build_report(run))
    cells = [a.get("rowspan") for t, a in page.tags if t == "td" and a.get("rowspan")]
    assert cells == ["4", "3", "4"]  # group 0: its id, its first three (equal) pictures, its prompt
    media = [a["src"] for t, a in page.tags if t == "img" and "media" in _classes(a)]
    assert media == [f"samples/media/step_00000001_{i:03d}_0.png" for i in (0, 3, 4)]
    assert len([1 for t, a in page.tags if t == "tr" and "rollout" in _classes(a)]) == 5


def test_kind_is_read_from_the_config_by_the_cli(tmp_path: Path) -> None:
    from mmpo.trainers import run_kind

    run = make_run(tmp_path / "run")
    assert run_kind(str(run)) == "token"  # quickstart: synthetic_vqa, the token trainer
    assert read_run(run).kind is None  # the report package itself never imports the trainers
    assert run_kind(str(tmp_path / "no_such_run")) is None


def test_cli_writes_the_report_and_refuses_a_folder_that_is_no_run(tmp_path: Path, capsys) -> None:
    run = make_run(tmp_path / "run")
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {run / REPORT_FILE}"
    assert (run / REPORT_FILE).stat().st_size > 1_000_000  # plotly.js is inlined
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "is not a run folder" in err and "config.yaml" in err


def test_a_report_that_fails_prints_one_warning_and_returns_none(tmp_path: Path, capsys) -> None:
    run = make_run(tmp_path / "run")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    assert write_report_safely(run) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: report not written (DataError: ")
    assert "metrics.jsonl: line 2" in err[0]
    assert not (run / REPORT_FILE).exists()


# -- the page in headless Chromium ------------------------------------------------------------------


def open_in_chromium(run: Path) -> dict[str, Any]:
    """Load report.html from file://, show every step's rollouts in turn, and return what the
    page did: console entries, requests, plots, pictures, rows per step."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from mmpo.report.browser import headless_chromium

    with headless_chromium() as driver:
        driver.get((run / REPORT_FILE).as_uri())
        WebDriverWait(driver, 60).until(lambda d: d.execute_script("return document.readyState") == "complete")
        rows: dict[int, int] = {}
        options = driver.execute_script(
            "var s = document.getElementById('rollout-step'); return s ? Array.from(s.options, o => o.value) : []"
        )
        for value in options:
            Select(driver.find_element(By.ID, "rollout-step")).select_by_value(value)
            rows[int(value)] = driver.execute_script(
                "return document.querySelectorAll('div.rollout-step:not([hidden]) tr.rollout').length"
            )
        WebDriverWait(driver, 60).until(
            lambda d: d.execute_script("return Array.from(document.images).every(i => i.complete)")
        )
        out = {
            "rows": rows,
            "all_rows": driver.execute_script("return document.querySelectorAll('tr.rollout').length"),
            "images": driver.execute_script(
                "return Array.from(document.images, i => [i.getAttribute('src'), i.naturalWidth])"
            ),
            "waiting": driver.execute_script("return document.querySelectorAll('img[data-src]').length"),
            "plots": driver.execute_script(
                "return Array.from(document.querySelectorAll('.js-plotly-plot'), d => [d.data.length,"
                " d._fullLayout.dragmode, d.querySelectorAll('.scatterlayer .trace').length])"
            ),
            "resources": driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)"),
            "pwned": driver.execute_script("return window.pwned === undefined ? null : window.pwned"),
            "console": driver.get_log("browser"),
        }
        requests = []
        for entry in driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                requests.append(message["params"]["request"]["url"])
        out["requests"] = requests
    return out


def assert_page_ok(run: Path, seen: dict[str, Any]) -> None:
    """The checks of issue 17 on a page opened by :func:`open_in_chromium`."""
    assert [e for e in seen["console"] if e["level"] == "SEVERE"] == []
    assert seen["pwned"] is None
    samples = read_samples(run)
    per_step: dict[int, int] = {}
    for row in samples:
        per_step[row["step"]] = per_step.get(row["step"], 0) + 1
    assert seen["rows"] == per_step and seen["all_rows"] == len(samples)
    assert seen["waiting"] == 0
    assert seen["images"], "the page shows no picture"
    for src, width in seen["images"]:
        assert width > 0, f"{src} did not decode"
        assert (run / src).is_file()
    assert seen["plots"] and all(n > 0 and mode == "zoom" and drawn == n for n, mode, drawn in seen["plots"])
    figures = json.loads(parse(run / REPORT_FILE).data_block)["figures"]
    assert len(seen["plots"]) == len(figures)
    for url in seen["resources"] + seen["requests"]:
        assert url.split(":", 1)[0] in ("file", "data", "blob"), url
    assert any(u.startswith("file:") and u.endswith(".gif") for u in seen["requests"]) == any(
        s.endswith(".gif") for s, _ in seen["images"]
    )


@needs_chromium
@pytest.mark.slow
def test_report_in_headless_chromium(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    build_report(run)
    seen = open_in_chromium(run)
    assert_page_ok(run, seen)
    # every logged picture, the evaluation pictures and nothing from the hostile completion
    assert len(seen["images"]) == sum(len(r["media"]) for r in read_samples(run)) + 2
    assert not any("example.com" in (s or "") for s, _ in seen["images"])


@needs_chromium
@pytest.mark.slow
def test_training_writes_the_report_and_prints_its_path(tmp_path: Path, capsys, monkeypatch, tiny_overrides) -> None:
    """``trainer.report: true``: the report is rewritten after each evaluation (steps 0 and 1;
    the one at the last step is followed by the final report), each time with that evaluation."""
    import mmpo.trainers.loop as loop

    written: list[str] = []

    def write_and_keep(run_dir: Path, kind: str | None = None) -> Path | None:  # the real writer, then a copy
        path = write_report_safely(run_dir, kind=kind)
        written.append(path.read_text(encoding="utf-8") if path else "")
        return path

    monkeypatch.setattr(loop, "write_report_safely", write_and_keep)
    run = tmp_path / "run"
    overrides = [
        *tiny_overrides,
        f"output_dir={run}",
        "trainer.max_steps=2",
        "trainer.eval_every=1",
        "trainer.report=true",
    ]
    assert main(["train", str(ROOT / "configs" / "quickstart.yaml"), *overrides]) == 0
    out = capsys.readouterr().out
    assert f"report:     {run / REPORT_FILE}" in out.splitlines()
    html = (run / REPORT_FILE).read_text(encoding="utf-8")
    assert len(written) == 3 and written[-1] == html
    assert "eval/step_00000000 (step 0)" in written[0] and "eval/step_00000001" not in written[0]
    assert "eval/step_00000001 (step 1)" in written[1] and "eval/step_00000002" not in written[1]
    assert "eval/step_00000002 (step 2)" in html and 'id="rollout-step"' in html
    assert_page_ok(run, open_in_chromium(run))


@needs_chromium
@pytest.mark.slow
def test_screenshot_script_saves_the_whole_page(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("report_screenshots", ROOT / "scripts" / "report_screenshots.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    run = make_run(tmp_path / "run")
    out = script.screenshot(run, tmp_path / "shot.png", width=1200, step=1)
    with Image.open(out) as shot:
        width, height = shot.size
        pixels = shot.convert("RGB")
        header = pixels.getpixel((5, 5))
    assert width == 1200 and height > 2000  # the whole page, not the 1000 px window
    assert header == (15, 23, 42)  # the page's dark header band (#0f172a): the page was drawn
    with pytest.raises(SystemExit, match="no logged rollouts at step 7"):
        script.screenshot(run, tmp_path / "none.png", step=7)
