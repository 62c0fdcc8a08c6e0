"""How a text longer than the model's window is read (`REGISTRY_LONG_TEXT`), and how its answer is chosen.

A classifier reads at most its window (512 tokens for BERT-sized models). Reading only the first
window of a longer text lets anyone pad an injection past it, so by default every part of a text
is read:

- `windows`: the text's tokens in windows of `capacity` text tokens (the window less the model's
  special tokens), one starting every `stride` tokens and the last one ending at the text's end,
  so consecutive windows overlap by `capacity - stride` tokens and any passage that short lies
  whole inside one window. Every window is classified; the text's answer is the window with the
  highest probability on the positive labels (the same rule as Meta Prompt Guard's advice to scan
  long inputs in 512-token segments and flag the text when any segment is flagged).
- `truncate`: the first window only; the answer says `truncated: true` when that was not all of it.
- `head_tail`: the first quarter of a window and the rest from the text's end (Sun et al., "How to
  Fine-Tune BERT for Text Classification?"); `skipped` names the characters between them.

The windows of all texts of a forward batch are grouped by length together (runners/text.py),
so a long text costs its windows, not a pass of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from registry.settings import RegistrySettings

Span = tuple[int, int]


@dataclass(frozen=True)
class Piece:
    """One model input cut from a text: its text tokens and the characters they cover."""

    text: int  # index of the text in the batch
    ids: list[int]
    span: Optional[Span]  # None when the tokenizer gives no character offsets (a slow tokenizer)


@dataclass(frozen=True)
class Reading:
    """How one loaded model reads texts: the mode, its window, and which labels count as positive."""

    mode: str
    window: int  # tokens per model input, special tokens included
    capacity: int  # text tokens per model input
    stride: int  # tokens from one window's start to the next
    prefix: tuple[int, ...]  # the special tokens the model's template puts before a text ...
    suffix: tuple[int, ...]  # ... and after it
    positive: tuple[int, ...]  # indices of the positive labels

    @property
    def head(self) -> int:
        """Text tokens `head_tail` keeps from the start; the rest of the capacity comes from the end."""
        return max(1, self.capacity // 4)

    def describe(self, labels: Sequence[str]) -> dict[str, Any]:
        return {"mode": self.mode, "window": self.window, "stride": self.stride, "overlap": self.capacity - self.stride,
                "positive_labels": [labels[i] for i in self.positive]}

    def cut(self, index: int, ids: list[int], offsets: Optional[list[tuple[int, int]]]) -> tuple[list[Piece], dict[str, Any]]:
        """The pieces of one tokenized text, and what its answer says about the reading (beyond the winner's span)."""
        n, cap = len(ids), self.capacity

        def span(start: int, end: int) -> Optional[Span]:
            if offsets is None:
                return None
            return (offsets[start][0], offsets[end - 1][1]) if end > start else (0, 0)

        if n <= cap:
            return [Piece(index, ids, span(0, n))], {"truncated": False}
        if self.mode == "truncate":
            return [Piece(index, ids[:cap], span(0, cap))], {"truncated": True}
        if self.mode == "head_tail":
            head, tail = self.head, cap - self.head
            whole = None if offsets is None else (offsets[0][0], offsets[-1][1])
            skipped = None if offsets is None else [offsets[head - 1][1], offsets[n - tail][0]]
            return [Piece(index, ids[:head] + ids[n - tail:], whole)], {"truncated": True, "skipped": skipped}
        starts = list(range(0, n - cap, self.stride)) + [n - cap]
        return [Piece(index, ids[s:s + cap], span(s, s + cap)) for s in starts], {"truncated": False}

    def model_input(self, piece: Piece) -> list[int]:
        return [*self.prefix, *piece.ids, *self.suffix]


def template(tokenizer: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The special tokens the tokenizer wraps one text in, before and after (`[CLS]`/`[SEP]`, `<s>`/`</s>`)."""
    probe = "hello"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return tuple(full[:i]), tuple(full[i + len(bare):])
    raise ValueError("the tokenizer's special-token template does not keep the text's own tokens together")


def positive_labels(labels: Sequence[str], settings: RegistrySettings) -> tuple[int, ...]:
    """Indices of the labels whose probability makes a window win.

    `REGISTRY_POSITIVE_LABELS` when set (those of the model's labels it names); else every label
    not named by `REGISTRY_BENIGN_LABELS`; a model all of whose labels are benign-like, or none,
    counts every label (its most confident window wins).

    Raises:
        ValueError: `REGISTRY_POSITIVE_LABELS` names none of the model's labels.
    """
    if settings.positive_labels:
        wanted = {label.upper() for label in settings.positive_labels}
        chosen = tuple(i for i, label in enumerate(labels) if label.upper() in wanted)
        if not chosen:
            raise ValueError(f"REGISTRY_POSITIVE_LABELS={','.join(settings.positive_labels)} names none of the model's labels "
                             f"({', '.join(labels)})")
        return chosen
    benign = {label.upper() for label in settings.benign_labels}
    chosen = tuple(i for i, label in enumerate(labels) if label.upper() not in benign)
    return chosen or tuple(range(len(labels)))


def reading_for(settings: RegistrySettings, tokenizer: Any, max_length: int, labels: Sequence[str]) -> Reading:
    """The reading of one loaded model: its window (the setting, at most the model's limit) and stride.

    Raises:
        ValueError: the window leaves no room for text, or the positive labels name none of the model's.
    """
    prefix, suffix = template(tokenizer)
    window = min(settings.window_tokens or max_length, max_length)
    capacity = window - len(prefix) - len(suffix)
    if capacity < 2:
        raise ValueError(f"a window of {window} tokens leaves {capacity} for text after the special tokens")
    stride = settings.window_stride if settings.window_stride is not None and settings.window_stride < capacity \
        else max(1, capacity * 3 // 4)
    return Reading(settings.long_text, window, capacity, stride, prefix, suffix, positive_labels(labels, settings))
