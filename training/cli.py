"""`registry-publish` / `python -m training.cli`: the write side and a resolver probe, as commands.

    python -m training.cli publish --name prompt_injection --model-dir ./out --metric f1=0.93 --metric accuracy=0.95
    python -m training.cli refresh --name prompt_injection      # rebuild cache + backup from MLflow
    python -m training.cli resolve --name prompt_injection --selector best
    python -m training.cli promote --name prompt_injection --version 3 --alias best
    python -m training.cli revoke --name prompt_injection --version 3          # delete it; `best` moves
    python -m training.cli revoke --name prompt_injection --version 3 --alias champion

Settings come from the same variables as the service (`MLFLOW_TRACKING_URI`, `REGISTRY_*`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from typing import Optional

from registry.errors import RegistryError
from registry.settings import RegistrySettings


def _metric(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, float(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"metric {name!r}: {value!r} is not a number") from exc


def main(argv: Optional[list[str]] = None) -> int:
    from training.publisher import FLAVORS

    parser = argparse.ArgumentParser(prog="registry-publish", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    pub = sub.add_parser("publish", help="register a Hugging Face sequence-classification directory in MLflow")
    pub.add_argument("--name", required=True, help="model name (registered as <prefix><name>)")
    pub.add_argument("--model-dir", required=True, help="directory with config.json (id2label), weights and tokenizer")
    pub.add_argument("--metric", type=_metric, action="append", default=[], help="NAME=VALUE, repeatable")
    pub.add_argument("--flavor", choices=FLAVORS, default="transformers")
    pub.add_argument("--primary-metric", default="f1", help="metric that decides whether `best` moves")
    pub.add_argument("--lower-is-better", action="store_true")
    ref = sub.add_parser("refresh", help="rebuild the cache and the file backup from MLflow")
    ref.add_argument("--name", required=True)
    pro = sub.add_parser("promote", help="point an alias at a version, refresh cache + backup, tell the services")
    pro.add_argument("--name", required=True)
    pro.add_argument("--version", required=True)
    pro.add_argument("--alias", default="best")
    rev = sub.add_parser("revoke", help="delete a version (or remove one alias from it), refresh cache + backup, tell the services")
    rev.add_argument("--name", required=True)
    rev.add_argument("--version", required=True)
    rev.add_argument("--alias", default=None, help="remove only this alias; the version stays")
    rev.add_argument("--primary-metric", default="f1", help="metric that decides where `best` moves")
    rev.add_argument("--lower-is-better", action="store_true")
    res = sub.add_parser("resolve", help="walk the chain and print the record and the trail")
    res.add_argument("--name", required=True)
    res.add_argument("--selector", default=None, help="latest, best, an alias or a version (default REGISTRY_ALIAS)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")

    # MLflow prints progress to stdout; keep stdout for the JSON answer only.
    out = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):
            answer = _run(args)
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(answer, indent=2), file=out)
    return 0


def _run(args: argparse.Namespace) -> dict:
    settings = RegistrySettings.from_env()
    if args.command == "resolve":
        from registry.resolver import Resolver

        resolution = Resolver.from_settings(settings).resolve(args.name, args.selector or settings.alias)
        return {"record": resolution.record.to_dict(), "trail": resolution.trail_dicts()}
    from training.publisher import Publisher

    publisher = Publisher(settings)
    try:
        if args.command == "refresh":
            record = publisher.refresh(args.name)
            publisher.announce(args.name)
            return record.to_dict() if record else {"model": args.name, "versions": []}
        if args.command == "promote":
            return publisher.promote(args.name, args.version, args.alias).to_dict()
        if args.command == "revoke":
            return publisher.revoke(args.name, args.version, alias=args.alias, primary_metric=args.primary_metric,
                                    greater_is_better=not args.lower_is_better)
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(args.model_dir).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        result = publisher.publish(args.name, model, tokenizer, dict(args.metric), flavor=args.flavor,
                                   primary_metric=args.primary_metric, greater_is_better=not args.lower_is_better)
        return {"record": result.record.to_dict(), "best_moved": result.best_moved, "previous_best": result.previous_best}
    finally:
        publisher.close()


if __name__ == "__main__":
    sys.exit(main())
