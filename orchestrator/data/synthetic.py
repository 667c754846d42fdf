"""Generated data sets, so that runs and tests work with no download.

`synthetic:instruct`: short instruction -> answer pairs (arithmetic, reversing, copying,
case changes) in both `messages` and `prompt`/`completion` shape.
`synthetic:arithmetic`: addition problems with a verifiable `answer` (for GRPO).
Deterministic per seed.
"""

from __future__ import annotations

import random
from typing import Callable, Dict, Iterator, List

_WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "rocket", "garden",
          "silver", "window", "forest", "candle", "planet", "butter", "orange", "marble"]


def _instruct_row(rng: random.Random) -> Dict[str, object]:
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
        return {"messages": [{"role": "user", "content": prompt},
                             {"role": "assistant", "content": answer}]}
    return {"prompt": prompt, "completion": answer}


def instruct(n: int, seed: int) -> Iterator[Dict[str, object]]:
    rng = random.Random(seed)
    for _ in range(n):
        yield _instruct_row(rng)


def arithmetic(n: int, seed: int) -> Iterator[Dict[str, object]]:
    """Two-operand addition with a verifiable answer: for SFT (prompt/completion) and for
    GRPO (prompt/answer). Different seeds give different problem streams; held-out sets
    are made disjoint by the caller."""
    rng = random.Random(seed)
    for _ in range(n):
        a, b = rng.randrange(50), rng.randrange(50)
        yield {"prompt": f"What is {a} + {b}?", "completion": str(a + b), "answer": str(a + b)}


GENERATORS: Dict[str, Callable[[int, int], Iterator[Dict[str, object]]]] = {
    "instruct": instruct,
    "arithmetic": arithmetic,
}


def generate(name: str, n: int, seed: int) -> List[Dict[str, object]]:
    return list(GENERATORS[name](n, seed))
