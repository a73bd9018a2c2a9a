"""Judges: partial credit in [0, 1] for wrong answers (Spectral Policy Optimization, arXiv 2505.11595).

Spectral PO gives the responses of an all-negative group graded rewards from an AI judge, so the
group is no longer uniform (``docs/algorithms.md``, Spectral PO). The paper's judge is a strong LLM
given the question, the reference and the response; its prompt and scale are not public. This
module offers three judges behind one interface, :meth:`Judge.score`::

    judge.score(prompts: list[str], completions: list[str], references: list[str | None]) -> Tensor [n]

scores in [0, 1] (float32), NaN where a row could not be judged; one bad row never raises.

- ``reward``: a reward function as judge: a reward component of the task (by name, read from
  ``task.reward(samples, completions).components``) or any callable ``fn(prompts, completions,
  references) -> [n]``, mapped to [0, 1] by ``(v - low) / (high - low)``, clamped.
- ``numeric``: closeness of the completion's number to the reference's,
  ``1 / (1 + |x - y| / max(|y|, floor))``; a heuristic of this library, not the paper's judge.
- ``local_model``: a local causal LM (save_pretrained folder, never downloaded) asked whether the
  response is on the right track; the score is ``P(Yes) / (P(Yes) + P(No))`` of the next token,
  i.e. the softmax over the two answer tokens' logits.

Build one with :func:`build_judge` (a name, or ``{"name": ..., <options>}``): unknown or bad options raise
:class:`mmpo.errors.ConfigError` naming the judge, the option and the value.
"""

from __future__ import annotations

import abc
import logging
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, Sequence

import torch

from mmpo.core.registry import Registry, did_you_mean
from mmpo.errors import ConfigError
from mmpo.rewards.format import extract_answer_tag
from mmpo.rewards.open_answer import parse_number

log = logging.getLogger(__name__)


def _bad(judge: str, option: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"judge {judge!r}: option {option!r} = {value!r}: {why}")


