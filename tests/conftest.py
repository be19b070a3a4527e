"""Settings for the whole test session, applied before any test module imports MLflow.

MLflow's telemetry client, started when mlflow is imported, fetches its configuration in a background
thread; where that fails (no network, as here) the thread removes `_MLFLOW_TELEMETRY_SESSION_ID` from
`os.environ`. urllib reads the proxy settings by iterating `os.environ` on every request, so a request made
by MLflow's client at that moment fails with `KeyError: '_MLFLOW_TELEMETRY_SESSION_ID'`
(tests/integration/serving/test_hot_reload.py hit it once). With telemetry off, mlflow's import removes
the variable once, before any thread exists. Subprocesses (servers, trainers) inherit the setting.
"""

from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
