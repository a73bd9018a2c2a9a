"""Multiple-choice rewards: robust extraction of the chosen option, accuracy and format."""

from __future__ import annotations

import re
from typing import Literal, Sequence

import torch

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)
Accept = Literal["both", "letter", "option"]


def _strip(text: str) -> str:
    return text.strip().strip(".()!:,").strip()


def extract_choice(
    text: str, letters: Sequence[str], options: Sequence[str] | None = None, accept: Accept = "both"
) -> str | None:
    """The letter of the option a completion chose, or None.

    Looks inside ``<answer>...</answer>`` when present. Then, in order: the whole text is one
    option's text (case-insensitive) or one letter; "answer is X" / "(X)"; a standalone
    capital letter; the first option text named as a whole word. Letters are matched as
    capitals so that the article "a" is not read as option A. ``accept`` limits the forms.
    """
    m = _ANSWER_TAG.search(text)
    if m:
        text = m.group(1)
    use_letters = accept in ("both", "letter") and letters
    use_options = accept in ("both", "option") and options
    bare = _strip(text)
    if use_options:
        for letter, opt in zip(letters, options):  # type: ignore[arg-type]
            if bare.lower() == str(opt).lower():
                return letter
    if use_letters:
        if bare in letters:
            return bare
        alt = "".join(re.escape(x) for x in letters)
        for pattern, flags in (
            (rf"answer\s*(?:is|:)?\s*\(?([{alt}])\b", re.I),
            (rf"\(([{alt}])\)", 0),
            (rf"(?<![A-Za-z])([{alt}])(?![A-Za-z])", 0),
        ):
            found = re.search(pattern, text, flags=flags)
            if found and found.group(1).upper() in letters:
                return found.group(1).upper()
    if use_options:
        hits = []
        for letter, opt in zip(letters, options):  # type: ignore[arg-type]
            found = re.search(rf"(?<!\w){re.escape(str(opt))}(?!\w)", text, flags=re.I)
            if found:
                hits.append((found.start(), letter))
        if hits:
            return min(hits)[1]
    return None


def choice_accuracy(
    completions: Sequence[str],
    answers: Sequence[str],
    letters: Sequence[Sequence[str]],
    options: Sequence[Sequence[str]] | None = None,
    accept: Accept = "both",
) -> torch.Tensor:
    """1.0 where the chosen option is the answer letter, else 0.0. Shape [N]."""
    opts = options if options is not None else [None] * len(completions)
    return torch.tensor(
        [float(extract_choice(c, ls, o, accept) == a) for c, a, ls, o in zip(completions, answers, letters, opts)],
        dtype=torch.float32,
    )


def choice_format(
    completions: Sequence[str],
    letters: Sequence[Sequence[str]],
    options: Sequence[Sequence[str]] | None = None,
    accept: Accept = "both",
    exact: bool = False,
) -> torch.Tensor:
    """1.0 where a completion chooses an option (any, right or wrong), else 0.0. Shape [N].

    ``exact=True`` asks for the completion to be nothing but that option (letter or text).
    """
    opts = options if options is not None else [None] * len(completions)
    out = []
    for c, ls, o in zip(completions, letters, opts):
        chosen = extract_choice(c, ls, o, accept)
        if chosen is not None and exact:
            bare = _strip(c)
            texts = {str(x).lower() for x in (o or [])} if accept != "letter" else set()
            forms = set(ls) if accept != "option" else set()
            chosen = chosen if (bare in forms or bare.lower() in texts) else None
        out.append(float(chosen is not None))
    return torch.tensor(out, dtype=torch.float32)
