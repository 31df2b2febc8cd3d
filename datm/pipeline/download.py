"""Step download: the configured dataset -> data/{train,test}.safetensors."""

from __future__ import annotations

from .. import data
from ..config import Params, Paths


def download_data(params: Params, paths: Paths) -> dict:
    """Read the dataset and save its splits. The artifacts name the dataset, not the folder it
    was read from (Debian's copy, torchvision's layout, ...): the same images give the same
    bytes on every machine. The folder is in the returned summary, for the console."""
    train, test = data.load(params.data)
    where = train.source
    label = params.data.root if params.data.name == "imagefolder" else params.data.name
    train.source = test.source = label
    train.save(paths.train, "train")
    test.save(paths.test, "test")
    return {"train_images": len(train.labels), "test_images": len(test.labels),
            "classes": train.num_classes, "shape": list(train.shape), "source": where}
