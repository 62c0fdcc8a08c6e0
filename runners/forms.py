"""What a fetched artifact is: the four forms the text-classification runner loads, and their parts.

- `mlflow-transformers`: `model/` (config + weights) and `components/tokenizer/`;
- `mlflow-pytorch-pickle`: `data/model.pth` (a pickled module) and `extra_files/` (tokenizer, config.json);
- `mlflow-pytorch-pt2`: `data/model.pt2` (a torch.export program) and `extra_files/` (tokenizer, config.json);
- `huggingface`: a `save_pretrained` directory (config.json, weights, tokenizer) or a hub id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Union

from registry.errors import ArtifactError

FORM_TRANSFORMERS = "mlflow-transformers"
FORM_PICKLE = "mlflow-pytorch-pickle"
FORM_PT2 = "mlflow-pytorch-pt2"
FORM_HUGGINGFACE = "huggingface"


def read_mlmodel(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load((path / "MLmodel").read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ArtifactError(str(path), f"unreadable MLmodel file: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("flavors"), dict):
        raise ArtifactError(str(path), "MLmodel file has no flavors")
    return data


def detect_form(location: Union[Path, str]) -> str:
    """Which of the supported artifact forms a fetched location holds."""
    if isinstance(location, str):
        return FORM_HUGGINGFACE  # a hub id
    if (location / "MLmodel").is_file():
        flavors = read_mlmodel(location)["flavors"]
        if "transformers" in flavors:
            return FORM_TRANSFORMERS
        if "pytorch" in flavors:
            data = location / str(flavors["pytorch"].get("model_data", "data"))
            if (data / "model.pt2").is_file():
                return FORM_PT2
            if (data / "model.pth").is_file():
                return FORM_PICKLE
            raise ArtifactError(str(location), f"pytorch flavor without {data.name}/model.pt2 or {data.name}/model.pth")
        raise ArtifactError(str(location), f"no supported MLflow flavor (found {', '.join(sorted(flavors))}; need transformers or pytorch)")
    if (location / "config.json").is_file():
        return FORM_HUGGINGFACE
    raise ArtifactError(str(location), "neither an MLflow model (no MLmodel file) nor a Hugging Face directory (no config.json)")


def labels_from(id2label: Mapping[Any, str], where: str) -> tuple[str, ...]:
    try:
        by_index = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError) as exc:
        raise ArtifactError(where, f"id2label keys must be integers: {exc}") from exc
    if not by_index or sorted(by_index) != list(range(len(by_index))):
        raise ArtifactError(where, f"id2label must number labels 0..n-1, got {sorted(by_index)}")
    return tuple(by_index[i] for i in range(len(by_index)))


def extra_files_dir(path: Path, flavor: Mapping[str, Any]) -> Path:
    """The folder of the tokenizer files and config.json logged with `extra_files`."""
    entries = flavor.get("extra_files") or []
    folders = {Path(e["path"]).parent for e in entries if isinstance(e, Mapping) and "path" in e}
    if len(folders) != 1:
        raise ArtifactError(str(path), "pytorch flavor must carry its tokenizer and config.json as extra_files in one folder")
    folder = path / folders.pop()
    if not (folder / "config.json").is_file():
        raise ArtifactError(str(path), f"extra files in {folder.name}/ hold no config.json (needed for the labels)")
    return folder
