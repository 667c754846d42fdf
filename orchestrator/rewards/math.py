"""Math answer rewards.

`math_verify` uses Hugging Face's `math-verify` (LaTeX/expression extraction, \\boxed{} first,
else the last expression, then symbolic equivalence), the verifier used by open GRPO
recipes. `exact_match` compares the last number. `format` checks a regex.
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_SPECIALS = re.compile(r"<\|[^|]*\|>")


def _clean(text: str) -> str:
    return _SPECIALS.sub("", text).strip()


def math_verify(completion: str, answer: str, **_) -> float:
    from math_verify import parse, verify

    gold = parse(str(answer))
    pred = parse(_clean(completion))
    return 1.0 if gold and pred and verify(gold, pred) else 0.0


def exact_match(completion: str, answer: str, **_) -> float:
    nums = _NUMBER.findall(_clean(completion))
    return 1.0 if nums and nums[-1] == str(answer).strip() else 0.0


def format_regex(completion: str, answer: str, pattern: str = r"\\boxed\{.+\}", **_) -> float:
    return 1.0 if re.search(pattern, _clean(completion), flags=re.DOTALL) else 0.0
