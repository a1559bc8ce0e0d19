"""Issue #17: the object mask the cpu backend used is one of the task's files, so a user can
see why a model looks wrong."""

from __future__ import annotations

import io

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from serve_app.service import Services
from tests.integration.test_api_worker import make_worker, submit


def test_mask_is_stored_with_the_task(client: TestClient, services: Services) -> None:
    task = submit(client)
    assert make_worker(services).run_once()
    done = client.get(f"/api/v1/task/{task['id']}").json()
    assert done["status"] == "succeeded"
    response = client.get(f"/api/v1/task/{task['id']}/result/mask")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    mask = np.asarray(Image.open(io.BytesIO(response.content)))
    assert mask.ndim == 2 and set(np.unique(mask).tolist()) == {0, 255}
    # The object is a minority of the frame, and it is there.
    assert 0.01 < (mask == 255).mean() < 0.9
