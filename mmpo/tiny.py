"""Offline tiny models: random-weight Qwen2 / Qwen3 LMs and Qwen2-VL / Qwen2.5-VL VLMs.

Everything here is built in code, so tests and the quickstart never touch a model hub:

- a byte-level BPE tokenizer trained with `tokenizers` on the small English corpus below
  (deterministic), with the Qwen special tokens and pre-tokenizer regex, wrapped in
  `PreTrainedTokenizerFast` with a Qwen2-VL style chat template;
- the real transformers model classes built from small configs (text hidden 64, 2 heads of
  head_dim 32, 2 layers; vision depth 2) with weights drawn from `torch.manual_seed(seed)`;
- for VLMs, the real `Qwen2VLProcessor` / `Qwen2_5_VLProcessor` around that tokenizer, with
  pixel limits small enough for 56x56 images.

Every size is a keyword override (see `TinySizes`). Save with `save_tiny` and load everything
through `mmpo.models.load_model`, the one loading path (`tiny:<kind>` writes and loads a cached copy).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import string
import threading
from pathlib import Path
from typing import Any, Callable

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast

from mmpo.core.registry import Registry
from mmpo.errors import ConfigError
from mmpo.hf_logging import quiet_hf_progress
from mmpo.special_tokens import SAMPLEABLE_SPECIAL_TOKENS, special_token_ids  # noqa: F401  (re-exported)

# ----------------------------------------------------------------------------- tokenizer

#: Qwen special tokens (flagged special: removed by ``decode(skip_special_tokens=True)``).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
#: Tags added as single, non-special tokens (kept when decoding), as Qwen2.5 / Qwen3 do for
#: ``<tool_call>`` and ``<think>``. One token per tag makes the format easy for a tiny policy.
TAG_TOKENS: tuple[str, ...] = (
    "<tool_call>",
    "</tool_call>",
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
)
#: Special tokens that Qwen2-VL writes in its answers (grounding: ``<|box_start|>(x1,y1),(x2,y2)
#: <|box_end|>``), so they stay sampleable when a real Qwen tokenizer has them.
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

#: The Qwen2 pre-tokenizer split (digits one by one, an optional leading space/punctuation
#: glued to a word, so both ``A`` and `` A`` / ``(A`` exist as pieces).
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: Qwen2-VL's chat template (default system turn, images/videos as placeholder runs).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_COLOURS = "red green blue yellow orange purple pink brown black white gray grey cyan".split()
_SHAPES = "circle square triangle rectangle star cross diamond hexagon oval line dot".split()
_NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()
_FIXED_TEXT = """\
You are a helpful assistant.
Answer the question about the image. Think first, then give the answer.
Put your reasoning in <think> </think> and the final answer in <answer> </answer>.
<think>The image shows a red circle on a white background.</think> <answer>A</answer>
<think>I count the shapes one by one: one, two, three.</think><answer>3</answer>
<think>The square is blue, so the colour is blue.</think> <answer>B</answer>
Question: What colour is the shape in the image?
Question: What color is the largest shape?
Question: Which shape is in the picture?
Question: How many circles are there in the image?
Question: How many objects can you count?
What is shown in the image? Which option is correct? Choose one option.
Options: A. red B. green C. blue D. yellow E. none of these
Options: (A) circle (B) square (C) triangle (D) star (E) cross
Choose the answer from A, B, C, D or E. The answer is A. The answer is (B).
Answer with the option letter only. Answer: C Answer: D. Answer: (E)
A B C D E A. B. C. D. E. (A) (B) (C) (D) (E) A) B) C) D) E)
The correct answer is A. I think the answer is B. So the answer is C.
0 1 2 3 4 5 6 7 8 9 10 11 12 20 25 50 100 2024 3.5 1/2
Count the number of shapes. The count is 4. There are 2 shapes.
The first frame shows a ball. The video shows a car moving left.
Look at the video frames and answer the question about what happens.
<tool_call>{"name": "zoom", "arguments": {"frame": 3, "box": [0, 0, 28, 28]}}</tool_call>
<tool_call>{"name": "select_frames", "arguments": {"frames": [1, 4, 7]}}</tool_call>
Click the button. Type the text. Scroll down. The page has a search box.
The robot picks up the red block and places it on the blue plate.
The tissue shows tumour cells. The air quality is good today.
user assistant system tool image video frame picture question answer think
"""


def _corpus() -> list[str]:
    """The built-in training corpus (fixed sentences plus template-generated ones)."""
    lines = _FIXED_TEXT.splitlines() * 3  # weighted up against the generated lines
    letters = "ABCDE"
    for i, colour in enumerate(_COLOURS):
        shape = _SHAPES[i % len(_SHAPES)]
        n = i % 10
        letter = letters[i % 5]
        lines += [
            f"The {shape} is {colour}. A {colour} {shape}. What colour is the {shape}? {colour.capitalize()}.",
            f"Which shape is {colour}? The {colour} one is a {shape}. The color is {colour}.",
            f"How many {shape}s are there? There are {_NUMBER_WORDS[n]} ({n}) {shape}s.",
            f"<think>The {shape} looks {colour}, option {letter} says {colour}.</think> <answer>{letter}</answer>",
            f"{letter}. {colour} ({letter}) {shape} {letter}) {_NUMBER_WORDS[n]} {n}",
        ]
    for n, word in enumerate(_NUMBER_WORDS):
        lines.append(f"{word} {n} {word.capitalize()} = {n}. I count {word} shapes: {n}.")
    # The chat scaffolding is in every prompt: weight it up so it costs few tokens.
    lines += ["system", "You are a helpful assistant.", "user", "assistant", "tool"] * 12
    return lines


def _special_added_tokens() -> list[AddedToken]:
    return [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]


def _tag_added_tokens() -> list[AddedToken]:
    return [AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS]


@functools.lru_cache(maxsize=8)
def _trained_tokenizer_json(vocab_size: int) -> str:
    """Train the byte-level BPE once per vocab_size; returns the `tokenizers` JSON."""
    n_added = len(SPECIAL_TOKENS) + len(TAG_TOKENS)
    n_bpe = vocab_size - n_added
    if n_bpe < 256 + 16:
        raise ConfigError(
            f"vocab_size={vocab_size} is too small: the byte-level tokenizer needs 256 byte tokens, "
            f"{n_added} added tokens and some merges (use at least {256 + 16 + n_added})."
        )
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()  # as Qwen2's tokenizer.json (and Qwen2Tokenizer) has
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=n_bpe,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # Added tokens are cut out of the text before BPE sees it, as at encoding time, so no
    # merges are spent on pieces of "<answer>" etc.
    cut = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS + TAG_TOKENS))
    pieces = [p for line in _corpus() for p in cut.split(line) if p]
    tok.train_from_iterator(pieces, trainer=trainer)
    # Added after training so their ids follow the BPE vocabulary, as in Qwen.
    tok.add_special_tokens(_special_added_tokens())
    tok.add_tokens(_tag_added_tokens())
    return tok.to_str()


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A deterministic byte-level BPE tokenizer with Qwen special tokens and chat template.

    The vocabulary holds at most `vocab_size` tokens (fewer only if the built-in corpus runs
    out of pairs to merge): the BPE tokens first, then `SPECIAL_TOKENS`, then `TAG_TOKENS`.
    eos is ``<|im_end|>``, pad is ``<|endoftext|>``, there is no bos (as in Qwen).
    """
    backend = Tokenizer.from_str(_trained_tokenizer_json(int(vocab_size)))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        bos_token=None,
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )


