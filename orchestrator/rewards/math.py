"""Math answer rewards.

`math_verify` uses Hugging Face's `math-verify` (LaTeX/expression extraction, \\boxed{} first,
else the last expression, then symbolic equivalence), the verifier used by open GRPO
recipes. `exact_match` compares the last number. `format` checks a regex.

`math_verify` refuses one answer that `math-verify` alone accepts: when the gold answer is a
number, a completion whose final expression is still a calculation ("88 + 5 equals 88 + 5.")
scores 0. `math-verify` evaluates that expression and finds it equal to 93, and GRPO on a
small model learns within a few steps to restate the question instead of answering it.
Fractions ("3/4", "\\frac{3}{4}") still count as numbers.
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_SPECIALS = re.compile(r"<\|[^|]*\|>")
# An operation between two operands in the extracted answer: "88 + 5", "9 \\times 10", "2^3".
_OPERATION = re.compile(r"[\d)}]\s*(?:[-+*^×·]|\\cdot|\\times)\s*[\d(\\{]")


def _clean(text: str) -> str:
    return _SPECIALS.sub("", text).strip()


def math_verify(completion: str, answer: str, **_) -> float:
    from math_verify import parse, verify

    gold = parse(str(answer))
    pred = parse(_clean(completion))
    if not gold or not pred or _restates_a_calculation(gold, pred):
        return 0.0
    return 1.0 if verify(gold, pred) else 0.0


def _restates_a_calculation(gold: list, pred: list) -> bool:
    """The gold answer is a number, the prediction an unevaluated calculation (a sum, a
    product, a power): the completion never stated the result."""
    gold_is_number = any(getattr(g, "is_Number", False) for g in gold)
    pred_text = next((p for p in pred if isinstance(p, str)), "")
    pred_is_number = any(getattr(p, "is_Number", False) for p in pred)
    return gold_is_number and not pred_is_number and bool(_OPERATION.search(pred_text))


def exact_match(completion: str, answer: str, **_) -> float:
    nums = _NUMBER.findall(_clean(completion))
    return 1.0 if nums and nums[-1] == str(answer).strip() else 0.0


def format_regex(completion: str, answer: str, pattern: str = r"\\boxed\{.+\}", **_) -> float:
    return 1.0 if re.search(pattern, _clean(completion), flags=re.DOTALL) else 0.0
