"""`registry`: the operator's command for the model registry (also `python -m registry`).

    registry status [--service URL] [--model NAME ...]     every layer beside MLflow; exit 1 on disagreement
    registry resolve NAME [--selector S]                   the record and the trail, as the service sees it
    registry publish NAME --model-dir DIR [--metric k=v ...] [--flavor F]
    registry promote NAME VERSION [--alias A]              point an alias (default best) at a version
    registry revoke NAME VERSION [--alias A]               delete a version (or remove one alias from it)
    registry cache show | refresh | clear                  the Redis copy of the registry
    registry backup verify                                 the file backup: shape, signature, artifact digests

Every subcommand takes `--json` (the answer on stdout, nothing else there; logs and MLflow's own
prints go to stderr). Exit codes: 0 ok, 1 the registry disagrees or something is unhealthy (a
version or alias the registry does not have included), 2 usage or configuration error. An error
is one `error: ...` line on stderr; no progress bars (MLflow's and tqdm's are switched off). `resolve`
only reads: it writes nothing back to the cache or the backup. Settings come from the service's
variables (`MLFLOW_TRACKING_URI`, `REGISTRY_*`).
"""

from __future__ import annotations

from typing import Any, Optional

import click

from registry.cli_backup import backup
from registry.cli_cache import cache
from registry.cli_common import OK, UNHEALTHY, Output, Problem, check_names, config_problem, esc, json_option, \
    load_settings, quiet_progress, quiet_stdout, setup_logging
from registry.cli_status import status
from registry.errors import ModelNotResolvable
from registry.record import BEST, Selector


@click.group(help=__doc__.split("\n\n")[0], context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="log at INFO on stderr (default: warnings only)")
def cli(verbose: bool) -> None:
    quiet_progress()
    setup_logging(verbose)


cli.add_command(status)
cli.add_command(cache)
cli.add_command(backup)


def _name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    return check_names([value])[0]


