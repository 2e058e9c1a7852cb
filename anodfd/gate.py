"""The champion gate and the promotion lease: which registered version serves, decided once at a time.

``challenger`` always moves to a new version; ``champion`` moves only when the new version
- clears the floor: test F1 above template differencing's on the same split, pixel AUC clearly above chance;
- and beats the champion's test F1 under the same `anodfd.scoring.Protocol` (data by content, split, native
  resolution, thresholds). A champion scored under another protocol is re-scored first, when the gate has the
  data to do it; otherwise champion stays. `promote` moves an alias explicitly.

Several searches may promote into one registry at once. The gate runs under a lease held in the registry itself
(a registered model ``<name>.promotion-lease`` that only one process can create), re-checks after moving the
alias, and treats any MLflow error as "promote nothing": a champion is never chosen on a failed lookup. Every
alias move is recorded on the version it lands on (previous holder, reason, time); `registry.history` lists them.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from anodfd.card import model_card
from anodfd.registry import (
    AUDIT_PREFIX,
    CHALLENGER,
    CHAMPION,
    PREFIX,
    RegistryError,
    load_checkpoint_from_registry,
    model_name,
    register_version,
    require_model,
    version_by_alias,
)
from anodfd.scoring import Scorecard, shortfall
from anodfd.tracking import client

LEASE_SUFFIX = ".promotion-lease"
LEASE_TTL_S = 120.0  # a gate takes seconds; a holder that crashed loses its lease after this
LEASE_WAIT_S = 600.0  # how long a promotion waits for another one to finish
RESCORED_PREFIX = "rescored."  # version tags rescored.<time_ns> = the scores it had under its earlier protocol


@dataclass
class Registration:
    name: str
    version: int
    champion: bool  # whether this version now holds the champion alias
    reason: str  # why champion moved or not, for people


class PromotionFailed(RegistryError):
    """An MLflow error during the champion gate: nothing was promoted; promoting again later is safe."""


def _mlflow_errors() -> tuple[type[BaseException], ...]:
    import requests
    from mlflow.exceptions import MlflowException

    return MlflowException, requests.RequestException, ConnectionError, TimeoutError


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
            champion = version_by_alias(c, name, CHAMPION)
            if rescore is not None and _needs_rescore(champion, tags, version):
                _rescore(uri, name, champion, rescore)
            with promotion_lease(c, name, lease_ttl, lease_wait) as lease:
                champion = version_by_alias(c, name, CHAMPION)
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


def promote(uri: str, dataset: str, version: int, alias: str = CHAMPION, reason: str | None = None) -> None:
    """Point ``alias`` at ``version`` explicitly (no F1 gate: a person decided), under the promotion lease."""
    from mlflow.exceptions import MlflowException

    name = require_model(uri, model_name(dataset)).name
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