_STRIP = string.whitespace + string.punctuation


def token_ids_decoding_to(tokenizer: Any, texts: list[str]) -> dict[str, list[int]]:
    """Map each text to the ids of every vocabulary token that decodes to it.

    A token matches when its decoded text, stripped of surrounding whitespace and punctuation,
    equals the text stripped the same way (case-sensitive): for "A" that is ``A``, `` A``
    (``ĠA``), ``(A``, `` (A``, ... whichever the vocabulary has. Special tokens never match.
    Accepts a tokenizer or a processor.
    """
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    special = {i for i, t in tok.added_tokens_decoder.items() if t.special} | set(tok.all_special_ids)
    n = len(tok)
    decoded = tok.batch_decode([[i] for i in range(n)], skip_special_tokens=False)
    out: dict[str, list[int]] = {t: [] for t in texts}
    wanted = {t.strip(_STRIP): t for t in texts}
    for i, piece in enumerate(decoded):
        key = piece.strip(_STRIP)
        if key in wanted and i not in special:
            out[wanted[key]].append(i)
    return out


# ----------------------------------------------------------------------------- sizes


@dataclasses.dataclass
class TinySizes:
    """Every size of a tiny model; each field is a keyword override of the builders.

    Text fields apply to all kinds, ``vision_*`` / pixel fields to the VLMs only.
    """

    vocab_size: int = 512  # tokenizer vocabulary
    model_vocab_size: int | None = None  # embedding rows; None: len(tokenizer). Larger pads like Qwen
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    head_dim: int | None = None  # None: hidden_size // num_attention_heads (Qwen3 may differ)
    max_position_embeddings: int = 4096
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02  # std of the random init (text and vision)
    head_init_std: float | None = None  # std of the LM head; small -> near-uniform first policy
    mrope_section: list[int] | None = None  # None: split head_dim/2 as 1:1.5:1.5 like Qwen
    vision_depth: int = 2
    vision_embed_dim: int = 64
    vision_num_heads: int = 2
    vision_mlp_ratio: int = 2  # Qwen2-VL
    vision_intermediate_size: int = 128  # Qwen2.5-VL
    vision_window_size: int = 112  # Qwen2.5-VL window attention, in pixels
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 28 * 28 * 4
    max_pixels: int = 224 * 224
    video_min_pixels: int = 28 * 28 * 4
    video_max_pixels: int = 112 * 112

    @classmethod
    def from_overrides(cls, overrides: dict[str, Any]) -> "TinySizes":
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(overrides) - set(valid))
        if unknown:
            raise ConfigError(f"Unknown tiny model override(s) {unknown}. Valid: {', '.join(valid)}.")
        sizes = cls(**overrides)
        sizes.validate()
        return sizes

    def text_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        hd = self.text_head_dim()
        if hd < 32 or hd % 2:
            raise ConfigError(f"tiny model head_dim={hd} must be even and >= 32 (vLLM loads those).")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}."
            )
        if self.mrope_section is not None and sum(self.mrope_section) != hd // 2:
            raise ConfigError(f"mrope_section {self.mrope_section} must sum to head_dim/2 = {hd // 2}.")
        if self.vision_embed_dim % self.vision_num_heads:
            raise ConfigError(
                f"vision_embed_dim={self.vision_embed_dim} must be a multiple of "
                f"vision_num_heads={self.vision_num_heads}."
            )

    def mrope(self) -> list[int]:
        if self.mrope_section is not None:
            return list(self.mrope_section)
        half = self.text_head_dim() // 2
        t = half // 4  # Qwen2-VL: [16, 24, 24] of 64
        h = (half - t) // 2
        return [t, h, half - t - h]


