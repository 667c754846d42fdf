"""The one chat encoder: messages -> token ids, and which of those ids are completion.

Every stage renders chat through this module: SFT rows (`data/sft.py`), preference rows
(`data/preference.py`), RL and evaluation prompts (`encode_prompt`). A conversation is
rendered to text with the tokenizer's chat template, then tokenized with
`add_special_tokens=False`, because the template already writes any BOS/EOS it wants
(tokenizing with special tokens would add a second BOS on Llama-style tokenizers).

Completion tokens are located by rendering: an assistant turn `i` spans
`[len(render(msgs[:i], generation prompt)), len(render(msgs[:i + 1])))`. That needs a
prefix-stable template (rendering k messages is a prefix of rendering k+1), which holds
for ChatML, Llama-3 and Qwen templates; a template that breaks it is reported instead of
silently mis-masking. Preparing many rows (`encode_labeled_many`) renders the same texts
but tokenizes only the conversations, in one batched call, and reads each turn's edges
from their tokens' character spans; it tokenizes the prefixes, as above, only for a
conversation where a token crosses an edge, so the ids and labels are the same.

Row-shape checks raise `ValueError` with the reason alone (also for a wrong type: that
is a bad row, not a caller's bug); `data/bad_rows.py` adds the file and row number and
applies `data.on_bad_rows`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from orchestrator.errors import DataError

IGNORE = -100
"""Label of a token that carries no loss (the `ignore_index` of cross-entropy)."""
ROLES = frozenset({"system", "user", "assistant", "tool"})

Messages = list[dict[str, str]]

_NO_TEMPLATE = (
    "the tokenizer has no chat template, so chat rows cannot be rendered. Set "
    "model.chat_template to a Jinja template (or use the tokenizer of the model's "
    "instruct variant via model.tokenizer)."
)
_NOT_PREFIX_STABLE = (
    "the chat template is not prefix-stable (rendering the first messages is not a "
    "prefix of rendering all), so assistant tokens cannot be located. Set "
    "model.chat_template to a template that is."
)


def require_chat_template(tokenizer: Any) -> None:
    """Fail the run (not the row) when the tokenizer cannot render chat."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(_NO_TEMPLATE)


def check_messages(msgs: Any, field: str = "messages") -> Messages:
    """Validate a message list; return copies holding only `role` and `content`.

    An empty or whitespace-only assistant message is malformed: training on it teaches
    the model to stop at once, and a preference pair with one is meaningless.
    """
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"'{field}' must be a non-empty list")
    name = "message" if field == "messages" else f"'{field}' message"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{name} {i} must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"{name} {i} has role {m['role']!r}; expected one of {sorted(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(  # noqa: TRY004 (a bad row: ValueError is the bad-row signal)
                f"{name} {i} content must be a string, got {type(m['content']).__name__}"
            )
        if m["role"] == "assistant" and not m["content"].strip():
            raise ValueError(f"{name} {i} (assistant) is empty")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def as_messages(value: Any, field: str, role: str) -> list[Any]:
    """A row field that is a string (one `role` message) or a list of messages, as a list
    (validate the whole conversation with `check_messages`). An empty string for an
    assistant field (a completion) is malformed."""
    if isinstance(value, str):
        if role == "assistant" and not value.strip():
            raise ValueError(f"empty '{field}'")
        return [{"role": role, "content": value}]
    if not isinstance(value, list):
        raise ValueError(f"'{field}' must be a string or a list of messages")  # noqa: TRY004
    return value


