"""Loads one resolved model version and classifies texts with it.

Four artifact forms, told apart by the `MLmodel` file's flavors (or its absence):

- `mlflow-transformers`: `model/` (config + weights) and `components/tokenizer/`;
- `mlflow-pytorch-pickle`: `data/model.pth` (a pickled module) and `extra_files/` (tokenizer, config.json);
- `mlflow-pytorch-pt2`: `data/model.pt2` (a torch.export program `(input_ids, attention_mask) -> logits`)
  and `extra_files/` (tokenizer, config.json with the labels);
- `huggingface`: a `save_pretrained` directory (config.json, weights, tokenizer) or a hub id.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from registry.errors import ArtifactError
from registry.record import ModelRecord
from registry.settings import EAGER_EXECUTION, MAX_WINDOW_TOKENS, RegistrySettings
from runners.artifacts import ArtifactStore
from runners.base import WARMUP_TEXTS, Runner, pickle_refused
from runners.forms import (  # noqa: F401 - the forms are part of this module's API
    FORM_HUGGINGFACE,
    FORM_PICKLE,
    FORM_PT2,
    FORM_TRANSFORMERS,
    detect_form,
    extra_files_dir,
    labels_from,
    read_mlmodel,
)
from runners.pt2 import check_pickle_free, import_pytree_types, input_shape, logits_of, static_batch_forward
from runners.windows import Piece, Reading, reading_for

logger = logging.getLogger(__name__)


#: Longest input handed to a model, whatever its tokenizer claims.
MAX_LENGTH_CAP = MAX_WINDOW_TOKENS

_CLASSIFICATION_TASKS = ("text-classification", "sentiment-analysis")

Encoded = Mapping[str, torch.Tensor]


@dataclass
class _LoadedModel:
    """What a loader builds: the tokenizer, the forward pass, and how inputs must be shaped."""

    tokenizer: Any
    forward: Callable[[Encoded], torch.Tensor]  # encoded inputs on the device -> logits
    labels: tuple[str, ...]
    max_length: int
    pad_to_max_length: bool = False
    module: Optional[torch.nn.Module] = None  # the eager torch module, when there is one (REGISTRY_ACCELERATE)


def length_groups(lengths: Sequence[int], max_size: int, spread: float = 1.5, slack: int = 8) -> list[list[int]]:
    """Indices grouped by similar length: sorted, a new group when full or when the next length
    exceeds `spread` times the group's shortest plus `slack` tokens."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if groups and len(groups[-1]) < max_size and lengths[i] <= lengths[groups[-1][0]] * spread + slack:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def pad_rows(tokenizer: Any, rows: Sequence[Sequence[int]], length: Optional[int] = None) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask` of token-id rows padded to `length` (default: the longest row),
    on the tokenizer's padding side with its pad token: what `tokenizer.pad(..., return_tensors="pt")`
    answers for these two keys, built in one array (`tokenizer.pad` walks every row in Python: 312 µs a
    group of 8 against 20 here, which counts where the forward pass is cheap, as with `openvino-bf16`).
    A tokenizer without a pad token is left to `tokenizer.pad`, which says why it cannot pad.

    Raises:
        ValueError: a row is longer than `length` (a program exported for one sequence length cannot read it).
    """
    longest = max((len(row) for row in rows), default=0)
    if length is not None and longest > length:
        raise ValueError(f"an input of {longest} tokens does not fit the model's fixed length of {length}")
    pad_id = getattr(tokenizer, "pad_token_id", None)
    width = max(length or 0, longest)
    if pad_id is None:
        return tokenizer.pad({"input_ids": [list(row) for row in rows], "attention_mask": [[1] * len(row) for row in rows]},
                             padding="max_length" if length else True, max_length=length, return_tensors="pt")
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    for i, row in enumerate(rows):
        where = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, where] = row
        mask[i, where] = 1
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}


def _max_length(tokenizer: Any) -> int:
    # Tokenizers without a limit report a huge sentinel (int(1e30)).
    return min(int(getattr(tokenizer, "model_max_length", MAX_LENGTH_CAP) or MAX_LENGTH_CAP), MAX_LENGTH_CAP)


def _sequence_classifier(source: Union[Path, str], device: torch.device) -> Any:
    from transformers import AutoModelForSequenceClassification

    model, info = AutoModelForSequenceClassification.from_pretrained(source, output_loading_info=True)
    # A checkpoint without a classification head loads "successfully" with a random one.
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ArtifactError(str(source), f"not a trained sequence classifier: weights missing for {', '.join(missing)}")
    return model.to(device).eval()


class TextClassificationRunner(Runner):
    """One model version in memory: load it once, then classify batches of texts."""

    #: predict may run in several threads at once: inference only reads the module's weights, and
    #: the tokenizer is called under a lock (see `_tokenizer_lock`).
    thread_safe = True

    def __init__(
        self,
        record: ModelRecord,
        settings: RegistrySettings,
        *,
        device: Union[str, torch.device, None] = None,
        store: Optional[ArtifactStore] = None,
        location: Union[Path, str, None] = None,
    ):
        super().__init__(record, settings, store=store, location=location)
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.form: Optional[str] = None
        self._model: Optional[_LoadedModel] = None
        #: How forward passes run: "eager", or the acceleration that passed its parity check ("int8").
        self.execution = "eager"
        self.accelerate_info: Optional[dict[str, Any]] = None
        # A fast tokenizer switches its Rust padding state when a call asks for other settings
        # (tokenize pads, predict does not) while it encodes with the GIL released; tokenizers
        # releases have raised "Already borrowed" for that (not reproduced with the pinned 0.23.3).
        # Encoding is about 1% of the CPU: one call at a time costs nothing measurable.
        self._tokenizer_lock = threading.Lock()
        #: How texts longer than the window are read (REGISTRY_LONG_TEXT), set at load.
        self.reading: Optional[Reading] = None
        self._offsets = False  # whether the tokenizer gives character offsets (a fast tokenizer)
        self._built_from: Union[Path, str, None] = None
        self._counts_lock = threading.Lock()
        self.windows_read = 0  # model inputs classified (a long text is several)
        self.forward_passes = 0

    @property
    def labels(self) -> tuple[str, ...]:
        """Label names in id2label order."""
        return self._require().labels

    def build(self, location: Union[Path, str]) -> None:
        """Detect the artifact's form and build it on the device; the reading of long texts with it."""
        form = detect_form(location)
        loaders: dict[str, Callable[[Any], _LoadedModel]] = {  # a hub id (str) only for the Hugging Face form
            FORM_TRANSFORMERS: self._load_mlflow_transformers,
            FORM_PICKLE: self._load_pytorch_pickle,
            FORM_PT2: self._load_pytorch_pt2,
            FORM_HUGGINGFACE: self._load_huggingface,
        }
        self.form = form
        self._built_from = location  # the artifact directory (or hub id): exported accelerations are cached beside it
        model = loaders[form](location)
        self.reading = reading_for(self.settings, model.tokenizer, model.max_length, model.labels)
        self._offsets = bool(getattr(model.tokenizer, "is_fast", False))
        self._model = model

    def warm_up(self) -> None:
        """One forward pass before serving; also proves the logits match the labels."""
        model = self._require()
        encoded = self.tokenize(list(WARMUP_TEXTS))
        with torch.inference_mode():
            logits = model.forward({key: value.to(self.device) for key, value in encoded.items()})
        expected = (len(WARMUP_TEXTS), len(model.labels))
        if tuple(logits.shape) != expected:
            raise ValueError(f"logits of shape {tuple(logits.shape)} for {expected[0]} texts and {expected[1]} labels")

    def after_warm_up(self) -> None:
        assert self.reading is not None  # set by build
        if self.settings.window_stride is not None and self.reading.stride != self.settings.window_stride:
            logger.warning("%s %s v%s: REGISTRY_WINDOW_STRIDE=%d does not fit its window of %d text tokens; stride %d is used",
                           self.tag, self.record.name, self.record.version, self.settings.window_stride, self.reading.capacity,
                           self.reading.stride)
        self._accelerate(self._require())

    def tokenize(self, texts: Sequence[str]) -> Encoded:
        """Encode texts as one padded batch of tensors (on the CPU)."""
        model = self._require()
        with self._tokenizer_lock:
            return model.tokenizer(
                list(texts),
                padding="max_length" if model.pad_to_max_length else True,
                truncation=True,
                max_length=model.max_length,
                return_tensors="pt",
            )

    def predict_encoded(self, encoded: Encoded) -> list[dict[str, Any]]:
        """Run the forward pass over one encoded batch; `{"label", "score"}` per row."""
        model = self._require()
        scores, indices = self._probabilities(model, encoded).max(dim=-1)
        return [{"label": model.labels[i], "score": s} for i, s in zip(indices.tolist(), scores.tolist())]

    def predict(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        """Classify texts; per text, in order, `{"label", "score", "windows", "span", "truncated"}`.

        Each text is read as `REGISTRY_LONG_TEXT` says (runners/windows.py): by default all of it,
        in overlapping windows; the answer is the window with the highest probability on a
        positive label, `windows` how many were read, `span` the characters of the winning one
        (`[start, end)`), `truncated` whether part of the text was not read (`skipped` says which,
        in `head_tail` mode). The windows of all texts are sorted by length and run in groups of
        similar length (at most `settings.forward_batch_size` each): a batch is padded to its
        longest input, and one long input would otherwise make every short one in it as slow.
        """
        if not texts:
            return []
        model, reading = self._require(), self.reading
        assert reading is not None  # set by load() with the model
        with self._tokenizer_lock:
            encoded = model.tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=self._offsets,
                                      return_attention_mask=False, verbose=False)
        offsets = encoded["offset_mapping"] if self._offsets else [None] * len(texts)
        pieces: list[Piece] = []
        notes: list[dict[str, Any]] = []
        counts: list[int] = []
        for i, ids in enumerate(encoded["input_ids"]):
            cut, note = reading.cut(i, ids, offsets[i])
            pieces += cut
            notes.append(note)
            counts.append(len(cut))
        probs = self._classify_inputs(model, [reading.model_input(piece) for piece in pieces])
        positive = probs[:, list(reading.positive)].sum(dim=-1).tolist()
        top_scores, top_labels = (t.tolist() for t in probs.max(dim=-1))
        results: list[dict[str, Any]] = []
        first = 0
        for count, note in zip(counts, notes):
            best = max(range(first, first + count), key=positive.__getitem__)  # the first of equals
            span = pieces[best].span
            results.append({"label": model.labels[top_labels[best]], "score": top_scores[best], "windows": count,
                            "span": list(span) if span is not None else None, **note})
            first += count
        return results

    def weigh(self, texts: Sequence[str]) -> int:
        """About how many model inputs these texts make (a long text read in windows is several); the
        batcher counts this against its limits. Estimated from the characters (about 4 a token): exact
        counts would take a tokenizer call per request."""
        reading = self.reading
        if reading is None or reading.mode != "windows":
            return len(texts)
        return sum(1 + max(0, -(-(len(text) // 4 - reading.capacity) // reading.stride)) for text in texts)

    def _classify_inputs(self, model: _LoadedModel, inputs: list[list[int]]) -> torch.Tensor:
        """Class probabilities `[len(inputs), labels]` (on the CPU) of token-id inputs, in groups of similar length."""
        step = self.settings.forward_batch_size
        if model.pad_to_max_length:  # a program exported for one sequence length: nothing to gain from grouping
            groups = [list(range(start, min(start + step, len(inputs)))) for start in range(0, len(inputs), step)]
        else:
            groups = length_groups([len(ids) for ids in inputs], step)
        out = torch.empty((len(inputs), len(model.labels)))
        for group in groups:
            rows = [inputs[i] for i in group]
            length = model.max_length if model.pad_to_max_length else None
            out[group] = self._probabilities(model, pad_rows(model.tokenizer, rows, length))
        with self._counts_lock:
            self.windows_read += len(inputs)
            self.forward_passes += len(groups)
        return out

    def _probabilities(self, model: _LoadedModel, encoded: Encoded) -> torch.Tensor:
        inputs = {key: value.to(self.device) for key, value in encoded.items()}
        with torch.inference_mode():
            return torch.softmax(model.forward(inputs).float(), dim=-1).cpu()

    def details(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "execution": self.execution,
            "reading": self.reading.describe(self._model.labels) if self.reading and self._model else None,
            "windows_read": self.windows_read,
            "forward_passes": self.forward_passes,
            **({"accelerate": self.accelerate_info} if self.accelerate_info else {}),
            **({"near_tie": dict(counts)} if (counts := getattr(self._model.forward if self._model else None, "counts", None)) else {}),
        }

    def release(self) -> None:
        """Drop the model so a swapped-out version gives its memory back."""
        self._model = None

    def close(self) -> None:
        super().close()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _accelerate(self, model: _LoadedModel) -> None:
        """`REGISTRY_ACCELERATE`: swap in the accelerated forward pass when it agrees with the eager one.

        Parity texts: the model's gate set when configured, else the warm-up texts. Refused: the
        eager model serves, and `describe()` says why.
        """
        from runners import accelerate

        requested = self.settings.accelerate  # one of the values the settings accept
        self.execution, self.accelerate_info = "eager", None
        if requested in EAGER_EXECUTION:
            return
        texts, source = accelerate.parity_texts(self.record.name, self.settings.gate.get(self.record.name), list(WARMUP_TEXTS))
        step = self.settings.forward_batch_size
        batches = [{k: v.to(self.device) for k, v in self.tokenize(texts[i:i + step]).items()} for i in range(0, len(texts), step)]
        max_diff = self.settings.accelerate_max_diff
        converts = accelerate.converted_as(requested)  # openvino-bf16 counts as the openvino conversion it runs
        started, conversions = time.perf_counter(), accelerate.CONVERSIONS[converts]
        try:
            forward, parity = accelerate.accelerate(requested, model.module, model.forward, _module_forward, batches, source, max_diff,
                                                    plan=self._acceleration_plan(model))
        except accelerate.AccelerationRefused as exc:
            self.accelerate_info = {"requested": requested, "refused": str(exc)}
            logger.warning("%s %s v%s: %s refused, eager serves: %s", self.tag, self.record.name, self.record.version, requested, exc)
            return
        # The eager module is dropped with the old _LoadedModel: only the accelerated one stays in memory.
        self._model = _LoadedModel(model.tokenizer, forward, model.labels, model.max_length, model.pad_to_max_length, None)
        self.execution = requested
        self.accelerate_info = {"requested": requested, "parity": parity.to_dict(), "max_diff": max_diff,
                                "seconds": round(time.perf_counter() - started, 3),
                                **({"converted": accelerate.CONVERSIONS[converts] > conversions} if requested in accelerate.EXPORTED else {})}
        logger.info("%s %s v%s runs %s (parity on %s: max probability difference %.4f)", self.tag, self.record.name,
                    self.record.version, requested, parity.source, parity.max_diff)

    def _acceleration_plan(self, model: _LoadedModel) -> Any:
        """Where an exported acceleration is cached (beside the artifact in the artifact cache, by its digest) and
        the threads it runs with (those of the forward lanes: REGISTRY_FORWARD_THREADS, REGISTRY_TORCH_THREADS)."""
        from registry.digest import tree_sha256
        from runners import accelerate
        from serving.batching import forward_plan

        lanes, threads = forward_plan(self.settings.forward_threads, self.settings.torch_threads,
                                      workers=self.settings.workers, cuda=self.device.type == "cuda")
        cache_dir: Optional[Path] = None
        location = self._built_from
        if location is not None and Path(location).is_dir():
            entry = self.store.entry_dir(self.record)
            if self.record.sha256 and Path(location).resolve() == (entry / "artifact").resolve():
                cache_dir = entry  # the artifact's own cache entry
            else:  # a directory the cache does not hold (a local fallback, an unverified record): keyed by its digest
                cache_dir = entry.parent / tree_sha256(location)
        return accelerate.Plan(cache_dir, torch_threads=threads, lanes=lanes, max_length=model.max_length)

    def _require(self) -> _LoadedModel:
        if self._model is None:
            raise RuntimeError(f"model {self.record.name} v{self.record.version} is not loaded: call load() first")
        return self._model

    # One loader per form; each returns the built model or raises.

    def _load_mlflow_transformers(self, path: Path) -> _LoadedModel:
        from transformers import AutoTokenizer

        flavor = read_mlmodel(path)["flavors"]["transformers"]
        task = flavor.get("task")
        if task not in _CLASSIFICATION_TASKS:
            raise ArtifactError(str(path), f"transformers flavor for task {task!r}, not text-classification")
        model_dir = path / str(flavor.get("model_binary", "model"))
        if not model_dir.is_dir():
            raise ArtifactError(str(path), f"transformers flavor without saved weights ({model_dir.name}/ missing; "
                                           "logged with save_pretrained=False?)")
        if "tokenizer" not in (flavor.get("components") or []):
            raise ArtifactError(str(path), "transformers flavor saved without its tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(path / "components" / "tokenizer")
        model = _sequence_classifier(model_dir, self.device)
        return self._transformers_model(tokenizer, model, labels_from(model.config.id2label, str(path)))

    def _load_pytorch_pickle(self, path: Path) -> _LoadedModel:
        from transformers import AutoTokenizer

        if not (self.record.sha256 or self.settings.allow_pickle):
            raise pickle_refused(self.record.location, "pickle-format artifact")
        flavor = read_mlmodel(path)["flavors"]["pytorch"]
        extra = extra_files_dir(path, flavor)
        model_file = path / str(flavor.get("model_data", "data")) / "model.pth"
        module = torch.load(model_file, map_location=self.device, weights_only=False)
        if not isinstance(module, torch.nn.Module):
            raise ArtifactError(str(path), f"model.pth holds a {type(module).__name__}, not a torch module")
        config = getattr(module, "config", None)
        id2label = config.id2label if config is not None else json.loads((extra / "config.json").read_text()).get("id2label") or {}
        tokenizer = AutoTokenizer.from_pretrained(extra)
        return self._transformers_model(tokenizer, module.to(self.device).eval(), labels_from(id2label, str(path)))

    def _load_pytorch_pt2(self, path: Path) -> _LoadedModel:
        from torch.export.passes import move_to_device_pass
        from transformers import AutoTokenizer

        flavor = read_mlmodel(path)["flavors"]["pytorch"]
        extra = extra_files_dir(path, flavor)
        model_file = path / str(flavor.get("model_data", "data")) / "model.pt2"
        if not (self.record.sha256 or self.settings.allow_pickle):
            check_pickle_free(model_file)
        import_pytree_types(model_file)  # load order must not matter
        program = torch.export.load(str(model_file))
        if self.device.type != "cpu":
            program = move_to_device_pass(program, self.device)
        batch, seq, seq_upper = input_shape(program, str(path))
        # An exported program is already in eval mode; its module() refuses .eval().
        module = program.module()
        tokenizer = AutoTokenizer.from_pretrained(extra)
        labels = labels_from(json.loads((extra / "config.json").read_text()).get("id2label") or {}, str(path))
        if seq is not None:
            max_length, pad_to_max = seq, True  # a static sequence dim takes exactly that length
        else:
            max_length, pad_to_max = min(_max_length(tokenizer), seq_upper or MAX_LENGTH_CAP), False
        logger.info("%s pt2 program for %s: batch %s, sequence %s", self.tag, self.record.name, batch or "dynamic", seq or f"dynamic <= {max_length}")
        if batch is None:
            forward: Callable[[Encoded], torch.Tensor] = lambda enc: logits_of(module(enc["input_ids"], enc["attention_mask"]))
        else:
            forward = static_batch_forward(module, batch)
        return _LoadedModel(tokenizer, forward, labels, max_length, pad_to_max)

    def _load_huggingface(self, location: Union[Path, str]) -> _LoadedModel:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(location)
        model = _sequence_classifier(location, self.device)
        return self._transformers_model(tokenizer, model, labels_from(model.config.id2label, str(location)))

    @staticmethod
    def _transformers_model(tokenizer: Any, model: Any, labels: tuple[str, ...]) -> _LoadedModel:
        return _LoadedModel(tokenizer, _module_forward(model), labels, _max_length(tokenizer),
                            module=model if isinstance(model, torch.nn.Module) else None)


def _module_forward(model: Any) -> Callable[[Encoded], torch.Tensor]:
    """The forward pass of a transformers-style module called with the tokenizer's keyword tensors."""
    return lambda enc: logits_of(model(**enc))

