"""ControlNet jobs through the whole stack: a GPU worker serving a ControlNet
(T2I_CONTROLNETS, batching on), a job with a control image follows it, an identical request
is served from the first, another image is another partition, and bad uses are refused
before anything is enqueued. Real Redis, S3, Chroma and Celery workers, the tiny model."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import numpy as np
import pytest

from conftest import job_count, private_workers
from core.errors import InvalidRequest
from core.settings import Settings
from producer.client import Client
from tests.engine.shared import signed_pixels, square_png, tiny_controlnet
from workers.builtin_models import build_tiny_pipeline

pytestmark = pytest.mark.e2e

PROMPT = "a lighthouse on a cliff"


@pytest.fixture(scope="module")
def controlled(s3_server: Settings, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[Settings]:
    path = tiny_controlnet(build_tiny_pipeline().unet, tmp_path_factory.mktemp("edges"))
    with private_workers(s3_server, tmp_path_factory.mktemp("controlnet"), "controlnet",
                         gpu_batch=2, controlnets=f"edges={path}") as config:
        yield config


def square_at(x: int, size: int = 64) -> str:
    return "data:image/png;base64," + base64.b64encode(square_png(x, size)).decode()


def test_a_controlled_job_follows_its_image_and_repeats_are_served_from_it(controlled):
    client = Client(controlled)
    params = {"steps": 8, "seed": 3, "width": 64, "height": 64}
    left = client.wait(client.submit(PROMPT, controlnet={"name": "edges",
                                                         "image": square_at(4)}, **params), 180)
    plain = client.wait(client.submit(PROMPT, **params), 180)
    assert left["state"] == plain["state"] == "succeeded", left["error"]
    assert left["request"]["controlnet"]["name"] == "edges"
    assert np.abs(signed_pixels(client.result(left["id"])) - signed_pixels(client.result(plain["id"]))
                  ).mean() > 3
    again = client.wait(client.submit(PROMPT, controlnet={"name": "edges",
                                                          "image": square_at(4)}, **params), 180)
    assert again["cache"]["route"] == "exact"
    right = client.wait(client.submit(PROMPT, controlnet={"name": "edges",
                                                          "image": square_at(36)}, **params),
                        180)
    assert right["state"] == "succeeded" and right["cache"]["route"] == "full"


def test_bad_controlnet_uses_are_refused_and_enqueue_nothing(controlled):
    client, before = Client(controlled), job_count(controlled)
    for control, field in (({"name": "depth", "image": square_at(4)}, "controlnet.name"),
                           ({"name": "edges", "image": square_at(4, size=32)},
                            "controlnet.image"),
                           ({"name": "edges", "image": "not an image"}, "controlnet.image")):
        with pytest.raises(InvalidRequest) as refused:
            client.submit(PROMPT, controlnet=control, width=64, height=64)
        assert refused.value.field == field
    assert job_count(controlled) == before
