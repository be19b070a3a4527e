"""Where a served model comes from: an MLflow registry alias or version, another MLflow URI, or a bundle path.

Parsing is separate from loading so the command line can reject a malformed URI before anything starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

SourceKind = Literal["alias", "version", "mlflow", "path"]

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))/?$")


@dataclass(frozen=True)
class ModelSource:
    """A parsed model location; `registered_name` is set for models:/ URIs."""

    uri: str
    kind: SourceKind
    registered_name: str | None = None
    alias: str | None = None
    version: str | None = None

    @property
    def watchable(self) -> bool:
        """Only an alias can move to another version, so only aliases are polled for hot reload."""
        return self.kind == "alias"


def parse_model_source(uri: str) -> ModelSource:
    """Parse `uri`; raises ValueError naming the expected forms."""
    text = uri.strip()
    if not text:
        raise ValueError(
            "model URI is empty: expected models:/<name>@<alias>, models:/<name>/<version> or a path"
        )
    if text.startswith("models:/"):
        match = _MODELS_URI.match(text)
        if match is None:
            raise ValueError(
                f"model URI {text!r} is malformed: expected models:/<name>@<alias> or "
                "models:/<name>/<version>"
            )
        if match["alias"]:
            return ModelSource(text, "alias", match["name"], alias=match["alias"])
        return ModelSource(text, "version", match["name"], version=match["version"])
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:/", text) and not text.startswith("file:"):
        return ModelSource(text, "mlflow")
    path = text.removeprefix("file://").removeprefix("file:")
    return ModelSource(str(Path(path).expanduser()), "path")
