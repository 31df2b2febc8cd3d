"""Step download: the configured dataset -> data/{train,test}.safetensors."""

from __future__ import annotations

from .. import data
from ..config import Params, Paths


def download(params: Params, paths: Paths) -> dict:
    train, test = data.load(params.data)
    train.save(paths.train, "train")
    test.save(paths.test, "test")
    return {"train_images": len(train.labels), "test_images": len(test.labels),
            "classes": train.num_classes, "shape": list(train.shape), "source": train.source}