# ----------------------------------------------------------------------------- builders

Builder = Callable[..., tuple[Any, Any]]
#: kind -> builder ``(seed: int = 0, **overrides) -> (model, processor_or_tokenizer)``.
TINY_KINDS: Registry[Builder] = Registry("tiny model kind")


_BUILD_LOCK = threading.Lock()


def _seeded(build: Callable[[], Any], seed: int, head_init_std: float | None = None) -> Any:
    """Run `build` under torch.manual_seed(seed) without changing the caller's RNG stream.

    Weight init draws from torch's global CPU generator, which threads share: the lock keeps
    two concurrent builds from interleaving their draws (the weights must depend on seed only).
    ``head_init_std`` re-draws the output head with that std (a small head gives a
    near-uniform initial policy, as RL actors are usually initialised).
    """
    with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
        if head_init_std is not None:
            head = model.get_output_embeddings()
            if head.weight is model.get_input_embeddings().weight:
                raise ConfigError("head_init_std needs tie_word_embeddings=False")
            with torch.no_grad():
                head.weight.normal_(0.0, head_init_std)
        return model


def _token_ids(tok: PreTrainedTokenizerFast) -> dict[str, int]:
    return {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}


def _text_kwargs(s: TinySizes, tok: PreTrainedTokenizerFast) -> dict[str, Any]:
    ids = _token_ids(tok)
    rows = len(tok) if s.model_vocab_size is None else s.model_vocab_size
    if rows < len(tok):
        raise ConfigError(f"model_vocab_size={rows} is smaller than the tokenizer ({len(tok)} tokens).")
    return dict(
        vocab_size=rows,
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_hidden_layers,
        num_attention_heads=s.num_attention_heads,
        num_key_value_heads=s.num_key_value_heads,
        max_position_embeddings=s.max_position_embeddings,
        bos_token_id=ids[PAD_TOKEN],
        eos_token_id=ids[EOS_TOKEN],
        pad_token_id=ids[PAD_TOKEN],
        tie_word_embeddings=s.tie_word_embeddings,
        initializer_range=s.initializer_range,
    )


