"""Step zca: fit ZCA whitening on the training images -> artifacts/zca.safetensors."""

from __future__ import annotations

import time

from .. import data
from ..config import Params, Paths
from ..zca import ZCA, fit


def fit_zca(params: Params, paths: Paths) -> dict:
    train = data.Split.load(paths.train)
    if not params.zca.enabled:
        ZCA().save(paths.zca)
        return {"enabled": False}
    tic = time.perf_counter()
    # Raw [0, 1] pixels, not normalized ones, as the reference (see data.to_model_space). On the
    # compute device: Tiny ImageNet's 12288-dim fit takes minutes on a CPU, seconds on a GPU.
    images = train.images.to(params.torch_device())
    zca = fit(images, params.zca.eps, scale=1 / 255)
    zca.save(paths.zca, {"eps": params.zca.eps})
    return {"enabled": True, "eps": params.zca.eps, "seconds": time.perf_counter() - tic}
