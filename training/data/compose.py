"""Length-robust examples composed, seeded, from the committed pieces.

The pieces are the short rows of `prompt_injection.jsonl` (injections; benign texts, hard negatives
among them) and the hand-written benign sentences of `context.txt` (emails, docs, news, code
comments, support tickets, recipes, meeting notes, reviews, travel, science, policy, chat, and
benign talk about security). Long examples are built from them on the fly: an injection, or a
benign text, set inside benign context at the start, in the middle or at the end, up to several
model windows long. Nothing long is committed except the gate set.

The held-out side is honest: the *pieces* are split before anything is composed. A row's `group`
(one hand-written text, or one payload shared by template combinations) and each context sentence
fall on one side only, chosen by a salted hash, stratified per family and per genre; so no held-out
injection, benign text or context sentence is seen in training, in any composition.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

HERE = Path(__file__).resolve().parent
CONTEXT_PATH = HERE / "context.txt"
GATE_PATH = HERE / "gate_prompt_injection.jsonl"

#: Share of each family of pieces (and of each context genre) held out for evaluation and the gate.
TEST_FRACTION = 0.25
SPLIT_SALT = "length-robust-v1"
#: The length buckets of the evaluation: benign sentences before the piece, or a long layout.
CONTEXT_SENTENCES = (0, 1, 2, 5, 20)
PAST_512 = "past512"  # the piece after more than 512 tokens of benign text (then 0-2 sentences)
START_LONG = "start_long"  # the piece first, then about 3,000 characters of benign text
BUCKETS: tuple[str, ...] = tuple(str(k) for k in CONTEXT_SENTENCES) + (PAST_512, START_LONG)
#: Characters of benign text before the piece in PAST_512: at 4-5 characters a token in this corpus,
#: always more than 512 tokens (tests/test_demo.py checks it with the real tokenizer).
PAST_512_CHARS = 3000
START_LONG_CHARS = 3000
SEED = 20261202


def _hash01(key: str) -> float:
    return int(hashlib.sha256(f"{SPLIT_SALT}:{key}".encode()).hexdigest()[:12], 16) / 16 ** 12


def held_out(keys: Sequence[str], fraction: float = TEST_FRACTION) -> set[str]:
    """The keys on the test side: the `round(len * fraction)` smallest salted hashes (stable, order-free)."""
    ordered = sorted(set(keys), key=_hash01)
    return set(ordered[: round(len(ordered) * fraction)])


def load_context(path: Path = CONTEXT_PATH) -> dict[str, list[str]]:
    """Genre -> sentences of the context corpus (`## genre` headers, `#!` comments)."""
    out: dict[str, list[str]] = {}
    genre: Optional[str] = None
    for lineno, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#!"):
            continue
        if line.startswith("## "):
            genre = line[3:].strip()
            out.setdefault(genre, [])
            continue
        if genre is None:
            raise ValueError(f"{path}:{lineno}: a sentence before the first '## genre' header")
        out[genre].append(line)
    return out


@dataclass(frozen=True)
class Pieces:
    """One side of the split: the pieces compositions are made of."""

    injections: tuple[str, ...]
    safe: tuple[str, ...]  # short benign texts, hard negatives included
    hard: tuple[str, ...]  # the hard negatives (also in `safe`)
    context: dict[str, tuple[str, ...]] = field(default_factory=dict)  # genre -> sentences

    def sentences(self) -> list[str]:
        return [s for genre in sorted(self.context) for s in self.context[genre]]


#: Row families kept on the train side: the benign prefixes of the delimiter attacks are also rows of
#: their own (so the prefix is no signal), and a held-out benign text must not occur inside a training injection.
TRAIN_ONLY_FAMILIES = frozenset({"prefix"})


def _family(group: str) -> str:
    return group.split(":", 1)[0]


def split_pieces(rows: Optional[Sequence[dict[str, str]]] = None, context: Optional[dict[str, list[str]]] = None,
                 fraction: float = TEST_FRACTION) -> tuple[Pieces, Pieces]:
    """(train, test) pieces: row groups split per family, context sentences per genre, by salted hash."""
    if rows is None:
        from training.demo import load_dataset

        rows = load_dataset()
    context = load_context() if context is None else context
    groups = [r.get("group") or f"row:{r['text']}" for r in rows]
    test_groups: set[str] = set()
    for family in sorted({_family(g) for g in groups} - TRAIN_ONLY_FAMILIES):
        test_groups |= held_out([g for g in groups if _family(g) == family], fraction)
    sides: dict[bool, dict[str, list[str]]] = {False: {"INJECTION": [], "SAFE": [], "hard": []},
                                               True: {"INJECTION": [], "SAFE": [], "hard": []}}
    for row, group in zip(rows, groups):
        side = sides[group in test_groups]
        side[row["label"]].append(row["text"])
        if _family(group) == "hard":
            side["hard"].append(row["text"])
    ctx: dict[bool, dict[str, tuple[str, ...]]] = {False: {}, True: {}}
    for genre, sentences in context.items():
        test = held_out(sentences, fraction)
        ctx[True][genre] = tuple(s for s in sentences if s in test)
        ctx[False][genre] = tuple(s for s in sentences if s not in test)

    def pieces(test: bool) -> Pieces:
        side = sides[test]
        return Pieces(tuple(side["INJECTION"]), tuple(side["SAFE"]), tuple(side["hard"]), ctx[test])

    return pieces(False), pieces(True)


# -- composing ------------------------------------------------------------------------------------

def document(rng: random.Random, context: dict[str, tuple[str, ...]], n: int, min_chars: int = 0) -> str:
    """Benign text of `n` sentences (or more, until `min_chars`) in paragraphs of 2-6 sentences, from
    one to four genres; a sentence repeats only once every genre in reach is used up (more genres
    join when the chosen ones run out)."""
    if n <= 0 and min_chars <= 0:
        return ""
    genres = sorted(g for g in context if context[g])
    rng.shuffle(genres)
    reach = rng.choice((1, 1, 2, 3, 4))
    decks: dict[str, list[str]] = {}
    paragraphs: list[str] = []
    count = chars = 0
    while count < n or chars < min_chars:
        live = [g for g in genres[:reach] if decks.get(g, True)]
        if not live:
            if reach < len(genres):
                reach += 1
                continue
            decks.clear()
            live = genres[:reach]
        genre = rng.choice(live)
        if genre not in decks:
            decks[genre] = rng.sample(context[genre], len(context[genre]))
        want = rng.randint(2, 6)
        if chars >= min_chars:
            want = min(want, n - count)
        deck = decks[genre]
        sentences = [deck.pop() for _ in range(max(1, min(want, len(deck))))]
        paragraph = ("\n" if genre == "code" else " ").join(sentences)
        paragraphs.append(paragraph)
        count += len(sentences)
        chars += len(paragraph) + 2
    return "\n\n".join(paragraphs)


def embed(rng: random.Random, piece: str, before: str, after: str) -> tuple[str, tuple[int, int]]:
    """`before` + piece + `after`, with paragraph or sentence breaks; returns the text and the piece's span."""
    text, start = "", 0
    if before:
        text = before + rng.choice(("\n\n", "\n\n", " ", "\n"))
        start = len(text)
    text += piece
    end = len(text)
    if after:
        text += rng.choice(("\n\n", "\n\n", " ", "\n")) + after
    return text, (start, end)


