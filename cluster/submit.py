"""Submit the search (`tune/search.py`), or with `--score` batch scoring (`anodfd score`), to a Ray cluster as a Ray Job.

    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=...    # the cluster's token (`ray get-auth-token` on the head)
    python cluster/submit.py --address http://HEAD:8265 --check -- --dataset OL --gpus-per-worker 1
    python cluster/submit.py --address http://HEAD:8265 --wait -- \\
        --dataset OL --gpus-per-worker 1 --cpus-per-worker 4 --max-concurrent 8

Everything after `--` (and any flag this script does not know) goes to `tune/search.py` unchanged; it is
checked here first, so a typo fails before anything is uploaded. The project folder is the job's working
directory, and the runtime environment comes from `cluster/runtime_env.yaml`; `--mlflow-uri` and `--storage`
(or `$MLFLOW_TRACKING_URI` / `$ANODFD_STORAGE` here) override its URIs. With `--wait` the job's output is
streamed until it ends, and the exit status is the job's: 0 if it SUCCEEDED, 1 otherwise. `--check` runs the
search's preflight on every node (versions, code, GPUs and drivers, storage, data, MLflow) as a job of its
own, prints one row per node and starts no trial. A connection or submission failure exits 2 with one line.

    python cluster/submit.py --address http://HEAD:8265 --score --wait -- \
        --model models:/anodfdnet-OL@champion --hist /mnt/anodfd/night/hist --cur /mnt/anodfd/night/cur \
        --out /mnt/anodfd/scores/night

With `--score`, the flags after `--` are `anodfd score`'s, checked with its own parser; the folders must be absolute
paths every node mounts, and `--model` needs a tracking server the job can reach.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shlex
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

import yaml

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = "tune/search.py"
RUNTIME_ENV = ROOT / "cluster" / "runtime_env.yaml"


class SubmitError(Exception):
    """Something to fix before the job can be submitted."""


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """(this script's options, the search's flags): the search's are those after `--`, wherever it stands,
    and any before it that this script does not know."""
    argv = list(sys.argv[1:] if argv is None else argv)
    mine, search = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    # No abbreviations: `--run X` must not be taken as --runtime-env X.
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS"),
                   help="the head's dashboard / job API, http://HEAD:8265 (default $RAY_API_SERVER_ADDRESS)")
    p.add_argument("--runtime-env", type=Path, default=RUNTIME_ENV, help="runtime environment YAML")
    p.add_argument("--wait", action="store_true", help="stream the job's output until it ends; exit with its status")
    p.add_argument("--check", action="store_true",
                   help="run the preflight on every node as a job (no trial starts), print it, exit with its status")
    p.add_argument("--score", action="store_true",
                   help="submit `anodfd score` (batch scoring) instead of the search; its flags follow `--`")
    p.add_argument("--submission-id", default=None, help="the job's id (default: one Ray makes up)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the job API to answer")
    args, unknown = p.parse_known_args(mine)
    return args, unknown + search


def _load_runtime_env(path: Path) -> tuple[dict, dict[str, str]]:
    if not path.is_file():
        raise SubmitError(f"runtime environment {path} not found; pass --runtime-env FILE")
    env = yaml.safe_load(path.read_text()) or {}
    return env, {k: str(v) for k, v in (env.get("env_vars") or {}).items()}


def _with_working_dir(env: dict, env_vars: dict[str, str]) -> dict:
    working_dir = env.get("working_dir", ".")
    if "://" not in working_dir:  # a folder relative to the project root; a URI (s3://...zip) is used as is
        working_dir = str((ROOT / working_dir).resolve())
    return {**env, "working_dir": working_dir, "env_vars": env_vars}


def _refuse_address(argv: list[str], what: str) -> None:
    if any(a == "--address" or a.startswith("--address=") for a in argv):
        raise SubmitError(f"--address among the {what}'s flags: the job joins its own cluster; give the cluster's "
                          "address before `--` (submit.py --address http://HEAD:8265 -- ...)")


def check_score_args(argv: list[str]) -> argparse.Namespace:
    """Parse `anodfd score`'s flags with its own parser and check that its paths mean something on the cluster."""
    from anodfd.cli import build_parser

    _refuse_address(argv, "scoring job")
    ns = build_parser().parse_args(["score", *argv])
    for flag in ("hist", "cur", "list", "out", "checkpoint"):
        value = getattr(ns, flag)
        if value and "://" not in value and not Path(value).is_absolute():
            raise SubmitError(f"--{flag} {value}: the job runs on the head node and its actors on any node; give an "
                              "absolute path that every node mounts")
    return ns


