"""`registry-publish` / `python -m training.cli`: the write side and a resolver probe, as commands.

    python -m training.cli publish --name prompt_injection --model-dir ./out --metric f1=0.93 --metric accuracy=0.95
    python -m training.cli refresh --name prompt_injection      # rebuild cache + backup from MLflow
    python -m training.cli resolve --name prompt_injection --selector best

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
            return publisher.refresh(args.name).to_dict()
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
