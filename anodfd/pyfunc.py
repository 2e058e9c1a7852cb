"""The registered model as MLflow stores it: a pyfunc model ("models from code": `anodfd/serving.py`) whose only
artifact is the checkpoint, so nothing is pickled, logged as a LoggedModel of the search run with the card's
pictures beside it.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import tempfile
from pathlib import Path

from anodfd.card import CARD_DIR, view_text
from anodfd.tracking import client

SERVING_CODE = Path(__file__).with_name("serving.py")
CHECKPOINT_FILE = "checkpoint.pt"
# pyfunc copies `artifacts={"checkpoint": .../checkpoint.pt}` to this path inside the model
CHECKPOINT_ARTIFACT = f"artifacts/{CHECKPOINT_FILE}"
# Packages the pyfunc model imports, pinned to what logged it (`anodfd` itself comes from this repository).
REQUIREMENTS = ("torch", "torchvision", "timm", "numpy", "opencv-python-headless", "mlflow")


def log_pyfunc(uri: str, ckpt: dict, experiment: str, run_id: str, tags: dict[str, str],
                files: dict[str, Path] | None = None, artifacts: dict[str, str] | None = None) -> str:
    """Save the pyfunc model locally, upload it as a LoggedModel of ``run_id``; returns the model id.
    ``artifacts`` go in beside the checkpoint (`anodfd.serving`'s ``openvino``: an IR that runs in the network's place).

    This is what ``mlflow.pyfunc.log_model`` does, but through the explicit client: the fluent call would need
    the run made active (``mlflow.start_run``), which changes the search run's status and the process's URI.
    """
    import mlflow
    import torch
    from mlflow.models import Model

    from anodfd.serving import CHECKPOINT_KEY, OPENVINO_KEY

    artifacts = artifacts or {}
    requirements = REQUIREMENTS + (("openvino",) if OPENVINO_KEY in artifacts else ())
    c = client(uri)
    logged = c.create_logged_model(experiment, name="anodfdnet", source_run_id=run_id, tags=tags)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            slim = Path(tmp) / CHECKPOINT_FILE
            torch.save({**ckpt, "optimizer": None}, slim)  # serving needs no optimizer state (2/3 of the bytes)
            threshold = float(ckpt.get("threshold", 0.5))
            mlflow.pyfunc.save_model(
                Path(tmp) / "model", python_model=str(SERVING_CODE),
                artifacts={CHECKPOINT_KEY: str(slim), **artifacts},
                signature=signature(threshold), input_example=input_example(),
                pip_requirements=[_pinned(p) for p in requirements],
                metadata={"threshold": threshold,
                          "view": view_text(ckpt["config"]["data"])},
                mlflow_model=Model(artifact_path=logged.artifact_location, run_id=run_id, model_id=logged.model_id,
                                   model_uuid=logged.model_id),
            )
            for fname, path in (files or {}).items():  # the model card's pictures travel with the model
                (Path(tmp) / "model" / CARD_DIR).mkdir(exist_ok=True)
                shutil.copyfile(path, Path(tmp) / "model" / CARD_DIR / fname)
            c.log_model_artifacts(logged.model_id, str(Path(tmp) / "model"))
    except BaseException:
        c.finalize_logged_model(logged.model_id, "FAILED")
        raise
    c.finalize_logged_model(logged.model_id, "READY")
    return logged.model_id


def signature(threshold: float):
    """Only the ``threshold`` param (default: the calibrated one): the model takes either a dict of uint8 arrays or
    a DataFrame of encoded images (`anodfd.serving`), which no single MLflow input schema allows, so the model
    checks its input itself."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    return ModelSignature(inputs=None, outputs=None, params=ParamSchema([ParamSpec("threshold", "double", threshold)]))


def input_example():
    """A 64x48 PNG pair as a DataFrame: MLflow saves it as ``serving_input_example.json``, a ready request body."""
    import cv2
    import numpy as np
    import pandas as pd

    image = np.linspace(0, 255, 48 * 64 * 3).astype(np.uint8).reshape(48, 64, 3)
    files = [cv2.imencode(".png", x)[1].tobytes() for x in (image, image[::-1].copy())]
    return pd.DataFrame({"history": [files[0]], "current": [files[1]]})


def _pinned(package: str) -> str:
    try:
        return f"{package}=={importlib.metadata.version(package)}"
    except importlib.metadata.PackageNotFoundError:
        return package
