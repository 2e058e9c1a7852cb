"""The MLflow Model Registry: one registered model per dataset (``anodfdnet-<dataset>``), its versions and aliases.

Registering logs a checkpoint as a pyfunc model (`anodfd.pyfunc`) and makes it a new version carrying its model card
(`anodfd.card`: test scores under an evaluation protocol, the template-differencing floor, config, links). Which
version is ``champion`` is the gate's business (`anodfd.gate`, which also registers and promotes under its lease);
this module looks versions up, lists them, shows their alias moves and loads their checkpoints.

Like `anodfd.tracking`, everything takes the URI explicitly (registry URI = tracking URI) and uses the explicit
client, never MLflow's process-wide fluent state.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from anodfd.card import is_number, model_card
from anodfd.config import ConfigError
from anodfd.pyfunc import CHECKPOINT_ARTIFACT, CHECKPOINT_FILE, log_pyfunc
from anodfd.scoring import Scorecard
from anodfd.tracking import check_tracking, client, redact

PREFIX = "anodfdnet-"
CHAMPION, CHALLENGER = "champion", "challenger"
AUDIT_PREFIX = "audit."  # version tags audit.<time_ns> = {"alias", "previous", "reason", "time", "by"}
MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))")


class RegistryError(ConfigError):
    """A registered model, version or alias that does not exist, or cannot be used as asked."""


class ArtifactMissing(RegistryError):
    """A registered version whose checkpoint is gone from the artifact store: no retry brings it back."""


def model_name(dataset: str) -> str:
    """``OL`` -> ``anodfdnet-OL``: one registered model per dataset."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", dataset or ""):
        raise RegistryError(f"dataset name {dataset!r} cannot name a registered model; use letters, digits, . _ -")
    return PREFIX + dataset


def registered_name(c, dataset: str) -> str:
    """The registered model of ``dataset``, case-insensitively: ``ol`` finds ``anodfdnet-OL`` if that exists, so
    one dataset never gets two models (and two champions) that differ in case."""
    return _canonical(c, model_name(dataset))


def _canonical(c, name: str) -> str:
    for m in c.search_registered_models(f"name ILIKE '{name}'"):
        if m.name.lower() == name.lower():
            return m.name
    return name


# --- registering -----------------------------------------------------------------------------------------


def register_version(
    uri: str, checkpoint: str | Path, dataset: str, card: Scorecard, run_id: str,
    tags: dict[str, str] | None = None,
) -> tuple[str, int]:
    """The first half of `gate.log_and_register`: the logged model and its new version with its card, no alias yet.

    Version tags: the card's (`Scorecard.tags`: test metrics at 0.5 and calibrated, served threshold, protocol,
    floor, split sizes), ``dataset``, ``search_run_id``, ``config``, the code version, and ``tags``.
    """
    from mlflow.entities import LoggedModelOutput
    from mlflow.exceptions import MlflowException

    from anodfd.checkpoint import load_checkpoint

    for scores in (card.metrics, card.calibrated):  # at 0.5, and at the served threshold the gate compares
        if not 0.0 <= scores.get("f1", math.nan) <= 1.0:  # also catches NaN and a missing F1
            raise RegistryError(f"a scorecard needs a test F1 in [0, 1] to register a model; got {scores}")
    model_name(dataset)
    check_tracking(uri)
    ckpt = load_checkpoint(checkpoint)  # a clear error for a bad path, before anything is logged
    c = client(uri)
    name = registered_name(c, dataset)
    try:
        experiment = c.get_run(run_id).info.experiment_id
    except MlflowException as e:
        raise RegistryError(f"MLflow run {run_id} not found at {redact(uri)} ({redact(e.message)})") from None

    version_tags = {
        **card.tags(), "dataset": name.removeprefix(PREFIX), "search_run_id": run_id,
        "config": json.dumps(ckpt["config"], separators=(",", ":")), "epoch": str(ckpt.get("epoch", "")),
        **code_version(), **{k: str(v) for k, v in (tags or {}).items()},
    }
    model_id = log_pyfunc(uri, ckpt, experiment, run_id, version_tags, card.files)
    c.log_outputs(run_id, [LoggedModelOutput(model_id, step=0)])  # the run's "Logged models" list shows it

    try:
        c.create_registered_model(name, description=f"AnoDFDNet on {name.removeprefix(PREFIX)}; "
                                                    "aliases: champion, challenger")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    with _process_tracking_uri(uri):
        mv = c.create_model_version(name, source=f"models:/{model_id}", run_id=run_id, model_id=model_id,
                                    tags=version_tags)
    c.update_model_version(name, mv.version, description=model_card(uri, name, int(mv.version), version_tags,
                                                                    experiment))
    return name, int(mv.version)


