"""The MLflow pyfunc model: a (history, current) pair in, its anomaly map out; for Python callers and over HTTP.

Two inputs, told apart by type:
- a dict of uint8 RGB arrays ``{"history": NxHxWx3, "current": NxHxWx3}`` (Python callers) -> the float32 maps;
- a DataFrame with columns ``history`` and ``current`` holding encoded JPEG or PNG files (bytes, or base64 text as
  ``mlflow models serve`` receives them in JSON) -> a DataFrame with ``score``, ``anomalous_fraction``, ``boxes`` and
  ``map_png`` (the map as an 8-bit PNG), exactly what `anodfd predict` writes for the same files. A 2048x1536 pair
  is then two JPEGs of a few hundred kB, not 19 million numbers of JSON. The ``threshold`` param (default: the
  calibrated one) cuts the boxes.

The logged signature declares only that param: MLflow signatures are either tensor- or column-based and would
refuse one of the two inputs, so `predict` checks its input itself. A bad request raises an `MlflowException` with
INVALID_PARAMETER_VALUE, which the scoring server answers with HTTP 400 and the message (which column, which row,
what to send instead): an empty batch, a pair of two sizes, an image of more than `MAX_PIXELS` (read from the file's
header, before anything is decoded).

This file is logged as MLflow "models from code" (see `anodfd.registry`): MLflow copies it into the model and runs
it at load time, so nothing is pickled. The weights, config and calibrated threshold come from the checkpoint
artifact, read with ``torch.load(weights_only=True)``. Loading needs only `anodfd` (and its dependencies) importable.
An ``openvino`` artifact (an IR of `anodfd export --format openvino`, FP32 or INT8, of the same checkpoint) runs in
place of the network, on the CPU, with the checkpoint's view, window and threshold.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from typing import Any

import cv2
import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from PIL import Image, UnidentifiedImageError

from anodfd.checkpoint import inference_model, load_checkpoint
from anodfd.config import ConfigError
from anodfd.data.layouts import DatasetError
from anodfd.inference import pair_map, resolve_device
from anodfd.predict import analyse, check_threshold, map_png

CHECKPOINT_KEY = "checkpoint"  # the name of the checkpoint in the model's `artifacts`
OPENVINO_KEY = "openvino"  # an IR folder or .xml (`anodfd export --format openvino`), run instead of the network
INPUTS = ("history", "current")
ENCODED_OUTPUTS = ("score", "anomalous_fraction", "boxes", "map_png")
# Pixels of one image: 2048x1536 is 3.1 M. A 2.6 MB PNG can hold 30000x30000, 2.7 GB once decoded, and the maps
# take four times that in float32: one request must not be able to exhaust the server's memory.
MAX_PIXELS = 50_000_000


def check_pixels(width: int, height: int, where: str) -> None:
    if width * height > MAX_PIXELS:
        raise ConfigError(f"{where}: {width}x{height} is {width * height / 1e6:.0f} megapixels, over the served "
                          f"limit of {MAX_PIXELS / 1e6:g}; send it downscaled, or cut it into tiles")


def check_pair(i: int, h: np.ndarray, c: np.ndarray) -> None:
    """Both inputs refuse a pair of two sizes with this one message."""
    if h.shape[:2] != c.shape[:2]:
        raise ConfigError(f"row {i}: history is {h.shape[1]}x{h.shape[0]} but current is {c.shape[1]}x"
                          f"{c.shape[0]}; send the two images of a pair at the same size")


def as_image_list(x: Any, name: str) -> list[np.ndarray]:
    """An NxHxWx3 batch, or a length-N object array of HxWx3 images -> a list of images.

    One pair may come as a batch of one (``image[None]``) or as a bare HxWx3 image.
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
    if not images:
        raise ConfigError(f"{name}: an empty batch; send at least one pair")
    for i, im in enumerate(images):
        if im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8:
            raise ConfigError(f"{name}: expected HxWx3 uint8 RGB images, got {im.dtype} {im.shape}")
        check_pixels(im.shape[1], im.shape[0], f"row {i}, {name}")
    return images


