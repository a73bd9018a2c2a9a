"""The report's HTML: one page from :class:`~mmpo.report.collect.RunData`.

Every text that comes from the run (completions are untrusted model output, prompts, metric
names, paths) goes through :func:`html.escape`; pictures are local files referenced by paths
relative to the run folder (logged media: checked to stay inside it; a predictions row's data-set
image may lie outside, ``../``); the page's script reads its data from a JSON block and
attaches its listeners itself (no inline handlers). The page's Content-Security-Policy forbids
every network request."""

from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import datetime
from html import escape
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

from mmpo.report.collect import EvalFolder, RunData, category_of, is_number, split_categories
from mmpo.report.curves import GROUPS, PLOT_CONFIG, cards, figure

#: trainer kinds whose logged media are generated images (a grid per prompt across steps)
IMAGE_KINDS = ("denoising", "noise")
#: most columns (steps, evenly spaced) and rows (prompts) of the image grid
GRID_COLUMNS = 8
GRID_ROWS = 12
#: most evaluations (evenly spaced) in a per-category table, and in-training evaluation folders shown (the last)
CATEGORY_COLUMNS = 12
EVAL_FOLDERS_SHOWN = 10
#: text columns of predictions rows, in this order when present
PREDICTION_TEXT = ("id", "input", "question", "options", "prediction", "completion", "answer")
#: keys of predictions rows that reference pictures
PREDICTION_MEDIA = ("images", "image", "media", "video", "gif")
IMAGE_SUFFIXES = (".png", ".gif", ".jpg", ".jpeg", ".webp")
_PLACEHOLDER = re.compile(r"@@([A-Z_]+)@@")


def fmt(value: Any) -> str:
    """A metric value for a table cell (4 significant digits; ints as ints; '' for None)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e9:
            return str(int(value))
        return f"{value:.4g}"
    return str(value)


def evenly(items: list[Any], n: int) -> list[Any]:
    """At most ``n`` of ``items``, evenly spaced, the first and the last included."""
    if len(items) <= n:
        return list(items)
    if n <= 1:
        return list(items[-1:])
    picks = sorted({round(i * (len(items) - 1) / (n - 1)) for i in range(n)})
    return [items[i] for i in picks]


def safe_rel(path: str) -> str | None:
    """``path`` when it is a plain relative POSIX path inside the run folder (no scheme, no
    ``..``, not absolute), else None."""
    if not path or "\\" in path or ":" in path or path.startswith(("/", "~")):
        return None
    parts = PurePosixPath(path).parts
    if any(p in ("..", "") for p in parts):
        return None
    return PurePosixPath(path).as_posix()


def _pid(value: Any) -> str:
    return f'<span class="pid">{escape(str(value if value is not None else ""))}</span>'


def _text_block(value: Any, cls: str = "text") -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        value = json.dumps(value, ensure_ascii=False, default=str)
    return f'<pre class="{cls}">{escape(value)}</pre>'


def _table(head: list[str], rows: list[list[str]], cls: str = "data") -> str:
    """A table; ``head`` is plain text (escaped here), cells are HTML already."""
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table></div>'


def _num(value: Any) -> str:
    text = fmt(value)
    if is_number(value):
        return f'<span class="num">{escape(text)}</span>'
    return escape(text)


def _img(rel: str, *, lazy: bool = False, cls: str = "media", alt: str = "") -> str:
    """A picture of the run folder (``rel`` relative to it), linked to the full-size file; with
    ``lazy`` its source waits in ``data-src`` until the page's script shows it."""
    src = "data-src" if lazy else "src"
    ref = escape(rel, quote=True)
    return f'<a href="{ref}" target="_blank"><img class="{cls}" {src}="{ref}" alt="{escape(alt, quote=True)}"></a>'


# -- sections -----------------------------------------------------------------------------------


