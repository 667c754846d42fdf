"""Generated data sets, so that runs and tests work with no download.

`synthetic:instruct`: short instruction -> answer pairs (arithmetic, reversing, copying,
case changes) in both `messages` and `prompt`/`completion` shape.
`synthetic:arithmetic`: addition problems with a verifiable `answer` (for GRPO).
`synthetic:arithmetic_pairs`: the same problems as preference pairs (right vs off-by-one sum).
`synthetic:review_pairs`: "describe the X" with a kind (chosen) or unkind (rejected) one-line
review, for reward models; `review_pairs_heldout` describes objects no training pair names.
`synthetic:reviews`: the same prompts with one review (30% kind) as the demonstration, and
the verifier `kind_review`, for RL against a learned reward of kindness.
`synthetic:text`: short generated stories `{"text"}` for continued pretraining (`data/text.py`).
Deterministic per seed.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

from orchestrator.data.text import documents

_WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "tiger",
    "lemon",
    "piano",
    "rocket",
    "garden",
    "silver",
    "window",
    "forest",
    "candle",
    "planet",
    "butter",
    "orange",
    "marble",
]


def _instruct_row(rng: random.Random) -> dict[str, object]:
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randrange(100), rng.randrange(100)
        prompt, answer = f"What is {a} + {b}?", str(a + b)
    elif kind == 1:
        w = rng.choice(_WORDS)
        prompt, answer = f"Reverse the word: {w}", w[::-1]
    elif kind == 2:
        w = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 4)))
        prompt, answer = f"Uppercase: {w}", w.upper()
    else:
        w = rng.sample(_WORDS, rng.randint(2, 5))
        prompt, answer = f"Sort alphabetically: {', '.join(w)}", ", ".join(sorted(w))
    if rng.random() < 0.5:
        return {
            "messages": [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": answer},
            ]
        }
    return {"prompt": prompt, "completion": answer}


def instruct(n: int, seed: int) -> Iterator[dict[str, object]]:
    rng = random.Random(seed)
    for _ in range(n):
        yield _instruct_row(rng)


def _is_heldout(a: int, b: int) -> bool:
    # A fixed 30% of problems, never trained on. Drawn per (a, b) pair, not by digits, so
    # every one-digit addition fact still appears in training (with other tens digits):
    # held-out accuracy then measures generalisation, not facts never shown.
    return random.Random(a * 1000 + b).random() < 0.3


def _addition(n: int, seed: int, heldout: bool, noise: float) -> Iterator[dict[str, object]]:
    rng = random.Random(seed)
    made = 0
    while made < n:
        a, b = rng.randrange(10, 90), rng.randrange(1, 10)
        if _is_heldout(a, b) != heldout:
            continue
        made += 1
        shown = a + b + (1 if rng.random() < noise else 0)
        yield {
            "prompt": f"What is {a} + {b}?",
            "completion": str(shown),
            "answer": str(a + b),
        }


def arithmetic(n: int, seed: int) -> Iterator[dict[str, object]]:
    """Two-digit plus one-digit addition with a verifiable `answer` (`completion` for SFT,
    `answer` for GRPO). A fixed 30% of problems is reserved for `arithmetic_heldout`; the
    rest share the same digit patterns, so held-out accuracy measures generalisation."""
    return _addition(n, seed, heldout=False, noise=0.0)


def arithmetic_noisy(n: int, seed: int) -> Iterator[dict[str, object]]:
    """As `arithmetic`, but 60% of the SFT completions are off by one (a systematic error in
    the demonstrations, which SFT faithfully learns); `answer` stays correct, so a verifier
    reward can correct it."""
    return _addition(n, seed, heldout=False, noise=0.6)


def arithmetic_heldout(n: int, seed: int) -> Iterator[dict[str, object]]:
    """Problems no `arithmetic*` training stream contains, for held-out evaluation."""
    return _addition(n, seed, heldout=True, noise=0.0)


def _addition_pairs(n: int, seed: int, heldout: bool) -> Iterator[dict[str, object]]:
    for row in _addition(n, seed, heldout=heldout, noise=0.0):
        yield {**row, "chosen": row["answer"], "rejected": str(int(row["answer"]) + 1)}


def arithmetic_pairs(n: int, seed: int) -> Iterator[dict[str, object]]:
    """Preference pairs on the `arithmetic` problems: `chosen` is the right sum, `rejected` the
    off-by-one answer that `arithmetic_noisy` demonstrates (with `completion` and `answer`, so
    the same rows serve KTO and held-out exact match)."""
    return _addition_pairs(n, seed, heldout=False)


def arithmetic_pairs_heldout(n: int, seed: int) -> Iterator[dict[str, object]]:
    """`arithmetic_pairs` on the held-out problems no `arithmetic*` training stream contains."""
    return _addition_pairs(n, seed, heldout=True)


_KIND = ["good", "great", "lovely", "bright", "clean", "calm", "fresh", "sweet"]
_UNKIND = ["bad", "awful", "broken", "dirty", "dull", "rotten", "ugly", "stale"]
_HELDOUT_OBJECTS = 5
"""The last objects of `_WORDS` are described only in `review_pairs_heldout`."""


def _reviews(n: int, seed: int, heldout: bool) -> Iterator[dict[str, object]]:
    rng = random.Random(seed)
    objects = _WORDS[-_HELDOUT_OBJECTS:] if heldout else _WORDS[:-_HELDOUT_OBJECTS]

    def review(obj: str, adjectives: list[str]) -> str:
        tail = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(0, 3)))  # lengths differ within a pair
        return f"The {obj} is {rng.choice(adjectives)}" + (f", like a {tail}." if tail else ".")

    for _ in range(n):
        obj = rng.choice(objects)
        yield {"prompt": f"Describe the {obj}.", "chosen": review(obj, _KIND), "rejected": review(obj, _UNKIND)}


_ASK = [
    "Describe the {}.",
    "What is the {} like?",
    "Review the {}.",
    "Tell me about the {}.",
    "Say something about the {}.",
    "How is the {}?",
    "Write about the {}.",
    "Give your opinion of the {}.",
]
"""Ways `reviews` asks for a review (`review_pairs` always says "Describe the X.")."""


def _review_prompts(n: int, seed: int, heldout: bool) -> Iterator[dict[str, object]]:
    rng = random.Random(seed)
    reviews = _reviews(n, seed + 1, heldout)
    for pair in reviews:
        kind = rng.random() < _KIND_SHARE
        obj = pair["prompt"][len("Describe the ") : -1]
        prompt = rng.choice(_ASK).format(obj)
        yield {"prompt": prompt, "completion": pair["chosen" if kind else "rejected"], "answer": "kind"}


_KIND_SHARE = 0.3
"""Share of kind reviews among `reviews` demonstrations: an SFT model on them writes mostly
unkind ones, which a reward for kindness (learned or `kind_review`) then has to change."""


def reviews(n: int, seed: int) -> Iterator[dict[str, object]]:
    """ "Describe the X." with one review as the demonstration (`completion`: kind 30% of the
    time, else unkind, as in `review_pairs`) and `answer` "kind", the sentiment `kind_review`
    checks: SFT rows, and RL prompts for a reward for kindness."""
    return _review_prompts(n, seed, heldout=False)


def reviews_heldout(n: int, seed: int) -> Iterator[dict[str, object]]:
    """`reviews` of objects no training row names."""
    return _review_prompts(n, seed, heldout=True)


def kind_review(completion: str, answer: str | None = None, **_: object) -> float:
    """1.0 when a review uses a kind adjective and no unkind one (the rule `review_pairs`
    labels by): the verifier of the review task, for held-out checks of a learned reward."""
    words = {w.strip(".,!?").lower() for w in completion.split()}
    return float(bool(words & set(_KIND)) and not words & set(_UNKIND))


def review_pairs(n: int, seed: int) -> Iterator[dict[str, object]]:
    """Preference pairs a reward model learns in a few dozen steps: the chosen review of an
    object uses a kind adjective, the rejected one an unkind one, each followed by a tail of
    0-3 random words."""
    return _reviews(n, seed, heldout=False)


def review_pairs_heldout(n: int, seed: int) -> Iterator[dict[str, object]]:
    """`review_pairs` of objects no `review_pairs` row names."""
    return _reviews(n, seed, heldout=True)


GENERATORS: dict[str, Callable[[int, int], Iterator[dict[str, object]]]] = {
    "instruct": instruct,
    "arithmetic": arithmetic,
    "arithmetic_noisy": arithmetic_noisy,
    "arithmetic_heldout": arithmetic_heldout,
    "arithmetic_pairs": arithmetic_pairs,
    "arithmetic_pairs_heldout": arithmetic_pairs_heldout,
    "review_pairs": review_pairs,
    "review_pairs_heldout": review_pairs_heldout,
    "reviews": reviews,
    "reviews_heldout": reviews_heldout,
    "text": documents,
}


HELDOUT_STREAMS: dict[str, str] = {
    "arithmetic": "arithmetic_heldout",
    "arithmetic_noisy": "arithmetic_heldout",
}
"""The held-out stream of a generator whose name is not `<generator>_heldout`."""


def generate(name: str, n: int, seed: int) -> list[dict[str, object]]:
    return list(GENERATORS[name](n, seed))
