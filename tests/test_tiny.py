"""Tiny offline models (mmpo.tiny) and the single loading path (mmpo.models.load_model)."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmpo import tiny
from mmpo.cli import tiny_main
from mmpo.errors import ConfigError
from mmpo.models import ensure_tiny, load_model
from mmpo.tiny import (
    TINY_KINDS,
    build_tiny,
    build_tokenizer,
    save_tiny,
    special_token_ids,
    token_ids_decoding_to,
)

KINDS = ["qwen2", "qwen3", "qwen2_vl", "qwen2_5_vl"]
VLM_KINDS = ["qwen2_vl", "qwen2_5_vl"]
NEVER_SAMPLE = ["<|endoftext|>", "<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


@pytest.fixture(scope="module", autouse=True)
def tiny_cache(tmp_path_factory: pytest.TempPathFactory):
    """Point $MMPO_CACHE at a fresh folder for this module."""
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("mmpo_cache")
        mp.setenv("MMPO_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each kind written once with save_tiny (seed 0)."""
    root = tmp_path_factory.mktemp("saved")
    return {k: save_tiny(k, root / k) for k in KINDS}


@pytest.fixture(scope="module")
def vlms() -> dict[str, tuple]:
    """Each VLM kind loaded once through load_model('tiny:<kind>'), in train mode."""
    out = {}
    for k in VLM_KINDS:
        model, proc, info = load_model(f"tiny:{k}")
        out[k] = (model.train(), proc, info)
    return out


def _image_prompt(proc, n_images: int = 1, text: str = "What colour is the shape?") -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return proc.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)


def _square(colour: tuple[int, int, int], w: int = 56, h: int = 56) -> Image.Image:
    return Image.new("RGB", (w, h), colour)


def _text_batch(kind: str, proc):
    if kind in VLM_KINDS:
        return proc(text=[_image_prompt(proc)], images=[_square((255, 0, 0))], return_tensors="pt")
    return proc(["The answer is (A). There are 3 red circles."], return_tensors="pt")


def _forward_backward(model, batch) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    logits = model(**batch).logits
    logits.float().log_softmax(-1)[..., :8].mean().backward()
    return logits


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_training_is_deterministic():
    first = build_tokenizer().backend_tokenizer.to_str()
    tiny._trained_tokenizer_json.cache_clear()  # force a second, independent training run
    second_tok = build_tokenizer()
    assert second_tok.backend_tokenizer.to_str() == first
    assert second_tok.get_vocab() == build_tokenizer().get_vocab()


def test_tokenizer_layout():
    tok = build_tokenizer()
    assert len(tok) == 512
    assert len(build_tokenizer(vocab_size=400)) == 400
    vocab = tok.get_vocab()
    for t in tiny.SPECIAL_TOKENS + tiny.TAG_TOKENS:
        assert t in vocab
        assert tok(t)["input_ids"] == [vocab[t]]  # one token each
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    # special tokens vanish on skip_special_tokens, the tags stay
    ids = tok("<|im_start|>assistant\n<think>x</think> <answer>B</answer><|im_end|>")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>x</think> <answer>B</answer>"
    text = 'It\'s 2024! (A) A. ünïcode <tool_call>{"a": [1, 2]}</tool_call>\n\n  end'
    assert tok.decode(tok(text)["input_ids"]) == text
    with pytest.raises(ConfigError, match="vocab_size=100"):
        build_tokenizer(vocab_size=100)


def test_tokenizer_covers_the_task_words():
    tok = build_tokenizer()
    vocab = tok.get_vocab()
    for piece in ["ĠA", "ĠB", "ĠE", "Ġred", "Ġblue", "Ġcircle", "Ġsquare", "Ġanswer", "Ġcolour", "Ġshape", "Ġmany"]:
        assert piece in vocab, piece
    for d in "0123456789":  # digits are single tokens (Qwen split)
        assert tok(d)["input_ids"] == [vocab[d]]


def test_chat_template_matches_qwen2_vl_layout():
    tok = build_tokenizer()
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What colour?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Go"}]},
        {"role": "assistant", "content": "<answer>A</answer>"},
    ]
    assert tok.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Go<|im_end|>\n"
        "<|im_start|>assistant\n<answer>A</answer><|im_end|>\n"
    )