def _summary(run: RunData) -> str:
    records = run.records
    steps = max((int(r["step"]) for r in records), default=0)
    config = run.config
    max_steps = (config.get("trainer") or {}).get("max_steps")
    items: list[tuple[str, str]] = [("steps", f"{steps}" + (f" / {max_steps}" if max_steps else ""))]
    for key in ("reward_mean", "loss", "kl", "entropy"):
        last = next((r[key] for r in reversed(records) if is_number(r.get(key))), None)
        if last is not None:
            items.append((key, fmt(float(last))))
    last_eval = next((r for r in reversed(records) if any(k.startswith("eval/") for k in r)), None)
    if last_eval:
        names = [k.removeprefix("eval/") for k in last_eval if k.startswith("eval/") and is_number(last_eval[k])]
        plain, _ = split_categories(names)
        for name in plain[:6]:
            items.append((f"eval/{name} (step {last_eval['step']})", fmt(float(last_eval[f"eval/{name}"]))))
    items.append(("logged rollouts", str(len(run.samples))))
    cells = "".join(
        f'<div class="card"><div class="card-value">{escape(v)}</div><div class="card-label">{escape(k)}</div></div>'
        for k, v in items
    )
    return f'<div class="cards">{cells}</div>'


def _curves(run: RunData, figures: list[dict[str, Any]]) -> str:
    groups = cards(run.records)
    if not groups:
        return '<p class="empty">No metrics logged yet (metrics.jsonl is empty or missing).</p>'
    out = []
    for group in GROUPS:
        if group not in groups:
            continue
        divs = []
        for card in groups[group]:
            figures.append(figure(run.records, card))
            divs.append(f'<div class="plot" data-fig="{len(figures) - 1}"></div>')
        out.append(f'<h3>{escape(group)}</h3><div class="plots">{"".join(divs)}</div>')
    return "".join(out)


def _eval_history(run: RunData) -> str:
    """Evaluation metrics of metrics.jsonl: one table over checkpoints (steps), one per
    category family (rows: categories, columns: steps)."""
    evals = [r for r in run.records if any(k.startswith("eval/") and is_number(v) for k, v in r.items())]
    if not evals:
        return ""
    names = list(dict.fromkeys(k.removeprefix("eval/") for r in evals for k in r if k.startswith("eval/")))
    plain, families = split_categories(names)
    out = ["<h3>Over training (metrics.jsonl)</h3>"]
    rows = [[_num(r["step"])] + [_num(r.get(f"eval/{n}")) for n in plain] for r in evals]
    out.append(f'<div class="tall">{_table(["step"] + plain, rows)}</div>')
    columns = evenly(evals, CATEGORY_COLUMNS)
    for base, members in families.items():
        head = ["category"] + [f"step {r['step']}" for r in columns]
        body = []
        if base in plain:
            body.append(["<b>all</b>"] + [_num(r.get(f"eval/{base}")) for r in columns])
        for name in members:
            body.append([escape(category_of(base, name))] + [_num(r.get(f"eval/{name}")) for r in columns])
        note = f" ({len(columns)} of {len(evals)} evaluations)" if len(columns) < len(evals) else ""
        out.append(f"<h4>eval/{escape(base)} per category{note}</h4>" + _table(head, body))
    sft = [(k, v) for r in run.records for k, v in r.items() if k.startswith("sft/") and is_number(v)]
    if sft:
        out.append("<h4>Supervised stage</h4>" + _table(["metric", "value"], [[escape(k), _num(v)] for k, v in sft]))
    return "".join(out)


def _metrics_tables(metrics: dict[str, float]) -> str:
    names = list(metrics)
    plain, families = split_categories(names)
    plain = [n for n in plain if n not in families or not families[n]]
    out = []
    if plain:
        out.append(_table(["metric", "value"], [[escape(n), _num(metrics[n])] for n in plain], cls="data narrow"))
    if families:
        categories: list[str] = []
        for base, members in families.items():
            categories += [c for c in (category_of(base, m) for m in members) if c not in categories]
        head = ["category"] + list(families)
        rows = []
        if any(b in metrics for b in families):
            rows.append(["<b>all</b>"] + [_num(metrics.get(b)) for b in families])
        for cat in categories:
            rows.append([escape(cat)] + [_num(metrics.get(_member(b, cat, families[b]))) for b in families])
        out.append(_table(head, rows, cls="data narrow"))
    return "".join(out)


