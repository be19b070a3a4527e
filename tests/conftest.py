"""Settings for the whole test session, applied before any test module imports MLflow, and helpers the
unit and integration trees share (as fixtures: the test modules import no helper modules).

MLflow's telemetry client, started when mlflow is imported, fetches its configuration in a background
thread; where that fails (no network, as here) the thread removes `_MLFLOW_TELEMETRY_SESSION_ID` from
`os.environ`. urllib reads the proxy settings by iterating `os.environ` on every request, so a request made
by MLflow's client at that moment fails with `KeyError: '_MLFLOW_TELEMETRY_SESSION_ID'`
(tests/integration/serving/test_hot_reload.py hit it once). With telemetry off, mlflow's import removes
the variable once, before any thread exists. Subprocesses (servers, trainers) inherit the setting.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Sequence

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

PngChunks = Callable[[Sequence[tuple[bytes, bytes]]], bytes]


def _png_from_chunks(chunks: Sequence[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(
        len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
        for kind, data in chunks
    )
    return b"\x89PNG\r\n\x1a\n" + body


@pytest.fixture
def png_from_chunks() -> PngChunks:
    """A PNG file from (type, data) chunks, each given its length and CRC: for PNGs laid out as no
    encoder writes them (an eXIf after the pixels, a header with no pixels at all)."""
    return _png_from_chunks
