"""Opt-in accelerated execution of a loaded transformers classifier (`REGISTRY_ACCELERATE`).

- `int8`: torch dynamic quantization of every `torch.nn.Linear` (weights stored as int8, activations
  quantized per batch at run time; `torch.ao.quantization.quantize_dynamic`).
- `onnx`: the module exported to ONNX (dynamic batch and sequence axes) and rewritten by ONNX Runtime's
  transformer optimizer (`onnxruntime.transformers.optimizer`, model type `bert`: attention, GELU,
  embedding and skip-LayerNorm fusion), run by an ONNX Runtime CPU session.
- `onnx-int8`: the same fused graph with its MatMul/Attention weights quantized to int8
  (`onnxruntime.quantization.quantize_dynamic`, per channel; activations quantized per batch at run time).
- `openvino`: the exported graph compiled by OpenVINO's CPU plugin (f32).
- `openvino-int8`: the same with every MatMul weight stored as int8 (symmetric, per output channel,
  the `Constant(i8) -> Convert -> Multiply(scale)` form OpenVINO's CPU plugin runs as compressed
  weights, with activations quantized per group at run time).
- `openvino-bf16`: the `openvino` graph (the same cached conversion) computed in bfloat16
  (`INFERENCE_PRECISION_HINT=bf16`): on a CPU with bf16 units (Intel AMX or AVX512-BF16) the matrix
  products run on them. A CPU without them is refused up front, before converting (OpenVINO would
  emulate bf16, slower than f32), and the eager model serves.

The two exported int8 forms keep their f32 graph beside them and answer like eager near a tie: a row
whose two highest class probabilities are within `2 x REGISTRY_ACCELERATE_MAX_DIFF` of each other
(where an int8 difference of up to that tolerance could change the label) is run again in f32, and
that answer is used. Most texts are far from a tie; a text near one gets the eager model's label.

The ONNX / OpenVINO forms are converted at load, once: the result is written beside the artifact in
the artifact cache (`<cache>/<name>/<version>/<sha256>/accelerated/<kind>-<fingerprint>/`, the
fingerprint covering the recipe and the converters' versions; `openvino-bf16` uses the `openvino`
entry, `CONVERTED_AS`), into a temporary directory renamed into place, under a lock so that two
workers do not convert at once; a restart loads it directly.

Nothing accelerated serves unless it agrees with the eager model first: at load, both classify the
parity texts (the model's gate set when one is configured, else the warm-up texts); every label must
be the same and no class probability may differ by more than `REGISTRY_ACCELERATE_MAX_DIFF`. The
exported forms are also compared on one input of the model's longest length (dynamic axes). When
that fails (or the model cannot be accelerated, or the package a form needs is not installed), the
eager model serves and the runner says why.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch

from registry.settings import ACCELERATIONS

logger = logging.getLogger(__name__)


Forward = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]

#: The forms converted to a file at load (cached), and the packages each needs (import names).
EXPORTED = {"onnx": ("onnxruntime", "onnx"), "onnx-int8": ("onnxruntime", "onnx"),
            "openvino": ("openvino", "onnx"), "openvino-int8": ("openvino", "onnx"),  # OpenVINO reads torch's ONNX export
            "openvino-bf16": ("openvino", "onnx")}
#: Forms that run another form's conversion (its files and cache entry), with other settings at open.
CONVERTED_AS = {"openvino-bf16": "openvino"}
#: Bumped when a conversion recipe changes: cached conversions of another recipe are not reused.
RECIPE = 2
#: Conversions run in this process, per kind (a cached one loads without converting).
CONVERSIONS: Counter = Counter()
#: How `pip` installs the packages of the exported forms.
INSTALL_HINT = "pip install 'security-classifier-serving[accelerate]'"
#: The file a finished conversion writes last, with what it was made from.
DONE = "conversion.json"
#: OpenVINO: activations of int8-weight MatMuls are quantized in groups of this many values at run time.
OV_DYNAMIC_QUANT_GROUP = 32


@dataclass
class Parity:
    """How the accelerated model compared with the eager one on the parity texts."""

    texts: int
    label_mismatches: int
    max_diff: float
    source: str
    engine: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"texts": self.texts, "label_mismatches": self.label_mismatches, "max_diff": round(self.max_diff, 6),
                "source": self.source, "engine": self.engine}


class AccelerationRefused(Exception):
    """Why an accelerated forward pass does not serve."""


@dataclass(frozen=True)
class Plan:
    """What an exported form needs besides the module: where to cache it and how to run it."""

    cache_dir: Optional[Path]  # the artifact's cache entry (`.../<sha256>/`); None: convert into a temporary directory
    torch_threads: int = 1  # intra-op threads of each forward pass
    lanes: int = 1  # forward passes run at once on the one model (REGISTRY_FORWARD_THREADS)
    max_length: int = 512  # the longest input the runner hands the model


#: Quantized kernel libraries, best first. Measured on this project's 2-core Xeon, MiniLM, batches of 8, one thread:
#: onednn 2.0-2.7x eager, fbgemm 1.3-2.1x, x86 (torch's default) 1.2-2.1x; the longer the texts, the wider the gap.
ENGINES = ("onednn", "x86", "fbgemm")


def quantized_engine() -> str:
    """Select the fastest available quantized engine for this process (a process-wide torch setting) and name it."""
    supported = torch.backends.quantized.supported_engines
    engine = next((e for e in ENGINES if e in supported), torch.backends.quantized.engine)
    if torch.backends.quantized.engine != engine:
        torch.backends.quantized.engine = engine
    return engine


def quantize_int8(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` with every Linear layer dynamically quantized to int8 (the eager module is untouched).

    Weights are packed for the engine selected now; forward passes use the same process-wide engine.
    """
    from torch.ao.quantization import quantize_dynamic

    quantized_engine()
    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notes are not the operator's concern
        warnings.simplefilter("ignore")
        return quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8, inplace=False).eval()


