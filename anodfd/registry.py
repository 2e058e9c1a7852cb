"""The MLflow Model Registry: one registered model per dataset (``anodfdnet-<dataset>``), with a champion gate.

Each registration logs a checkpoint as an MLflow pyfunc model ("models from code": `anodfd/serving.py`, with the
checkpoint as its only artifact, so nothing is pickled), makes it a new version, points the ``challenger`` alias at
it, and moves ``champion`` only when its test F1 beats the champion's on the same data (the same fingerprint of
the split lists and files). F1 measured on different data is not comparable, so that case never moves champion
on its own; `promote` moves an alias explicitly.

Like `anodfd.tracking`, everything takes the URI explicitly (registry URI = tracking URI) and uses the explicit
client, never MLflow's process-wide fluent state.
"""

from __future__ import annotations

import importlib.metadata
import math
import re
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from anodfd.config import ConfigError
from anodfd.tracking import check_tracking, client

PREFIX = "anodfdnet-"
CHAMPION, CHALLENGER = "champion", "challenger"
SERVING_CODE = Path(__file__).with_name("serving.py")
CHECKPOINT_FILE = "checkpoint.pt"
# pyfunc copies `artifacts={"checkpoint": .../checkpoint.pt}` to this path inside the model
CHECKPOINT_ARTIFACT = f"artifacts/{CHECKPOINT_FILE}"
# Packages the pyfunc model imports, pinned to what logged it (`anodfd` itself comes from this repository).
REQUIREMENTS = ("torch", "torchvision", "timm", "numpy", "opencv-python-headless", "mlflow")
MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))")


class RegistryError(ConfigError):
    """A registered model, version or alias that does not exist, or cannot be used as asked."""


@dataclass
class Registration:
    name: str
    version: int
    champion: bool  # whether this version now holds the champion alias
    reason: str  # why champion moved or not, for people