def _member(base: str, category: str, members: list[str]) -> str:
    return next((m for m in members if category_of(base, m) == category), "")


def _prediction_media(run: RunData, folder: EvalFolder, value: Any) -> list[str]:
    """Pictures a predictions row references (relative to its folder, or a path: a data set's
    image), as existing local files relative to the run folder (``../`` for a data set's image)."""
    values = value if isinstance(value, list) else [value]
    root = run.run_dir.resolve()
    out = []
    for item in values:
        if not isinstance(item, str) or not item.lower().endswith(IMAGE_SUFFIXES) or "://" in item:
            continue
        path = Path(item).expanduser()
        for candidate in (path,) if path.is_absolute() else (root / folder.path / path, path):
            resolved = candidate.resolve()
            if resolved.is_file():
                out.append(Path(os.path.relpath(resolved, root)).as_posix())
                break
    return out


def _predictions(run: RunData, folder: EvalFolder) -> str:
    rows = folder.predictions
    if not rows:
        return ""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    media = [k for k in keys if k in PREDICTION_MEDIA]
    text = [k for k in PREDICTION_TEXT if k in keys] + [
        k for k in keys if k not in PREDICTION_TEXT and k not in media and not all(is_number(r.get(k)) for r in rows)
    ]
    scores = [k for k in keys if k not in text and k not in media]
    body = []
    for row in rows:
        cells = []
        if media:
            pics = [p for k in media for p in _prediction_media(run, folder, row.get(k))]
            given = [row.get(k) for k in media if row.get(k)]
            cells.append("".join(_img(p, cls="thumb") for p in pics) or _text_block(given or None))
        cells += [_text_block(row.get(k), "text short") if k != "id" else _pid(row.get(k)) for k in text]
        cells += [_num(row.get(k)) for k in scores]
        body.append(cells)
    head = (["images"] if media else []) + text + scores
    note = f"first {len(rows)} of {folder.num_predictions} rows of "
    link = f"{folder.path}/predictions.jsonl"
    return f'<p class="muted">{escape(note)}<a href="{escape(link, quote=True)}">{escape(link)}</a></p>' + _table(
        head, body, cls="data predictions"
    )


def _eval_folders(run: RunData) -> str:
    if not run.evals:
        return ""
    out = ["<h3>Evaluation folders</h3>"]
    in_training = [f for f in run.evals if f.step is not None]
    shown = in_training[-EVAL_FOLDERS_SHOWN:]
    if len(shown) < len(in_training):
        out.append(
            f'<p class="muted">The last {len(shown)} of {len(in_training)} in-training evaluations; '
            "the tables and curves above hold the metrics of all.</p>"
        )
    last_step = max((f.step for f in shown), default=None)
    for folder in [f for f in run.evals if f.step is None or any(f is s for s in shown)]:
        is_open = folder.step is None or folder.step == last_step
        label = folder.path + (f" (step {folder.step})" if folder.step is not None else "")
        pics = "".join(_img(p, cls="thumb", alt=p) for p in folder.pictures if safe_rel(p))
        detail = (
            (f'<p class="muted">checkpoint: {escape(folder.checkpoint)}</p>' if folder.checkpoint else "")
            + _metrics_tables(folder.metrics)
            + (f'<div class="pictures">{pics}</div>' if pics else "")
            + _predictions(run, folder)
        )
        out.append(
            f'<details class="eval"{" open" if is_open else ""}><summary>{escape(label)}'
            f'<span class="muted"> · {folder.num_predictions} predictions</span></summary>{detail}</details>'
        )
    return "".join(out)


def spans(keys: list[Any]) -> list[int]:
    """Row spans of cells shared by consecutive rows with equal keys: the first row of a run of
    equal keys gets its length, the others 0 (their cell is covered)."""
    out = [0] * len(keys)
    start = 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[start]:
            out[start] = i - start
            start = i
    return out