def parity_texts(model: str, gate: Optional[Any], fallback: Sequence[str], limit: int = 256) -> tuple[list[str], str]:
    """The texts both models must agree on: the model's gate set (first `limit`, read by the gate's own
    reader) when configured and readable, else `fallback`."""
    if gate is not None:
        from registry.errors import SettingsError
        from serving.gate import GateSet

        try:
            texts = list(GateSet.read(model, gate).texts[:limit])
            return texts, f"gate set {Path(gate.path).name} ({len(texts)} texts)"
        except SettingsError as exc:
            logger.warning("accelerate: %s; checking parity on the warm-up texts", exc)
    return list(fallback), f"warm-up texts ({len(fallback)})"


def compare(eager: Forward, accelerated: Forward, batches: Sequence[Mapping[str, torch.Tensor]], source: str) -> Parity:
    """Class probabilities of both forward passes over the same encoded batches."""
    mismatches, worst, n = 0, 0.0, 0
    with torch.inference_mode():
        for batch in batches:
            p = torch.softmax(eager(batch).float(), dim=-1)
            q = torch.softmax(accelerated(batch).float(), dim=-1)
            mismatches += int((p.argmax(dim=-1) != q.argmax(dim=-1)).sum())
            worst = max(worst, float((p - q).abs().max()))
            n += int(p.shape[0])
    return Parity(n, mismatches, worst, source)


