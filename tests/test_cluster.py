"""The search on a real Ray cluster: `cluster/submit.py` against a two-node cluster on 127.0.0.1 (`ray start`
head + joined node, token auth on, dashboard on loopback) and a real `mlflow server`.

The nodes run as a real node does: a Python environment with the project's dependencies and without the
project, so trial workers can import the code only from the package the job uploaded. Two more nodes that
advertise a GPU (one with an NVIDIA driver too old for the pinned torch, one with none) join for the GPU
preflight tests at the end of the module.
"""

from __future__ import annotations

import http.server
import importlib.util
import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import ray
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
SUBMIT = CLUSTER / "submit.py"
OLD_DRIVER = "535.104.05"  # what the fake nvidia-smi of one GPU node reports: CUDA 12.2 era, too old for CUDA 13


def load_submit():
    spec = importlib.util.spec_from_file_location("anodfd_submit", SUBMIT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- submit.py: bad input and unreachable clusters fail before anything is uploaded -------------------------


def run_submit(argv: list[str], capsys) -> tuple[int, str]:
    submit = load_submit()
    try:
        rc = submit.main(argv)
    except SystemExit as e:  # argparse's own error exit
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("extra,expected", [
    (["--storage", "runs"], "storage 'runs'"),
    (["--mlflow-uri", "sqlite:///mlflow.db"], "needs a tracking server"),
    (["--data", "data/OL"], "--data data/OL"),
    (["--max-epochs", "2", "--typo"], "unrecognized arguments: --typo"),
    # No abbreviations, on either side of `--`: a prefix of a flag is not that flag.
    (["--max-ep", "2"], "unrecognized arguments: --max-ep"),
    (["--address=http://10.0.0.1:8265"], "--address among the search's flags"),
    (["--address", "http://10.0.0.1:8265"], "--address among the search's flags"),
])
def test_submit_rejects_bad_input_before_connecting(extra, expected, capsys, tmp_path):
    argv = ["--address", "http://127.0.0.1:9", "--", "--data", str(tmp_path), "--storage", str(tmp_path),
            "--mlflow-uri", "http://127.0.0.1:5000", *extra]
    rc, err = run_submit(argv, capsys)
    assert rc == 2 and expected in err


@pytest.mark.parametrize("extra,expected", [
    (["--out", "scores"], "--out scores: the job runs on the head node"),
    (["--out", "/mnt/s", "--mlflow-uri", "sqlite:///mlflow.db"], "--model is read from the registry on the cluster"),
    (["--out", "/mnt/s", "--address", "http://10.0.0.1:8265"], "--address among the scoring job's flags"),
])
def test_submit_score_rejects_bad_input_before_connecting(extra, expected, capsys):
    argv = ["--address", "http://127.0.0.1:9", "--score", "--", "--model", "models:/anodfdnet-OL@champion",
            "--hist", "/mnt/h", "--cur", "/mnt/c", *extra]
    rc, err = run_submit(argv, capsys)
    assert rc == 2 and expected in err
    rc, err = run_submit(["--address", "http://127.0.0.1:9", "--score", "--check", "--", "--checkpoint", "/x.pt",
                          "--hist", "/h", "--cur", "/c", "--out", "/o"], capsys)
    assert rc == 2 and "does not go with --score" in err


def test_submit_takes_no_abbreviations_and_splits_at_double_dash_anywhere():
    submit = load_submit()
    # `--run X` is not --runtime-env: it goes to the search (whose parser then rejects it).
    args, search = submit.parse_args(["--address", "http://h:8265", "--run", "x", "--", "--data", "/d"])
    assert args.runtime_env == submit.RUNTIME_ENV and search == ["--run", "x", "--data", "/d"]
    # `--` after some search flags, `--address=URL`, and a search flag that looks like one of submit's.
    args, search = submit.parse_args(["--data", "/d", "--address=http://h:8265", "--", "--preset", "smoke",
                                      "--", "--wait"])
    assert args.address == "http://h:8265" and not args.wait
    assert search == ["--data", "/d", "--preset", "smoke", "--", "--wait"]


class _Answer404(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture
def not_a_dashboard():
    """A real HTTP server on 127.0.0.1 that is not a Ray dashboard: every path is a 404."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer404)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


@pytest.fixture
def silent_port():
    """A port that accepts TCP connections and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    yield s.getsockname()[1]
    s.close()


@pytest.mark.parametrize("case", ["refused", "http-404", "tls", "timeout"])
def test_submit_connection_failures_are_one_line_naming_the_address_and_the_fix(case, capsys, tmp_path,
                                                                                 not_a_dashboard, silent_port):
    address, fix = {
        "refused": (f"http://127.0.0.1:{free_port()}", "start the cluster"),
        "http-404": (f"http://127.0.0.1:{not_a_dashboard}", "answered HTTP 404"),
        "tls": (f"https://127.0.0.1:{not_a_dashboard}", "use http:// if the dashboard serves plain HTTP"),
        "timeout": (f"http://127.0.0.1:{silent_port}", "did not answer in 1 s"),
    }[case]
    start = time.monotonic()
    rc, err = run_submit(["--address", address, "--timeout", "1", "--", "--data", str(tmp_path), "--storage",
                          str(tmp_path), "--mlflow-uri", "http://127.0.0.1:5000"], capsys)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert address in err and fix in err, err
    assert time.monotonic() - start < 30


# --- a real cluster ------------------------------------------------------------------------------------------


def node_python(root: Path) -> Path:
    """A Python environment as a cluster node has one: the project's dependencies, not the project.

    A venv whose site-packages path points at this environment's: the packages are the same, but that folder's
    .pth files (the project's editable install among them) are not run, so `import anodfd` finds nothing
    unless the job's package is on the path.
    """
    env = root / "nodeenv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    (site,) = (env / "lib").glob("python*/site-packages")
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env / "bin" / "python"


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.python = node_python(root)
        self.token = secrets.token_hex(32)
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        # `python` in job entrypoints is the nodes' environment.
        self.env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")},
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "PYTHONUNBUFFERED": "1",
                    "PATH": f"{self.python.parent}:{os.environ['PATH']}"}
        self.groups: list[int] = []
        self.nodes = 0

    def start_node(self, head: bool = False, cpus: int = 1, gpus: int = 0, path_first: Path | None = None,
                   python: Path | None = None) -> None:
        index = self.nodes
        self.nodes += 1
        # Each node: its own temp dir (two runtime-env agents sharing one would delete each other's
        # working dirs) and its own agent ports (defaults are fixed numbers that would clash on one host).
        # Worker ports below the kernel's ephemeral range, where free_port() never lands.
        ports = ["--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port()),
                 "--runtime-env-agent-port", str(free_port()),
                 "--min-worker-port", str(20000 + 1000 * index), "--max-worker-port", str(20999 + 1000 * index)]
        common = ["--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus), "--num-gpus", str(gpus),
                  "--temp-dir", str(self.root / f"node{index}"), "--disable-usage-stats", *ports]
        ray_cli = [str(python or self.python), "-m", "ray.scripts.scripts", "start"]
        if head:
            cmd = [*ray_cli, "--head", "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1",
                   "--dashboard-port", str(self.dashboard_port), "--ray-client-server-port", str(free_port()), *common]
        else:
            cmd = [*ray_cli, "--address", f"127.0.0.1:{self.gcs_port}", *common]
        env = dict(self.env)
        if path_first:
            env["PATH"] = f"{path_first}:{env['PATH']}"
        # A new session: every daemon `ray start` leaves behind stays in this process group, stopped by PID below.
        # cwd: the node's own folder, so not even the current directory offers the project.
        proc = subprocess.Popen(cmd, env=env, cwd=self.root, start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        self.groups.append(proc.pid)
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out[-3000:]
        deadline = time.time() + 60
        while self.alive_nodes() < self.nodes:
            assert time.time() < deadline, "the node never joined"
            time.sleep(1)

    def api(self, path: str) -> dict:
        req = urllib.request.Request(f"{self.address}{path}", headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)

    def alive_nodes(self) -> int:
        nodes = self.api("/api/v0/nodes?limit=100&detail=false")["data"]["result"]["result"]
        return sum(1 for n in nodes if n["state"] == "ALIVE")

    def submit(self, *search_args: str, options: tuple[str, ...] = (), timeout: int = 900) -> subprocess.CompletedProcess:
        """`submit.py --wait OPTIONS -- SEARCH_ARGS` from the laptop side (this environment, which has the project)."""
        return subprocess.run([sys.executable, str(SUBMIT), "--address", self.address, "--wait", *options, "--",
                               *search_args], env=self.env, text=True, capture_output=True, timeout=timeout, check=False)

    def stop(self) -> None:
        for pgid in self.groups:
            try:
                os.killpg(pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        time.sleep(3)
        # Job drivers run in sessions of their own; they are recognised by the node temp dirs they run in.
        for pid in [int(p) for p in os.listdir("/proc") if p.isdigit()]:
            try:
                cwd = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                continue
            if cwd.startswith(str(self.root)):
                os.kill(pid, signal.SIGKILL)
        for pgid in self.groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def cluster():
    assert not ray.is_initialized(), "this module needs the machine to itself: no local Ray in this process"
    # A short path: Ray's socket paths under the temp dir must fit in 107 bytes.
    c = Cluster(Path(tempfile.mkdtemp(prefix="anodfd-rc-", dir="/tmp")))
    try:
        c.start_node(head=True)
        c.start_node()
        yield c
    finally:
        c.stop()
        shutil.rmtree(c.root, ignore_errors=True)


def test_nodes_have_the_dependencies_but_not_the_project(cluster):
    """The isolation is real: outside a job's package, the nodes' Python cannot import the project."""
    ok = subprocess.run([str(cluster.python), "-c", "import ray, torch, mlflow, timm, cv2"], cwd=cluster.root,
                        capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    missing = subprocess.run([str(cluster.python), "-c", "import anodfd"], cwd=cluster.root, capture_output=True,
                             text=True, check=False)
    assert "No module named 'anodfd'" in missing.stderr


def test_dashboard_and_job_api_on_loopback_with_token_auth(cluster):
    listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout
    bound = {line.split()[3] for line in listening.splitlines()}
    assert f"127.0.0.1:{cluster.dashboard_port}" in bound
    assert not any(b.endswith(f":{cluster.dashboard_port}") and not b.startswith("127.0.0.1") for b in bound)
    with pytest.raises(urllib.error.HTTPError) as e:  # no token, no answer
        urllib.request.urlopen(f"{cluster.address}/api/jobs/", timeout=10)
    assert e.value.code == 401


def in_a_job_package(path: str) -> bool:
    """True for a file inside a job's unpacked working directory on one of the test cluster's nodes."""
    return re.search(r"/node\d+/session_[^/]+/runtime_resources/working_dir_files/_ray_pkg_[0-9a-f]+/", path) is not None


def test_search_submitted_to_a_two_node_cluster(cluster, synth_ol, tmp_path, mlflow_server):
    data = shutil.copytree(synth_ol, tmp_path / "OLcluster")  # its own registered model: anodfdnet-OLcluster
    storage = tmp_path / "shared-runs"
    # Two DDP workers of 0.9 CPU cannot share a 1-CPU node: the trial trains across both nodes. The network is a
    # baseline (tests/test_search.py searches AnoDFDNet): the search and the registry take any model. One trial:
    # what a second would add (ranking, resume) is tests/test_search.py's.
    proc = cluster.submit("--data", str(data), "--preset", "smoke", "--model", "fc-siam-diff", "--num-samples", "1",
                          "--max-epochs", "2", "--workers-per-trial", "2", "--storage", str(storage),
                          "--mlflow-uri", mlflow_server, "--name", "cluster1")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "submitted raysubmit_" in out and "ray job stop --address" in out
    assert "cluster: 2 node(s) can write" in out
    assert "job raysubmit_" in out and "SUCCEEDED" in out

    # Every trial worker imported the project from the job's own package, never from an installation.
    found = re.findall(r"worker (\d) of 2 on [\d.]+: anodfd\.data\.layouts from (\S+)", out)
    assert {rank for rank, _ in found} == {"0", "1"}, out[-5000:]
    assert all(in_a_job_package(path) for _, path in found), found
    workers = cluster.api("/api/v0/actors?limit=1000&detail=false&filter_keys=class_name&filter_predicates=%3D"
                          "&filter_values=RayTrainWorker")["data"]["result"]["result"]
    assert len({w["node_id"] for w in workers}) == 2, "the trial trained on both nodes"
    assert (storage / "cluster1" / "train_runs").is_dir()  # checkpoints went to the storage given

    from anodfd.tracking import client

    c = client(mlflow_server)
    assert len(c.search_model_versions("name = 'anodfdnet-OLcluster'")) == 1
    registered = c.get_model_version_by_alias("anodfdnet-OLcluster", "challenger")  # champion only past the floor
    assert registered.version == "1"
    assert c.get_run(registered.tags["search_run"]).data.params["model.name"] == "fc-siam-diff"


def test_cluster_job_fails_fast_without_mlflow_or_writable_storage(cluster, synth_ol, tmp_path, mlflow_server):
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    cases = [
        (["--storage", str(tmp_path / "runs"), "--mlflow-uri", f"http://127.0.0.1:{free_port()}"],
         "MLflow tracking server http://127.0.0.1:"),
        (["--storage", str(not_a_folder / "runs"), "--mlflow-uri", mlflow_server], "storage folder"),
    ]
    for flags, message in cases:
        proc = cluster.submit("--data", str(synth_ol), "--preset", "smoke", "--name", "doomed", *flags, timeout=300)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1, out[-3000:]
        assert message in out and "FAILED" in out
        assert "starting search" not in out, "it failed before any trial started"
    assert not (tmp_path / "runs" / "doomed").exists()


def preflight_rows(out: str) -> dict[str, list[str]]:
    """The preflight table's rows by node id prefix: {id8: cells}."""
    rows = {}
    for line in out.splitlines():
        m = re.match(r"[\d.]+ \(([0-9a-f]{8})\)\s+(.*)$", line)
        if m:
            rows[m.group(1)] = m.group(2).split()
    return rows


def test_check_runs_the_preflight_on_every_node_without_a_trial(cluster, synth_ol, tmp_path, mlflow_server):
    storage = tmp_path / "runs"
    proc = cluster.submit("--data", str(synth_ol), "--storage", str(storage), "--mlflow-uri", mlflow_server,
                          options=("--check", "--submission-id", "raysub-check-1"), timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    rows = preflight_rows(out)
    assert len(rows) == 2 and "check passed: 2 node(s)" in out, out[-4000:]
    import torch

    for cells in rows.values():
        # CPU GPU python ray torch (CUDA) driver devices code-from storage data MLflow status
        assert cells[2] == "{}.{}.{}".format(*sys.version_info[:3]) and cells[3] == ray.__version__
        assert cells[4] == torch.__version__ and in_a_job_package(cells[8] + "/")
        assert cells[9:] == ["ok", "ok", "ok", "ok"]
    assert "starting search" not in out and not [p for p in storage.iterdir() if p.is_dir()]  # no trial, no run

    # The same submission id again: the cluster refuses it, in one line that names the address and the fix.
    again = cluster.submit("--data", str(synth_ol), "--storage", str(storage), "--mlflow-uri", mlflow_server,
                           options=("--submission-id", "raysub-check-1"), timeout=120)
    rc, err = again.returncode, again.stderr
    assert rc == 2 and len([e for e in err.splitlines() if "submit: error" in e]) == 1, err
    assert "Traceback" not in err
    assert cluster.address in err and "already exists" in err and "pass another --submission-id" in err


def test_wait_streams_the_log_as_the_job_runs(cluster):
    """`follow` tails the job's log: lines arrive while the job runs, each once, then the final status."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.address, headers={"Authorization": f"Bearer {cluster.token}"})
    job = client.submit_job(entrypoint="python -c \"import time; print('first', flush=True); time.sleep(6); "
                                       "print('second', flush=True)\"")
    seen: list[tuple[float, str]] = []

    class Recorder(io.StringIO):
        def write(self, s: str) -> int:
            seen.append((time.monotonic(), s))
            return len(s)

    real, sys.stdout = sys.stdout, Recorder()
    try:
        status = load_submit().follow(client, job)
    finally:
        sys.stdout = real
    text = "".join(s for _, s in seen)
    lines = text.splitlines()
    assert status == "SUCCEEDED" and lines.count("first") == 1 and lines.count("second") == 1, text
    t_first = next(t for t, s in seen if "first" in s.splitlines())
    t_second = next(t for t, s in seen if "second" in s.splitlines())
    assert t_second - t_first > 4, "the first line was shown while the job was still running"


def test_batch_scoring_submitted_to_a_two_node_cluster(cluster, synth_ol, tiny_checkpoints, tmp_path):
    """`submit.py --score` runs `anodfd score` as a job: actors on both nodes (whose Python has no project) write
    what `anodfd predict` writes here, and a relative path is refused before anything is uploaded."""
    from anodfd.cli import main as anodfd

    ckpt = tiny_checkpoints[0]
    listing, out = str(synth_ol / "test.txt"), tmp_path / "shared-scores"
    assert anodfd(["predict", "--checkpoint", str(ckpt), "--list", listing, "--out", str(tmp_path / "here")]) == 0

    relative = subprocess.run([sys.executable, str(SUBMIT), "--address", cluster.address, "--score", "--",
                               "--checkpoint", str(ckpt), "--list", listing, "--out", "scores"],
                              env=cluster.env, text=True, capture_output=True, check=False)
    assert relative.returncode == 2 and "--out scores: the job runs on the head node" in relative.stderr

    # Two actors of 0.7 CPU cannot share a 1-CPU node: one scores on each.
    proc = cluster.submit("--checkpoint", str(ckpt), "--list", listing, "--out", str(out), "--cpus-per-actor", "0.7",
                          options=("--score",), timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "SUCCEEDED" in text, text[-5000:]
    assert "scoring with 2 actor(s) of 0.7 CPU" in text
    actors = cluster.api("/api/v0/actors?limit=1000&detail=false")["data"]["result"]["result"]
    scorers = [a for a in actors if "_Scorer" in a["class_name"]]
    assert len({a["node_id"] for a in scorers}) == 2, scorers
    for here in (tmp_path / "here").glob("*.json"):
        assert json.loads((out / here.name).read_text()) == json.loads(here.read_text()), here.name
    assert (out / "scores.parquet").is_file()


# --- GPU preflight: two nodes that advertise a GPU they cannot use (keep these last: they stay joined) --------


@pytest.fixture(scope="module")
def gpu_nodes(cluster):
    """One node whose nvidia-smi reports a driver too old for torch's CUDA 13 build, one with no driver at all.
    Both advertise one GPU to Ray, as a real GPU node does; everything else about them is real."""
    fake = cluster.root / "old-driver-bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text(f"#!/bin/sh\necho {OLD_DRIVER}\n")
    (fake / "nvidia-smi").chmod(0o755)
    before = {n["node_id"] for n in cluster.api("/api/v0/nodes?limit=100&detail=false")["data"]["result"]["result"]}
    cluster.start_node(cpus=0, gpus=1, path_first=fake)
    old = {n["node_id"] for n in cluster.api("/api/v0/nodes?limit=100&detail=false")["data"]["result"]["result"]} - before
    cluster.start_node(cpus=0, gpus=1)
    none = {n["node_id"] for n in cluster.api("/api/v0/nodes?limit=100&detail=false")["data"]["result"]["result"]}
    none -= before | old
    return {"old": old.pop()[:8], "none": none.pop()[:8]}


def test_gpu_search_fails_within_seconds_naming_each_node_and_driver(cluster, gpu_nodes, synth_ol, tmp_path,
                                                                    mlflow_server):
    import torch

    proc = cluster.submit("--data", str(synth_ol), "--preset", "smoke", "--gpus-per-worker", "1", "--storage",
                          str(tmp_path / "runs"), "--mlflow-uri", mlflow_server, "--name", "gpu", timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "FAILED" in out, out[-3000:]
    assert "starting search" not in out and not (tmp_path / "runs" / "gpu" / "train_runs").exists()
    need = {"13": "580.65.06"}[torch.version.cuda.split(".")[0]]
    problems = {line.strip() for line in out.splitlines() if re.match(r"\s*[\d.]+ \([0-9a-f]{8}\): ", line)}
    (old,) = [p for p in problems if gpu_nodes["old"] in p]
    assert f"NVIDIA driver {OLD_DRIVER} is too old" in old and f"needs NVIDIA driver >= {need}" in old
    (none,) = [p for p in problems if gpu_nodes["none"] in p]
    assert "no NVIDIA driver found" in none and f">= {need}" in none
    assert len(problems) == 2, "the CPU nodes are fine"
    job = re.search(r"submitted (raysubmit_\w+)", out).group(1)
    info = cluster.api(f"/api/jobs/{job}")
    assert (info["end_time"] - info["start_time"]) / 1000 < 90, "failed within seconds, before any trial"


def test_check_reports_each_gpu_nodes_driver(cluster, gpu_nodes, synth_ol, tmp_path, mlflow_server):
    proc = cluster.submit("--data", str(synth_ol), "--storage", str(tmp_path / "runs"), "--mlflow-uri", mlflow_server,
                          options=("--check",), timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    rows = preflight_rows(out)
    assert len(rows) == 4
    assert rows[gpu_nodes["old"]][6:8] == [OLD_DRIVER, "0"] and rows[gpu_nodes["old"]][-1] == "FAIL"
    assert rows[gpu_nodes["none"]][6:8] == ["-", "0"] and rows[gpu_nodes["none"]][-1] == "FAIL"
    assert sum(cells[-1] == "ok" for cells in rows.values()) == 2


# --- a node whose OpenCV is not the driver's (last: it stays joined) --------------------------------------------


def test_a_node_with_another_opencv_stops_the_search_before_its_first_trial(cluster, synth_ol, tmp_path,
                                                                           mlflow_server):
    """A node whose environment records another OpenCV release (its own dist-info ahead of the shared packages, as
    an image built from an older lock has): the search stops in the preflight with one line naming that node, the
    package and both versions, and no trial starts."""
    import importlib.metadata

    mine = importlib.metadata.version("opencv-python-headless")
    theirs = "5.0.0.93" if mine != "5.0.0.93" else "4.14.0.94"
    python = node_python(cluster.root / "other-opencv")
    (site,) = (python.parents[1] / "lib").glob("python*/site-packages")
    info = site / f"opencv_python_headless-{theirs}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: opencv-python-headless\nVersion: {theirs}\n")
    before = {n["node_id"] for n in cluster.api("/api/v0/nodes?limit=100&detail=false")["data"]["result"]["result"]}
    cluster.start_node(cpus=0, python=python)
    (node,) = {n["node_id"] for n in cluster.api("/api/v0/nodes?limit=100&detail=false")["data"]["result"]["result"]
               } - before
    proc = cluster.submit("--data", str(synth_ol), "--preset", "smoke", "--gpus-per-worker", "0", "--storage",
                          str(tmp_path / "runs"), "--mlflow-uri", mlflow_server, "--name", "cv", timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "FAILED" in out, out[-3000:]
    assert "starting search" not in out and not (tmp_path / "runs" / "cv" / "train_runs").exists()
    problems = {line.strip() for line in out.splitlines() if re.match(r"\s*[\d.]+ \([0-9a-f]{8}\): ", line)}
    (problem,) = problems  # one line: that node, that package, both versions
    assert problem.endswith(f" ({node[:8]}): opencv-python-headless {theirs} there, {mine} on the driver: install "
                            "requirements.lock on every node (cluster/Dockerfile), or pass --allow-version-mismatch "
                            "to run anyway"), out[-3000:]