def _media_digest(run: RunData, row: dict[str, Any]) -> tuple[str, ...]:
    out = []
    for rel in row.get("media") or []:
        path = run.run_dir / "samples" / str(rel)
        out.append(hashlib.sha1(path.read_bytes()).hexdigest() if path.is_file() else str(rel))
    return tuple(out)


def _cell(html: str, span: int | None = None) -> str:
    if span is None:
        return f"<td>{html}</td>"
    if span == 0:
        return ""
    return f'<td rowspan="{span}">{html}</td>' if span > 1 else f"<td>{html}</td>"


def _rollout_row(row: dict[str, Any], lazy: bool, prompt_span: int = 1, media_span: int = 1) -> str:
    """One logged rollout; the rollout id, prompt and media cells span ``prompt_span`` /
    ``media_span`` rows (0: covered by a row above: same group, same prompt, same pictures)."""
    components = [(k.removeprefix("reward/"), v) for k, v in row.items() if k.startswith("reward/") and v is not None]
    comp = "".join(f"<tr><td>{escape(k)}</td><td>{_num(v)}</td></tr>" for k, v in components)
    pics = "".join(_img(f"samples/{p}", lazy=lazy) for p in (row.get("media") or []) if safe_rel(str(p)))
    advantage = row.get("advantage")
    sign = "pos" if is_number(advantage) and advantage > 0 else "neg" if is_number(advantage) and advantage < 0 else ""
    cells = [
        _cell(
            f'<span class="pid">{escape(str(row.get("prompt_id", "")))}</span><br>'
            f'<span class="muted">group {escape(str(row.get("group", "")))}</span>',
            prompt_span,
        ),
        _cell(pics, media_span),
        _cell(_text_block(row.get("prompt")), prompt_span),
        _cell(_text_block(row.get("completion"))),
        _cell(_num(row.get("reward"))),
        _cell(f'<table class="components">{comp}</table>' if comp else ""),
        _cell(f'<span class="adv {sign}">{escape(fmt(advantage))}</span>'),
    ]
    return '<tr class="rollout">' + "".join(cells) + "</tr>"


def _rollouts(run: RunData) -> str:
    if not run.samples:
        return '<p class="empty">No rollouts logged (<code>trainer.log_samples: 0</code>, or no step finished yet).</p>'
    by_step: dict[int, list[dict[str, Any]]] = {}
    for row in run.samples:
        by_step.setdefault(int(row["step"]), []).append(row)
    steps = sorted(by_step)
    shown = steps[-1]
    options = "".join(
        f'<option value="{s}"{" selected" if s == shown else ""}>step {s} ({len(by_step[s])} rows)</option>'
        for s in steps
    )
    head = "".join(
        f"<th>{h}</th>" for h in ("rollout", "media", "prompt", "completion", "reward", "components", "advantage")
    )
    panels = []
    for s in steps:
        rows = by_step[s]
        prompts = [(r.get("prompt_id"), r.get("group"), r.get("prompt")) for r in rows]
        pictures = spans([(k, _media_digest(run, r)) for k, r in zip(prompts, rows)])
        body = "".join(_rollout_row(r, s != shown, p, m) for r, p, m in zip(rows, spans(prompts), pictures))
        panels.append(
            f'<div class="rollout-step" data-step="{s}"{"" if s == shown else " hidden"}>'
            f'<div class="scroll"><table class="data rollouts"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div></div>"
        )
    controls = (
        '<div class="controls"><button type="button" id="rollout-prev">&larr; previous</button>'
        f'<label>step <select id="rollout-step">{options}</select></label>'
        '<button type="button" id="rollout-next">next &rarr;</button>'
        f'<span class="muted">{len(run.samples)} rows over {len(steps)} steps · samples/step_*.parquet</span></div>'
    )
    return controls + "".join(panels)