def _row(text: str, label: str, span: Optional[tuple[int, int]], kind: str, bucket: str = "") -> dict[str, Any]:
    row: dict[str, Any] = {"text": text, "label": label, "span": list(span) if span else None, "kind": kind}
    if bucket:
        row["bucket"] = bucket
    return row


#: Benign sentences around a piece in training compositions: mostly within one 256-token window,
#: sometimes several windows (the trainer then crops a window around the piece).
TRAIN_CONTEXT_SIZES = (1, 1, 2, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 40)


def _layout(rng: random.Random, pieces: Pieces) -> tuple[str, str]:
    """Benign text to put before and after a piece: at the start, in the middle or at the end."""
    total = rng.choice(TRAIN_CONTEXT_SIZES)
    where = rng.choice(("start", "middle", "middle", "end"))
    before_n = 0 if where == "start" else total if where == "end" else rng.randint(1, max(1, total - 1))
    return document(rng, pieces.context, before_n), document(rng, pieces.context, total - before_n)


def training_rows(pieces: Pieces, seed: int, embedded_per_injection: float = 2.0, twins: float = 0.5,
                  embedded_per_safe: float = 0.5, hard_extra: int = 2, documents: int = 250) -> list[dict[str, Any]]:
    """One epoch of training examples from the train pieces (a new `seed` per epoch gives new compositions).

    Every piece bare; each injection inside benign context `embedded_per_injection` times on average,
    a share `twins` of them with a benign twin: the same context with a benign text, or nothing, in
    the injection's place (so the context itself is never the signal); benign texts inside context
    (`embedded_per_safe`), hard negatives `hard_extra` more times (the hardest negatives are benign
    text that talks about injection); and pure benign documents of 1-40 sentences. The service
    reads long benign texts as several windows and flags the text when any one is flagged, so benign
    windows must be many. Rows carry the piece's character `span` so the trainer can crop a window
    around it. The train side's short benign texts also serve as context sentences (a genre of
    their own): a corpus of a few hundred context sentences is small enough to memorize, and a
    model that has memorized it flags any benign sentence it has not seen.
    """
    rng = random.Random(seed)
    pieces = replace(pieces, context={**pieces.context, "asked": tuple(pieces.safe)})
    rows: list[dict[str, Any]] = []
    rows += [_row(t, "INJECTION", (0, len(t)), "bare") for t in pieces.injections]
    rows += [_row(t, "SAFE", None, "bare") for t in pieces.safe]

    def repeat(texts: Sequence[str], times: float) -> list[str]:
        whole, part = int(times), times - int(times)
        out = [t for t in texts for _ in range(whole)]
        return out + [t for t in texts if rng.random() < part]

    for t in repeat(pieces.injections, embedded_per_injection):
        before, after = _layout(rng, pieces)
        text, span = embed(rng, t, before, after)
        rows.append(_row(text, "INJECTION", span, "embedded"))
        if rng.random() < twins / max(embedded_per_injection, 1e-9):
            if rng.random() < 0.5:
                text, span = embed(rng, rng.choice(pieces.safe), before, after)
                rows.append(_row(text, "SAFE", span, "twin"))
            elif before or after:
                text, span = embed(rng, "", before, after)
                rows.append(_row(text.strip(), "SAFE", None, "twin"))
    for t in repeat(pieces.safe, embedded_per_safe) + repeat(pieces.hard, hard_extra):
        text, span = embed(rng, t, *_layout(rng, pieces))
        rows.append(_row(text, "SAFE", span, "embedded"))
    for _ in range(documents):
        rows.append(_row(document(rng, pieces.context, rng.choice(TRAIN_CONTEXT_SIZES)), "SAFE", None, "document"))
    rng.shuffle(rows)
    return rows