def _finite(judge: str, option: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(judge, option, value, "must be a finite number")
    return float(value)


def _positive_int(judge: str, option: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _bad(judge, option, value, "must be an integer >= 1")
    return value


def _text(judge: str, option: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _bad(judge, option, value, "must be a non-empty string")
    return value


def _check_rows(prompts: Sequence[Any], completions: Sequence[Any], references: Sequence[Any]) -> int:
    n = len(completions)
    if len(prompts) != n or len(references) != n:
        raise ValueError(f"judge: {len(prompts)} prompts, {n} completions and {len(references)} references differ")
    return n


def _as_scores(values: Any, n: int) -> torch.Tensor:
    """``values`` (a tensor or a sequence of numbers / None) as float32 ``[n]``, NaN for None."""
    if isinstance(values, torch.Tensor):
        out = values.detach().float().cpu().reshape(-1)
    else:
        out = torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float32)
    if out.numel() != n:
        raise ValueError(f"judge: expected {n} values, got {out.numel()}")
    return out


class Judge(abc.ABC):
    """Base class of judges (subclasses are dataclasses of their options)."""

    #: the registry name (set by :func:`_register`)
    name: str = ""

    @abc.abstractmethod
    def score(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        references: Sequence[str | None],
        *,
        samples: Sequence[Any] | None = None,
    ) -> torch.Tensor:
        """Partial credit ``[n]`` float32 in [0, 1] of ``completions[i]`` answering ``prompts[i]``
        whose reference answer is ``references[i]`` (None: unknown); NaN where not judged.
        ``samples`` (the task's :class:`mmpo.tasks.Sample` of each row) is read by judges that
        call the task's reward."""


JUDGES: Registry[type[Judge]] = Registry("judge")


def _register(name: str) -> Callable[[type[Judge]], type[Judge]]:
    def deco(cls: type[Judge]) -> type[Judge]:
        cls.name = name
        return JUDGES.register(name)(cls)

    return deco


def _per_row(fn: Callable[[list[int]], torch.Tensor], n: int, what: str) -> torch.Tensor:
    """``fn(all rows)``; when that raises, ``fn([i])`` row by row, NaN for the rows that fail.
    A ConfigError (a wrong option, not a bad row) propagates."""
    try:
        return fn(list(range(n)))
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - a judge never fails a whole batch for one bad row
        log.warning("%s failed on a batch of %d rows (%s: %s); judging row by row", what, n, type(exc).__name__, exc)
    out = torch.full((n,), float("nan"))
    for i in range(n):
        try:
            out[i] = fn([i])[0]
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001
            log.warning("%s failed on row %d (%s: %s); its score is NaN", what, i, type(exc).__name__, exc)
    return out


# ---------------------------------------------------------------------------------------------
# reward: a reward function as judge
# ---------------------------------------------------------------------------------------------


@_register("reward")
@dataclass
class RewardJudge(Judge):
    """A reward function as judge: ``clamp((v - low) / (high - low), 0, 1)`` of its value ``v``.

    ``component``: the name of one of the task's reward components (the task is given to
    :func:`build_judge`; :meth:`score` then needs ``samples``) or a callable ``fn(prompts,
    completions, references) -> [n]``. ``low`` / ``high``: the values that map to 0 and 1
    (default 0 and 1). Non-finite values are NaN.
    """

    component: Any
    low: float = 0.0
    high: float = 1.0
    task: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.low = _finite(self.name, "low", self.low)
        self.high = _finite(self.name, "high", self.high)
        if self.high <= self.low:
            raise _bad(self.name, "high", self.high, f"must be > low ({self.low})")
        if callable(self.component):
            return
        _text(self.name, "component", self.component)
        if self.task is None:
            raise _bad(self.name, "component", self.component, "names a task reward component, but no task is given")
        known = self._task_components()
        if known is not None and self.component not in known:
            why = f"the task's reward has no such component.{did_you_mean(self.component, known)} Components: "
            raise _bad(self.name, "component", self.component, why + ", ".join(known))

    def _task_components(self) -> list[str] | None:
        """The task's component names, from its reward of an empty completion of its first
        training prompt; None when that cannot be computed here (checked at the first score)."""
        try:
            return list(self.task.reward([self.task.train_sample(0)], [""]).components)
        except Exception:  # noqa: BLE001 - best effort: some tasks cannot score outside training
            return None

    def _values(self, rows: list[int], prompts, completions, references, samples) -> torch.Tensor:
        if callable(self.component):
            got = self.component(
                [prompts[i] for i in rows], [completions[i] for i in rows], [references[i] for i in rows]
            )
            return _as_scores(got, len(rows))
        comps = self.task.reward([samples[i] for i in rows], [completions[i] for i in rows]).components
        if self.component not in comps:
            raise _bad(self.name, "component", self.component, f"the task's reward has components {', '.join(comps)}")
        return _as_scores(comps[self.component], len(rows))

    def score(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        references: Sequence[str | None],
        *,
        samples: Sequence[Any] | None = None,
    ) -> torch.Tensor:
        n = _check_rows(prompts, completions, references)
        if not callable(self.component) and (samples is None or len(samples) != n):
            raise ValueError(f"judge 'reward' with component {self.component!r} needs samples= (one per row)")
        if n == 0:
            return torch.zeros(0)
        v = _per_row(lambda rows: self._values(rows, prompts, completions, references, samples), n, "judge 'reward'")
        s = ((v - self.low) / (self.high - self.low)).clamp(0.0, 1.0)
        return torch.where(torch.isfinite(v), s, torch.full_like(s, float("nan")))


# ---------------------------------------------------------------------------------------------
# numeric: closeness of the final number
# ---------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def final_number(text: str | None) -> float | None:
    """The number a text answers: the content of its last ``<answer>`` block, else of its last
    ``\\boxed{}``, else the whole text; read whole by :func:`mmpo.rewards.parse_number` (fractions,
    number words, percentages as their number), else its last number. None when there is none."""
    if text is None:
        return None
    part = extract_answer_tag(text)
    if part is None:
        part = _last_boxed(text)
    if part is None:
        part = text
    whole = parse_number(part)
    if whole is not None:
        return whole[0]
    found = _NUMBER.findall(part)
    return float(found[-1].replace(",", "")) if found else None


@_register("numeric")
@dataclass
class NumericJudge(Judge):
    """``1 / (1 + |x - y| / max(|y|, floor))`` for the completion's number x and the reference's y
    (:func:`final_number`); a heuristic of this library (the Spectral PO paper uses an LLM judge).

    1 for the exact number, 0.5 at a relative error of 1. A completion with no number scores 0
    (judged: no answer); a row whose reference is None or has no number is NaN (not judged).
    ``floor`` (default 1) keeps references near 0 from making every error huge.
    """

    floor: float = 1.0

    def __post_init__(self) -> None:
        self.floor = _finite(self.name, "floor", self.floor)
        if self.floor <= 0:
            raise _bad(self.name, "floor", self.floor, "must be > 0")

    def _one(self, completion: str, reference: str | None) -> float:
        y = final_number(reference)
        if y is None:
            return float("nan")
        x = final_number(completion)
        if x is None:
            return 0.0
        s = 1.0 / (1.0 + abs(x - y) / max(abs(y), self.floor))
        return s if math.isfinite(s) else 0.0

    def score(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        references: Sequence[str | None],
        *,
        samples: Sequence[Any] | None = None,
    ) -> torch.Tensor:
        n = _check_rows(prompts, completions, references)
        out = torch.full((n,), float("nan"))
        for i in range(n):
            try:
                out[i] = self._one(completions[i], references[i])
            except Exception as exc:  # noqa: BLE001 - one odd row is NaN, never a failed step
                log.warning("judge 'numeric' failed on row %d (%s: %s)", i, type(exc).__name__, exc)
        return out


# ---------------------------------------------------------------------------------------------
# local_model: P(Yes) of a local causal LM
# ---------------------------------------------------------------------------------------------

DEFAULT_QUESTION = "Is this reasoning on the right track? Answer Yes or No."
DEFAULT_TEMPLATE = "Question:\n{prompt}\n\n{reference_line}Response:\n{completion}\n\n{question}"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@_register("local_model")
@dataclass
class LocalModelJudge(Judge):
    """A local causal LM asked a yes/no question; score = ``P(yes) / (P(yes) + P(no))`` of the next token.

    The judge reads ``template`` filled with ``{prompt}``, ``{completion}``, ``{question}`` and
    ``{reference_line}`` (``"Reference answer: <ref>\\n\\n"``, empty when the reference is None),
    as the user turn of the tokenizer's chat template (with the generation prompt) when it has one
    and ``chat`` is true, else as plain text followed by ``"\\nAnswer:"``. The score is the
    softmax over the logits of the first tokens of ``yes`` and ``no`` at the next position
    (``sigmoid(l_yes - l_no)``). Inputs longer than ``max_length`` tokens keep their last
    ``max_length`` tokens (the question stays). Batched by ``batch_size``, right-padded, without
    gradients.

    Options: ``model`` (a save_pretrained folder, loaded by :func:`mmpo.models.load_model` with
    local files only; ``tiny:<kind>`` for tests), ``question``, ``template``, ``yes`` / ``no``
    (answer words, default ``"Yes"`` / ``"No"``; their first tokens must differ), ``batch_size``
    (8), ``max_length`` (2048), ``device`` (``"cpu"``), ``dtype`` (float32 | bfloat16 | float16),
    ``chat`` (true).
    """

    model: str
    question: str = DEFAULT_QUESTION
    template: str = DEFAULT_TEMPLATE
    yes: str = "Yes"
    no: str = "No"
    batch_size: int = 8
    max_length: int = 2048
    device: str = "cpu"
    dtype: str = "float32"
    chat: bool = True
    _net: Any = field(default=None, init=False, repr=False, compare=False)
    _tok: Any = field(default=None, init=False, repr=False, compare=False)
    _ids: tuple[int, int] = field(default=(0, 0), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        j = self.name
        _text(j, "model", self.model)
        _text(j, "question", self.question)
        _text(j, "template", self.template)
        if "{completion}" not in self.template:
            raise _bad(j, "template", self.template, "must contain {completion}")
        try:
            self.template.format(prompt="", completion="", question="", reference_line="")
        except (KeyError, IndexError, ValueError) as exc:
            raise _bad(
                j,
                "template",
                self.template,
                f"placeholders are {{prompt}}, {{completion}}, "
                f"{{question}}, {{reference_line}} ({type(exc).__name__}: {exc})",
            ) from None
        _text(j, "yes", self.yes)
        _text(j, "no", self.no)
        self.batch_size = _positive_int(j, "batch_size", self.batch_size)
        self.max_length = _positive_int(j, "max_length", self.max_length)
        if self.dtype not in _DTYPES:
            raise _bad(j, "dtype", self.dtype, f"choose from {', '.join(_DTYPES)}")
        if not isinstance(self.chat, bool):
            raise _bad(j, "chat", self.chat, "must be true or false")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise _bad(j, "device", self.device, str(exc)) from None
        self._load()

    def _load(self) -> None:
        from mmpo.models import load_model

        try:
            net, proc, _ = load_model(self.model, dtype=_DTYPES[self.dtype], device=self.device)
        except ConfigError as exc:
            raise _bad(self.name, "model", self.model, str(exc)) from None
        self._net = net.eval().requires_grad_(False)
        self._tok = getattr(proc, "tokenizer", proc)
        ids = []
        for option, word in (("yes", self.yes), ("no", self.no)):
            toks = self._tok.encode(word, add_special_tokens=False)
            if not toks:
                raise _bad(self.name, option, word, "encodes to no token")
            ids.append(int(toks[0]))
        if ids[0] == ids[1]:
            raise _bad(self.name, "no", self.no, f"starts with the same token as yes={self.yes!r}")
        self._ids = (ids[0], ids[1])

    def judge_text(self, prompt: str, completion: str, reference: str | None) -> str:
        """The whole text the judge model reads for one row (chat template applied when used)."""
        ref = "" if reference is None else f"Reference answer: {reference}\n\n"
        user = self.template.format(prompt=prompt, completion=completion, question=self.question, reference_line=ref)
        if self.chat and getattr(self._tok, "chat_template", None):
            msgs = [{"role": "user", "content": user}]
            return self._tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return user + "\nAnswer:"

    def _encode(self, prompt: str, completion: str, reference: str | None) -> list[int]:
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise TypeError(
                f"prompt and completion must be strings, got {type(prompt).__name__}, {type(completion).__name__}"
            )
        if reference is not None and not isinstance(reference, str):
            reference = str(reference)
        text = self.judge_text(prompt, completion, reference)
        chat = self.chat and getattr(self._tok, "chat_template", None)
        ids = self._tok.encode(text, add_special_tokens=not chat)
        if not ids:
            raise ValueError("the judge text encodes to no token")
        return ids[-self.max_length :]

    @torch.no_grad()
    def _forward(self, rows: list[list[int]]) -> torch.Tensor:
        """P(yes) / (P(yes) + P(no)) ``[b]`` of encoded rows, one forward."""
        dev = next(self._net.parameters()).device
        pad = self._tok.pad_token_id if self._tok.pad_token_id is not None else 0
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        att = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            att[i, : len(r)] = 1
        logits = self._net(input_ids=ids.to(dev), attention_mask=att.to(dev)).logits
        last = torch.tensor([len(r) - 1 for r in rows], device=logits.device)
        pair = logits[torch.arange(len(rows), device=logits.device), last][:, list(self._ids)].float()
        return torch.softmax(pair, dim=-1)[:, 0].cpu()

    def score(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        references: Sequence[str | None],
        *,
        samples: Sequence[Any] | None = None,
    ) -> torch.Tensor:
        n = _check_rows(prompts, completions, references)
        out = torch.full((n,), float("nan"))
        encoded: dict[int, list[int]] = {}
        for i in range(n):
            try:
                encoded[i] = self._encode(prompts[i], completions[i], references[i])
            except Exception as exc:  # noqa: BLE001 - one bad row is NaN
                log.warning("judge 'local_model' cannot encode row %d (%s: %s)", i, type(exc).__name__, exc)
        order = sorted(encoded, key=lambda i: len(encoded[i]))  # similar lengths share a batch
        for k in range(0, len(order), self.batch_size):
            chunk = order[k : k + self.batch_size]
            got = _per_row(lambda rows: self._forward([encoded[chunk[r]] for r in rows]), len(chunk), "judge model")
            out[chunk] = got
        return torch.where(torch.isfinite(out), out, torch.full_like(out, float("nan")))


def build_judge(spec: str | Mapping[str, Any] | None, task: Any = None) -> Judge:
    """The judge of ``spec``: a name of :data:`JUDGES`, or a mapping ``{"name": ..., <options>}``
    (e.g. ``{"name": "numeric", "floor": 1.0}``). ``task`` is given to the ``reward`` judge (whose
    ``component`` names one of its reward components). ConfigError for a missing or unknown judge,
    an unknown option or a bad value (naming it)."""
    if isinstance(spec, str):
        name, opts = spec, {}
    elif isinstance(spec, Mapping) and isinstance(spec.get("name"), str):
        name, opts = spec["name"], {k: v for k, v in spec.items() if k != "name"}
    else:
        raise ConfigError(
            f"judge: expected a judge name or a mapping {{name: <{' | '.join(JUDGES.names())}>, <options>}}, "
            f"got {spec!r}"
        )
    cls = JUDGES.get(name)
    known = [f.name for f in fields(cls) if f.init and f.name != "task"]
    for key in opts:
        if key not in known:
            raise ConfigError(
                f"judge {name!r}: unknown option {key!r}.{did_you_mean(str(key), known)} Valid: {', '.join(known)}"
            )
    missing = [f.name for f in fields(cls) if f.init and f.name != "task" and f.name not in opts and _required(f)]
    if missing:
        raise ConfigError(f"judge {name!r}: option {missing[0]!r} is required")
    if "task" in {f.name for f in fields(cls)}:
        opts["task"] = task
    return cls(**opts)


def _required(f: Any) -> bool:
    from dataclasses import MISSING

    return f.default is MISSING and f.default_factory is MISSING


__all__ = [
    "DEFAULT_QUESTION",
    "DEFAULT_TEMPLATE",
    "JUDGES",
    "Judge",
    "LocalModelJudge",
    "NumericJudge",
    "RewardJudge",
    "build_judge",
    "final_number",
]
