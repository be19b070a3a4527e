"""Plain-dict TrainingJobs, MPIJobs and pods for the operator's pure parts."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture
def tj() -> dict[str, Any]:
    return {
        "apiVersion": "fieldkube.io/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {
            "name": "flowers",
            "namespace": "team-a",
            "uid": "0f9a-uid",
            "generation": 1,
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {"dataset": {"path": "prepared/canola"}, "workers": 2, "gpusPerWorker": 4},
    }