def _check_head_dim_fixed(s: TinySizes, kind: str) -> None:
    if s.head_dim is not None and s.head_dim != s.hidden_size // s.num_attention_heads:
        raise ConfigError(
            f"tiny '{kind}' has head_dim = hidden_size / num_attention_heads = "
            f"{s.hidden_size // s.num_attention_heads}; head_dim={s.head_dim} is only for qwen3."
        )


def _finish(model: Any, tok: PreTrainedTokenizerFast) -> Any:
    """Attach the generation config (eos, pad, never-sample tokens suppressed) and eval mode."""
    ids = _token_ids(tok)
    model.generation_config = GenerationConfig(
        bos_token_id=ids[PAD_TOKEN],
        eos_token_id=[ids[EOS_TOKEN]],
        pad_token_id=ids[PAD_TOKEN],
        suppress_tokens=special_token_ids(tok),
    )
    model.eval()
    return model


@TINY_KINDS.register("qwen2")
def build_qwen2(seed: int = 0, **overrides: Any) -> tuple[Any, PreTrainedTokenizerFast]:
    """Tiny random Qwen2 causal LM (Qwen2ForCausalLM) and its tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    s = TinySizes.from_overrides(overrides)
    _check_head_dim_fixed(s, "qwen2")
    tok = build_tokenizer(s.vocab_size)
    config = Qwen2Config(**_text_kwargs(s, tok), rope_theta=s.rope_theta, use_sliding_window=False)
    return _finish(_seeded(lambda: Qwen2ForCausalLM(config), seed, s.head_init_std), tok), tok


@TINY_KINDS.register("qwen3")
def build_qwen3(seed: int = 0, **overrides: Any) -> tuple[Any, PreTrainedTokenizerFast]:
    """Tiny random Qwen3 causal LM (Qwen3ForCausalLM; explicit head_dim, q/k norm)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    s = TinySizes.from_overrides(overrides)
    tok = build_tokenizer(s.vocab_size)
    config = Qwen3Config(
        **_text_kwargs(s, tok), head_dim=s.text_head_dim(), rope_theta=s.rope_theta, use_sliding_window=False
    )
    return _finish(_seeded(lambda: Qwen3ForCausalLM(config), seed, s.head_init_std), tok), tok


def _vl_text_config(s: TinySizes, tok: PreTrainedTokenizerFast) -> dict[str, Any]:
    return dict(
        **_text_kwargs(s, tok),
        rope_parameters={"rope_type": "default", "rope_theta": s.rope_theta, "mrope_section": s.mrope()},
    )


