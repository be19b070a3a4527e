"""`fieldkube-serve`: read flags (or FIELDKUBE_SERVE_* environment variables) and run the service."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fieldkube.serving.model_source import parse_model_source
from fieldkube.serving.settings import ServeSettings, SettingsError, build_settings, field_env_name
from fieldkube.vision.bundle import SPEC_FILE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fieldkube-serve",
        description="Serve the fieldkube flower counter and building segmenter over HTTP "
        "(/v1 API, /v2 Open Inference Protocol, / web page, /metrics). Every flag can also be set by the "
        "environment variable shown; MLFLOW_TRACKING_URI is honoured too.",
    )
    for name, info in ServeSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{info.description or name} [env {field_env_name(name)}]"
        if info.default is not None:
            help_text += f" (default {info.default})"
        parser.add_argument(flag, dest=name, default=None, help=help_text)
    return parser


def parse_settings(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> ServeSettings:
    """Settings from flags over the environment; exits with a one-line message on bad values."""
    parser = _parser()
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {key: value for key, value in vars(args).items() if value is not None}
    try:
        settings = build_settings(overrides, environ)
        for flag in ("counter", "segmenter"):
            uri = getattr(settings, flag)
            if uri:
                try:
                    source = parse_model_source(uri)
                except ValueError as error:
                    raise SettingsError(f"{flag}: {error}") from None
                if source.kind == "path" and not (Path(source.uri) / SPEC_FILE).is_file():
                    raise SettingsError(
                        f"{flag}: {source.uri} is not a model bundle directory (expected {SPEC_FILE} and "
                        "model.safetensors in it), nor a models:/<name>@<alias> URI"
                    )
    except SettingsError as error:
        parser.error(str(error))
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from fieldkube.serving.server import serve

    serve(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
