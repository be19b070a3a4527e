"""Loading a bundle for serving: the task is checked and the model warmed up before it can serve."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fieldkube.serving.served_model import ModelCheckError, load_served_model
from fieldkube.vision.bundle import save_bundle
from fieldkube.vision.models import build_model

PARAMS = {"width": 0.25}


@pytest.fixture
def counter_bundle(tmp_path):
    torch.manual_seed(0)
    save_bundle(tmp_path / "counter", build_model("counter-mcnn", **PARAMS), "counter-mcnn", PARAMS, tile=32)
    return tmp_path / "counter"


def test_bundle_of_the_other_task_is_refused(counter_bundle) -> None:
    with pytest.raises(ModelCheckError, match="is a counter model, expected a segmenter model"):
        load_served_model(counter_bundle, "segmenter", None, None, torch.device("cpu"), str(counter_bundle))


def test_local_bundle_is_versioned_by_its_weights_and_serves_tiles(counter_bundle) -> None:
    model = load_served_model(counter_bundle, "counter", None, None, torch.device("cpu"), "here")
    assert (model.name, model.architecture, model.tile) == ("counter-mcnn", "counter-mcnn", 32)
    assert model.version.startswith("local-") and len(model.version) == len("local-") + 12
    out = model.forward(np.zeros((3, 3, 32, 32), dtype=np.float32))
    assert out.shape == (3, 1, 32, 32) and np.isfinite(out).all()