def model_name(dataset: str) -> str:
    """``OL`` -> ``anodfdnet-OL``: one registered model per dataset."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", dataset or ""):
        raise RegistryError(f"dataset name {dataset!r} cannot name a registered model; use letters, digits, . _ -")
    return PREFIX + dataset


# --- registering -----------------------------------------------------------------------------------------


def decide_champion(f1: float, fingerprint: str, champion) -> tuple[bool, str]:
    """Whether a new version with test ``f1`` on data ``fingerprint`` takes over from ``champion`` (a ModelVersion
    or None), and why. Strictly better on the same data only: a tie keeps the incumbent."""
    if champion is None:
        return True, f"no champion yet, so this version (test F1 {f1:.6g}) becomes champion"
    v, old_fp, old_f1 = champion.version, champion.tags.get("fingerprint"), champion.tags.get("test_f1")
    if old_fp != fingerprint:
        return False, (
            f"champion v{v} was scored on data {old_fp}, this version on {fingerprint}: their test F1 are not "
            "comparable, so champion stays; `anodfd models promote` moves it explicitly"
        )
    if old_f1 is None:
        return False, f"champion v{v} has no test_f1 tag to compare with, so champion stays"
    if f1 > float(old_f1):
        return True, f"test F1 {f1:.6g} beats champion v{v}'s {float(old_f1):.6g} on data {fingerprint}"
    return False, f"test F1 {f1:.6g} does not beat champion v{v}'s {float(old_f1):.6g} on data {fingerprint}"


def log_and_register(
    uri: str, checkpoint: str | Path, dataset: str, test_metrics: dict[str, float], fingerprint: str,
    run_id: str, tags: dict[str, str] | None = None,
) -> Registration:
    """Log ``checkpoint`` as a pyfunc model in run ``run_id``, register it as a new version of
    ``anodfdnet-<dataset>`` with ``challenger`` on it, and give it ``champion`` if it passes `decide_champion`.

    ``test_metrics`` are the test split's metrics (keys ``f1``, ``iou``, ... or ``test_f1``, ...); each becomes
    a ``test_<key>`` version tag, as do ``dataset``, ``fingerprint``, ``search_run_id``, the code version and ``tags``.
    """
    from mlflow.entities import LoggedModelOutput
    from mlflow.exceptions import MlflowException

    from anodfd.train.loop import load_checkpoint

    name = model_name(dataset)
    metrics = {k.removeprefix("test_"): float(v) for k, v in test_metrics.items()}
    f1 = metrics.get("f1", math.nan)
    if not 0.0 <= f1 <= 1.0:  # also catches NaN and a missing F1
        raise RegistryError(f"test_metrics needs an F1 in [0, 1] to register a model; got {test_metrics}")
    check_tracking(uri)
    ckpt = load_checkpoint(checkpoint)  # a clear error for a bad path, before anything is logged
    c = client(uri)
    try:
        experiment = c.get_run(run_id).info.experiment_id
    except MlflowException as e:
        raise RegistryError(f"MLflow run {run_id} not found at {uri} ({e.message})") from None

    version_tags = {
        **{f"test_{k}": str(v) for k, v in metrics.items()},
        "dataset": dataset, "fingerprint": fingerprint, "search_run_id": run_id, **code_version(),
        **{k: str(v) for k, v in (tags or {}).items()},
    }
    model_id = _log_pyfunc(uri, ckpt, experiment, run_id, version_tags)
    c.log_outputs(run_id, [LoggedModelOutput(model_id, step=0)])  # the run's "Logged models" list shows it

    try:
        c.create_registered_model(name, description=f"AnoDFDNet on {dataset}; aliases: champion, challenger")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    champion = _version_by_alias(c, name, CHAMPION)
    take, reason = decide_champion(f1, fingerprint, champion)
    mv = c.create_model_version(name, source=f"models:/{model_id}", run_id=run_id, model_id=model_id,
                                tags=version_tags)
    c.set_model_version_tag(name, mv.version, "registration_decision", reason)
    c.set_registered_model_alias(name, CHALLENGER, mv.version)
    if take:
        c.set_registered_model_alias(name, CHAMPION, mv.version)
    return Registration(name, int(mv.version), take, reason)


def _log_pyfunc(uri: str, ckpt: dict, experiment: str, run_id: str, tags: dict[str, str]) -> str:
    """Save the pyfunc model locally, upload it as a LoggedModel of ``run_id``; returns the model id.

    This is what ``mlflow.pyfunc.log_model`` does, but through the explicit client: the fluent call would need
    the run made active (``mlflow.start_run``), which changes the search run's status and the process's URI.
    """
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import Model

    from anodfd.serving import CHECKPOINT_KEY

    c = client(uri)
    logged = c.create_logged_model(experiment, name="anodfdnet", source_run_id=run_id, tags=tags)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            slim = Path(tmp) / CHECKPOINT_FILE
            torch.save({**ckpt, "optimizer": None}, slim)  # serving needs no optimizer state (2/3 of the bytes)
            image_size = ckpt["config"]["data"]["image_size"]
            example = np.linspace(0, 255, 48 * 64 * 3).astype(np.uint8).reshape(1, 48, 64, 3)
            mlflow.pyfunc.save_model(
                Path(tmp) / "model", python_model=str(SERVING_CODE), artifacts={CHECKPOINT_KEY: str(slim)},
                signature=signature(), input_example={"history": example, "current": example[:, ::-1].copy()},
                pip_requirements=[_pinned(p) for p in REQUIREMENTS],
                metadata={"threshold": float(ckpt.get("threshold", 0.5)), "image_size": image_size},
                mlflow_model=Model(artifact_path=logged.artifact_location, run_id=run_id, model_id=logged.model_id,
                                   model_uuid=logged.model_id),
            )
            c.log_model_artifacts(logged.model_id, str(Path(tmp) / "model"))
    except BaseException:
        c.finalize_logged_model(logged.model_id, "FAILED")
        raise
    c.finalize_logged_model(logged.model_id, "READY")
    return logged.model_id


def signature():
    """Named uint8 RGB inputs of any size (a batch of N), float32 probability maps out."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    image = (-1, -1, -1, 3)
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), image, "history"),
                       TensorSpec(np.dtype(np.uint8), image, "current")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1), "anomaly_map")]),
    )


def _pinned(package: str) -> str:
    try:
        return f"{package}=={importlib.metadata.version(package)}"
    except importlib.metadata.PackageNotFoundError:
        return package


