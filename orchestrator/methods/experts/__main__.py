"""`python -m orchestrator.methods.experts apply --base DIR --delta FILE --out DIR`

Rebuild a full model from a base and an experts delta (`export/experts_delta.safetensors`):
ship a few MB of changed expert slices instead of the whole model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from orchestrator.methods.experts.delta import apply_to_dir


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.methods.experts",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    apply = sub.add_parser("apply", help="write base + delta as a full transformers model")
    apply.add_argument("--base", required=True, help="base model: hub id or directory")
    apply.add_argument("--delta", required=True, type=Path, help="experts_delta.safetensors")
    apply.add_argument("--out", required=True, type=Path, help="output directory")
    args = parser.parse_args(argv)
    try:
        out = apply_to_dir(args.base, args.delta, args.out)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
