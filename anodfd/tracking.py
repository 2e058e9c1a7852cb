"""Everything MLflow: where runs go, checking the server is there, runs, metrics and artifacts.

The explicit `MlflowClient(uri)` is used throughout (not the fluent `mlflow.start_run` globals), because the
same run is written from the driver and from a Ray worker process.
"""

from __future__ import annotations

import base64
import json
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from anodfd.config import Config, ConfigError

DEFAULT_EXPERIMENT = "anodfd"
RUN_DIR_TAG = "anodfd.run_dir"  # identifies the MLflow run of a Ray run, so a resumed run logs to the same one


class TrackingError(ConfigError):
    """The tracking server or store cannot be used."""


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``--mlflow-uri``, else ``MLFLOW_TRACKING_URI``, else a SQLite store in the working directory.

    Paths are made absolute here, in the driver: Ray workers run in another working directory.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return use_credentials(uri)


_USERINFO = re.compile(r"(?P<start>\b[a-zA-Z][\w+.-]*://[^/\s:@]*):[^/\s@]*@")


def redact(text: str) -> str:
    """``text`` (a URI, or a message quoting one) with every password in a URI replaced by ``***``."""
    return _USERINFO.sub(r"\g<start>:***@", text)


def use_credentials(uri: str) -> str:
    """An HTTP(S) URI without its ``user:password@``, which go into MLflow's own variables for this process
    (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD), so the URI that is printed, logged, stored and handed
    to Ray workers carries no secret; local Ray workers inherit the variables."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or parts.password is None:
        return uri
    os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username or "")
    os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password)
    return _without_userinfo(uri)


def _without_userinfo(uri: str) -> str:
    """``uri`` without ``user:password@`` (which urllib cannot open either)."""
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _auth_header(uri: str) -> dict[str, str]:
    """The Authorization header MLflow's client sends: basic auth from the URI or the variables, else a token."""
    parts = urlsplit(uri)
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if parts.password is not None:
        user, password = unquote(parts.username or ""), unquote(parts.password)
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    if token := os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {token}"}
    return {}


def default_artifact_location(uri: str) -> str | None:
    """Artifacts of a local SQLite store go beside it (``mlartifacts/``), as an absolute URI."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None  # a server decides where its artifacts go


def check_tracking(uri: str, timeout: float = 5.0) -> None:
    """Fail before any training if the tracking server does not answer, with what to do about it."""
    if uri.startswith(("http://", "https://")):
        bare = _without_userinfo(uri)
        try:
            request = urllib.request.Request(f"{bare.rstrip('/')}/health", headers=_auth_header(uri))
            with urllib.request.urlopen(request, timeout=timeout) as r:
                if r.status == 200:
                    return
                problem = f"HTTP {r.status}"
        except urllib.error.HTTPError as e:
            if e.code not in (401, 403):
                raise TrackingError(f"MLflow tracking server {redact(uri)} answers /health with HTTP {e.code}; fix "
                                    "--mlflow-uri / MLFLOW_TRACKING_URI") from None
            raise TrackingError(
                f"MLflow tracking server {redact(uri)} refused access (HTTP {e.code}): set MLFLOW_TRACKING_USERNAME "
                "and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN, or give them in the URI "
                "(http://USER:PASSWORD@host:port)") from None
        except (urllib.error.URLError, OSError, ValueError) as e:  # ValueError: a URI urllib cannot parse
            problem = redact(str(getattr(e, "reason", e)))
        raise TrackingError(
            f"MLflow tracking server {redact(uri)} is unreachable ({problem}); start it (for example "
            "`mlflow server --host 127.0.0.1 --port 5000`), fix --mlflow-uri / MLFLOW_TRACKING_URI, "
            "or unset both to use the local store ./mlflow.db"
        )
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TrackingError(f"MLflow store {redact(uri)}: folder {folder} is missing or not writable")


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(uri: str, name: str = DEFAULT_EXPERIMENT) -> str:
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=default_artifact_location(uri))
    except Exception:  # noqa: BLE001 - another process created it first
        return c.get_experiment_by_name(name).experiment_id


def start_run(
    uri: str, config: Config, run_dir: str, run_name: str, experiment: str = DEFAULT_EXPERIMENT,
    tags: dict[str, str] | None = None, parent_run_id: str | None = None,
) -> tuple[str, bool]:
    """The run for ``run_dir``: the existing one when resuming, else a new one with the config as params.

    Returns (run_id, resumed).
    """
    c = client(uri)
    exp = experiment_id(uri, experiment)
    found = c.search_runs([exp], filter_string=f"tags.`{RUN_DIR_TAG}` = '{run_dir}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        c.update_run(run_id, status="RUNNING")
        return run_id, True
    all_tags = {RUN_DIR_TAG: run_dir, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(exp, run_name=run_name, tags=all_tags)
    log_params(uri, run.info.run_id, config.flat())
    log_json(uri, run.info.run_id, config.to_dict(), "config.json")
    return run.info.run_id, False


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    c = client(uri)
    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        c.log_batch(run_id, params=items[i : i + 100])


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
    client(uri).log_batch(run_id, metrics=items)


def log_file(uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    client(uri).log_artifact(run_id, str(path), artifact_path)


def log_json(uri: str, run_id: str, data: Any, name: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_text(json.dumps(data, indent=2, default=str))
        log_file(uri, run_id, path)


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status=status)


def ui_command(uri: str) -> str:
    """What to type to look at the runs."""
    if uri.startswith("sqlite:///"):
        art = default_artifact_location(uri)
        return f"mlflow ui --backend-store-uri {uri} --default-artifact-root {art} --host 127.0.0.1 --port 5000"
    return f"open {redact(uri)} in a browser"