@contextmanager
def _process_tracking_uri(uri: str) -> Iterator[None]:
    """The process's tracking URI set to ``uri`` for the block, then put back as it was (its environment variable too).

    A local (SQL) registry store resolves a ``models:/<id>`` source through a fresh ``MlflowClient()``, i.e. the
    process's tracking URI, not the client's: a store at any path but ./mlflow.db fails with "Logged model with ID
    ... not found". A server resolves it on its side, so this matters only for local stores.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils

    if uri.startswith(("http://", "https://")):
        yield
        return
    before, env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # None unsets the variable, which the user may have set: restore it
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


def history(uri: str, dataset: str) -> list[dict]:
    """Every recorded alias move of ``anodfdnet-<dataset>``, oldest first."""
    name = require_model(uri, model_name(dataset)).name
    moves = []
    for mv in client(uri).search_model_versions(f"name = '{name}'"):
        for k, v in mv.tags.items():
            if k.startswith(AUDIT_PREFIX):
                moves.append({"ns": int(k[len(AUDIT_PREFIX):]), "version": int(mv.version), **json.loads(v)})
    return sorted(moves, key=lambda m: m["ns"])


def show(uri: str, dataset: str, version: int) -> str:
    """`anodfd models show`: a version's model card, its aliases and its alias moves, as text."""
    from mlflow.exceptions import MlflowException

    model = require_model(uri, model_name(dataset))
    try:
        mv = client(uri).get_model_version(model.name, str(version))
    except MlflowException:
        raise RegistryError(f"{model.name} has no version {version}") from None
    aliases = sorted(a for a, v in model.aliases.items() if int(v) == version)
    moves = [m for m in history(uri, dataset) if m["version"] == version]
    decision = mv.tags.get("registration_decision", "-")
    return "\n".join([
        mv.description or f"## {model.name} v{version}\n(no model card: registered by an older anodfd)",
        "", f"aliases: {', '.join(aliases) or 'none'}", f"gate decision: {decision}",
        f"load: mlflow.pyfunc.load_model('models:/{model.name}/{version}')", "", "alias moves onto this version:",
        format_history(moves) if moves else "  none",
    ])


def format_history(moves: list[dict]) -> str:
    lines = [f"{'time':<19}  {'alias':<10} {'to':>3}  {'from':>4}  {'by':<20} reason"]
    for m in moves:
        prev = "-" if m["previous"] is None else f"v{m['previous']}"
        lines.append(f"{m['time']:<19}  {m['alias']:<10} v{m['version']:<2}  {prev:>4}  {m['by']:<20} {m['reason']}")
    return "\n".join(lines)


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


def version_by_alias(c, name: str, alias: str):
    """The version ``alias`` points at, None if it points nowhere; any other failure is raised, never taken
    for "no champion" (that would crown the next version unopposed)."""
    model = c.get_registered_model(name)
    if alias not in model.aliases:
        return None
    return c.get_model_version(name, str(model.aliases[alias]))


