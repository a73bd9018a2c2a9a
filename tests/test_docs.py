"""The README and docs/: generated pages current, the README small, every link resolving, no
citation of a file outside the repository, and the task written in docs/writing-a-task.md training."""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from mmpo import docs_gen
from mmpo.cli import main
from mmpo.config import from_dict
from mmpo.tasks import TASKS, RewardOutput

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_MAX_BYTES = 12 * 1024
#: screenshots taken from a real run in headless Chromium; they are committed after the pages
SCREENSHOTS = {"img/report_token.png", "img/report_diffusion.png", "img/report_environment.png"}
#: folders that hold no file of the project (environments, run outputs, caches)
SKIP_DIRS = {".git", ".venv", ".venv-vllm", "runs", "build", "node_modules", "__pycache__", ".pytest_cache"}

_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.S | re.M)
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.M)


def _markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def _prose(path: Path) -> str:
    """The file's markdown outside fenced code blocks (code is not linked)."""
    return _FENCE.sub("", path.read_text(encoding="utf-8"))


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(h) for h in _HEADING.findall(_prose(path))}


def _project_files(suffixes: tuple[str, ...]) -> list[Path]:
    out = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        out += [Path(folder) / f for f in files if Path(f).suffix in suffixes]
    return out


def test_algorithms_doc_is_current() -> None:
    committed = (ROOT / docs_gen.OUTPUT).read_text(encoding="utf-8")
    assert committed == docs_gen.render(), "docs/algorithms.md is stale: run make docs"


def test_algorithms_doc_covers_every_registry_entry() -> None:
    from mmpo.core import ADVANTAGES, GROUP_FILTERS, KL_SCHEDULES, POLICY_LOSSES

    text = (ROOT / docs_gen.OUTPUT).read_text(encoding="utf-8")
    headings = set(re.findall(r"^### `([^`]+)`", text, re.M))
    for registry in (ADVANTAGES, POLICY_LOSSES, KL_SCHEDULES, GROUP_FILTERS):
        for name, aliases, _ in docs_gen._entries(registry):
            assert name in headings, f"{registry.kind} {name!r} has no section"
    # a docstring's formula is there as written
    assert "A_i = (R_i - mean_g R) / (std_g R + eps)" in text
    assert "| `eps_high` | `0.2` |" in text  # ppo_clip's option and its default
    assert {"synthetic_vqa", "vlm_reasoning", "ript_vla"} <= headings


def test_readme_fits_and_opens_with_the_two_commands() -> None:
    data = README.read_bytes()
    assert len(data) <= README_MAX_BYTES, f"README.md is {len(data)} bytes; the limit is {README_MAX_BYTES}"
    first_block = data.decode().split("```")[1]
    assert "make quickstart" in first_block and "make test" in first_block


def test_readme_names_the_real_extras() -> None:
    import tomllib

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]) - {"vllm"}
    readme = README.read_text(encoding="utf-8")
    assert extras, "pyproject.toml lists no extras"
    for extra in extras:
        assert f"`{extra}`" in readme, f"the README does not name the extra {extra!r}"


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path: Path) -> None:
    bad = []
    for target in _LINK.findall(_prose(path)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        rel = dest.relative_to(DOCS).as_posix() if dest.is_relative_to(DOCS) else None
        if not dest.exists():
            if rel not in SCREENSHOTS:
                bad.append(f"{target} (no such file)")
            continue
        if anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target} (no heading with anchor #{anchor})")
    assert not bad, f"{path.relative_to(ROOT)}: broken links: {bad}"


def test_docs_link_to_every_doc_page() -> None:
    index = _prose(DOCS / "index.md")
    linked = {(DOCS / t.partition("#")[0]).resolve() for t in _LINK.findall(index)}
    pages = {p.resolve() for p in DOCS.rglob("*.md")} - {(DOCS / "index.md").resolve()}
    assert pages <= linked, f"docs/index.md does not link {sorted(str(p) for p in pages - linked)}"


def test_nothing_cites_a_file_outside_the_repository() -> None:
    needle = "ALGORITHMS" + ".md"  # split, so that this file does not cite it either
    hits = [
        str(p.relative_to(ROOT))
        for p in _project_files((".py", ".md", ".yaml", ".yml", ".toml", ".txt"))
        if needle in p.read_text(encoding="utf-8", errors="replace")
    ]
    assert not hits, f"{needle} is not part of the repository; cite the paper or docs/algorithms.md in {hits}"


def test_license_is_the_apache_2_text() -> None:
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX: How to apply the Apache License" in text
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()


@functools.cache
def _letters_module() -> types.ModuleType:
    """The Python block of docs/writing-a-task.md, as a module (in ``sys.modules``, as an imported
    plugin module is: dataclasses look their module up there)."""
    text = (DOCS / "writing-a-task.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
    assert len(blocks) == 1
    module = types.ModuleType("docs_letters")
    sys.modules[module.__name__] = module
    exec(compile(blocks[0], "docs/writing-a-task.md", "exec"), module.__dict__)
    return module


def test_the_documented_task_scores_its_completions() -> None:
    cls = _letters_module().LettersTask
    task = cls(from_dict(cls.Config, {"num_train": 4}, where="task"), seed=0)
    samples = [task.train_sample(i) for i in range(6)]
    assert [s.id for s in samples[4:]] == ["train-0", "train-1"]  # cycles over num_train
    assert samples[4].answer == task.train_sample(0).answer  # deterministic
    completions = [samples[0].answer, "z", f" {samples[2].answer.lower()}!"]
    out = task.reward(samples[:3], completions)
    assert isinstance(out, RewardOutput)
    assert out.rewards.tolist() == [1.0, 0.0, 1.0] and torch.equal(out.components["accuracy"], out.rewards)
    assert len(task.eval_samples(3)) == 3


@pytest.mark.slow
def test_the_documented_task_trains(tmp_path: Path) -> None:
    cls = _letters_module().LettersTask
    if "letters_docs" not in TASKS:
        TASKS.add("letters_docs", cls)
    config = tmp_path / "letters.yaml"
    config.write_text(
        "task: {name: letters_docs, num_train: 16}\n"
        "model: {path: tiny:qwen2_vl}\n"
        "rollout: {group_size: 4, prompts_per_step: 2, max_new_tokens: 3}\n"
        "trainer: {max_steps: 1, lr: 1.0e-3, eval_at_start: false, report_to: []}\n"
        "eval: {num_samples: 4, batch_size: 4}\n"
    )
    run = tmp_path / "run"
    assert main(["train", str(config), f"output_dir={run}"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 1 and "reward/accuracy" in records[0]
    assert (run / "model" / "config.json").is_file()