def test_special_token_ids_are_the_never_sample_tokens():
    tok = build_tokenizer()
    expected = sorted(tok.convert_tokens_to_ids(t) for t in NEVER_SAMPLE)
    assert special_token_ids(tok) == expected
    assert tok.eos_token_id not in expected
    assert tok.convert_tokens_to_ids("<think>") not in expected
    # a real Qwen2-VL tokenizer also flags its grounding tokens special; the model writes those
    tok.add_special_tokens({"additional_special_tokens": ["<|box_start|>", "<|vision_pad|>"]})
    assert special_token_ids(tok) == sorted(expected + [tok.convert_tokens_to_ids("<|vision_pad|>")])


def test_token_ids_decoding_to_finds_spaced_and_bare_letters():
    tok = build_tokenizer()
    found = token_ids_decoding_to(tok, ["A", "B", "red", "zzz"])
    vocab = tok.get_vocab()
    assert vocab["A"] in found["A"] and vocab["ĠA"] in found["A"]
    assert vocab["B"] in found["B"] and vocab["ĠB"] in found["B"]
    assert vocab["Ġred"] in found["red"]
    assert found["zzz"] == []
    # every id found decodes to the letter up to whitespace/punctuation, and none is missed
    for i in range(len(tok)):
        piece = tok.decode([i]).strip(" \n\t.()[]:,")
        assert (piece == "A") == (i in found["A"]), (i, tok.decode([i]))


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("kind", KINDS)
def test_saved_folder_loads_with_identical_logits(kind: str, saved: dict[str, Path]):
    model, proc = build_tiny(kind)
    loaded, lproc, info = load_model(str(saved[kind]))
    assert type(loaded) is type(model)
    batch = _text_batch(kind, proc)
    lbatch = _text_batch(kind, lproc)  # the reloaded processor/tokenizer gives the same inputs
    assert batch.keys() == lbatch.keys()
    for k in batch:
        assert torch.equal(batch[k], lbatch[k]), k
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
    tiny_model, _, tiny_info = load_model(f"tiny:{kind}")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, tiny_model(**batch).logits)
    assert info.is_vlm == (kind in VLM_KINDS) and info.model_type == kind
    assert Path(tiny_info.path).parent == Path(os.environ["MMPO_CACHE"]) / "tiny"


@pytest.mark.parametrize("kind", KINDS)
def test_saved_layout_and_info(kind: str, saved: dict[str, Path]):
    folder = saved[kind]
    names = {p.name for p in folder.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "chat_template.jinja",
    } <= names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    config = json.loads((folder / "config.json").read_text())
    text_cfg = config.get("text_config", config)
    head_dim = text_cfg.get("head_dim") or text_cfg["hidden_size"] // text_cfg["num_attention_heads"]
    assert head_dim >= 32
    if kind in VLM_KINDS:
        assert sum(text_cfg["rope_parameters"]["mrope_section"]) == head_dim // 2
    _, proc, info = load_model(str(folder))
    tok = getattr(proc, "tokenizer", proc)
    assert info.eos_token_ids == [tok.convert_tokens_to_ids("<|im_end|>")]
    assert info.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert info.special_token_ids == sorted(tok.convert_tokens_to_ids(t) for t in NEVER_SAMPLE)
    assert info.special == info.special_token_ids
    assert info.vocab_size == len(tok) == 512