def require_model(uri: str, name: str):
    """The registered model, or a one-line error naming what is registered there."""
    from mlflow.exceptions import MlflowException

    check_tracking(uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        # Looking something up must not create an empty store as a side effect.
        raise RegistryError(f"no MLflow store at {redact(uri)}; pass --mlflow-uri or set MLFLOW_TRACKING_URI")
    c = client(uri)
    try:
        return c.get_registered_model(_canonical(c, name))
    except MlflowException:
        known = sorted(m.name for m in c.search_registered_models())
        raise RegistryError(
            f"no registered model {name} at {redact(uri)}; registered there: {', '.join(known) or 'none'}"
        ) from None


def list_versions(uri: str, dataset: str) -> list[dict]:
    """Every version of ``anodfdnet-<dataset>``, oldest first: version, aliases, test metrics, fingerprint, ..."""
    model = require_model(uri, model_name(dataset))
    name = model.name
    aliases: dict[str, list[str]] = {}
    for alias, version in model.aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for mv in client(uri).search_model_versions(f"name = '{name}'"):
        rows.append({
            "version": int(mv.version),
            "aliases": sorted(aliases.get(str(mv.version), [])),
            **{k: float(v) for k, v in mv.tags.items() if k.startswith("test_") and is_number(v)},
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

    lines = [(f"{'version':>7}  {'aliases':<20} {'F1@0.5':>7}  {'F1 served':>9}  {'IoU':>6}  {'AUC':>6}  "
              f"{'fingerprint':<16}  created")]
    for r in rows:
        lines.append(
            f"{r['version']:>7}  {','.join(r['aliases']) or '-':<20} {num(r.get('test_f1')):>7}  "
            f"{num(r.get('test_f1_calibrated')):>9}  "
            f"{num(r.get('test_iou')):>6}  {num(r.get('test_auc')):>6}  {r['fingerprint'] or '-':<16}  {r['created']}"
        )
    return "\n".join(lines)


def resolve_version(uri: str, model_uri: str) -> tuple[str, int]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> (name, version), with a clear error if absent."""
    from mlflow.exceptions import MlflowException

    m = MODEL_URI.fullmatch(model_uri)
    if not m:
        raise RegistryError(f"{model_uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION, "
                            "e.g. models:/anodfdnet-OL@champion")
    model = require_model(uri, m["name"])
    name = model.name
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

    from anodfd.checkpoint import load_checkpoint

    name, version = resolve_version(uri, model_uri)
    # Through the version's storage location: a models:/ artifact URI would be resolved against the process's
    # global registry URI, not ``uri``.
    location = client(uri).get_model_version_download_uri(name, str(version))
    artifact = f"{location.rstrip('/')}/{CHECKPOINT_ARTIFACT}"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(artifact_uri=artifact, dst_path=tmp, tracking_uri=uri)
        except Exception:
            # A missing file and an unreachable store fail alike; the listing tells them apart.
            folder = artifact.rpartition("/")[0]
            listed = mlflow.artifacts.list_artifacts(artifact_uri=folder, tracking_uri=uri)
            if any(f.path.endswith(CHECKPOINT_FILE) for f in listed):
                raise
            raise ArtifactMissing(f"{name} v{version}: its checkpoint {redact(artifact)} is missing from the artifact "
                                  "store (deleted or never uploaded), so this version cannot be loaded") from None
        return load_checkpoint(path)


def log_export(uri: str, model_uri: str, path: Path, int8: dict | None = None) -> str:
    """Attach an exported file (`anodfd export`) to the registered version it came from: logged to the version's
    run under ``<kind>/v<version>/`` and named in the version's tag ``<kind>``, where kind is ``onnx``,
    ``openvino`` (an FP32 IR, .xml with its .bin) or ``openvino_int8``. ``int8``, the INT8 check's figures, goes in
    the tag ``int8_check`` (JSON) and, as ``int8_<fp32|int8>_<figure>`` metrics, in the run. An IR also gets a
    servable pyfunc model (the checkpoint with the IR in the network's place), named in the tag ``<kind>_model``
    as ``models:/<id>``: what `mlflow models serve -m` takes. Returns lines saying where it went."""
    from anodfd.openvino_ir import INT8_FILE
    from anodfd.serving import OPENVINO_KEY

    path = Path(path)
    kind = "onnx" if path.suffix == ".onnx" else "openvino_int8" if path.name == INT8_FILE else "openvino"
    name, version = resolve_version(uri, model_uri)
    c = client(uri)
    mv = c.get_model_version(name, str(version))
    if not mv.run_id:
        raise RegistryError(f"{name} v{version} has no source run to log the export to")
    # Versions can share a run (one search registers several), so each gets its own folder: nothing is overwritten.
    folder = f"{kind}/v{version}"
    files = (path,) if kind == "onnx" else (path, path.with_suffix(".bin"))
    for f in files:
        c.log_artifact(mv.run_id, str(f), folder)
    location = f"runs:/{mv.run_id}/{folder}/{path.name}"
    c.set_model_version_tag(name, str(version), kind, location)
    if int8:
        c.set_model_version_tag(name, str(version), "int8_check", json.dumps(int8))
        for model in ("fp32", "int8"):
            for figure, value in int8[model].items():
                c.log_metric(mv.run_id, f"int8_{model}_{figure}", value)
    lines = [f"logged to {name} v{version} as {location} (tag {kind})"]
    if kind != "onnx":
        with tempfile.TemporaryDirectory() as tmp:  # the serving model reads its IR folder's model.xml
            ir = Path(tmp) / "ir"
            ir.mkdir()
            for f in files:
                shutil.copyfile(f, ir / f"model{f.suffix}")
            model_id = log_pyfunc(uri, load_checkpoint_from_registry(uri, model_uri),
                                  c.get_run(mv.run_id).info.experiment_id, mv.run_id,
                                  {"source_version": f"{name}/{version}", "runtime": kind},
                                  artifacts={OPENVINO_KEY: str(ir)})
        c.set_model_version_tag(name, str(version), f"{kind}_model", f"models:/{model_id}")
        lines.append(f"served by models:/{model_id} (tag {kind}_model): mlflow models serve -m models:/{model_id}")
    return "\n".join(lines)


def download_ir(uri: str, model_uri: str, dst: str | Path) -> Path:
    """The OpenVINO IR a registered version carries (`log_export`), INT8 when it has one, else FP32, downloaded into
    ``dst``: its .xml. A version without one gets one clear error that says how to give it one."""
    import mlflow

    name, version = resolve_version(uri, model_uri)
    tags = client(uri).get_model_version(name, str(version)).tags
    kind = "openvino_int8" if "openvino_int8" in tags else "openvino"
    location = tags.get(kind)
    if not location:
        raise RegistryError(f"{name} v{version} carries no OpenVINO IR; attach one with `anodfd export --model "
                            f"{model_uri} --format openvino [--int8] --out DIR`, or drop --ir")
    folder, _, file = location.rpartition("/")
    (Path(dst) / kind).mkdir(parents=True, exist_ok=True)  # both kinds' folders end in v<version>
    local = mlflow.artifacts.download_artifacts(artifact_uri=folder, dst_path=str(Path(dst) / kind), tracking_uri=uri)
    return Path(local) / file
