"""The MLflow pyfunc model: (history, current) RGB images in, anomaly probability map out.

This file is logged as MLflow "models from code" (see `anodfd.registry`): MLflow copies it into the model and runs
it at load time, so nothing is pickled. The weights, config and calibrated threshold come from the checkpoint
artifact, read with ``torch.load(weights_only=True)``. Loading needs only `anodfd` (and its dependencies) importable.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np

from anodfd.config import ConfigError
from anodfd.inference import pair_map
from anodfd.train.loop import load_checkpoint, model_from_checkpoint, resolve_device

CHECKPOINT_KEY = "checkpoint"  # the name of the checkpoint in the model's `artifacts`


def as_image_list(x: Any, name: str) -> list[np.ndarray]:
    """An NxHxWx3 batch, or a length-N object array of HxWx3 images -> a list of images.

    Through MLflow (`mlflow.pyfunc.load_model(...).predict`) the logged signature requires the batch axis: send one
    pair as ``image[None]``. Called directly, a single HxWx3 image is accepted too.
    """
    x = np.asarray(x)
    if x.dtype == object:  # a "ragged" batch: images of different sizes
        images = [np.asarray(im) for im in x]
    elif x.ndim == 3:
        images = [x]
    elif x.ndim == 4:
        images = list(x)
    else:
        raise ConfigError(f"{name}: expected HxWx3 or NxHxWx3 uint8 RGB, got shape {x.shape}")
    for im in images:
        if im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8:
            raise ConfigError(f"{name}: expected HxWx3 uint8 RGB images, got {im.dtype} {im.shape}")
    return images


class AnomalyMapModel(mlflow.pyfunc.PythonModel):
    """pyfunc inputs ``history`` and ``current``; output float32 probabilities at each current image's size."""

    # MLflow would otherwise ask for a type hint on `predict`'s input; it accepts none for a dict of arrays, and
    # the logged TensorSpec signature already validates the inputs.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        ckpt = load_checkpoint(context.artifacts[CHECKPOINT_KEY])
        self.device = resolve_device("auto")
        self.model, config = model_from_checkpoint(ckpt, self.device)
        self.data = config.data  # the view and window training used: `pair_map` feeds the network the same way
        self.threshold = float(ckpt.get("threshold", config.train.threshold))

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        """``{"history": NxHxWx3, "current": NxHxWx3}`` uint8 RGB -> NxHxW float32 maps (an object array of HxW maps
        for a ragged batch). One pair is a batch of one: ``{"history": h[None], "current": c[None]}``."""
        try:
            hist, cur = model_input["history"], model_input["current"]
        except (KeyError, TypeError, IndexError):
            raise ConfigError("input must be a dict with arrays 'history' and 'current'") from None
        hists, curs = as_image_list(hist, "history"), as_image_list(cur, "current")
        if len(hists) != len(curs):
            raise ConfigError(f"{len(hists)} history images but {len(curs)} current images")
        maps = []
        for i, (h, c) in enumerate(zip(hists, curs)):
            # One pair at a time, its tiles batched: memory stays bounded however many or large the pairs are.
            try:
                maps.append(pair_map(self.model, self.data, h, c, self.device)[0].astype(np.float32))
            except ConfigError as e:
                raise ConfigError(f"pair {i}: {e}") from None
        cur = np.asarray(cur)
        if cur.dtype == object:
            out = np.empty(len(maps), dtype=object)  # np.array(maps) would try to broadcast maps of different sizes
            out[:] = maps
            return out
        return maps[0] if cur.ndim == 3 else np.stack(maps)


mlflow.models.set_model(AnomalyMapModel())
