"""``model.path: org/name``: a Hub id resolved from the local Hugging Face cache, never downloaded.

The cache is a real folder in huggingface_hub's layout (``models--org--name/snapshots/<commit>/``
plus ``refs/main``) under a temporary ``HF_HOME``, read by huggingface_hub's own lookup.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mmpo.cli import main
from mmpo.config import load_config
from mmpo.diffusion.pipeline import resolve_pipeline_folder
from mmpo.errors import ConfigError
from mmpo.hub import hub_cache_dir, is_hub_id, local_model_folder
from mmpo.models import load_model
from mmpo.tiny import save_tiny

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs" / "quickstart.yaml")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cached_repo(hf_home: Path, repo_id: str) -> Path:
    """An empty snapshot folder of ``repo_id`` in the cache layout; returns the snapshot folder."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "hf_home"
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    return home


@pytest.mark.parametrize(
    "value,expected",
    [
        ("Qwen/Qwen2-VL-2B-Instruct", True),
        ("org/name.v1", True),
        ("runs/x", True),  # the shape alone cannot tell; a local folder of that name wins
        ("tiny:qwen2", False),
        ("/abs/path", False),
        ("./org/name", False),
        ("runs/x/model", False),
        ("org/..", False),
        ("name", False),
        ("~/models/x", False),
    ],
)
def test_hub_id_shape(value: str, expected: bool) -> None:
    assert is_hub_id(value) is expected


def test_cache_dir_follows_the_environment(hf_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert hub_cache_dir() == hf_home / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "elsewhere"))
    assert hub_cache_dir() == hf_home / "elsewhere"


def test_cached_hub_id_loads_the_snapshot(hf_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snapshot = _cached_repo(hf_home, "tiny-org/tiny-qwen2")
    save_tiny("qwen2", snapshot, seed=0)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline mode changes nothing: the cache is all it reads

    cfg = load_config(QUICK, ["model.path=tiny-org/tiny-qwen2"])
    assert cfg.model.path == "tiny-org/tiny-qwen2"
    model, _, info = load_model("tiny-org/tiny-qwen2")
    assert Path(info.path) == snapshot
    assert not info.is_vlm and info.model_type == "qwen2"
    reference, _, _ = load_model(str(snapshot))
    for (name, p), (_, q) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert p.equal(q), name


def test_missing_hub_id_names_the_download_command(hf_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(QUICK, ["model.path=some-org/not-cached"])
    message = " ".join(str(err.value).split())
    assert "model.path" in message and "`hf download some-org/not-cached`" in message
    assert str(hf_home / "hub") in message
    with pytest.raises(ConfigError, match="hf download some-org/not-cached"):
        load_model("some-org/not-cached")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set"):
        local_model_folder("some-org/not-cached")


def test_missing_hub_id_on_the_command_line_exits_2(hf_home: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["train", QUICK, f"output_dir={hf_home / 'run'}", "model.path=some-org/not-cached"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "hf download some-org/not-cached" in " ".join(err.split())


def test_a_local_folder_wins_over_the_cache(hf_home: Path) -> None:
    _cached_repo(hf_home, "org/name")
    local = Path("org") / "name"
    local.mkdir(parents=True)
    assert local_model_folder("org/name") == local


def test_a_repo_without_refs_main_is_not_cached(hf_home: Path) -> None:
    snapshot = _cached_repo(hf_home, "org/name")
    (snapshot.parents[1] / "refs" / "main").unlink()
    with pytest.raises(ConfigError, match="hf download org/name"):
        local_model_folder("org/name")


def test_diffusers_pipeline_from_the_cache(hf_home: Path) -> None:
    snapshot = _cached_repo(hf_home, "org/tiny-pipeline")
    (snapshot / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    assert resolve_pipeline_folder("org/tiny-pipeline") == snapshot
    with pytest.raises(ConfigError, match="hf download org/other-pipeline"):
        resolve_pipeline_folder("org/other-pipeline")