def _refuse_credentials(uri: str | None) -> None:
    """A password in the URI would travel in the job's runtime env, which the dashboard and `ray job` show."""
    from urllib.parse import urlsplit

    from anodfd.tracking import redact

    if uri and "://" in uri and urlsplit(uri).password is not None:
        raise SubmitError(f"MLflow URI {redact(uri)}: a cluster job would show this password to anyone who reads the job; "
                          "pass the URI without it and set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD on "
                          "the cluster's nodes (the image's environment, or a Kubernetes secret)")


def build_score_runtime_env(path: Path, score: argparse.Namespace) -> dict:
    """The runtime env file for a scoring job: a registry URI the job can reach when the model comes from it."""
    env, env_vars = _load_runtime_env(path)
    uri = score.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or env_vars.get("MLFLOW_TRACKING_URI")
    _refuse_credentials(uri)
    if score.model:
        if not uri or not uri.startswith(("http://", "https://", "databricks")):
            raise SubmitError(f"MLflow URI {uri!r}: --model is read from the registry on the cluster; pass "
                              "--mlflow-uri http://HOST:5000 (a SQLite file lives on one node's disk)")
        env_vars["MLFLOW_TRACKING_URI"] = uri
    return _with_working_dir(env, env_vars)


def build_runtime_env(path: Path, search: argparse.Namespace) -> dict:
    """The runtime env file with the URIs the search will use filled in, checked for cluster use."""
    env, env_vars = _load_runtime_env(path)
    storage = search.storage_flag or os.environ.get("ANODFD_STORAGE") or env_vars.get("ANODFD_STORAGE")
    uri = search.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or env_vars.get("MLFLOW_TRACKING_URI")
    _refuse_credentials(uri)
    if not uri or not uri.startswith(("http://", "https://", "databricks")):
        raise SubmitError(f"MLflow URI {uri!r}: a cluster needs a tracking server every node can reach; pass "
                          "--mlflow-uri http://HOST:5000 (a SQLite file lives on one node's disk)")
    if not storage or not ("://" in storage or Path(storage).is_absolute()):
        raise SubmitError(f"storage {storage!r}: trials write checkpoints from every node, so pass --storage "
                          "s3://bucket/path, gs://bucket/path or an absolute folder mounted on every node")
    if search.data and not Path(search.data).is_absolute():
        raise SubmitError(f"--data {search.data}: the job runs on the head node; give the absolute path of the "
                          "dataset folder there (mounted at the same path on every node)")
    if search.data_root and not Path(search.data_root).is_absolute():
        raise SubmitError(f"--data-root {search.data_root}: give an absolute path on the cluster's nodes")
    if search.dataset and not (search.data_root or env_vars.get("ANODFD_DATA_ROOT")):
        raise SubmitError(f"--dataset {search.dataset}: set ANODFD_DATA_ROOT in {path} or pass --data-root")
    env_vars.update(MLFLOW_TRACKING_URI=uri, ANODFD_STORAGE=storage)
    return _with_working_dir(env, env_vars)


def check_search_args(argv: list[str]) -> argparse.Namespace:
    """Parse the search's flags with the search's own parser (a typo fails here, not on the cluster)."""
    from tune.search import parse_args as search_parse_args

    _refuse_address(argv, "search")
    ns = search_parse_args(argv)
    # The search's own default ($ANODFD_STORAGE or ./runs) is taken on the cluster, not here.
    ns.storage_flag = _flag_value(argv, "--storage")
    return ns