def _cpu_capabilities() -> list[str]:
    import openvino as ov

    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def cpu_has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin computes bf16 natively here (AMX or AVX512-BF16); it would emulate it otherwise."""
    return "BF16" in _cpu_capabilities()


def missing_packages(kind: str) -> list[str]:
    """The packages an acceleration needs that this environment lacks (import names)."""
    return [name for name in EXPORTED.get(kind, ()) if importlib.util.find_spec(name) is None]


def accelerate(kind: str, module: Optional[torch.nn.Module], eager: Forward,
               wrap: Callable[[torch.nn.Module], Forward], batches: Sequence[Mapping[str, torch.Tensor]],
               source: str, max_diff: float, plan: Optional[Plan] = None) -> tuple[Forward, Parity]:
    """The accelerated forward pass when it agrees with `eager` on `batches`.

    `wrap` turns a module into a forward pass the way the loader did for the eager one; `plan` says
    where the exported forms are cached and how many threads they run with.

    Raises:
        AccelerationRefused: it cannot be built or does not agree; the message says why.
    """
    if kind not in ACCELERATIONS:
        raise AccelerationRefused(f"unknown acceleration {kind!r} (known: {', '.join(ACCELERATIONS)})")
    missing = missing_packages(kind)
    if missing:
        raise AccelerationRefused(f"{kind} needs the package(s) {', '.join(missing)}, not installed here ({INSTALL_HINT})")
    if kind == "openvino-bf16" and "BF16" not in (capabilities := _cpu_capabilities()):  # before converting anything
        raise AccelerationRefused(f"openvino-bf16 needs a CPU with bf16 units (Intel AMX or AVX512-BF16); this one offers "
                                  f"{', '.join(capabilities)}: REGISTRY_ACCELERATE=openvino runs here")
    if module is None:
        raise AccelerationRefused("this artifact form has no eager torch module to accelerate (exported programs are not)")
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    if device.type != "cpu":
        raise AccelerationRefused(f"{kind} runs on the CPU only (the model is on {device})")
    plan = plan or Plan(None)
    long_batch: list[Mapping[str, torch.Tensor]] = []
    try:
        if kind == "int8":
            forward = wrap(quantize_int8(module))
            engine = torch.backends.quantized.engine
        else:
            forward, engine = exported_forward(kind, module, batches[0], plan, band=max_diff)
            long_batch = [longest_input(batches[0], plan.max_length, module)]
        parity = compare(eager, forward, batches, source)
        parity.engine = engine
        extra = compare(eager, forward, long_batch, "longest input") if long_batch else None
    except AccelerationRefused:
        raise
    except Exception as exc:  # a layer or kernel the converter cannot handle here: eager serves
        raise AccelerationRefused(f"{kind} failed: {type(exc).__name__}: {exc}") from exc
    if parity.label_mismatches:
        raise AccelerationRefused(f"parity: {parity.label_mismatches} of {parity.texts} labels differ from eager on the {source}")
    if parity.max_diff > max_diff:
        raise AccelerationRefused(f"parity: max probability difference {parity.max_diff:.3g} > {max_diff:g} on the {source}")
    if extra is not None and (extra.label_mismatches or extra.max_diff > max_diff):
        raise AccelerationRefused(f"parity: an input of {plan.max_length} tokens differs from eager "
                                  f"(labels differing {extra.label_mismatches}, max probability difference {extra.max_diff:.3g})")
    return forward, parity


def longest_input(batch: Mapping[str, torch.Tensor], max_length: int, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """One input of `max_length` tokens (the parity batch's first row, repeated): the exported graph must take it."""
    limit = getattr(getattr(module, "config", None), "max_position_embeddings", None)
    length = min(max_length, int(limit)) if limit else max_length
    ids = batch["input_ids"][0][batch["attention_mask"][0].bool()]
    row = ids.repeat(-(-length // max(1, len(ids))))[:length]
    row[-1] = ids[-1]  # ends as the tokenizer ends an input (the separator)
    return {"input_ids": row.unsqueeze(0), "attention_mask": torch.ones((1, length), dtype=batch["attention_mask"].dtype)}


# -- the exported forms ------------------------------------------------------------------------------

def _versions(kind: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"torch": torch.__version__, "recipe": str(RECIPE)}
    for name in EXPORTED[kind]:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "?"
    return out


def fingerprint(kind: str) -> str:
    """What a cached conversion must have been made with to be reused (kind, recipe, converters' versions)."""
    return hashlib.sha256(json.dumps({"kind": kind, **_versions(kind)}, sort_keys=True).encode()).hexdigest()[:12]


def converted_as(kind: str) -> str:
    """The form whose conversion `kind` runs (itself, or the one it shares files with)."""
    return CONVERTED_AS.get(kind, kind)


def conversion_dir(plan: Plan, kind: str) -> Optional[Path]:
    return None if plan.cache_dir is None else plan.cache_dir / "accelerated" / f"{kind}-{fingerprint(kind)}"


def exported_forward(kind: str, module: torch.nn.Module, example: Mapping[str, torch.Tensor], plan: Plan,
                     band: float = 0.05) -> tuple[Forward, str]:
    """Convert `module` (or reuse its cached conversion) and open it; (forward pass, engine description).

    `band`: an int8 form reruns in f32 each row whose two highest probabilities are within `2 x band`."""
    converted = converted_as(kind)
    target = conversion_dir(plan, converted)
    if target is None:
        scratch = Path(tempfile.mkdtemp(prefix=f"accelerate-{kind}-"))
        try:
            _convert(converted, module, example, scratch)
            return _open(kind, scratch, plan, band)  # the runtimes read the files at open: the directory can go
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    if not (target / DONE).is_file():
        from registry.files import locked

        target.parent.mkdir(parents=True, exist_ok=True)
        with locked(target.parent / f".{target.name}.lock", 1800.0, AccelerationRefused):
            if not (target / DONE).is_file():  # another worker may have converted it while this one waited
                scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
                try:
                    _convert(converted, module, example, scratch)
                    shutil.rmtree(target, ignore_errors=True)  # an unfinished directory of an interrupted writer
                    os.replace(scratch, target)
                finally:
                    shutil.rmtree(scratch, ignore_errors=True)
    return _open(kind, target, plan, band)


def _convert(kind: str, module: torch.nn.Module, example: Mapping[str, torch.Tensor], out: Path) -> None:
    """Write the converted model of `kind` into `out`, `DONE` last."""
    CONVERSIONS[kind] += 1
    logger.info("accelerate: converting the model to %s (once; cached beside the artifact)", kind)
    with tempfile.TemporaryDirectory(prefix="export-", dir=out) as tmp:
        exported = Path(tmp) / "model.onnx"
        export_onnx(module, example, exported)
        if kind.startswith("onnx"):
            fused = optimize_bert(exported, module, Path(tmp) / "fused.onnx")
            if kind == "onnx-int8":
                quantize_onnx(fused, out / "model.onnx")
                os.replace(fused, out / "f32.onnx")  # near a tie the int8 form asks the f32 one
            else:
                os.replace(fused, out / "model.onnx")
        else:
            import openvino as ov

            core = ov.Core()
            model = core.read_model(str(exported))
            if kind == "openvino-int8":
                ov.save_model(core.read_model(str(exported)), str(out / "f32.xml"), compress_to_fp16=False)
                compress_weights_int8(model)
            ov.save_model(model, str(out / "model.xml"), compress_to_fp16=False)
    _fsync_tree(out)
    (out / DONE).write_text(json.dumps({"kind": kind, **_versions(kind)}, sort_keys=True))


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


class _Logits(torch.nn.Module):
    """(input_ids, attention_mask) -> logits: the two inputs the runner feeds, positional for the exporter."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from runners.pt2 import logits_of

        return logits_of(self.module(input_ids=input_ids, attention_mask=attention_mask))


@contextmanager
def _eager_attention(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The module with transformers' plain attention (the graph ONNX Runtime's fusion recognises), on a copy."""
    setter = getattr(module, "set_attn_implementation", None)
    if setter is None or getattr(getattr(module, "config", None), "_attn_implementation", "eager") == "eager":
        yield module
        return
    clone: Any = copy.deepcopy(module)
    try:
        clone.set_attn_implementation("eager")
    except Exception:  # a model without the switch: exported as it is
        clone = module
    yield clone


def export_onnx(module: torch.nn.Module, example: Mapping[str, torch.Tensor], path: Path) -> None:
    """`module` as an ONNX graph `(input_ids, attention_mask) -> logits`, batch and sequence axes dynamic."""
    dims = {0: "batch", 1: "sequence"}
    with _eager_attention(module) as exportable, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Logits(exportable).eval(), (example["input_ids"][:2], example["attention_mask"][:2]), str(path),
                          dynamo=False, input_names=["input_ids", "attention_mask"], output_names=["logits"], opset_version=17,
                          dynamic_axes={"input_ids": dims, "attention_mask": dims, "logits": {0: "batch"}}, do_constant_folding=True)


def optimize_bert(path: Path, module: torch.nn.Module, out: Path) -> Path:
    """ONNX Runtime's transformer optimizer (model type `bert`): attention, GELU, LayerNorm and embedding fusion."""
    from onnxruntime.transformers import optimizer

    config = getattr(module, "config", None)
    heads, hidden = int(getattr(config, "num_attention_heads", 0) or 0), int(getattr(config, "hidden_size", 0) or 0)
    quiet = logging.getLogger("onnxruntime.transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        model = optimizer.optimize_model(str(path), model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=1)
    finally:
        quiet.setLevel(level)
    fused = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
    logger.info("accelerate: ONNX Runtime fused %s", fused)
    model.save_model_to_file(str(out))
    return out


def quantize_onnx(path: Path, out: Path) -> None:
    """int8 weights for MatMul/Attention, activations quantized per batch at run time."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8, per_channel=True,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def compress_weights_int8(model: Any) -> int:
    """Every MatMul's constant weight as int8 (symmetric, per output channel) times its f32 scale; returns how many."""
    import numpy as np
    import openvino.opset13 as ops

    done = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul":
            continue
        weight = op.input_value(1).get_node()
        if weight.get_type_name() != "Constant" or weight.get_output_element_type(0).get_type_name() != "f32":
            continue
        w = weight.get_data().astype(np.float32)
        if w.ndim != 2:
            continue
        axis = 1 if op.get_attributes().get("transpose_b", False) else 0  # the input dimension, reduced over
        scale = np.abs(w).max(axis=axis, keepdims=True) / 127.0
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        decompressed = ops.multiply(ops.convert(ops.constant(q), "f32"), ops.constant(scale.astype(np.float32)))
        op.input(1).replace_source_output(decompressed.output(0))
        done += 1
    model.validate_nodes_and_infer_types()
    return done


def _feeds(names: Sequence[str], enc: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    ids = enc["input_ids"].detach().cpu()
    mask = enc["attention_mask"].detach().cpu() if "attention_mask" in enc else torch.ones_like(ids)
    given = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return {name: given[name].numpy().astype("int64", copy=False) for name in names}


def _open(kind: str, directory: Path, plan: Plan, band: float) -> tuple[Forward, str]:
    if kind.startswith("onnx"):
        forward, engine = _onnxruntime_forward(directory / "model.onnx", plan)
        if kind == "onnx-int8":
            return near_tie_in_f32(forward, _onnxruntime_forward(directory / "f32.onnx", plan)[0], band), f"{engine}; {_tie_note(band)}"
        return forward, engine
    forward, engine = _openvino_forward(directory / "model.xml", plan, int8=kind == "openvino-int8",
                                        precision="bf16" if kind == "openvino-bf16" else "f32")
    if kind == "openvino-int8":
        return near_tie_in_f32(forward, _openvino_forward(directory / "f32.xml", plan, int8=False)[0], band), f"{engine}; {_tie_note(band)}"
    return forward, engine


def _tie_note(band: float) -> str:
    return f"int8, rows whose top two probabilities are within {2 * band:g} rerun in f32"


def near_tie_in_f32(int8: Forward, f32: Forward, band: float) -> Forward:
    """`int8`'s logits, but those of the rows near a tie (top two probabilities within `2 x band`) from `f32`.

    A label flips only where the int8 probabilities differ from f32 by at least half the gap between
    the top two; within the tolerance `band` that is possible only for a gap of at most `2 x band`.
    """
    counts = {"rows": 0, "rerun_f32": 0}  # what /models shows (runner details)
    lock = threading.Lock()

    def forward(enc: Mapping[str, torch.Tensor]) -> torch.Tensor:
        logits = int8(enc).float()
        if logits.shape[-1] < 2:
            return logits
        top = torch.softmax(logits, dim=-1).topk(2, dim=-1).values
        near = (top[:, 0] - top[:, 1]) <= 2 * band
        with lock:
            counts["rows"] += int(near.shape[0])
            counts["rerun_f32"] += int(near.sum())
        if bool(near.any()):
            rows = near.nonzero().squeeze(1)
            mask = enc["attention_mask"][rows]
            ids = enc["input_ids"][rows]
            length = int(mask.sum(dim=-1).max())
            if not bool(mask[:, length:].any()):  # padded on the right: the rows' own padding, not the batch's
                ids, mask = ids[:, :length], mask[:, :length]
            sub = {"input_ids": ids, "attention_mask": mask}
            logits[rows] = f32(sub).float()
        return logits

    forward.counts = counts  # type: ignore[attr-defined]
    return forward


def _onnxruntime_forward(path: Path, plan: Plan) -> tuple[Forward, str]:
    """An ONNX Runtime session (its `run` is safe to call from several forward lanes at once)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = plan.torch_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if plan.lanes > 1:  # lanes share the CPUs: idle intra-op threads must not spin on a core another lane needs
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    output = session.get_outputs()[0].name

    def forward(enc: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.from_numpy(session.run([output], _feeds(names, enc))[0])

    return forward, f"onnxruntime {ort.__version__} CPU, {plan.torch_threads} intra-op thread(s)"


def _openvino_forward(path: Path, plan: Plan, int8: bool, precision: str = "f32") -> tuple[Forward, str]:
    """An OpenVINO CPU compiled model, one stream per forward lane and one infer request per lane thread.

    `precision`: what the CPU plugin computes in, `f32` or `bf16`; refused when the plugin settles on another."""
    import openvino as ov

    core = ov.Core()
    config: dict[str, Any] = {"NUM_STREAMS": plan.lanes, "INFERENCE_NUM_THREADS": plan.lanes * plan.torch_threads,
                              "INFERENCE_PRECISION_HINT": precision, "ENABLE_CPU_PINNING": False}
    if int8:
        config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = OV_DYNAMIC_QUANT_GROUP
    compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    names = [port.get_any_name() for port in compiled.inputs]
    output = compiled.outputs[0]
    local = threading.local()

    def forward(enc: Mapping[str, torch.Tensor]) -> torch.Tensor:
        request = getattr(local, "request", None)
        if request is None:  # an infer request runs one inference at a time: one per calling thread
            request = local.request = compiled.create_infer_request()
        result = request.infer(_feeds(names, enc), share_inputs=True)  # the arrays outlive the call; no copy
        return torch.from_numpy(result[output].copy())  # the request's output buffer is reused by its next call

    computes_in = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # what the plugin settled on
    if computes_in != precision:
        raise AccelerationRefused(f"OpenVINO's CPU plugin computes in {computes_in} here, not {precision}")
    return forward, f"openvino {ov.__version__} CPU, {computes_in}, {plan.lanes} stream(s) x {plan.torch_threads} thread(s)"
