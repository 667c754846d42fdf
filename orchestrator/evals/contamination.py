"""Decontamination check: do a task's evaluation items occur in the candidate's training data?

Measured before anything is evaluated. Text is normalised (Unicode NFKC, lower case, split
into words and single punctuation marks; system messages are left out on both sides: a
shared system prompt is not contamination). An item with at least `ngram` tokens is
scored by the share of its `ngram`-grams that occur in some training row; a shorter item
by whether its whole normalised text occurs in a training row (1.0 or 0.0). Items whose
share is at least the threshold are flagged, by index, with the share.

What an item's text is: a generation or choice item's prompt (its user and assistant
messages), an nll item's whole conversation or document. A training row's text: every
string of the row in order (the `role` keys and system messages left out).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

from orchestrator.errors import OrchestratorError

_TOKEN = re.compile(r"\w+|[^\w\s]")


class ContaminationError(OrchestratorError):
    """Evaluation items occur in the training data and eval.on_contamination=stop."""

    exit_code = 4


def tokens(text: str) -> list[str]:
    """The normalised tokens of `text` (NFKC, lower case, words and punctuation marks)."""
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).lower())


def _strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        if obj.get("role") == "system":
            return
        for k, v in obj.items():
            if k != "role":
                yield from _strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _strings(v)


def item_text(item: Any) -> str:
    """The text of an evaluation item that is looked for in the training data."""
    if isinstance(item, dict) and "messages" in item:  # generation, choice: the prompt
        return " ".join(_strings(item["messages"]))
    return " ".join(_strings(item))  # nll: a conversation or {"text"}


@dataclass
class Flag:
    index: int
    fraction: float
    match: str
    """ngram (share of the item's n-grams) | whole (a short item found whole)."""
    text: str
    """The start of the item's text, to recognise it."""


@dataclass
class TaskContamination:
    task: str
    items: int
    flagged: list[Flag] = field(default_factory=list)


class TrainingIndex:
    """The n-grams of the training rows, and their normalised text for short items."""

    def __init__(self, rows: Iterable[Any], n: int):
        self.n, self.rows, self.grams = n, 0, set()
        texts = []
        for row in rows:
            toks = tokens(" ".join(_strings(row)))
            self.rows += 1
            texts.append(" ".join(toks))
            self.grams.update(tuple(toks[i : i + n]) for i in range(len(toks) - n + 1))
        self.joined = " " + " \n ".join(texts) + " "

    def overlap(self, text: str) -> tuple[float, str]:
        """(share of `text`'s n-grams in the training rows, how it was measured)."""
        toks = tokens(text)
        if not toks:
            return 0.0, "whole"
        if len(toks) < self.n:
            return (1.0 if f" {' '.join(toks)} " in self.joined else 0.0), "whole"
        grams = [tuple(toks[i : i + self.n]) for i in range(len(toks) - self.n + 1)]
        return sum(g in self.grams for g in grams) / len(grams), "ngram"


def check_tasks(tasks: list, rows: Iterable[Any], n: int, threshold: float) -> list[TaskContamination]:
    """Per task (objects with `name` and `items`): its items whose overlap is >= threshold."""
    index = TrainingIndex(rows, n)
    out = []
    for task in tasks:
        res = TaskContamination(task.name, len(task.items))
        for i, item in enumerate(task.items):
            text = item_text(item)
            frac, how = index.overlap(text)
            if frac > 0 and frac >= threshold:
                res.flagged.append(Flag(i, round(frac, 4), how, text[:80]))
        out.append(res)
    return out


def measure(cfg, tasks: list, train) -> dict[str, Any]:
    """The report's `contamination` section for `tasks` against the training data `train`
    (a DataConfig, or None when the candidate's run is unknown); raises ContaminationError
    when items are flagged and eval.on_contamination=stop."""
    e = cfg.eval
    out: dict[str, Any] = {
        "ngram": e.contamination_ngram,
        "threshold": e.contamination_threshold,
        "on_contamination": str(e.on_contamination),
    }
    if e.on_contamination == "skip":
        return {**out, "checked": False, "note": "eval.on_contamination=skip"}
    if train is None:
        return {**out, "checked": False, "note": "the candidate's training data is unknown (not a run of this project)"}
    rows, note = _training_rows(train)
    out["training_source"] = train.source
    if rows is None:
        return {**out, "checked": False, "note": note}
    results = check_tasks(tasks, rows, e.contamination_ngram, e.contamination_threshold)
    out.update(
        checked=True,
        training_rows=len(rows),
        tasks={
            r.task: {
                "items": r.items,
                "flagged": len(r.flagged),
                "fraction_flagged": round(len(r.flagged) / max(r.items, 1), 4),
                "flagged_items": [vars(f) for f in r.flagged],
            }
            for r in results
        },
    )
    flagged = {r.task: r.flagged for r in results if r.flagged}
    if flagged:
        what = "; ".join(f"{t}: items {_indices(fs)}" for t, fs in flagged.items())
        msg = (
            f"evaluation items occur in the candidate's training data ({train.source}, "
            f"{e.contamination_ngram}-gram overlap >= {e.contamination_threshold:g}): {what}"
        )
        if e.on_contamination == "stop":
            raise ContaminationError(
                f"{msg}. Evaluate on items the candidate did not train on, or set eval.on_contamination=warn "
                "to report them and go on"
            )
        import logging

        logging.getLogger("orchestrator").warning("eval: %s (flagged in the report)", msg)
    return out


def _indices(flags: list[Flag], limit: int = 20) -> str:
    shown = ", ".join(f"{f.index} ({f.fraction:.0%})" for f in flags[:limit])
    return shown + (f" and {len(flags) - limit} more" if len(flags) > limit else "")


def _training_rows(train) -> tuple[Optional[list[Any]], str]:
    from orchestrator.data.sources import load_rows

    try:
        return [r.value for r in load_rows(train)], ""
    except Exception as exc:  # noqa: BLE001  (the report says why the check did not run; the eval goes on)
        return None, f"training data not readable from here ({type(exc).__name__}: {exc})"


def markdown_lines(section: Optional[dict[str, Any]]) -> list[str]:
    """The report's lines about contamination."""
    if not section:
        return []
    head = f"{section['ngram']}-gram overlap with the training data, flagged at >= {section['threshold']:g}"
    if not section.get("checked"):
        return [f"Not checked: {section.get('note', '')}."]
    lines = [
        f"{head}; training data `{section['training_source']}` ({section['training_rows']} rows).",
        "",
        "| task | items | flagged | flagged items (index: overlap) |",
        "|---|---|---|---|",
    ]
    for name, t in section["tasks"].items():
        items = ", ".join(f"{f['index']}: {f['fraction']:.0%}" for f in t["flagged_items"][:50]) or "none"
        lines.append(f"| {name} | {t['items']} | {t['flagged']} ({t['fraction_flagged']:.1%}) | {items} |")
    return lines
