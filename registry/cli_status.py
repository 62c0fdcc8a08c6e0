"""`registry status`: what every layer holds per model, side by side with MLflow (the authority).

For each model and each selector (`latest`, `best`, and `REGISTRY_ALIAS` when it is another
alias) it reads the Redis cache (with its TTL), the training API, MLflow, the file backup (with
its age) and, with `--service`, what a running service serves. A layer disagrees when it holds
another version than MLflow for a selector, holds a version MLflow no longer has, or records
another sha256 for a version than MLflow does. Exit 1 on any disagreement, an unreachable
configured layer or unusable registry data; 0 when everything agrees.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import click

from registry.cli_common import UNHEALTHY, OK, Output, age_s, esc, check_names, config_problem, human_age, json_option, \
    load_settings, quiet_stdout
from registry.errors import PayloadError, SourceUnavailable
from registry.payload import ModelSection, RegistryPayload
from registry.record import BEST, LATEST, Selector
from registry.settings import RegistrySettings
from registry.sources.file_backup import FileBackupSource
from registry.sources.mlflow_registry import MLflowRegistrySource
from registry.sources.payload_source import PayloadSource
from registry.sources.redis_cache import RedisCacheSource
from registry.sources.training_api import TrainingAPISource

LABELS = {"redis": "redis cache", "training_api": "training API", "mlflow": "MLflow (authority)", "file": "file backup",
          "service": "service"}


def selectors_for(settings: RegistrySettings) -> list[str]:
    out = [LATEST, BEST]
    pinned = Selector.parse(settings.alias)
    if pinned.kind == "alias" and pinned.value not in out:
        out.append(pinned.value)
    return out


def _pick(section: Optional[ModelSection], selector: str) -> Optional[str]:
    if section is None:
        return None
    record = section.select(Selector.parse(selector), custom_aliases=True)
    return None if record is None else record.version


def _read_layer(source: PayloadSource) -> tuple[dict[str, Any], Optional[RegistryPayload]]:
    """One read of a payload layer: its state and extras (TTL, age, URL), and the payload."""
    info: dict[str, Any] = {"configured": True, "state": "ok", "error": None}
    payload = None
    try:
        payload = source.load_payload()
    except SourceUnavailable as exc:
        info.update(state="unreachable", error=exc.reason)
    except PayloadError as exc:
        info.update(state="rejected", error=str(exc))
    if isinstance(source, RedisCacheSource):
        info["key"] = source.key
        if info["state"] != "unreachable":
            try:
                info["ttl_s"] = source.client.ttl(source.key)  # -2: no key, -1: no expiry
            except Exception as exc:  # noqa: BLE001 - a TTL we cannot read is only missing detail
                info["ttl_s"] = None
                info["error"] = info["error"] or f"ttl: {exc}"
    elif isinstance(source, TrainingAPISource):
        info["url"] = source.base_url
    elif isinstance(source, FileBackupSource):
        info["path"] = str(source.path)
        written = payload.written_at if payload is not None else None
        if written is None and source.path.exists():
            written = os.path.getmtime(source.path)
        info["timestamp"] = payload.timestamp if payload is not None else None
        info["age_s"] = age_s(written)
    if payload is None and info["state"] == "ok":
        info["state"] = "absent"
    return info, payload


def _service_models(url: str, timeout: float, token: Optional[str] = None) -> tuple[dict[str, Any], dict[str, Any]]:
    import httpx

    info: dict[str, Any] = {"configured": True, "state": "ok", "error": None, "url": url}
    # With the admin token the service gives the detail (selector, wanted, candidate); without it the summary.
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.get(url.rstrip("/") + "/models", timeout=timeout, headers=headers)
        response.raise_for_status()
        models = response.json().get("models")
        if not isinstance(models, dict):
            raise ValueError("the answer has no 'models' object")
        return info, models
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        info.update(state="unreachable", error=f"{type(exc).__name__}: {exc}")
        return info, {}


def _compare(layer: str, held: dict[str, Optional[str]], section: Optional[ModelSection], auth: Optional[ModelSection],
             selectors: list[str]) -> list[dict[str, Any]]:
    """Where a payload layer's section says something else than MLflow's."""
    out = []
    auth_versions = {r.version: r for r in auth.all_records()} if auth is not None else {}
    for sel in selectors:
        mine, theirs = held.get(sel), _pick(auth, sel)
        if mine is not None and mine != theirs:
            why = f"MLflow has no {sel}" if theirs is None else f"MLflow says {theirs}"
            out.append({"layer": layer, "selector": sel, "holds": mine, "mlflow": theirs, "reason": f"{sel} is {mine}, {why}"})
    for record in sorted({r.version: r for r in section.all_records()}.values(), key=lambda r: r.version_number) if section else ():
        known = auth_versions.get(record.version)
        if known is None:
            out.append({"layer": layer, "selector": None, "holds": record.version, "mlflow": None,
                        "reason": f"holds version {record.version}, which MLflow no longer has"})
        elif record.sha256 and known.sha256 and record.sha256 != known.sha256:
            out.append({"layer": layer, "selector": None, "holds": record.version, "mlflow": record.version,
                        "reason": f"version {record.version} has sha256 {record.sha256[:12]}…, MLflow records {known.sha256[:12]}…"})
    return out


def collect(settings: RegistrySettings, names: list[str], service: Optional[str], timeout: float) -> dict[str, Any]:
    mlflow = MLflowRegistrySource.from_settings(settings)
    if mlflow is None:
        raise config_problem("status compares every layer with MLflow: MLFLOW_TRACKING_URI is not set")
    sources: list[PayloadSource] = [s for s in (RedisCacheSource.from_settings(settings), TrainingAPISource.from_settings(settings),
                                                FileBackupSource.from_settings(settings)) if s is not None]
    layers: dict[str, dict[str, Any]] = {}
    payloads: dict[str, Optional[RegistryPayload]] = {}
    try:
        for source in sources:
            layers[source.source_id], payloads[source.source_id] = _read_layer(source)
        wanted = names or settings.models or None
        try:
            authority: Optional[RegistryPayload] = mlflow.payload(wanted)
            layers["mlflow"] = {"configured": True, "state": "ok", "error": None, "uri": settings.mlflow_tracking_uri}
        except SourceUnavailable as exc:
            authority = None
            layers["mlflow"] = {"configured": True, "state": "unreachable", "error": exc.reason, "uri": settings.mlflow_tracking_uri}
    finally:
        for closing in (*sources, mlflow):
            closing.close()
    served: dict[str, Any] = {}
    if service:
        token = settings.admin_token.get_secret_value() if settings.admin_token is not None else None
        layers["service"], served = _service_models(service, timeout, token)
    if wanted is None:  # every model MLflow holds, and every model a layer still holds
        found = set(authority.model_names()) if authority is not None else set()
        for payload in payloads.values():
            found.update(payload.model_names() if payload is not None else ())
        wanted = sorted(found)
    selectors = selectors_for(settings)
    problems = [{"layer": lid, "reason": f"{info['state']}: {info['error']}"} for lid, info in layers.items()
                if info["state"] in ("unreachable", "rejected")]
    models = {name: _model(name, settings.registered_name(name), selectors, authority, payloads, layers, served if service else None,
                           settings.alias, problems)
              for name in wanted}
    disagreements = [d for m in models.values() for d in m["disagreements"]]
    return {"ok": not disagreements and not problems, "selectors": selectors, "layers": layers, "models": models,
            "disagreements": disagreements, "problems": problems}


def _model(name: str, registered_name: str, selectors: list[str], authority: Optional[RegistryPayload],
           payloads: dict[str, Optional[RegistryPayload]],
           layers: dict[str, dict[str, Any]], served: Optional[dict[str, Any]], default_selector: str,
           problems: list[dict[str, Any]]) -> dict[str, Any]:
    auth = authority.section(name, source="mlflow") if authority is not None else None
    rows: dict[str, dict[str, Any]] = {}
    disagreements: list[dict[str, Any]] = []
    for lid, payload in payloads.items():
        state = layers[lid]["state"]
        row: dict[str, Any] = {"state": state, **{sel: None for sel in selectors}, "versions": []}
        section = None
        if payload is not None:
            try:
                section = payload.section(name, source=lid)
            except PayloadError as exc:
                row.update(state="rejected", error=str(exc))
                problems.append({"layer": lid, "model": name, "reason": f"rejected: {exc}"})
            if section is None and row["state"] == "ok":
                row["state"] = "absent"
        if section is not None:
            row.update({sel: _pick(section, sel) for sel in selectors})
            row["versions"] = sorted({r.version for r in section.all_records()}, key=int)
            if authority is not None:
                row["disagreements"] = _compare(lid, row, section, auth, selectors)
                disagreements.extend(row["disagreements"])
        rows[lid] = row
    if layers["mlflow"]["state"] == "ok":
        rows["mlflow"] = {"state": "ok" if auth is not None else "absent", **{sel: _pick(auth, sel) for sel in selectors},
                          "versions": sorted({r.version for r in auth.all_records()}, key=int) if auth else []}
    else:
        rows["mlflow"] = {"state": layers["mlflow"]["state"], **{sel: None for sel in selectors}, "versions": []}
    if served is not None:
        rows["service"] = _service_row(name, served.get(name), auth, authority is not None, layers["service"]["state"],
                                       default_selector, disagreements, problems)
    order = ["redis", "training_api", "mlflow", "file", "service"]
    return {"registered_name": registered_name, "layers": {k: rows[k] for k in order if k in rows}, "disagreements": disagreements}


def _service_row(name: str, body: Any, auth: Optional[ModelSection], compare: bool, state: str, default_selector: str,
                 disagreements: list[dict[str, Any]], problems: list[dict[str, Any]]) -> dict[str, Any]:
    if state != "ok":
        return {"state": state}
    if not isinstance(body, dict) or not body.get("version"):
        reason = "does not serve this model" if not isinstance(body, dict) else f"not loaded: {body.get('error')}"
        problems.append({"layer": "service", "model": name, "reason": reason})
        return {"state": "not_loaded", "error": reason}
    selector = str(body.get("selector") or default_selector)
    row = {"state": "ok", "version": str(body["version"]), "selector": selector, "source": body.get("source"),
           "wanted": _mapping(body.get("wanted")), "candidate": _mapping(body.get("candidate"))}
    if compare:
        expected = _pick(auth, selector)
        versions = {r.version for r in auth.all_records()} if auth is not None else set()
        if row["version"] != expected:
            why = f"MLflow has no {selector}" if expected is None else f"MLflow says {expected}"
            if row["version"] not in versions:
                why += f"; version {row['version']} is not in MLflow"
            disagreements.append({"layer": "service", "selector": selector, "holds": row["version"], "mlflow": expected,
                                  "reason": f"serves {row['version']} for {selector} (from {row['source']}), {why}"})
    wanted = row["wanted"]
    if isinstance(wanted, dict):
        problems.append({"layer": "service", "model": name,
                         "reason": f"wants version {wanted.get('version')}: {wanted.get('reason')}"})
    return row


def _mapping(value: Any) -> Optional[dict[str, Any]]:
    if value is None or isinstance(value, dict):
        return value
    return {"version": None, "reason": str(value)}


# -- people --------------------------------------------------------------------------------------
def _cell(row: dict[str, Any], sel: str, layer: str, flagged: set[tuple[str, Optional[str]]], auth_row: dict[str, Any]) -> str:
    if row.get("state") in ("unreachable", "rejected"):
        return "[red]?[/]"
    value = row.get(sel)
    if value is None:
        return "[dim]—[/]"
    if (layer, sel) in flagged:
        return f"[bold red]{value} ≠ {auth_row.get(sel) or 'none'}[/]"
    return f"[green]{value}[/]" if layer != "mlflow" else f"[bold]{value}[/]"


def _service_cell(row: dict[str, Any], sel: str, flagged: set[tuple[str, Optional[str]]], auth_row: dict[str, Any]) -> str:
    """The service serves one selector: its version goes under that selector's column."""
    if row.get("state") != "ok":
        return "[red]?[/]"
    if row.get("selector") != sel:
        return "[dim]·[/]"
    if ("service", sel) in flagged:
        return f"[bold red]{row['version']} ≠ {auth_row.get(sel) or 'none'}[/]"
    return f"[green]{row['version']}[/]"