def _version(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if Selector.parse(value).kind != "version":
        raise click.BadParameter(f"{value!r} is not a version number", param_hint="VERSION")
    return value


def _metric(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for text in values:
        name, sep, value = text.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"expected NAME=VALUE, got {text!r}")
        try:
            out[name] = float(value)
        except ValueError:
            raise click.BadParameter(f"metric {name!r}: {value!r} is not a number") from None
    return out


def _record_table(console: Any, record: dict[str, Any], title: str = "") -> None:
    from rich.table import Table

    table = Table(title=title or None, title_justify="left", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key in ("name", "version", "source", "aliases", "metrics", "sha256", "model_uri", "artifact_uri", "run_id", "created_at"):
        value = record.get(key)
        if isinstance(value, list):
            value = ", ".join(value) or "—"
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v:g}" for k, v in value.items()) or "—"
        table.add_row(key, "—" if value is None else esc(value))
    console.print(table)


def _trail_table(console: Any, trail: list[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table(title="trail", title_justify="left")
    for column in ("layer", "outcome", "ms", "detail"):
        table.add_column(column, overflow="fold")
    colour = {"hit": "green", "miss": "dim", "unavailable": "red", "rejected": "red"}
    for a in trail:
        table.add_row(a["source"], f"[{colour.get(a['outcome'], 'white')}]{a['outcome']}[/]", f"{a['elapsed_ms']:.1f}", esc(a["detail"]))
    console.print(table)


@cli.command()
@click.argument("name", callback=_name)
@click.option("--selector", default=None, help="latest, best, an alias or a version (default REGISTRY_ALIAS)")
@json_option
def resolve(out: Output, name: str, selector: Optional[str]) -> None:
    """Walk the chain as the service does: the record and every layer's answer; exit 1 when nothing resolves.

    Read-only: what a layer below the cache answers is not written back to the cache or the backup.
    """
    from registry.resolver import Resolver

    settings = load_settings()
    wanted = Selector.parse(selector or settings.alias)
    with quiet_stdout():
        resolver = Resolver.from_settings(settings, read_only=True)
        try:
            resolution = resolver.resolve(name, wanted)
        except ModelNotResolvable as exc:
            failure: Optional[ModelNotResolvable] = exc
        else:
            failure = None
        finally:
            resolver.close()
    if failure is not None:
        message, trail = str(failure), [a.to_dict() for a in failure.trail]
        click.echo(f"error: {message}", err=True)

        def render_failure(console: Any) -> None:
            console.print(f"[red]✗ {esc(message)}[/]")
            _trail_table(console, trail)

        out.done({"ok": False, "model": name, "selector": wanted.value, "error": message, "trail": trail}, render_failure, UNHEALTHY)
    data: dict[str, Any] = {"ok": True, "model": name, "selector": wanted.value, "record": resolution.record.to_dict(),
                            "trail": resolution.trail_dicts(), "stale": resolution.stale}

    def render(console: Any) -> None:
        _record_table(console, data["record"], f"{name}@{wanted.value}" + (" [yellow](stale)[/]" if resolution.stale else ""))
        _trail_table(console, data["trail"])

    out.done(data, render)


def _publisher(settings: Any) -> Any:
    from training.publisher import Publisher

    if not settings.mlflow_tracking_uri:
        raise config_problem("MLFLOW_TRACKING_URI is not set: there is no registry to write to")
    return Publisher(settings)


def _registered_version(publisher: Any, name: str, version: str) -> Any:
    """MLflow's section of `name`, when it holds `version`; otherwise the registry says no (exit 1), in one message."""
    section = publisher.mlflow.section(name)
    registered = publisher.mlflow.registered_name(name)
    if section is None:
        raise Problem(f"model {name!r} has no version in MLflow (registered model {registered!r} does not exist)", UNHEALTHY)
    known = [r.version for r in section.versions]
    if version not in known:
        raise Problem(f"model {name!r} has no version {version} in MLflow (versions: {', '.join(known) or 'none'})", UNHEALTHY)
    return section


@cli.command()
@click.argument("name", callback=_name)
@click.option("--model-dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Hugging Face sequence-classification directory (config.json with id2label, weights, tokenizer)")
@click.option("--metric", "metrics", multiple=True, callback=_metric, metavar="NAME=VALUE", help="repeatable")
@click.option("--flavor", type=click.Choice(["transformers", "pytorch-pickle", "pytorch-pt2", "pytorch-pt2-hf"]),
              default="transformers", show_default=True)
@click.option("--primary-metric", default="f1", show_default=True, help="the metric that decides whether `best` moves")
@click.option("--lower-is-better", is_flag=True)
@json_option
def publish(out: Output, name: str, model_dir: str, metrics: dict[str, float], flavor: str, primary_metric: str,
            lower_is_better: bool) -> None:
    """Register a model in MLflow (digest, tags, `best` if earned), refresh cache and backup, tell the services."""
    settings = load_settings()
    with quiet_stdout():
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        publisher = _publisher(settings)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            result = publisher.publish(name, model, tokenizer, metrics, flavor=flavor, primary_metric=primary_metric,
                                       greater_is_better=not lower_is_better)
        finally:
            publisher.close()
    data = {"ok": True, "record": result.record.to_dict(), "best_moved": result.best_moved, "previous_best": result.previous_best}

    def render(console: Any) -> None:
        _record_table(console, data["record"], f"published {name} version {result.record.version}")
        moved = f"best -> {result.record.version}" if result.best_moved else f"best stays at {result.previous_best}"
        console.print(f"[green]✓[/] {moved}")

    out.done(data, render)


@cli.command()
@click.argument("name", callback=_name)
@click.argument("version", callback=_version)
@click.option("--alias", default=BEST, show_default=True)
@json_option
def promote(out: Output, name: str, version: str, alias: str) -> None:
    """Point an alias at a version in MLflow, refresh cache and backup, tell the services."""
    settings = load_settings()
    with quiet_stdout():
        publisher = _publisher(settings)
        try:
            if Selector.parse(alias).kind != "alias":  # before asking MLflow: the caller's mistake (exit 2)
                raise config_problem(f"{alias!r} cannot be set as an alias ('latest' is the highest version, and numbers are versions)")
            section = _registered_version(publisher, name, version)
            before = section.select(Selector.parse(alias), custom_aliases=True)
            record = publisher.promote(name, version, alias)
        finally:
            publisher.close()
    data = {"ok": True, "model": name, "alias": alias, "version": record.version,
            "previous": before.version if before is not None else None, "record": record.to_dict()}
    out.done(data, lambda console: console.print(
        f"[green]✓[/] {name}@{alias}: {data['previous'] or 'unset'} -> {record.version}; cache and backup refreshed"))


@cli.command()
@click.argument("name", callback=_name)
@click.argument("version", callback=_version)
@click.option("--alias", default=None, help="remove only this alias from the version; the version stays")
@click.option("--primary-metric", default="f1", show_default=True, help="the metric that decides where `best` moves")
@click.option("--lower-is-better", is_flag=True)
@json_option
def revoke(out: Output, name: str, version: str, alias: Optional[str], primary_metric: str, lower_is_better: bool) -> None:
    """Take a version out of service: delete it (its aliases go; `best` moves), or remove one alias."""
    settings = load_settings()
    with quiet_stdout():
        publisher = _publisher(settings)
        try:
            section = _registered_version(publisher, name, version)
            if alias is not None:
                held = next(r for r in section.versions if r.version == version).aliases
                if alias not in held:
                    raise Problem(f"alias {alias!r} of model {name!r} is not on version {version} in MLflow "
                                  f"(its aliases: {', '.join(held) or 'none'})", UNHEALTHY)
            result = publisher.revoke(name, version, alias=alias, primary_metric=primary_metric,
                                      greater_is_better=not lower_is_better)
        finally:
            publisher.close()
    data = {"ok": True, **result}

    def render(console: Any) -> None:
        what = "deleted" if result["deleted"] else f"alias {alias} removed"
        best = f"; best -> {result['best']}" if result.get("best") else ""
        console.print(f"[green]✓[/] {name} version {version} {what}{best}; cache and backup refreshed")

    out.done(data, render)


def main(argv: Optional[list[str]] = None) -> int:
    """The console script: runs the command and returns its exit code."""
    try:
        cli.main(args=argv, prog_name="registry", standalone_mode=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return OK


__all__ = ["cli", "main", "Problem"]