def code_version() -> dict[str, str]:
    """``code_version`` (the package version) and, in a git checkout, ``git_commit`` (``-dirty`` if modified)."""
    import anodfd

    version = getattr(anodfd, "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version("anodfd")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
    tags = {"code_version": str(version)}
    root = Path(anodfd.__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    # Only when the package sits at the top of its own checkout, not in some unrelated repository.
    if git("rev-parse", "--show-toplevel") == str(root) and (commit := git("rev-parse", "HEAD")):
        dirty = git("status", "--porcelain", "--untracked-files=no")
        tags["git_commit"] = commit + ("-dirty" if dirty else "")
    return tags


# --- looking up ------------------------------------------------------------------------------------------


def _version_by_alias(c, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _require_model(uri: str, name: str):
    """The registered model, or a one-line error naming what is registered there."""
    from mlflow.exceptions import MlflowException

    check_tracking(uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        # Looking something up must not create an empty store as a side effect.
        raise RegistryError(f"no MLflow store at {uri}; pass --mlflow-uri or set MLFLOW_TRACKING_URI")
    c = client(uri)
    try:
        return c.get_registered_model(name)
    except MlflowException:
        known = sorted(m.name for m in c.search_registered_models())
        raise RegistryError(
            f"no registered model {name} at {uri}; registered there: {', '.join(known) or 'none'}"
        ) from None


def list_versions(uri: str, dataset: str) -> list[dict]:
    """Every version of ``anodfdnet-<dataset>``, oldest first: version, aliases, test metrics, fingerprint, ..."""
    name = model_name(dataset)
    model = _require_model(uri, name)
    aliases: dict[str, list[str]] = {}
    for alias, version in model.aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for mv in client(uri).search_model_versions(f"name = '{name}'"):
        rows.append({
            "version": int(mv.version),
            "aliases": sorted(aliases.get(str(mv.version), [])),
            **{k: float(v) for k, v in mv.tags.items() if k.startswith("test_")},
            "fingerprint": mv.tags.get("fingerprint"),
            "created": datetime.fromtimestamp(mv.creation_timestamp / 1000).strftime("%Y-%m-%d %H:%M:%S"),
            "run_id": mv.run_id,
            "tags": dict(mv.tags),
        })
    return sorted(rows, key=lambda r: r["version"])


def format_versions(rows: list[dict]) -> str:
    """The `anodfd models list` table."""
    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    lines = [f"{'version':>7}  {'aliases':<20} {'test F1':>7}  {'IoU':>6}  {'AUC':>6}  {'fingerprint':<16}  created"]
    for r in rows:
        lines.append(
            f"{r['version']:>7}  {','.join(r['aliases']) or '-':<20} {num(r.get('test_f1')):>7}  "
            f"{num(r.get('test_iou')):>6}  {num(r.get('test_auc')):>6}  {r['fingerprint'] or '-':<16}  {r['created']}"
        )
    return "\n".join(lines)


def promote(uri: str, dataset: str, version: int, alias: str = CHAMPION) -> None:
    """Point ``alias`` at ``version`` explicitly (no F1 gate: a person decided)."""
    from mlflow.exceptions import MlflowException

    name = model_name(dataset)
    _require_model(uri, name)
    c = client(uri)
    try:
        c.get_model_version(name, str(version))
    except MlflowException:
        versions = sorted(int(mv.version) for mv in c.search_model_versions(f"name = '{name}'"))
        raise RegistryError(f"{name} has no version {version}; versions: {versions or 'none'}") from None
    try:
        c.set_registered_model_alias(name, alias, str(version))
    except MlflowException as e:
        raise RegistryError(f"cannot set alias {alias!r} on {name} v{version}: {e.message}") from None


def resolve_version(uri: str, model_uri: str) -> tuple[str, int]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> (name, version), with a clear error if absent."""
    from mlflow.exceptions import MlflowException

    m = MODEL_URI.fullmatch(model_uri)
    if not m:
        raise RegistryError(f"{model_uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION, "
                            "e.g. models:/anodfdnet-OL@champion")
    name = m["name"]
    model = _require_model(uri, name)
    if m["alias"]:
        if m["alias"] not in model.aliases:
            raise RegistryError(f"{name} has no alias {m['alias']!r}; aliases: "
                                f"{', '.join(f'{a} -> v{v}' for a, v in sorted(model.aliases.items())) or 'none'}")
        return name, int(model.aliases[m["alias"]])
    try:
        client(uri).get_model_version(name, m["version"])
    except MlflowException:
        raise RegistryError(f"{name} has no version {m['version']}") from None
    return name, int(m["version"])


def load_checkpoint_from_registry(uri: str, model_uri: str) -> dict:
    """The checkpoint dict (``weights_only=True``) behind a registered version; its optimizer state is dropped."""
    import mlflow

    from anodfd.train.loop import load_checkpoint

    name, version = resolve_version(uri, model_uri)
    # Through the version's storage location: a models:/ artifact URI would be resolved against the process's
    # global registry URI, not ``uri``.
    location = client(uri).get_model_version_download_uri(name, str(version))
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{location.rstrip('/')}/{CHECKPOINT_ARTIFACT}", dst_path=tmp, tracking_uri=uri,
        )
        return load_checkpoint(path)
