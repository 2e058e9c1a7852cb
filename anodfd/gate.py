"""The champion gate and the promotion lease: which registered version serves, decided once at a time.

``challenger`` always moves to a new version; ``champion`` moves only when the new version
- clears the floor: test F1 above template differencing's on the same split, pixel AUC clearly above chance;
- and beats the champion's test F1 under the same `anodfd.scoring.Protocol` (data by content, split, native
  resolution, thresholds). A champion scored under another protocol is re-scored first, when the gate has the
  data to do it; otherwise champion stays. `promote` moves an alias explicitly.

Several searches may promote into one registry at once. The gate runs under a lease held in the registry itself
(a registered model ``<name>.promotion-lease`` that only one process can create), renewed while it works; every
alias move first checks that the lease is still held, and a holder that finds it lost puts back what it moved.
Any MLflow error means "promote nothing": a champion is never chosen on a failed lookup. Every alias move is
recorded on the version it lands on (previous holder, reason, time); `registry.history` lists them.
"""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from anodfd.card import is_number, model_card
from anodfd.registry import (
    AUDIT_PREFIX,
    CHALLENGER,
    CHAMPION,
    PREFIX,
    ArtifactMissing,
    RegistryError,
    load_checkpoint_from_registry,
    model_name,
    register_version,
    require_model,
    version_by_alias,
)
from anodfd.scoring import Scorecard, shortfall
from anodfd.tracking import client, redact

LEASE_SUFFIX = ".promotion-lease"
LEASE_TTL_S = 120.0  # a holder renews its lease every TTL/5; one that crashed loses it TTL after its last renewal
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


class LeaseLost(PromotionFailed):
    """The promotion lease was broken while its holder worked (it stalled longer than the lease lasts)."""


def _mlflow_errors() -> tuple[type[BaseException], ...]:
    import requests
    from mlflow.exceptions import MlflowException

    return MlflowException, requests.RequestException, ConnectionError, TimeoutError


# The F1 the gate compares: at the threshold the version serves with (`predict`, `score`, the pyfunc), not at 0.5,
# so a version cannot win the gate at one threshold and then find nothing as served.
GATE_F1 = "test_f1_calibrated"