def _image_grid(run: RunData) -> str:
    """Rows: prompts; columns: up to :data:`GRID_COLUMNS` logged steps (evenly spaced, first and
    last included); each cell the prompt's first logged image at that step, with its reward."""
    cells: dict[str, dict[int, dict[str, Any]]] = {}
    for row in run.samples:
        if row.get("media"):
            cells.setdefault(str(row.get("prompt", "")), {}).setdefault(int(row["step"]), row)
    if not cells:
        return '<p class="empty">No generated images logged yet.</p>'
    steps = sorted({s for by in cells.values() for s in by})
    steps = evenly(steps, GRID_COLUMNS)
    prompts = sorted(cells, key=lambda p: -sum(s in cells[p] for s in steps))[:GRID_ROWS]
    body = []
    for prompt in prompts:
        row = [f'<div class="grid-prompt">{escape(prompt)}</div>']
        for step in steps:
            sample = cells[prompt].get(step)
            media = [str(m) for m in (sample or {}).get("media") or [] if safe_rel(str(m))]
            if not media:
                row.append('<span class="muted">–</span>')
                continue
            row.append(
                _img(f"samples/{media[0]}", cls="grid", alt=prompt)
                + f'<div class="caption">reward {escape(fmt(sample.get("reward")))}</div>'
            )
        body.append(row)
    return _table(["prompt"] + [f"step {s}" for s in steps], body, cls="data image-grid")


def _config(run: RunData) -> str:
    if not run.config_text:
        return '<p class="empty">No config.yaml in the run folder.</p>'
    return f'<pre class="config">{escape(run.config_text)}</pre>'


# -- page ---------------------------------------------------------------------------------------


def _asset(name: str) -> str:
    return resources.files("mmpo.report").joinpath("assets", name).read_text(encoding="utf-8")


def script_json(value: Any) -> str:
    """JSON for a ``<script type="application/json">`` block: ``<`` escaped so no text in it can
    close the block."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")


def render(run: RunData) -> str:
    """The report page (one HTML string with plotly.js, CSS and script inlined)."""
    from plotly.offline import get_plotlyjs

    figures: list[dict[str, Any]] = []
    task = (run.config.get("task") or {}).get("name", "")
    sections: list[tuple[str, str, str]] = [
        ("summary", "Summary", _summary(run)),
        ("curves", "Curves", _curves(run, figures)),
    ]
    evaluation = _eval_history(run) + _eval_folders(run)
    sections.append(("evaluation", "Evaluation", evaluation or '<p class="empty">No evaluation results yet.</p>'))
    sections.append(("rollouts", "Logged rollouts", _rollouts(run)))
    if run.kind in IMAGE_KINDS:
        sections.append(("images", "Generated images per prompt", _image_grid(run)))
    sections.append(("config", "Resolved config", _config(run)))
    toc = "".join(f'<a href="#{sid}">{escape(title)}</a>' for sid, title, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{escape(t)}</h2>{html}</section>' for sid, t, html in sections)
    name = run.run_dir.resolve().name
    subtitle = " · ".join(
        x
        for x in (
            f"task {task}" if task else "",
            f"{run.kind} trainer" if run.kind else "",
            str(run.run_dir.resolve()),
            "written " + datetime.now().strftime("%Y-%m-%d %H:%M"),
        )
        if x
    )
    parts = {
        "TITLE": escape(f"mmpo report · {name}"),
        "HEADING": escape(name),
        "SUBTITLE": escape(subtitle),
        "TOC": toc,
        "BODY": body,
        "CSS": _asset("report.css"),
        "PLOTLY": get_plotlyjs(),
        "DATA": script_json({"figures": figures, "config": PLOT_CONFIG}),
        "SCRIPT": _asset("report.js"),
    }
    # one pass over the template: text put in is never searched for placeholders again
    return _PLACEHOLDER.sub(lambda m: parts[m.group(1)], _asset("page.html"))


__all__ = ["render", "fmt", "safe_rel", "script_json", "IMAGE_KINDS"]