def render_text(tokenizer: Any, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
    """The chat template's text of `messages`."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def render(tokenizer: Any, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    """Chat template -> text -> ids, with no special tokens beyond the template's own."""
    return tokenizer(render_text(tokenizer, messages, add_generation_prompt), add_special_tokens=False)["input_ids"]


def tokenize_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """The ids `render` gives for each text, from one batched tokenizer call (a fast
    tokenizer encodes the batch in Rust, without the per-call overhead of one call per
    text). A repeated text (a repeated row's prefixes) is tokenized once; repeats share one
    list, so callers copy before changing one."""
    unique = list(dict.fromkeys(texts))
    ids = tokenizer(unique, add_special_tokens=False, return_attention_mask=False)["input_ids"] if unique else []
    by_text = dict(zip(unique, ids))
    return [by_text[t] for t in texts]


def encode_prompt(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """The ids a model continues from: the conversation plus the assistant header."""
    return render(tokenizer, messages, True)


def assistant_prefixes(messages: Sequence[dict[str, str]]) -> list[tuple[Sequence[dict[str, str]], bool]]:
    """The renders (messages, add_generation_prompt) that locate the assistant turns, in the
    order `labels_from_prefixes` reads them: for each assistant turn `i`, `messages[:i]`
    with the generation prompt (where the turn starts; none for `i == 0`), then
    `messages[:i + 1]` (where it ends)."""
    out: list[tuple[Sequence[dict[str, str]], bool]] = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            if i:
                out.append((messages[:i], True))
            out.append((messages[: i + 1], False))
    return out


def labels_from_prefixes(
    messages: Sequence[dict[str, str]], ids: Sequence[int], prefix_ids: Iterator[Sequence[int]]
) -> list[int]:
    """Labels for `ids = render(messages, False)` from the ids of its `assistant_prefixes`
    (consumed from `prefix_ids`): the ids on every assistant turn, IGNORE elsewhere."""
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(next(prefix_ids)) if i else 0
        upto = next(prefix_ids)
        end = len(upto)
        if upto != list(ids[:end]):
            raise DataError(_NOT_PREFIX_STABLE)
        labels[start:end] = ids[start:end]
    return labels


def _token_edge(enc: Any, b: int, text: str, prefix: str, n_ids: int) -> int | None:
    """How many tokens of `text` (row `b` of the batch encoding `enc`) come before the end
    of `prefix`, when `prefix` starts `text` and ends where one token ends and the next
    begins; None otherwise (not a prefix, or a token crosses its end)."""
    c = len(prefix)
    if not text.startswith(prefix):
        return None
    if c == len(text):
        return n_ids
    t = enc.char_to_token(b, c)
    if t is None or enc.token_to_chars(b, t).start != c or (t and enc.token_to_chars(b, t - 1).end > c):
        return None
    return t


def encode_labeled_many(
    tokenizer: Any, convs: Sequence[tuple[Messages, str, list[str]]]
) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) as `render(msgs, False)` and `assistant_labels` give them, for each
    conversation given as (messages, its text, the texts of its `assistant_prefixes`), with
    one batched tokenizer call for the conversations instead of one per prefix.

    Each turn's edges are found in the conversation's own tokens (their character spans):
    a prefix that starts the text and ends where a token ends and the next begins tokenizes
    to the text's first tokens (a tokenizer's model merges nothing across an edge that no
    token crosses), so its length is that token count. A conversation with an edge that a
    token crosses, a prefix that does not start its text (a template that is not
    prefix-stable) or a slow tokenizer (no character spans) has its prefixes tokenized, as
    `assistant_labels` does, and fails in the same way."""
    if not convs:
        return []
    enc = tokenizer([text for _, text, _ in convs], add_special_tokens=False, return_attention_mask=False)
    fast = getattr(enc, "is_fast", False)
    out: list[tuple[list[int], list[int]]] = []
    exact: list[int] = []  # conversations whose prefixes are tokenized
    for b, ((msgs, text, prefixes), ids) in enumerate(zip(convs, enc["input_ids"])):
        edges = [_token_edge(enc, b, text, p, len(ids)) for p in prefixes] if fast else [None]
        labels = [IGNORE] * len(ids)
        if None in edges:
            exact.append(b)
        else:  # edges: (start, end) of each assistant turn, start 0 (not rendered) for turn 0
            turns = iter(edges)
            for i, m in enumerate(msgs):
                if m["role"] == "assistant":
                    start = next(turns) if i else 0
                    end = next(turns)
                    labels[start:end] = ids[start:end]
        out.append((ids, labels))
    if exact:
        prefix_ids = iter(tokenize_texts(tokenizer, [p for b in exact for p in convs[b][2]]))
        for b in exact:
            ids = out[b][0]
            out[b] = (ids, labels_from_prefixes(convs[b][0], ids, prefix_ids))
    return out


def assistant_labels(tokenizer: Any, messages: Sequence[dict[str, str]], ids: Sequence[int]) -> list[int]:
    """Labels for `ids = render(messages, False)`: the ids on every assistant turn
    (its content and end-of-turn tokens), IGNORE elsewhere."""
    prefixes = (render(tokenizer, msgs, gen) for msgs, gen in assistant_prefixes(messages))
    return labels_from_prefixes(messages, ids, prefixes)


def split_completion(
    tokenizer: Any,
    prompt: Sequence[dict[str, str]],
    completion: Sequence[dict[str, str]],
) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) with `prompt ids + completion ids` equal to the
    rendering of the whole conversation and `prompt ids == encode_prompt(prompt)`, so a
    completion scored here is the one a rollout would have generated after that prompt."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    full = render(tokenizer, list(prompt) + list(completion), False)
    if full[: len(prompt_ids)] != prompt_ids:
        raise DataError(_NOT_PREFIX_STABLE)
    return prompt_ids, full[len(prompt_ids) :]