def test_weights_depend_on_seed_only_and_keep_the_callers_rng():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    a, _ = build_tiny("qwen2", seed=0)
    after = torch.rand(4)
    assert torch.equal(after, expected)  # building did not consume the caller's RNG stream
    b, _ = build_tiny("qwen2", seed=0)
    c, _ = build_tiny("qwen2", seed=1)
    wa, wb, wc = (m.get_input_embeddings().weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_overrides_change_sizes_and_cache_folder():
    model, tok = build_tiny("qwen3", hidden_size=128, num_attention_heads=2, head_dim=64, num_hidden_layers=1)
    assert model.config.hidden_size == 128 and model.config.head_dim == 64 and model.config.num_hidden_layers == 1
    vl, _ = build_tiny("qwen2_vl", vision_embed_dim=32, vision_num_heads=1, vision_depth=1)
    assert vl.config.vision_config.embed_dim == 32 and vl.config.vision_config.depth == 1
    assert vl.config.vision_config.hidden_size == vl.config.text_config.hidden_size == 64
    assert ensure_tiny("qwen2") != ensure_tiny("qwen2", overrides={"num_hidden_layers": 1})
    assert ensure_tiny("qwen2", seed=0) != ensure_tiny("qwen2", seed=1)


def test_padded_embedding_rows_are_never_sampled():
    _, _, info = load_model("tiny:qwen2", tiny_overrides={"model_vocab_size": 520})
    assert info.vocab_size == 520
    assert set(range(512, 520)) <= set(info.special_token_ids)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"hidden_sise": 64}, "hidden_sise"),
        ({"hidden_size": 32}, "head_dim=16"),
        ({"mrope_section": [4, 4, 4]}, "mrope_section"),
        ({"head_dim": 64}, "only for qwen3"),
        ({"model_vocab_size": 100}, "model_vocab_size=100"),
    ],
)
def test_bad_overrides_raise_config_error(overrides: dict, message: str):
    with pytest.raises(ConfigError, match=message):
        build_tiny("qwen2_vl", **overrides)


def test_bad_paths_raise_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="nowhere"):
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(ConfigError, match="qwen2_vl"):  # lists the valid kinds
        load_model("tiny:qwen9")
    with pytest.raises(ConfigError, match="tiny_overrides"):
        load_model(str(tmp_path), tiny_overrides={"hidden_size": 64})
    assert "qwen2_5_vl" in TINY_KINDS


def test_concurrent_tiny_writes_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MMPO_CACHE", str(tmp_path))
    with ThreadPoolExecutor(max_workers=3) as pool:
        folders = list(pool.map(lambda _: ensure_tiny("qwen3", seed=5), range(3)))
    assert folders[0] == folders[1] == folders[2]
    assert [p.name for p in (tmp_path / "tiny").iterdir()] == [folders[0].name]  # no temp folders left
    model, _, _ = load_model("tiny:qwen3", seed=5)
    ref, _ = build_tiny("qwen3", seed=5)
    assert torch.equal(model.lm_head.weight, ref.lm_head.weight)


def test_load_dtype():
    model, _, _ = load_model("tiny:qwen2", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_tiny_main_writes_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture):
    assert tiny_main("qwen2_vl", str(tmp_path / "m")) == 0
    out = capsys.readouterr().out
    model, _ = build_tiny("qwen2_vl")
    assert f"{sum(p.numel() for p in model.parameters()):,} parameters" in out
    assert "vocab size 512" in out
    assert (tmp_path / "m" / "config.json").is_file()


# ----------------------------------------------------------------------------- VLM inputs


def _grad_ok(model) -> None:
    grads = [p.grad for n, p in model.named_parameters() if "visual" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)  # the image reached the loss


@pytest.mark.parametrize("kind", VLM_KINDS)
def test_vlm_one_image_forward_backward(kind: str, vlms):
    model, proc, info = vlms[kind]
    batch = proc(
        text=[_image_prompt(proc)] * 2, images=[_square((255, 0, 0)), _square((0, 0, 255))], return_tensors="pt"
    )
    # 56x56 -> 4x4 patches of 14 -> merged 2x2 -> 4 image-pad tokens per image
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]
    pads = batch["input_ids"] == model.config.image_token_id
    assert pads.sum(1).tolist() == [4, 4]
    assert torch.equal(batch["mm_token_type_ids"].bool(), pads)
    features = model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
    assert [f.shape[0] for f in features] == [4, 4]
    logits = _forward_backward(model, batch)
    assert logits.shape == (*batch["input_ids"].shape, info.vocab_size)
    _grad_ok(model)


@pytest.mark.parametrize("kind", VLM_KINDS)
def test_vlm_two_images_in_one_prompt(kind: str, vlms):
    model, proc, _ = vlms[kind]
    images = [_square((255, 0, 0)), _square((0, 255, 0), w=112, h=84)]
    batch = proc(text=[_image_prompt(proc, 2, "Which is red?")], images=images, return_tensors="pt")
    # 112x84 (w x h) -> 6x8 patches -> 12 merged tokens; plus 4 for the 56x56 image
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 6, 8]]
    n_pads = int((batch["input_ids"] == model.config.image_token_id).sum())
    assert n_pads == int(batch["image_grid_thw"].prod(-1).sum()) // 4 == 16
    _forward_backward(model, batch)
    _grad_ok(model)


