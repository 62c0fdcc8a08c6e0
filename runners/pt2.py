"""MLflow's `pt2` format (a torch.export program): what it expects, and loading it in any process.

`mlflow.pytorch.log_model(pytorch_model=<a transformers model>)` in the default `pt2` format
exports a program whose output is a transformers `ModelOutput`; torch can only read it back once
that type is registered as a pytree node, which happens when its module is imported. The archive
names the types it needs, so they are imported first: load order must not matter.
"""

from __future__ import annotations

import importlib
import json
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from registry.errors import ArtifactError

Encoded = Mapping[str, torch.Tensor]


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a forward pass: a tensor, a transformers ModelOutput, or a tuple whose first item they are."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    return output[0]


def input_shape(program: Any, where: str) -> tuple[Optional[int], Optional[int], Optional[int]]:
    """(static batch size, static sequence length, largest sequence length) of an exported program.

    MLflow exports `-1` signature dims with `Dim.AUTO`: they stay dynamic unless the model forced
    them static, and the sequence dim gets the model's position limit as its upper bound.
    """
    import sympy

    user_inputs = list(program.graph_signature.user_inputs)
    if len(user_inputs) != 2:
        raise ArtifactError(where, f"pt2 program must take (input_ids, attention_mask), it takes {user_inputs}")
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == user_inputs[0])
    shape = node.meta["val"].shape
    if len(shape) != 2:
        raise ArtifactError(where, f"pt2 program expects 2-d input_ids, got {len(shape)} dims")

    def static_and_upper(dim: Any) -> tuple[Optional[int], Optional[int]]:
        if isinstance(dim, int):
            return dim, dim
        bounds = program.range_constraints.get(dim.node.expr)
        upper = None if bounds is None else bounds.upper
        return None, int(upper) if isinstance(upper, sympy.Integer) else None

    batch, _ = static_and_upper(shape[0])
    seq, seq_upper = static_and_upper(shape[1])
    return batch, seq, seq_upper


def static_batch_forward(module: Any, batch: int) -> Callable[[Encoded], torch.Tensor]:
    """Runs a program exported with a fixed batch size on any number of rows, padding the last chunk."""

    def forward(encoded: Encoded) -> torch.Tensor:
        ids, mask = encoded["input_ids"], encoded["attention_mask"]
        out = []
        for start in range(0, ids.shape[0], batch):
            chunk_ids, chunk_mask = ids[start : start + batch], mask[start : start + batch]
            rows = chunk_ids.shape[0]
            if rows < batch:
                chunk_ids = torch.cat([chunk_ids, chunk_ids[:1].expand(batch - rows, -1)])
                chunk_mask = torch.cat([chunk_mask, chunk_mask[:1].expand(batch - rows, -1)])
            out.append(logits_of(module(chunk_ids, chunk_mask))[:rows])
        return torch.cat(out)

    return forward


def import_pytree_types(model_file: Path) -> None:
    """Import the `transformers` modules that define the pytree types a pt2 program refers to.

    A program exported from a Hugging Face model returns a `ModelOutput`, which transformers
    registers as a pytree node only when the class is defined; `torch.export.load` fails on a type
    not registered yet, so whether it loaded would depend on what the process imported before.
    The types are read from the archive's JSON records (the `in_spec`/`out_spec` tree specs of
    `models/*.json`), and only modules under `transformers.` are ever imported from them.
    """
    from torch.utils import _pytree

    names: set[str] = set()
    try:
        with zipfile.ZipFile(model_file) as archive:
            for member in archive.namelist():
                if not (member.endswith(".json") and Path(member).parent.name == "models"):
                    continue
                stack: list[Any] = [json.loads(archive.read(member))]
                while stack:
                    node = stack.pop()
                    if isinstance(node, dict):
                        for key, value in node.items():
                            if key in ("in_spec", "out_spec") and isinstance(value, str):
                                stack.append(json.loads(value))  # [protocol, {"type", "context", "children_spec"}]
                            elif key == "type" and isinstance(value, str) and "children_spec" in node:
                                names.add(value)
                            else:
                                stack.append(value)
                    elif isinstance(node, list):
                        stack.extend(node)
    except (OSError, zipfile.BadZipFile, UnicodeDecodeError, ValueError) as exc:
        raise ArtifactError(str(model_file), f"unreadable pt2 archive: {type(exc).__name__}: {exc}") from exc
    for name in sorted(names - set(_pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE)):
        module_name = name.rpartition(".")[0]
        if not (name.startswith("transformers.") and all(part.isidentifier() for part in module_name.split("."))):
            continue  # not ours to import: torch.export.load reports it if it stays unregistered
        try:
            importlib.import_module(module_name)
        except Exception as exc:  # ImportError, or whatever a module raises while importing
            raise ArtifactError(
                str(model_file), f"pt2 program refers to pytree type {name}, and {module_name} cannot be imported: {type(exc).__name__}: {exc}"
            ) from exc
        if name not in _pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            raise ArtifactError(str(model_file), f"pt2 program refers to pytree type {name}, which importing {module_name} does not register")


def check_pickle_free(model_file: Path) -> None:
    # torch.export.load unpickles weights and constants with weights_only=False, so an archive
    # whose digest is unknown is only loaded when every record passes MLflow's pickle-free check.
    from mlflow.exceptions import MlflowException

    try:
        from mlflow.pytorch import _validate_pt2_archive_is_pickle_free as validate
    except ImportError as exc:
        raise ArtifactError(str(model_file), "pt2 archive with no sha256, and this MLflow cannot check it for pickled records") from exc
    try:
        validate(str(model_file))
    except MlflowException as exc:
        raise ArtifactError(str(model_file), f"pt2 archive with no sha256 holds pickled records: {exc.message}") from exc
