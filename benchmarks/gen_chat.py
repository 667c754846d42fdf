"""Write a generated chat JSONL of realistic shape for data-preparation benchmarks.

    python -m benchmarks.gen_chat OUT.jsonl --rows 100000 [--seed 0]

Each row is `{"messages": [...]}`: an optional system message, then one to three
user/assistant turns of generated prose (about 600 bytes a row on average, so 100,000
rows are about 60 MB). Deterministic per seed; no download.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

_WORDS = (
    "the model data train token batch shard river stone cloud tiger lemon piano rocket garden silver "
    "window forest candle planet butter orange marble signal vector matrix answer question reason "
    "because therefore example number value result step first second then finally check"
).split()
_SYSTEM = ["You are a helpful assistant.", "Answer briefly.", "You are a careful math tutor."]


def _text(rng: random.Random, words: int) -> str:
    out = " ".join(rng.choice(_WORDS) for _ in range(words))
    return out[0].upper() + out[1:] + "."


def chat_row(rng: random.Random) -> dict[str, list[dict[str, str]]]:
    """One conversation: maybe a system message, then 1-3 turns."""
    msgs = [{"role": "system", "content": rng.choice(_SYSTEM)}] if rng.random() < 0.3 else []
    for _ in range(rng.choice((1, 1, 2, 3))):
        msgs.append({"role": "user", "content": _text(rng, rng.randint(4, 18))})
        msgs.append({"role": "assistant", "content": _text(rng, rng.randint(12, 55))})
    return {"messages": msgs}


def write_chat_jsonl(path: Path, rows: int, seed: int = 0) -> Path:
    """Write `rows` generated conversations to `path` (JSON Lines)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(rows):
            f.write(json.dumps(chat_row(rng)) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    write_chat_jsonl(a.out, a.rows, a.seed)
    print(f"{a.out}: {a.rows} rows, {a.out.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