def decide_champion(tags: dict[str, str], champion) -> tuple[bool, str]:
    """Whether a version with these tags takes over from ``champion`` (a ModelVersion or None), and why.

    It must clear the floor (`anodfd.scoring.shortfall`) and, when there is a champion, beat its test F1 under the
    same protocol; both at the threshold each version serves with (tag `GATE_F1`); a tie keeps the incumbent.
    """
    if not is_number(tags.get(GATE_F1, "")):
        return False, (f"stays challenger: it has no test F1 at its served threshold (tag {GATE_F1}) to compare, so "
                       "it was not registered by this anodfd; move champion by hand if it should serve "
                       "(anodfd models promote)")
    f1, auc = float(tags[GATE_F1]), float(tags.get("test_auc", "nan"))
    at = f" at its served threshold {tags['served_threshold']}" if "served_threshold" in tags else ""
    if "floor_f1" not in tags:
        return False, "stays challenger: no template-differencing floor was recorded for it"
    floor = float(tags["floor_f1"])
    if short := shortfall(f1, auc, floor, at=at):
        return False, f"stays challenger: {short}"
    cleared = f"test F1 {f1:.4f}{at} clears the floor {floor:.4f} (AUC {auc:.4f})"
    if champion is None:
        return True, f"no champion yet; {cleared}"
    v, ctags = champion.version, champion.tags
    if ctags.get("protocol_id") != tags.get("protocol_id"):
        return False, (
            f"champion v{v} was scored under protocol {ctags.get('protocol_id', '(none)')}, this version under "
            f"{tags.get('protocol_id')}: not comparable; re-score it with the data "
            f"(anodfd models gate --data DIR), or move champion by hand (anodfd models promote)"
        )
    if not is_number(ctags.get(GATE_F1, "")):
        return False, f"champion v{v} has no {GATE_F1} tag to compare with, so champion stays"
    old = float(ctags[GATE_F1])
    if f1 > old:
        return True, f"{cleared} and beats champion v{v}'s {old:.4f} under protocol {tags['protocol_id']}"
    return False, (f"test F1 {f1:.4f}{at} does not beat champion v{v}'s {old:.4f} under protocol "
                   f"{tags['protocol_id']}")


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
    both read the old champion and both write; a gate that lost the lease meanwhile raises LeaseLost and leaves
    the aliases as it found them. Any MLflow error raises PromotionFailed, with champion left where it was.
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
                lease.move(name, CHALLENGER, version, "registered by a search")
                if take and not already:
                    lease.move(name, CHAMPION, version, reason)
                lease.check()  # the moves landed while the lease was ours: nobody else moved an alias meanwhile
                c.set_model_version_tag(name, str(version), "registration_decision", reason)
                if take and int(c.get_registered_model(name).aliases.get(CHAMPION, -1)) != version:
                    raise PromotionFailed(f"{name}: champion is not v{version} right after the gate moved it there")
                return Registration(name, version, take, reason)
        raise PromotionFailed(f"{name}: champion kept moving while v{version} waited to be compared with it")
    except _mlflow_errors() as e:
        raise PromotionFailed(f"{name} v{version}: the champion gate failed at {redact(uri)} ({_one_line(e)}); "
                              "nothing was promoted, and the version is registered: promote it again once MLflow answers "
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
    try:
        ckpt = load_checkpoint_from_registry(uri, f"models:/{name}/{v}")
    except ArtifactMissing as e:
        raise PromotionFailed(
            f"{e}: champion v{v} cannot be re-scored, and no version can be compared with it. Register its checkpoint "
            "again if you have it (a new version; then `anodfd models gate` it), or move champion by hand to a "
            f"version that loads: anodfd models promote --dataset {name.removeprefix(PREFIX)} --version N --reason "
            f"'v{v} lost its checkpoint'") from None
    card = rescore(ckpt)
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
    return redact(text.strip().splitlines()[0])[:300]


class _Lease:
    """A held promotion lease. A heartbeat thread renews it; `check` (which `move` calls first) fences off a holder
    that lost it, and `undo` puts back what such a holder moved."""

    def __init__(self, c, lock: str, owner: str, ttl: float, renewed: float) -> None:
        self.c, self.lock, self.owner, self.ttl = c, lock, owner, ttl
        self.renewed = renewed  # monotonic start of the last renewal known to have landed while the lease was ours
        self.lost = False
        self.moves: list[tuple[str, int, str | None, str]] = []  # (alias, version, previous, audit tag) for undo
        self._stop = threading.Event()
        # A daemon, never joined: a renewal stuck on a dead server must not hold up the release or the exit.
        threading.Thread(target=self._heartbeat, daemon=True, name=f"renews {lock}").start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 5):
            start = time.monotonic()
            try:
                self.c.set_registered_model_tag(self.lock, "expires", f"{time.time() + self.ttl:.3f}")
                if _lease_owner(self.c, self.lock) != self.owner:
                    self.lost = True
                    return
            except _mlflow_errors():
                continue  # not renewed: `check` refuses once the last renewal is too old
            self.renewed = start

    def check(self) -> None:
        held = None if self.lost else _lease_owner(self.c, self.lock)
        # Contenders break a lease only after seeing its heartbeat unchanged for ttl on their own clocks, so a move
        # acknowledged within ttl of our last confirmed renewal landed while the lease was ours. Checked before and
        # after every move; a move that fails the check after it is undone.
        age = time.monotonic() - self.renewed
        if held != self.owner or age > self.ttl:
            self.lost = True
            why = f"not renewed for {age:.1f} s" if held == self.owner else f"now held by {held}" if held else "broken"
            raise LeaseLost(f"the promotion lease {self.lock} was lost ({why}): its holder stalled for longer than the "
                            f"lease's {self.ttl:g} s; nothing was promoted, promote again")

    def move(self, name: str, alias: str, version: int, reason: str) -> None:
        """Point ``alias`` at ``version`` if the lease is still ours, and record the move (`_move_alias`)."""
        self.check()
        previous = self.c.get_registered_model(name).aliases.get(alias)
        key = f"{AUDIT_PREFIX}{time.time_ns()}"
        self.moves.append((alias, version, previous, key))  # before the move: a failed request may still land
        _move_alias(self.c, name, alias, version, reason, previous, key)

    def release(self) -> None:
        if self._stop.is_set():
            return  # released already
        self._stop.set()
        try:
            if _lease_owner(self.c, self.lock) == self.owner:
                self.c.delete_registered_model(self.lock)
        except _mlflow_errors():
            pass  # MLflow is away: the lease dies when its renewals stop

    def undo(self, name: str, wait: float) -> None:
        """Under the lease again: each alias this holder moved that still points where it put it goes back, and the
        move's record goes; an alias someone has moved since stays theirs. A gate that lost its lease leaves no
        trace."""
        if not self.moves:
            return
        try:
            with promotion_lease(self.c, name, self.ttl, wait):
                aliases = self.c.get_registered_model(name).aliases
                for alias, version, previous, key in reversed(self.moves):
                    if str(aliases.get(alias)) != str(version):
                        continue
                    if previous is None:
                        self.c.delete_registered_model_alias(name, alias)
                    else:
                        self.c.set_registered_model_alias(name, alias, str(previous))
                    self.c.delete_model_version_tag(name, str(version), key)
        except (*_mlflow_errors(), PromotionFailed) as e:
            raise LeaseLost(f"the promotion lease of {name} was lost while it moved aliases, and putting them back "
                            f"failed ({_one_line(e)}): check `anodfd models history` and move them by hand "
                            "(anodfd models promote)") from None


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
    process create (the name is unique). Its holder renews its ``expires`` tag every ttl/5 s. A contender breaks it
    only after seeing that tag unchanged for the lease's ``ttl`` on its own monotonic clock, so hosts whose wall
    clocks disagree cannot expire a live lease, and a crashed holder's lease dies ttl after its last renewal.
    Released on every exit path; a holder that lost it puts back what it moved (`_Lease.undo`)."""
    from mlflow.exceptions import MlflowException

    lock = name + LEASE_SUFFIX
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + wait
    seen, since = None, time.monotonic()  # the holder's last heartbeat we saw, and when we first saw it
    while True:
        start = time.monotonic()
        try:
            c.create_registered_model(lock, tags={"owner": owner, "expires": f"{time.time() + ttl:.3f}",
                                                  "ttl": f"{ttl:g}"},
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
        now, beat = time.monotonic(), (held.tags.get("owner"), held.tags.get("expires"))
        # A read that races a release can see the lease without its tags (MLflow reads them in a second query):
        # that is a lease in flux, not a dead one.
        if beat != seen or None in beat:
            seen, since = beat, now
        elif now - since > float(held.tags.get("ttl", ttl)) and _lease_owner(c, lock) == beat[0]:
            try:
                c.delete_registered_model(lock)  # no heartbeat for a whole ttl: its holder is gone
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
            continue
        if now > deadline:
            raise PromotionFailed(f"another promotion into {name} holds {lock} ({beat[0]}) after {wait:g} s, and "
                                  f"renewed it {now - since:.0f} s ago; wait for it, or delete {lock} if that "
                                  "process is gone")
        time.sleep(random.uniform(0.05, 0.3))
    lease = _Lease(c, lock, owner, ttl, start)
    try:
        yield lease
    except LeaseLost:
        lease.release()
        lease.undo(name, wait)
        raise
    finally:
        lease.release()


def _move_alias(c, name: str, alias: str, version: int, reason: str, previous: str | None, key: str) -> None:
    """Point ``alias`` at ``version`` and record the move on that version under tag ``key``: previous holder,
    reason, time, who."""
    c.set_registered_model_alias(name, alias, str(version))
    record = {"alias": alias, "previous": None if previous is None else int(previous), "reason": reason,
              "time": datetime.fromtimestamp(int(key[len(AUDIT_PREFIX):]) / 1e9).isoformat(timespec="seconds"),
              "by": f"{os.environ.get('USER') or os.environ.get('USERNAME') or 'unknown'}@{socket.gethostname()}"}
    c.set_model_version_tag(name, str(version), key, json.dumps(record))


def promote(uri: str, dataset: str, version: int, alias: str = CHAMPION, reason: str | None = None) -> None:
    """Point ``alias`` at ``version`` explicitly (no F1 gate: a person decided), under the promotion lease.
    Aliases are lower case (``Champion`` means ``champion``): MLflow's are case-sensitive, and a second alias that
    differs only in case would leave the real one where it was."""
    from mlflow.exceptions import MlflowException

    alias = alias.lower()
    name = require_model(uri, model_name(dataset)).name
    c = client(uri)
    try:
        c.get_model_version(name, str(version))
    except MlflowException:
        versions = sorted(int(mv.version) for mv in c.search_model_versions(f"name = '{name}'"))
        raise RegistryError(f"{name} has no version {version}; versions: {versions or 'none'}") from None
    try:
        with promotion_lease(c, name) as lease:
            lease.move(name, alias, version, reason or "promoted by hand (anodfd models promote)")
            lease.check()
    except MlflowException as e:
        raise RegistryError(f"cannot set alias {alias!r} on {name} v{version}: {e.message}") from None