def _detail(layer: str, row: dict[str, Any], info: dict[str, Any]) -> str:
    parts = []
    if row.get("state") in ("unreachable", "rejected", "not_loaded"):
        parts.append(f"[red]{row['state']}: {esc(row.get('error') or info.get('error'))}[/]")
    elif row.get("state") == "absent":
        parts.append("[dim]holds nothing for this model[/]")
    if layer == "redis" and info.get("state") != "unreachable":
        ttl = info.get("ttl_s")
        parts.append(f"key {esc(info.get('key'))}" + (f", ttl {ttl}s" if ttl is not None and ttl >= 0 else ", no key" if ttl == -2 else ""))
    elif layer == "file":
        parts.append(f"age {human_age(info.get('age_s'))}" if info.get("age_s") is not None else "no file")
    elif layer in ("training_api", "mlflow"):
        parts.append(esc(info.get("url") or info.get("uri")))
    elif layer == "service" and row.get("state") == "ok":
        parts.append(esc(f"selector {row['selector']}, from {row.get('source')}"))
        if row.get("wanted"):
            wanted = row["wanted"]
            parts.append(f"[red]wanted {esc(wanted.get('version'))}: {esc(wanted.get('reason'))}[/]")
        if row.get("candidate"):
            parts.append(f"[yellow]candidate {esc(row['candidate'].get('version'))} not rolled to[/]")
    elif layer == "service":
        parts.append(esc(info.get("url")))
    return "; ".join(parts)


