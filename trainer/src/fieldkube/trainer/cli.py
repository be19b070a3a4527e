"""fieldkube-train: one entry point for every model and backend, configured by YAML and/or flags.

    fieldkube-train --config job.yaml --set train.epochs=5 --set tracking.alias=champion
    fieldkube-train --config job.yaml --init-from models:/fieldkube-counter@champion
    fieldkube-train --config-env FIELDKUBE_TRAINING_CONFIG     (one JSON document: how the operator runs it)
    horovodrun -np 2 -H localhost:2 --gloo fieldkube-train --config job.yaml
    torchrun --nproc-per-node 2 -m fieldkube.trainer.cli --config job.yaml --set runtime.backend=ddp

User mistakes (config, data, user code) end with one line naming the file/field and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from fieldkube.contract.config import load_config, load_config_document, training_config_json_schema
from fieldkube.trainer.errors import ConfigError, TrainerError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 143


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fieldkube-train", description="Train a fieldkube model.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--config", help="YAML file with sections model, data, train, checkpoint, tracking, ..."
    )
    source.add_argument(
        "--config-env",
        metavar="VAR",
        help="environment variable holding the whole configuration as one JSON document",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field, e.g. train.lr=0.001 (repeatable)",
    )
    parser.add_argument("--model", help="shortcut for model.name (built-in name or pkg.module:Class)")
    parser.add_argument("--dataset", help="shortcut for data.dataset (user dataset pkg.module:Class)")
    parser.add_argument("--data", help="shortcut for data.path")
    parser.add_argument(
        "--init-from",
        help="shortcut for model.init_from: start from models:/NAME@alias, models:/NAME/version, runs:/… "
        "or a bundle directory",
    )
    parser.add_argument("--print-schema", action="store_true", help="print the config JSON schema and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def _configure_logging() -> None:
    rank = next(
        (os.environ[k] for k in ("HOROVOD_RANK", "RANK", "OMPI_COMM_WORLD_RANK") if k in os.environ), "0"
    )
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format=f"%(asctime)s [rank {rank}] %(name)s %(message)s"
    )
    for noisy in ("mlflow", "urllib3", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def train_main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.print_schema:
        print(json.dumps(training_config_json_schema(), indent=2))
        return
    _configure_logging()
    overrides = list(args.overrides)
    shortcuts = (
        ("model", "model.name"),
        ("dataset", "data.dataset"),
        ("data", "data.path"),
        ("init_from", "model.init_from"),
    )
    for flag, key in shortcuts:
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    try:
        if args.config_env:
            document = os.environ.get(args.config_env)
            if document is None:
                raise ConfigError(f"--config-env {args.config_env}: the environment variable is not set")
            config = load_config_document(document, f"${args.config_env}", overrides)
        else:
            config = load_config(args.config, overrides)
        if args.print_config:
            print(json.dumps(config.model_dump(), indent=2))
            return
        from fieldkube.trainer.loop import run_training

        result = run_training(config)
    except TrainerError as exc:
        print(f"fieldkube-train: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("fieldkube-train: interrupted", file=sys.stderr)
        sys.exit(130)
    if result.report.get("interrupted"):
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    train_main()