def _flag_value(argv: list[str], flag: str) -> str | None:
    """The value given to ``flag`` (the last one, as argparse takes it), or None if it was not given."""
    value = None
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def connect(address: str, timeout: float = 10.0):
    """A Ray Jobs client for ``address``, or a SubmitError that names the address and what to do."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient  # Ray

    if not address or not address.startswith(("http://", "https://")):
        raise SubmitError(f"--address {address!r}: give the head's job API, http://HEAD:8265 "
                          "(for a cluster behind SSH or Kubernetes, port-forward 8265 first)")
    try:  # Ray's client can retry for a while on an address that does not answer: ask once, briefly, first
        urllib.request.urlopen(f"{address.rstrip('/')}/api/version", timeout=timeout).close()
    except urllib.error.HTTPError as e:
        if e.code != 401:  # 401 without a token: the job client below gives the precise message
            raise SubmitError(f"{address} answered HTTP {e.code} where Ray's job API should be: it is not a "
                              "Ray dashboard; pass the head's dashboard address (port 8265)") from None
    except Exception as e:  # noqa: BLE001 - every way of not answering becomes one line
        raise SubmitError(_unreachable(address, e, timeout)) from None
    try:
        client = JobSubmissionClient(address)  # Ray
        client.list_jobs()  # the first call that needs the token
    except AuthenticationError as e:
        raise SubmitError(f"the cluster at {address} refused the token ({str(e).splitlines()[0]}): export "
                          "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) with the cluster's "
                          "token, printed by `ray get-auth-token` on the head") from None
    except Exception as e:  # noqa: BLE001
        raise SubmitError(_unreachable(address, e, timeout)) from None
    return client


def _unreachable(address: str, e: BaseException, timeout: float) -> str:
    """One line for a job API that could not be talked to: what happened at ``address`` and the fix."""
    reason = getattr(e, "reason", e)
    if isinstance(reason, ssl.SSLError) or "SSL" in type(reason).__name__ or "ssl" in str(reason).lower():
        return (f"TLS with {address} failed ({_first_line(reason)}): use http:// if the dashboard serves plain "
                "HTTP, or make its certificate trusted (SSL_CERT_FILE=CA.pem)")
    if isinstance(reason, (TimeoutError, socket.timeout)) or "timed out" in str(reason).lower():
        return (f"{address} took the connection but did not answer in {timeout:g} s: check the tunnel or "
                "port-forward to the head's port 8265, or raise --timeout")
    return (f"no Ray job API at {address} ({_first_line(reason)}): start the cluster (`ray up cluster/aws.yaml`, "
            "or apply cluster/kuberay/rayjob.yaml), or port-forward its dashboard port 8265, then pass that address")


def _first_line(e: object) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    if any("Traceback (most recent call last)" in line for line in lines):
        # A server-side traceback: its exception line says what went wrong.
        raised = [line for line in lines if re.match(r"[\w.]+(Error|Exception)\b.*:", line)]
        return (raised or [line for line in lines if len(line) > 1])[-1][:300]
    return lines[0][:300]


def submit(client, address: str, entrypoint: str, runtime_env: dict, metadata: dict, submission_id: str | None) -> str:
    """Submit, or a SubmitError naming the address and the fix (upload, runtime env or server failures)."""
    try:
        return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,  # Ray
                                 metadata=metadata, submission_id=submission_id)
    except Exception as e:  # noqa: BLE001 - whatever Ray raised, the user gets one line
        text = _first_line(e)
        if "already exists" in text:
            fix = "pass another --submission-id"
        elif "size" in text.lower() or "too large" in text.lower():
            fix = "leave large files out of the package with the excludes in cluster/runtime_env.yaml"
        else:
            fix = f"see the head's dashboard ({address}, Jobs) and `ray logs dashboard.log` on the head"
        raise SubmitError(f"the cluster at {address} did not take the job ({text}): {fix}") from None


def follow(client, job_id: str) -> str:
    """Stream the job's output as it comes (Ray's log tail, over a websocket) until the job ends; its status."""
    from ray.job_submission import JobStatus  # Ray

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):  # Ray
            print(lines, end="", flush=True)

    asyncio.run(tail())
    while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                             JobStatus.STOPPED):
        time.sleep(1)  # the stream can close a moment before the status turns final
    return str(status.value)


class Job(NamedTuple):
    entrypoint: str
    runtime_env: dict
    metadata: dict
    about: list[str]  # what the job writes where, printed after submission
    follow: bool  # stream its output until it ends


def search_job(args: argparse.Namespace, argv: list[str]) -> Job:
    """The search (`tune/search.py ARGV`), checked; with --check, its preflight only (always followed)."""
    if args.check and "--check" not in argv:
        argv = [*argv, "--check"]
    search = check_search_args(argv)
    runtime_env = build_runtime_env(args.runtime_env, search)
    uri = runtime_env["env_vars"]["MLFLOW_TRACKING_URI"]
    return Job(f"python {ENTRYPOINT} {shlex.join(argv)}", runtime_env,
               {"anodfd.search": search.name or "", "anodfd.dataset": search.dataset or Path(search.data).name},
               [f"  storage {runtime_env['env_vars']['ANODFD_STORAGE']}, MLflow {uri}",
                f"  models:    {uri} -> Models -> anodfdnet-<dataset>"],
               args.wait or search.check)


def score_job(args: argparse.Namespace, argv: list[str]) -> Job:
    """`--score`: `anodfd score ARGV`, checked."""
    if args.check:
        raise SubmitError("--check runs the search's preflight; it does not go with --score")
    score = check_score_args(argv)
    return Job(f"python -m anodfd score {shlex.join(argv)}", build_score_runtime_env(args.runtime_env, score),
               {"anodfd.job": "score"},
               [(f"  results:   {score.out}/scores.parquet (ranked), maps, overlays, JSON; a rerun skips the pairs "
                "already scored")],
               args.wait)


def main(argv: list[str] | None = None) -> int:
    args, job_argv = parse_args(argv)
    try:
        job = (score_job if args.score else search_job)(args, job_argv)
        client = connect(args.address, args.timeout)
        job_id = submit(client, args.address, job.entrypoint, job.runtime_env, job.metadata, args.submission_id)
    except SubmitError as e:
        print(f"submit: error: {e}", file=sys.stderr)
        return 2
    a = shlex.quote(args.address)
    print("\n".join([f"submitted {job_id}: {job.entrypoint}", *job.about,
                     f"  follow:    ray job logs --address {a} --follow {job_id}",
                     f"  status:    ray job status --address {a} {job_id}",
                     f"  stop:      ray job stop --address {a} {job_id}",
                     f"  dashboard: {args.address} (jobs, actors, logs)"]), flush=True)
    return _follow_to_end(client, args, job_id) if job.follow else 0


def _follow_to_end(client, args: argparse.Namespace, job_id: str) -> int:
    """Stream the job's output until it ends; 0 if it SUCCEEDED, 1 if not, 2 if the stream was lost."""
    a = shlex.quote(args.address)
    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running (stop it with: ray job stop --address {a} {job_id})")
        return 130
    except Exception as e:  # noqa: BLE001 - the job runs on; only following it failed
        print(f"submit: error: lost the log stream of {job_id} at {args.address} ({_first_line(e)}); the job "
              f"keeps running: ray job logs --address {a} --follow {job_id}", file=sys.stderr)
        return 2
    info = client.get_job_info(job_id)
    print(f"\njob {job_id} {status}" + (f": {info.message}" if status != "SUCCEEDED" and info.message else ""))
    return 0 if status == "SUCCEEDED" else 1


if __name__ == "__main__":
    raise SystemExit(main())