def decode_image(value: Any, where: str) -> np.ndarray:
    """A JPEG or PNG file's bytes, or their base64 text (JSON), -> HxWx3 uint8 RGB, decoded as `anodfd predict`
    decodes files (OpenCV, then BGR to RGB)."""
    if isinstance(value, str):
        try:
            value = base64.b64decode(value)  # tolerant of the line breaks base64.encodebytes writes
        except (binascii.Error, ValueError):
            raise ConfigError(f"{where}: not valid base64; send the image file's bytes base64-encoded") from None
    if not isinstance(value, (bytes, bytearray)) or not value:
        raise ConfigError(f"{where}: expected a JPEG or PNG file (bytes, or base64 text in JSON), got "
                          f"{type(value).__name__ if value is not None else 'nothing'}")
    try:  # the size from the header alone; PIL refuses outright what it deems a decompression bomb
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(value)) as im:
                size = im.size
        check_pixels(*size, where)
    except Image.DecompressionBombError:
        raise ConfigError(f"{where}: far over the served limit of {MAX_PIXELS / 1e6:g} megapixels; send it "
                          "downscaled, or cut it into tiles") from None
    except (UnidentifiedImageError, OSError):
        pass  # not for PIL to judge: OpenCV decides below
    bgr = cv2.imdecode(np.frombuffer(value, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ConfigError(f"{where}: {len(value)} bytes that OpenCV cannot decode as an image; send a JPEG or PNG "
                          "file's bytes, base64-encoded")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


class AnomalyMapModel(mlflow.pyfunc.PythonModel):
    """pyfunc inputs ``history`` and ``current``; output float32 probabilities at each current image's size."""

    # MLflow would otherwise ask for a type hint on `predict`'s input; it accepts none for a dict of arrays, and
    # the logged TensorSpec signature already validates the inputs.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        ckpt = load_checkpoint(context.artifacts[CHECKPOINT_KEY])
        self.device = resolve_device("auto")
        self.model, config = inference_model(ckpt, self.device)
        if OPENVINO_KEY in context.artifacts:
            from anodfd.openvino_ir import ir_for

            self.model, self.device = ir_for(context.artifacts[OPENVINO_KEY], config), "cpu"
        self.data = config.data  # the view and window training used: `pair_map` feeds the network the same way
        self.threshold = float(ckpt.get("threshold", config.train.threshold))

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        """A DataFrame of encoded images -> a DataFrame of results; a dict of arrays -> maps (see the module doc)."""
        try:
            if isinstance(model_input, pd.DataFrame):
                return self.predict_encoded(model_input, (params or {}).get("threshold"))
            return self.predict_arrays(model_input)
        except (ConfigError, DatasetError) as e:
            raise MlflowException.invalid_parameter_value(str(e)) from None

    def predict_encoded(self, frame: pd.DataFrame, threshold: float | None = None) -> pd.DataFrame:
        """Columns ``history`` and ``current`` of JPEG/PNG files -> one row per pair: ``score``,
        ``anomalous_fraction``, ``boxes`` (regions above ``threshold``, in current-image pixels) and ``map_png``."""
        if frame.empty:
            raise ConfigError("an empty batch; send at least one pair (columns 'history' and 'current')")
        missing = [c for c in INPUTS if c not in frame.columns]
        if missing:
            raise ConfigError(f"missing column {', '.join(map(repr, missing))}: send columns 'history' and 'current' "
                              f"holding JPEG or PNG files, base64-encoded in JSON (got columns {list(frame.columns)})")
        threshold = check_threshold(float(self.threshold if threshold is None else threshold))
        rows = []
        for i, (hist, cur) in enumerate(zip(frame["history"], frame["current"])):
            h, c = decode_image(hist, f"row {i}, column 'history'"), decode_image(cur, f"row {i}, column 'current'")
            check_pair(i, h, c)
            result = analyse(self.model, self.data, h, c, threshold, self.device)
            rows.append({"score": result.score, "anomalous_fraction": result.anomalous_fraction,
                         "boxes": result.boxes, "map_png": map_png(result.probs)})
        return pd.DataFrame(rows, columns=list(ENCODED_OUTPUTS))

    def predict_arrays(self, model_input: Any):
        """``{"history": NxHxWx3, "current": NxHxWx3}`` uint8 RGB -> NxHxW float32 maps (an object array of HxW maps
        for a ragged batch; one HxW map for one bare HxWx3 pair)."""
        try:
            hist, cur = model_input["history"], model_input["current"]
        except (KeyError, TypeError, IndexError):
            raise ConfigError("input must be a dict with arrays 'history' and 'current', or a DataFrame with columns "
                              "'history' and 'current' of JPEG or PNG files") from None
        hists, curs = as_image_list(hist, "history"), as_image_list(cur, "current")
        if len(hists) != len(curs):
            raise ConfigError(f"{len(hists)} history images but {len(curs)} current images")
        for i, (h, c) in enumerate(zip(hists, curs)):  # all checked before the first is scored
            check_pair(i, h, c)
        maps = []
        for i, (h, c) in enumerate(zip(hists, curs)):
            # One pair at a time, its tiles batched: memory stays bounded however many or large the pairs are.
            try:
                maps.append(pair_map(self.model, self.data, h, c, self.device)[0].astype(np.float32))
            except (ConfigError, DatasetError) as e:
                raise ConfigError(f"pair {i}: {e}") from None
        cur = np.asarray(cur)
        if cur.dtype == object:
            out = np.empty(len(maps), dtype=object)  # np.array(maps) would try to broadcast maps of different sizes
            out[:] = maps
            return out
        return maps[0] if cur.ndim == 3 else np.stack(maps)


mlflow.models.set_model(AnomalyMapModel())