@pytest.mark.parametrize("kind", VLM_KINDS)
def test_vlm_video_frames(kind: str, vlms):
    from qwen_vl_utils import process_vision_info

    model, proc, _ = vlms[kind]
    frames = [_square((60 * i, 0, 0)) for i in range(4)]
    msgs = [
        {
            "role": "user",
            "content": [
                # qwen-vl-utils resizes video frames to >= 128 tokens unless told otherwise
                {"type": "video", "video": frames, "min_pixels": 28 * 28 * 4, "max_pixels": 56 * 56},
                {"type": "text", "text": "What happens?"},
            ],
        }
    ]
    text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    _, videos, video_kwargs = process_vision_info(msgs, return_video_kwargs=True, return_video_metadata=True)
    clips, metadata = zip(*videos)
    via_utils = proc(
        text=[text], videos=list(clips), video_metadata=list(metadata), return_tensors="pt", **video_kwargs
    )
    direct = proc(text=[text], videos=[frames], return_tensors="pt")
    for batch in (via_utils, direct):
        # 4 frames / temporal patch 2 = 2, 56x56 -> 4x4 patches: 2*16/4 = 8 video-pad tokens
        assert batch["video_grid_thw"].tolist() == [[2, 4, 4]]
        assert int((batch["input_ids"] == model.config.video_token_id).sum()) == 8
        assert torch.allclose(via_utils["pixel_values_videos"], direct["pixel_values_videos"], atol=1e-5)
        _forward_backward(model, batch)
        _grad_ok(model)
    if kind == "qwen2_5_vl":  # 2 frames per temporal patch at the 2 fps qwen-vl-utils assumes
        assert via_utils["second_per_grid_ts"].tolist() == [1.0]


@pytest.mark.parametrize("kind", VLM_KINDS)
def test_vlm_generate_never_samples_special_tokens(kind: str, vlms):
    model, proc, info = vlms[kind]
    model.eval()
    try:
        tok = proc.tokenizer
        tok.padding_side = "left"
        prompts = [_image_prompt(proc), _image_prompt(proc, 1, "How many?")]
        batch = proc(
            text=prompts, images=[_square((255, 0, 0)), _square((0, 0, 255))], return_tensors="pt", padding=True
        )
        torch.manual_seed(0)
        out = model.generate(**batch, max_new_tokens=24, do_sample=True, temperature=1.5)
    finally:
        proc.tokenizer.padding_side = "right"
        model.train()
    new = out[:, batch["input_ids"].shape[1] :]
    assert new.shape[0] == 2 and new.shape[1] >= 1
    # the random model puts mass on <|image_pad|> etc.; generation_config.suppress_tokens masks them
    # (pad fills finished rows, so look only at tokens before the first eos)
    for row in new.tolist():
        upto = row[: row.index(info.eos_token_ids[0])] if info.eos_token_ids[0] in row else row
        assert not set(upto) & set(info.special_token_ids)


def test_plugin_registered_kind_loads_through_tiny_prefix():
    def small_qwen2(seed: int = 0, **overrides):
        return tiny.build_qwen2(seed=seed, **{"num_hidden_layers": 1, **overrides})

    TINY_KINDS.register("test_one_layer")(small_qwen2)
    try:
        model, _, info = load_model("tiny:test_one_layer", seed=3)
        assert model.config.num_hidden_layers == 1 and info.model_type == "qwen2"
        assert Path(info.path).name.startswith("test_one_layer-seed3-")
    finally:
        TINY_KINDS._items.pop("test_one_layer")


def test_interrupted_cache_folder_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from mmpo.models import _tiny_folder

    monkeypatch.setenv("MMPO_CACHE", str(tmp_path))
    folder = _tiny_folder("qwen3", 7, {}, TINY_KINDS.get("qwen3"))
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"partial")
    with pytest.raises(ConfigError, match="delete it"):
        ensure_tiny("qwen3", seed=7)
    assert [p.name for p in (tmp_path / "tiny").iterdir()] == [folder.name]  # temp copy removed