def _vl_token_kwargs(tok: PreTrainedTokenizerFast) -> dict[str, int]:
    ids = _token_ids(tok)
    return dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def build_vl_processor(s: TinySizes, tok: PreTrainedTokenizerFast, processor_cls: type) -> Any:
    """The real Qwen2-VL family processor around the in-code tokenizer, with small pixel limits."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    common = dict(patch_size=s.patch_size, temporal_patch_size=s.temporal_patch_size, merge_size=s.spatial_merge_size)
    image_processor = Qwen2VLImageProcessor(min_pixels=s.min_pixels, max_pixels=s.max_pixels, **common)
    video_processor = Qwen2VLVideoProcessor(
        min_pixels=s.video_min_pixels, max_pixels=s.video_max_pixels, cap_pixels_per_frame=True, **common
    )
    return processor_cls(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


@TINY_KINDS.register("qwen2_vl")
def build_qwen2_vl(seed: int = 0, **overrides: Any) -> tuple[Any, Any]:
    """Tiny random Qwen2-VL (Qwen2VLForConditionalGeneration) and its Qwen2VLProcessor."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    s = TinySizes.from_overrides(overrides)
    _check_head_dim_fixed(s, "qwen2_vl")
    tok = build_tokenizer(s.vocab_size)
    config = Qwen2VLConfig(
        text_config=_vl_text_config(s, tok),
        vision_config=dict(
            depth=s.vision_depth,
            embed_dim=s.vision_embed_dim,
            hidden_size=s.hidden_size,
            mlp_ratio=s.vision_mlp_ratio,
            num_heads=s.vision_num_heads,
            patch_size=s.patch_size,
            spatial_merge_size=s.spatial_merge_size,
            temporal_patch_size=s.temporal_patch_size,
            initializer_range=s.initializer_range,
        ),
        tie_word_embeddings=s.tie_word_embeddings,
        **_vl_token_kwargs(tok),
    )
    model = _finish(_seeded(lambda: Qwen2VLForConditionalGeneration(config), seed, s.head_init_std), tok)
    return model, build_vl_processor(s, tok, Qwen2VLProcessor)


@TINY_KINDS.register("qwen2_5_vl")
def build_qwen2_5_vl(seed: int = 0, **overrides: Any) -> tuple[Any, Any]:
    """Tiny random Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration) and its Qwen2_5_VLProcessor."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    s = TinySizes.from_overrides(overrides)
    _check_head_dim_fixed(s, "qwen2_5_vl")
    tok = build_tokenizer(s.vocab_size)
    config = Qwen2_5_VLConfig(
        text_config=_vl_text_config(s, tok),
        vision_config=dict(
            depth=s.vision_depth,
            hidden_size=s.vision_embed_dim,
            intermediate_size=s.vision_intermediate_size,
            out_hidden_size=s.hidden_size,
            num_heads=s.vision_num_heads,
            patch_size=s.patch_size,
            spatial_merge_size=s.spatial_merge_size,
            temporal_patch_size=s.temporal_patch_size,
            window_size=s.vision_window_size,
            fullatt_block_indexes=[s.vision_depth - 1],
            initializer_range=s.initializer_range,
        ),
        tie_word_embeddings=s.tie_word_embeddings,
        **_vl_token_kwargs(tok),
    )
    model = _finish(_seeded(lambda: Qwen2_5_VLForConditionalGeneration(config), seed, s.head_init_std), tok)
    return model, build_vl_processor(s, tok, Qwen2_5_VLProcessor)


# ----------------------------------------------------------------------------- public API


def build_tiny(kind: str, seed: int = 0, **overrides: Any) -> tuple[Any, Any]:
    """Build tiny model `kind` in memory: ``(model, processor_or_tokenizer)`` (model in eval mode)."""
    return TINY_KINDS.get(kind)(seed=seed, **overrides)


def save_tiny(kind: str, folder: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Write tiny model `kind` to `folder` in save_pretrained layout (safetensors); returns it."""
    folder = Path(folder)
    model, proc = build_tiny(kind, seed=seed, **overrides)
    folder.mkdir(parents=True, exist_ok=True)
    with quiet_hf_progress():
        model.save_pretrained(folder, safe_serialization=True)
    model.generation_config.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder
