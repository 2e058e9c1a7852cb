"""The MLflow Model Registry: one registered model per dataset (``anodfdnet-<dataset>``), with a champion gate.

Each registration logs a checkpoint as an MLflow pyfunc model ("models from code": `anodfd/serving.py`, with the
checkpoint as its only artifact, so nothing is pickled), makes it a new version carrying its model card (test
scores under an evaluation protocol, the template-differencing floor, config, links), then runs the champion
gate. ``challenger`` always moves to the new version; ``champion`` moves only when the new version
- clears the floor: test F1 above template differencing's on the same split, pixel AUC clearly above chance;
- and beats the champion's test F1 under the same `anodfd.scoring.Protocol` (data by content, split, native
  resolution, thresholds). A champion scored under another protocol is re-scored first, when the gate has the
  data to do it; otherwise champion stays. `promote` moves an alias explicitly.

Several searches may promote into one registry at once. The gate runs under a lease held in the registry itself
(a registered model ``<name>.promotion-lease`` that only one process can create), re-checks after moving the
alias, and treats any MLflow error as "promote nothing": a champion is never chosen on a failed lookup. Every
alias move is recorded on the version it lands on (previous holder, reason, time); `history` lists them.

Like `anodfd.tracking`, everything takes the URI explicitly (registry URI = tracking URI) and uses the explicit
client, never MLflow's process-wide fluent state.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import random
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from anodfd.config import ConfigError
from anodfd.scoring import MIN_AUC, Scorecard, shortfall
from anodfd.tracking import check_tracking, client

PREFIX = "anodfdnet-"
CHAMPION, CHALLENGER = "champion", "challenger"
SERVING_CODE = Path(__file__).with_name("serving.py")
CHECKPOINT_FILE = "checkpoint.pt"
# pyfunc copies `artifacts={"checkpoint": .../checkpoint.pt}` to this path inside the model
CHECKPOINT_ARTIFACT = f"artifacts/{CHECKPOINT_FILE}"
# Packages the pyfunc model imports, pinned to what logged it (`anodfd` itself comes from this repository).
REQUIREMENTS = ("torch", "torchvision", "timm", "numpy", "opencv-python-headless", "mlflow")
LEASE_SUFFIX = ".promotion-lease"
LEASE_TTL_S = 120.0  # a gate takes seconds; a holder that crashed loses its lease after this
LEASE_WAIT_S = 600.0  # how long a promotion waits for another one to finish
AUDIT_PREFIX = "audit."  # version tags audit.<time_ns> = {"alias", "previous", "reason", "time", "by"}
RESCORED_PREFIX = "rescored."  # version tags rescored.<time_ns> = the scores it had under its earlier protocol
CARD_DIR = "card"  # the model's pictures (roc.png, overlays.jpg) sit here among its artifacts
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


def registered_name(c, dataset: str) -> str:
    """The registered model of ``dataset``, case-insensitively: ``ol`` finds ``anodfdnet-OL`` if that exists, so
    one dataset never gets two models (and two champions) that differ in case."""
    return _canonical(c, model_name(dataset))


def _canonical(c, name: str) -> str:
    for m in c.search_registered_models(f"name ILIKE '{name}'"):
        if m.name.lower() == name.lower():
            return m.name
    return name


class PromotionFailed(RegistryError):
    """An MLflow error during the champion gate: nothing was promoted; promoting again later is safe."""


def _mlflow_errors() -> tuple[type[BaseException], ...]:
    import requests
    from mlflow.exceptions import MlflowException

    return MlflowException, requests.RequestException, ConnectionError, TimeoutError


# --- registering -----------------------------------------------------------------------------------------


def decide_champion(tags: dict[str, str], champion) -> tuple[bool, str]:
    """Whether a version with these tags takes over from ``champion`` (a ModelVersion or None), and why.

    It must clear the floor (`anodfd.scoring.shortfall`) and, when there is a champion, beat its test F1 under the
    same protocol; a tie keeps the incumbent.
    """
    f1, auc = float(tags["test_f1"]), float(tags.get("test_auc", "nan"))
    if "floor_f1" not in tags:
        return False, "stays challenger: no template-differencing floor was recorded for it"
    floor = float(tags["floor_f1"])
    if short := shortfall(f1, auc, floor):
        return False, f"stays challenger: {short}"
    cleared = f"test F1 {f1:.4f} clears the floor {floor:.4f} (AUC {auc:.4f})"
    if champion is None:
        return True, f"no champion yet; {cleared}"
    v, ctags = champion.version, champion.tags
    if ctags.get("protocol_id") != tags.get("protocol_id"):
        return False, (
            f"champion v{v} was scored under protocol {ctags.get('protocol_id', '(none)')}, this version under "
            f"{tags.get('protocol_id')}: not comparable; re-score it with the data "
            f"(anodfd models gate --data DIR), or move champion by hand (anodfd models promote)"
        )
    if "test_f1" not in ctags:
        return False, f"champion v{v} has no test_f1 tag to compare with, so champion stays"
    old = float(ctags["test_f1"])
    if f1 > old:
        return True, f"{cleared} and beats champion v{v}'s {old:.4f} under protocol {tags['protocol_id']}"
    return False, f"test F1 {f1:.4f} does not beat champion v{v}'s {old:.4f} under protocol {tags['protocol_id']}"


Rescore = Callable[[dict], Scorecard]  # a checkpoint dict -> its scores under the gate's protocol


def log_and_register(
    uri: str, checkpoint: str | Path, dataset: str, card: Scorecard, run_id: str,
    tags: dict[str, str] | None = None, rescore: Rescore | None = None,
) -> Registration:
    """Log ``checkpoint`` as a pyfunc model in run ``run_id``, register it as a new version of
    ``anodfdnet-<dataset>`` with its model card, then run the champion gate (`gate`) on it."""
    name, version = register_version(uri, checkpoint, dataset, card, run_id, tags)
    return gate(uri, name, version, rescore=rescore)


def register_version(
    uri: str, checkpoint: str | Path, dataset: str, card: Scorecard, run_id: str,
    tags: dict[str, str] | None = None,
) -> tuple[str, int]:
    """The first half of `log_and_register`: the logged model and its new version with its card, no alias yet.

    Version tags: the card's (`Scorecard.tags`: test metrics at 0.5 and calibrated, served threshold, protocol,
    floor, split sizes), ``dataset``, ``search_run_id``, ``config``, the code version, and ``tags``.
    """
    from mlflow.entities import LoggedModelOutput
    from mlflow.exceptions import MlflowException

    from anodfd.train.loop import load_checkpoint

    f1 = card.metrics.get("f1", math.nan)
    if not 0.0 <= f1 <= 1.0:  # also catches NaN and a missing F1
        raise RegistryError(f"a scorecard needs a test F1 in [0, 1] to register a model; got {card.metrics}")
    model_name(dataset)
    check_tracking(uri)
    ckpt = load_checkpoint(checkpoint)  # a clear error for a bad path, before anything is logged
    c = client(uri)
    name = registered_name(c, dataset)
    try:
        experiment = c.get_run(run_id).info.experiment_id
    except MlflowException as e:
        raise RegistryError(f"MLflow run {run_id} not found at {uri} ({e.message})") from None

    version_tags = {
        **card.tags(), "dataset": name.removeprefix(PREFIX), "search_run_id": run_id,
        "config": json.dumps(ckpt["config"], separators=(",", ":")), "epoch": str(ckpt.get("epoch", "")),
        **code_version(), **{k: str(v) for k, v in (tags or {}).items()},
    }
    model_id = _log_pyfunc(uri, ckpt, experiment, run_id, version_tags, card.files)
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


def view_text(data: dict) -> str:
    """How a checkpoint's model sees a pair, from its config's data section (older ones: ``image_size``)."""
    resize, crop = data.get("resize", data.get("image_size", "?")), data.get("crop", 0)
    if resize:
        return f"pairs resized to {resize}x{resize} px" + (f", {crop} px crops and tiles" if crop else "")
    return f"pairs scaled by {data.get('scale', 1):g} keeping their aspect ratio, {crop} px crops and tiles"


def model_card(uri: str, name: str, version: int, tags: dict[str, str], experiment: str | None = None) -> str:
    """The version's description: what it scored, under which rules, against which floor, from which run."""
    def num(key: str) -> str:
        return f"{float(tags[key]):.4f}" if _is_number(tags.get(key, "")) else "-"

    def link(run_id: str | None) -> str:
        if not run_id:
            return "-"
        if uri.startswith("http") and experiment:
            return f"[{run_id}]({uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id})"
        return f"{run_id} (`mlflow ui --backend-store-uri {uri}`)"

    protocol = json.loads(tags.get("protocol", "{}"))
    config = json.loads(tags.get("config", "{}"))
    model, train, data = config.get("model", {}), config.get("train", {}), config.get("data", {})
    cols = ("f1", "iou", "precision", "recall", "auc")
    rows = [f"| 0.5 (paper) | {' | '.join(num(f'test_{k}') for k in cols)} |",
            (f"| {num('served_threshold')} (calibrated, served) | "
            f"{' | '.join(num(f'test_{k}_calibrated') for k in cols)} |")]
    return "\n".join([
        f"## {name} v{version}",
        "",
        (f"Test split ({tags.get('test_pairs', '?')} pairs), scored at the masks' native resolution under protocol "
        f"`{tags.get('protocol_id', '-')}`."),
        "",
        "| threshold | F1 | IoU | precision | recall | AUC |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"- **Serves with threshold** {num('served_threshold')} (calibrated on validation).",
        (f"- **Defects** at that threshold: F {num('test_defect_f')}, recall {num('test_defect_recall')}, precision "
         f"{num('test_defect_precision')}; {num('test_false_alarms_per_image')} false alarms per pair; every defect "
         f"found in {num('test_all_found')} of the pairs that have any."),
        *([(f"- **Against the dataset's boxes** at that threshold: overlap rule F {num('test_box_f')}, recall "
            f"{num('test_box_recall')}, precision {num('test_box_precision')}, {num('test_box_false_alarms_per_image')} "
            f"false alarms per pair; DeepPCB's rule (IoU > 0.33, one to one) F {num('test_strict_f')}, recall "
            f"{num('test_strict_recall')}, precision {num('test_strict_precision')}.")] if "test_box_f" in tags else []),
        (f"- **Floor**: template differencing test F1 {num('floor_f1')} (threshold {num('floor_threshold')} fitted "
        f"on train); pixel AUC must reach {MIN_AUC:g}."),
        (f"- **Protocol** `{tags.get('protocol_id', '-')}`: data fingerprint {protocol.get('fingerprint', '-')}, "
        f"split {protocol.get('split', '-')}; {protocol.get('resolution', '-')}; {protocol.get('thresholds', '-')}"
        + (f"; defects {protocol['defects']}." if "defects" in protocol else ".")),
        (f"- **Splits**: train {tags.get('split_train', '?')}, val {tags.get('split_val', '?')}, "
        f"test {tags.get('split_test', tags.get('test_pairs', '?'))} pairs."),
        (f"- **Training**: {model.get('name', '?')} depth {model.get('depth', '?')}, {view_text(data)}, "
        f"lr {train.get('lr', '?')} ({train.get('schedule', 'constant')}), batch {train.get('batch_size', '?')}, "
        f"loss bce {train.get('bce_weight', '?')} / "
        f"dice {train.get('dice_weight', '?')} / focal {train.get('focal_weight', '?')}; epoch "
        f"{tags.get('epoch', '?')} of {train.get('epochs', '?')}, seed {train.get('seed', '?')} "
        "(whole config: tag `config`)."),
        f"- **Search run**: {link(tags.get('search_run_id'))}; **trial run**: {link(tags.get('trial_run_id'))}.",
        f"- **Code**: anodfd {tags.get('code_version', '?')}"
        + (f", commit {tags['git_commit']}" if "git_commit" in tags else "") + ".",
        (f"- **Pictures**: `{CARD_DIR}/roc.png` (model against template differencing) and `{CARD_DIR}/overlays.jpg` "
        "among the model's artifacts."),
    ])


def gate(uri: str, name: str, version: int, rescore: Rescore | None = None, lease_ttl: float = LEASE_TTL_S,
         lease_wait: float = LEASE_WAIT_S) -> Registration:
    """The champion gate for ``version``: ``challenger`` goes to it, ``champion`` if `decide_champion` says so.

    A champion scored under another protocol is re-scored first with ``rescore`` (outside the lease: it can take
    minutes). The decision runs under the registry's promotion lease, so two searches promoting at once cannot
    both read the old champion and both write; after the aliases move it checks that the lease was still held
    and champion is where it was put. Any MLflow error raises PromotionFailed, with champion left where it was.
    """
    c = client(uri)
    try:
        tags = c.get_model_version(name, str(version)).tags
        for _ in range(5):
            champion = _version_by_alias(c, name, CHAMPION)
            if rescore is not None and _needs_rescore(champion, tags, version):
                _rescore(uri, name, champion, rescore)
            with promotion_lease(c, name, lease_ttl, lease_wait) as lease:
                champion = _version_by_alias(c, name, CHAMPION)
                if rescore is not None and _needs_rescore(champion, tags, version):
                    continue  # champion moved while we re-scored the one before: re-score the new one
                already = champion is not None and int(champion.version) == version
                take, reason = (True, "already champion") if already else decide_champion(tags, champion)
                c.set_model_version_tag(name, str(version), "registration_decision", reason)
                _move_alias(c, name, CHALLENGER, version, "registered by a search")
                if take and not already:
                    _move_alias(c, name, CHAMPION, version, reason)
                lease.check()  # still ours: nobody else can have moved an alias meanwhile
                if take and int(c.get_registered_model(name).aliases.get(CHAMPION, -1)) != version:
                    raise PromotionFailed(f"{name}: champion is not v{version} right after the gate moved it there")
                return Registration(name, version, take, reason)
        raise PromotionFailed(f"{name}: champion kept moving while v{version} waited to be compared with it")
    except _mlflow_errors() as e:
        raise PromotionFailed(f"{name} v{version}: the champion gate failed at {uri} ({_one_line(e)}); nothing was "
                              "promoted, and the version is registered: promote it again once MLflow answers "
                              f"(anodfd models gate --dataset {name.removeprefix(PREFIX)} --version {version})"
                              ) from None