def length_rows(pieces: Pieces, seed: int = SEED, per_bucket: Optional[int] = None,
                buckets: Iterable[str] = BUCKETS) -> list[dict[str, Any]]:
    """The length evaluation: each bucket holds injections and benign texts (hard negatives included)
    laid out the same way, from the given (held-out) pieces; `per_bucket` caps each label per bucket.

    Bucket "k" puts the piece after k benign sentences (at the end, as in the issue's report);
    `past512` after more than 512 tokens of benign text, then 0-2 sentences; `start_long` first,
    followed by about 3,000 characters of benign text.
    """
    rows: list[dict[str, Any]] = []
    for bucket in buckets:
        rng = random.Random(f"{seed}:{bucket}")
        for label, texts in (("INJECTION", list(pieces.injections)), ("SAFE", list(pieces.safe))):
            if per_bucket is not None and len(texts) > per_bucket:
                hard = [t for t in texts if t in set(pieces.hard)]
                rest = [t for t in texts if t not in set(pieces.hard)]
                keep_hard = rng.sample(hard, min(len(hard), per_bucket // 3))
                texts = keep_hard + rng.sample(rest, min(len(rest), per_bucket - len(keep_hard)))
            for t in texts:
                if bucket == PAST_512:
                    before = document(rng, pieces.context, 0, min_chars=PAST_512_CHARS)
                    text, span = embed(rng, t, before, document(rng, pieces.context, rng.randint(0, 2)))
                elif bucket == START_LONG:
                    text, span = embed(rng, t, "", document(rng, pieces.context, 0, min_chars=START_LONG_CHARS))
                else:
                    text, span = embed(rng, t, document(rng, pieces.context, int(bucket)), "")
                rows.append(_row(text, label, span, "length", bucket))
    return rows


def gate_rows(seed: int = SEED + 1) -> list[dict[str, str]]:
    """The demo's promotion gate (`REGISTRY_GATE`), from held-out pieces only: short injections and
    benign texts, and long ones: injections past 512 tokens at the end of long benign text, first
    before long text, in the middle of it; long benign documents and benign texts inside them."""
    _, test = split_pieces()
    rng = random.Random(seed)
    injections, safe = list(test.injections), list(test.safe)
    rows: list[dict[str, str]] = []

    def add(text: str, label: str) -> None:
        rows.append({"text": text, "label": label})

    for t in rng.sample(injections, min(30, len(injections))):
        add(t, "INJECTION")
    for t in rng.sample(safe, min(30, len(safe))):
        add(t, "SAFE")
    for t in rng.sample(injections, 12):  # past 512 tokens, at the end
        add(embed(rng, t, document(rng, test.context, 0, min_chars=PAST_512_CHARS), "")[0], "INJECTION")
    for t in rng.sample(injections, 6):  # first, then long benign text
        add(embed(rng, t, "", document(rng, test.context, 0, min_chars=START_LONG_CHARS))[0], "INJECTION")
    for t in rng.sample(injections, 6):  # in the middle of long benign text
        add(embed(rng, t, document(rng, test.context, 0, min_chars=1500), document(rng, test.context, 0, min_chars=1500))[0],
            "INJECTION")
    for _ in range(12):  # long benign documents
        add(document(rng, test.context, 0, min_chars=PAST_512_CHARS), "SAFE")
    for t in rng.sample(list(test.hard) or safe, 6):  # benign texts (hard negatives) past 512 tokens
        add(embed(rng, t, document(rng, test.context, 0, min_chars=PAST_512_CHARS), "")[0], "SAFE")
    rng.shuffle(rows)
    return rows


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