def render(data: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    selectors = data["selectors"]
    for name, model in data["models"].items():
        table = Table(title=f"[bold]{name}[/]", title_justify="left")
        table.add_column("layer")
        for sel in selectors:
            table.add_column(sel, justify="right")
        table.add_column("versions")
        table.add_column("detail", overflow="fold")
        flagged = {(d["layer"], d["selector"]) for d in model["disagreements"]}
        stale = {(d["layer"], d["holds"]) for d in model["disagreements"] if d["selector"] is None}
        auth_row = model["layers"].get("mlflow", {})
        for layer, row in model["layers"].items():
            info = data["layers"].get(layer, {})
            if layer == "service":
                cells = [_service_cell(row, sel, flagged, auth_row) for sel in selectors]
                versions = ""
            else:
                cells = [_cell(row, sel, layer, flagged, auth_row) for sel in selectors]
                versions = ",".join(f"[bold red]{v}![/]" if (layer, v) in stale else v for v in row.get("versions", []))
            table.add_row(LABELS[layer], *cells, versions, _detail(layer, row, info))
        console.print(table)
        for d in model["disagreements"]:
            console.print(f"  [red]✗ {LABELS[d['layer']]}: {esc(d['reason'])}[/]")
    if not data["models"]:
        console.print("no models: REGISTRY_MODELS is empty and no layer holds any")
    seen = set()
    for p in data["problems"]:
        line = f"{LABELS.get(p['layer'], p['layer'])}{' (' + p['model'] + ')' if p.get('model') else ''}: {p['reason']}"
        if line not in seen:
            seen.add(line)
            console.print(f"[red]✗ {esc(line)}[/]")
    if data["ok"]:
        console.print("[green]✓ every layer agrees with MLflow[/]")
    else:
        console.print(f"[red]{len(data['disagreements'])} disagreement(s), {len(seen)} problem(s)[/]")


@click.command()
@click.option("--service", metavar="URL", help="also ask a running service what it serves (GET URL/models)")
@click.option("--model", "models", multiple=True, metavar="NAME", help="model to check (repeatable; default REGISTRY_MODELS, else every model held)")
@click.option("--timeout", type=float, default=5.0, show_default=True, help="seconds for the service's answer")
@json_option
def status(out: Output, service: Optional[str], models: tuple[str, ...], timeout: float) -> None:
    """What every layer holds for latest, best and the pinned alias, beside MLflow; exit 1 on any disagreement."""
    settings = load_settings()
    names = check_names(models)
    with quiet_stdout():
        data = collect(settings, names, service, timeout)
    out.done(data, lambda console: render(data, console), OK if data["ok"] else UNHEALTHY)


__all__ = ["status", "collect"]