def _needs_rescore(champion, tags: dict[str, str], version: int) -> bool:
    return (champion is not None and int(champion.version) != version
            and champion.tags.get("protocol_id") != tags.get("protocol_id"))


def _rescore(uri: str, name: str, champion, rescore: Rescore) -> None:
    """Score ``champion`` under the gate's protocol and store that on it; its earlier scores are kept in a
    ``rescored.<time>`` tag, so nothing it was registered with is lost."""
    v = str(champion.version)
    print(f"registry: champion v{v} was scored under protocol {champion.tags.get('protocol_id', '(none)')}; "
          "re-scoring it under this one before comparing", flush=True)
    card = rescore(load_checkpoint_from_registry(uri, f"models:/{name}/{v}"))
    c = client(uri)
    before = {k: val for k, val in champion.tags.items()
              if k.startswith("test_") or k in ("protocol_id", "floor_f1", "fingerprint")}
    c.set_model_version_tag(name, v, f"{RESCORED_PREFIX}{time.time_ns()}", json.dumps(before))
    for k, val in card.tags().items():
        c.set_model_version_tag(name, v, k, val)
    mv = c.get_model_version(name, v)
    c.update_model_version(name, v, description=model_card(uri, name, int(v), mv.tags))


def _one_line(e: BaseException) -> str:
    text = getattr(e, "message", None) or str(e) or type(e).__name__
    return text.strip().splitlines()[0][:300]


class _Lease:
    def __init__(self, c, lock: str, owner: str) -> None:
        self.c, self.lock, self.owner = c, lock, owner

    def check(self) -> None:
        held = _lease_owner(self.c, self.lock)
        if held != self.owner:
            raise PromotionFailed(f"the promotion lease {self.lock} was lost to {held or 'nobody'}: its holder took "
                                  "longer than the lease lasts; promote again")


def _lease_owner(c, lock: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return c.get_registered_model(lock).tags.get("owner")
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


@contextmanager
def promotion_lease(c, name: str, ttl: float = LEASE_TTL_S, wait: float = LEASE_WAIT_S) -> Iterator[_Lease]:
    """Hold ``<name>.promotion-lease`` for the block: a registered model, which the registry lets exactly one
    process create (the name is unique). It carries its owner and expiry; an expired one (its holder crashed)
    is deleted by the next contender. Released on every exit path."""
    from mlflow.exceptions import MlflowException

    lock = name + LEASE_SUFFIX
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + wait
    while True:
        try:
            c.create_registered_model(lock, tags={"owner": owner, "expires": f"{time.time() + ttl:.3f}"},
                                      description=f"held while a promotion into {name} runs; deleted after it")
            break
        except MlflowException as e:
            # DOES_NOT_EXIST: MLflow looked up the existing lease to word its error, and it was just released.
            if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        try:
            held = c.get_registered_model(lock)
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                continue  # released meanwhile: try again at once
            raise
        # A read that races a release can see the lease without its tags (MLflow reads them in a second query):
        # that is a lease in flux, not an expired one.
        expires = held.tags.get("expires")
        if expires is not None and float(expires) < time.time() and _lease_owner(c, lock) == held.tags["owner"]:
            try:
                c.delete_registered_model(lock)  # its holder died: the lease has expired
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
            continue
        if time.monotonic() > deadline:
            raise PromotionFailed(f"another promotion into {name} holds {lock} ({held.tags.get('owner')}) "
                                  f"after {wait:g} s; it expires at {held.tags.get('expires')}, or delete it")
        time.sleep(random.uniform(0.05, 0.3))
    try:
        yield _Lease(c, lock, owner)
    finally:
        try:
            if _lease_owner(c, lock) == owner:
                c.delete_registered_model(lock)
        except _mlflow_errors():
            pass  # MLflow is away: the lease expires on its own


def _move_alias(c, name: str, alias: str, version: int, reason: str) -> None:
    """Point ``alias`` at ``version`` and record the move on that version: previous holder, reason, time, who."""
    previous = c.get_registered_model(name).aliases.get(alias)
    c.set_registered_model_alias(name, alias, str(version))
    now = time.time_ns()
    record = {"alias": alias, "previous": None if previous is None else int(previous), "reason": reason,
              "time": datetime.fromtimestamp(now / 1e9).isoformat(timespec="seconds"),
              "by": f"{os.environ.get('USER') or os.environ.get('USERNAME') or 'unknown'}@{socket.gethostname()}"}
    c.set_model_version_tag(name, str(version), f"{AUDIT_PREFIX}{now}", json.dumps(record))


def history(uri: str, dataset: str) -> list[dict]:
    """Every recorded alias move of ``anodfdnet-<dataset>``, oldest first."""
    name = _require_model(uri, model_name(dataset)).name
    moves = []
    for mv in client(uri).search_model_versions(f"name = '{name}'"):
        for k, v in mv.tags.items():
            if k.startswith(AUDIT_PREFIX):
                moves.append({"ns": int(k[len(AUDIT_PREFIX):]), "version": int(mv.version), **json.loads(v)})
    return sorted(moves, key=lambda m: m["ns"])


def show(uri: str, dataset: str, version: int) -> str:
    """`anodfd models show`: a version's model card, its aliases and its alias moves, as text."""
    from mlflow.exceptions import MlflowException

    model = _require_model(uri, model_name(dataset))
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


def _log_pyfunc(uri: str, ckpt: dict, experiment: str, run_id: str, tags: dict[str, str],
                files: dict[str, Path] | None = None) -> str:
    """Save the pyfunc model locally, upload it as a LoggedModel of ``run_id``; returns the model id.

    This is what ``mlflow.pyfunc.log_model`` does, but through the explicit client: the fluent call would need
    the run made active (``mlflow.start_run``), which changes the search run's status and the process's URI.
    """
    import mlflow
    import torch
    from mlflow.models import Model

    from anodfd.serving import CHECKPOINT_KEY

    c = client(uri)
    logged = c.create_logged_model(experiment, name="anodfdnet", source_run_id=run_id, tags=tags)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            slim = Path(tmp) / CHECKPOINT_FILE
            torch.save({**ckpt, "optimizer": None}, slim)  # serving needs no optimizer state (2/3 of the bytes)
            threshold = float(ckpt.get("threshold", 0.5))
            mlflow.pyfunc.save_model(
                Path(tmp) / "model", python_model=str(SERVING_CODE), artifacts={CHECKPOINT_KEY: str(slim)},
                signature=signature(threshold), input_example=input_example(),
                pip_requirements=[_pinned(p) for p in REQUIREMENTS],
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
    """The version ``alias`` points at, None if it points nowhere; any other failure is raised, never taken
    for "no champion" (that would crown the next version unopposed)."""
    model = c.get_registered_model(name)
    if alias not in model.aliases:
        return None
    return c.get_model_version(name, str(model.aliases[alias]))


def _require_model(uri: str, name: str):
    """The registered model, or a one-line error naming what is registered there."""
    from mlflow.exceptions import MlflowException

    check_tracking(uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        # Looking something up must not create an empty store as a side effect.
        raise RegistryError(f"no MLflow store at {uri}; pass --mlflow-uri or set MLFLOW_TRACKING_URI")
    c = client(uri)
    try:
        return c.get_registered_model(_canonical(c, name))
    except MlflowException:
        known = sorted(m.name for m in c.search_registered_models())
        raise RegistryError(
            f"no registered model {name} at {uri}; registered there: {', '.join(known) or 'none'}"
        ) from None


def list_versions(uri: str, dataset: str) -> list[dict]:
    """Every version of ``anodfdnet-<dataset>``, oldest first: version, aliases, test metrics, fingerprint, ..."""
    model = _require_model(uri, model_name(dataset))
    name = model.name
    aliases: dict[str, list[str]] = {}
    for alias, version in model.aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for mv in client(uri).search_model_versions(f"name = '{name}'"):
        rows.append({
            "version": int(mv.version),
            "aliases": sorted(aliases.get(str(mv.version), [])),
            **{k: float(v) for k, v in mv.tags.items() if k.startswith("test_") and _is_number(v)},
            "fingerprint": mv.tags.get("fingerprint"),
            "created": datetime.fromtimestamp(mv.creation_timestamp / 1000).strftime("%Y-%m-%d %H:%M:%S"),
            "run_id": mv.run_id,
            "tags": dict(mv.tags),
        })
    return sorted(rows, key=lambda r: r["version"])


def _is_number(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


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


def promote(uri: str, dataset: str, version: int, alias: str = CHAMPION, reason: str | None = None) -> None:
    """Point ``alias`` at ``version`` explicitly (no F1 gate: a person decided), under the promotion lease."""
    from mlflow.exceptions import MlflowException

    name = _require_model(uri, model_name(dataset)).name
    c = client(uri)
    try:
        c.get_model_version(name, str(version))
    except MlflowException:
        versions = sorted(int(mv.version) for mv in c.search_model_versions(f"name = '{name}'"))
        raise RegistryError(f"{name} has no version {version}; versions: {versions or 'none'}") from None
    try:
        with promotion_lease(c, name):
            _move_alias(c, name, alias, version, reason or "promoted by hand (anodfd models promote)")
    except MlflowException as e:
        raise RegistryError(f"cannot set alias {alias!r} on {name} v{version}: {e.message}") from None


def resolve_version(uri: str, model_uri: str) -> tuple[str, int]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> (name, version), with a clear error if absent."""
    from mlflow.exceptions import MlflowException

    m = MODEL_URI.fullmatch(model_uri)
    if not m:
        raise RegistryError(f"{model_uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION, "
                            "e.g. models:/anodfdnet-OL@champion")
    model = _require_model(uri, m["name"])
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


def log_export(uri: str, model_uri: str, path: Path) -> str:
    """Attach an exported file (`anodfd export`) to the registered version it came from: logged to the version's
    run under ``onnx/v<version>/`` and named in the version's tag ``onnx``. Returns a line saying where it went."""
    name, version = resolve_version(uri, model_uri)
    c = client(uri)
    mv = c.get_model_version(name, str(version))
    if not mv.run_id:
        raise RegistryError(f"{name} v{version} has no source run to log the export to")
    # Versions can share a run (one search registers several), so each gets its own folder: nothing is overwritten.
    folder = f"onnx/v{version}"
    c.log_artifact(mv.run_id, str(path), folder)
    location = f"runs:/{mv.run_id}/{folder}/{Path(path).name}"
    c.set_model_version_tag(name, str(version), "onnx", location)
    return f"logged to {name} v{version} as {location} (tag onnx)"
