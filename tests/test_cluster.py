"""cluster/: config files checked the way Ray and KubeRay read them, and the search submitted with
`cluster/submit.py --wait` to a real two-node Ray cluster (`ray start` head + joined node, token auth on,
dashboard on loopback) against a real `mlflow server`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import ray
import yaml
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
SUBMIT = CLUSTER / "submit.py"


def pinned_ray_version() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray_dep,) = [d for d in deps if d.startswith("ray[")]
    assert "==" in ray_dep, "the cluster files name one Ray version: pyproject.toml must pin it"
    return ray_dep.split("==")[1]


def load_submit():
    spec = importlib.util.spec_from_file_location("anodfd_submit", SUBMIT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the config files --------------------------------------------------------------------------------------


def test_installed_ray_is_the_pinned_one():
    assert ray.__version__ == pinned_ray_version()


def test_launcher_config_passes_rays_own_validation():
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    config = prepare_config(raw)  # as `ray up` does: defaults merged, then ray-schema.json applied
    validate_config(config)
    with pytest.raises(ValidationError):  # the validation is real: a misspelt key fails it
        validate_config({**config, "max_worker": 3})

    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head runs the Tune driver only"
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    spot = [k for k, v in workers.items() if v["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
    assert spot and len(spot) < len(workers), "both spot and on-demand GPU workers"
    for t in workers.values():
        assert t["min_workers"] == 0 < t["max_workers"], "GPU workers autoscale from zero"
        assert t["node_config"]["InstanceType"].startswith(("g", "p")), "GPU instance types"
    for t in types.values():
        assert set(t["node_config"]["IamInstanceProfile"]) == {"Name"}, "the instance profile by name"
    assert config["docker"]["image"].startswith(f"rayproject/ray:{pinned_ray_version()}-")
    assert (ROOT / config["file_mounts"]["/home/ray/anodfd"] / "tune" / "search.py").is_file()
    assert any("pip install" in c and "/home/ray/anodfd" in c for c in config["setup_commands"])
    for c in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token" in c
    assert "--dashboard-host=127.0.0.1" in config["head_start_ray_commands"][1]


def test_kuberay_rayjob_is_a_ray_io_v1_job_with_head_and_gpu_workers():
    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    version = pinned_ray_version()
    assert cluster["rayVersion"] == version
    assert cluster["authOptions"]["mode"] == "token" and cluster["enableInTreeAutoscaling"] is True
    assert spec["shutdownAfterJobFinishes"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    (gpu,) = cluster["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 < gpu["maxReplicas"]
    (worker,) = gpu["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    images = [c["image"] for c in head["template"]["spec"]["containers"] + [worker]]
    assert all(i.endswith(f":{version}-gpu") for i in images), images
    # The image is cluster/Dockerfile: Ray at the same version, the project at /app.
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{version}-" in dockerfile and "/app" in dockerfile

    # The entry point exists and its flags are ones the search accepts.
    python, script, *flags = spec["entrypoint"].split()
    assert python == "python" and script.startswith("/app/")
    assert (ROOT / script.removeprefix("/app/")).is_file()
    submit = load_submit()
    assert submit.check_search_args(flags).gpus_per_worker == 1
    # Same env_vars as the runtime env cluster/submit.py sends.
    shared = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())["env_vars"]
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"] == shared
    pvc = yaml.safe_load((CLUSTER / "kuberay" / "storage.yaml").read_text())
    claims = {v["persistentVolumeClaim"]["claimName"] for v in head["template"]["spec"]["volumes"]}
    assert claims == {pvc["metadata"]["name"]} and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert shared["ANODFD_STORAGE"].startswith("/mnt/anodfd/")  # the shared volume's mount path


def test_no_credentials_in_cluster_files():
    secret = re.compile(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|(RAY_AUTH_TOKEN|password|secret)\s*[:=]\s*"
                        r"[A-Za-z0-9+/_-]{8,}|\b[0-9a-f]{32,}\b", re.IGNORECASE)
    files = [p for p in CLUSTER.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert len(files) >= 6
    for path in files:
        assert not secret.search(path.read_text()), f"{path}: {secret.search(path.read_text())}"


def test_best_checkpoint_is_fetched_from_a_storage_uri(tmp_path):
    """Storage given as a URI (s3://, gs://; here file://, the same pyarrow code path) is read through a copy."""
    import torch

    from anodfd.train.launch import best_checkpoint_file, fetch_checkpoints

    run = tmp_path / "bucket" / "search" / "train_runs" / "trial1"
    for epoch, f1 in ((1, 0.2), (2, 0.5), (3, 0.4)):
        (run / f"epoch_{epoch:04d}").mkdir(parents=True)
        torch.save({"epoch": epoch, "metrics": {"f1": f1, "calibrated_f1": f1}}, run / f"epoch_{epoch:04d}" / "checkpoint.pt")
        (run / f"epoch_{epoch:04d}" / "roc_epoch_1.png").write_bytes(b"png")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    local = fetch_checkpoints(f"file://{run}", scratch)
    assert local == scratch and sorted(p.relative_to(scratch).as_posix() for p in scratch.rglob("*.*")) == [
        "epoch_0001/checkpoint.pt", "epoch_0002/checkpoint.pt", "epoch_0003/checkpoint.pt"]
    assert best_checkpoint_file(local) == scratch / "epoch_0002" / "checkpoint.pt"
    assert fetch_checkpoints(str(run), scratch) == run  # a folder is used in place


# --- submit.py: bad input fails before anything is uploaded -------------------------------------------------


@pytest.mark.parametrize("extra,expected", [
    (["--storage", "runs"], "storage 'runs'"),
    (["--mlflow-uri", "sqlite:///mlflow.db"], "needs a tracking server"),
    (["--data", "data/OL"], "--data data/OL"),
    (["--max-epochs", "2", "--typo"], "unrecognized arguments: --typo"),
])
def test_submit_rejects_bad_input_before_connecting(extra, expected, capsys, tmp_path):
    submit = load_submit()
    argv = ["--address", "http://127.0.0.1:9", "--", "--data", str(tmp_path), "--storage", str(tmp_path),
            "--mlflow-uri", "http://127.0.0.1:5000", *extra]
    try:
        rc = submit.main(argv)
    except SystemExit as e:  # argparse's own error exit
        rc = e.code
    assert rc == 2
    assert expected in capsys.readouterr().err


def test_submit_to_an_unreachable_address_fails_fast(capsys, tmp_path):
    submit = load_submit()
    port = free_port()
    rc = submit.main(["--address", f"http://127.0.0.1:{port}", "--", "--data", str(tmp_path), "--storage",
                      str(tmp_path), "--mlflow-uri", "http://127.0.0.1:5000"])
    assert rc == 2
    assert f"no Ray job API at http://127.0.0.1:{port}" in capsys.readouterr().err


# --- a real two-node cluster --------------------------------------------------------------------------------


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.token = secrets.token_hex(32)
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        bin_dir = str(Path(sys.executable).parent)  # `python` in job entrypoints is this environment's
        self.env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")},
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "PATH": f"{bin_dir}:{os.environ['PATH']}",
                    "PYTHONUNBUFFERED": "1"}
        self.groups: list[int] = []

    def start_node(self, head: bool, index: int) -> None:
        ray_bin = str(Path(sys.executable).parent / "ray")
        # Each node: its own temp dir (two runtime-env agents sharing one would delete each other's
        # working dirs) and its own agent ports (defaults are fixed numbers that would clash on one host).
        ports = ["--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port()),
                 "--runtime-env-agent-port", str(free_port()),
                 "--min-worker-port", str(30000 + 1000 * index), "--max-worker-port", str(30999 + 1000 * index)]
        common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--temp-dir", str(self.root / f"node{index}"),
                  "--disable-usage-stats", *ports]
        if head:
            cmd = [ray_bin, "start", "--head", "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1",
                   "--dashboard-port", str(self.dashboard_port), "--ray-client-server-port", str(free_port()), *common]
        else:
            cmd = [ray_bin, "start", "--address", f"127.0.0.1:{self.gcs_port}", *common]
        # A new session: every daemon `ray start` leaves behind stays in this process group, stopped by PID below.
        proc = subprocess.Popen(cmd, env=self.env, start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        self.groups.append(proc.pid)
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out[-3000:]

    def api(self, path: str) -> dict:
        req = urllib.request.Request(f"{self.address}{path}", headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)

    def alive_nodes(self) -> int:
        nodes = self.api("/api/v0/nodes?limit=100&detail=false")["data"]["result"]["result"]
        return sum(1 for n in nodes if n["state"] == "ALIVE")

    def submit(self, *search_args: str, timeout: int = 900) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(SUBMIT), "--address", self.address, "--wait", "--", *search_args],
                              env=self.env, text=True, capture_output=True, timeout=timeout, check=False)

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
        c.start_node(head=True, index=0)
        c.start_node(head=False, index=1)
        deadline = time.time() + 60
        while c.alive_nodes() < 2:
            assert time.time() < deadline, "the second node never joined"
            time.sleep(1)
        yield c
    finally:
        c.stop()
        shutil.rmtree(c.root, ignore_errors=True)


def test_dashboard_and_job_api_on_loopback_with_token_auth(cluster):
    listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout
    bound = {line.split()[3] for line in listening.splitlines()}
    assert f"127.0.0.1:{cluster.dashboard_port}" in bound
    assert not any(b.endswith(f":{cluster.dashboard_port}") and not b.startswith("127.0.0.1") for b in bound)
    with pytest.raises(urllib.error.HTTPError) as e:  # no token, no answer
        urllib.request.urlopen(f"{cluster.address}/api/jobs/", timeout=10)
    assert e.value.code == 401


def test_search_submitted_to_a_two_node_cluster(cluster, synth_ol, tmp_path, mlflow_server):
    data = shutil.copytree(synth_ol, tmp_path / "OLcluster")  # its own registered model: anodfdnet-OLcluster
    storage = tmp_path / "shared-runs"
    # Two DDP workers of 0.9 CPU cannot share a 1-CPU node: every trial trains across both nodes. The network
    # is a baseline (tests/test_search.py searches AnoDFDNet): the search and the registry take any model.
    proc = cluster.submit("--data", str(data), "--preset", "smoke", "--model", "fc-siam-diff", "--num-samples", "2",
                          "--max-epochs", "2", "--workers-per-trial", "2", "--storage", str(storage),
                          "--mlflow-uri", mlflow_server, "--name", "cluster1")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "submitted raysubmit_" in out and "ray job stop --address" in out
    assert "cluster: 2 node(s) can write" in out
    assert "job raysubmit_" in out and "SUCCEEDED" in out

    workers = cluster.api("/api/v0/actors?limit=1000&detail=false&filter_keys=class_name&filter_predicates=%3D"
                          "&filter_values=RayTrainWorker")["data"]["result"]["result"]
    assert len({w["node_id"] for w in workers}) == 2, "trials trained on both nodes"
    assert (storage / "cluster1" / "train_runs").is_dir()  # checkpoints went to the storage given

    from anodfd.tracking import client

    c = client(mlflow_server)
    assert len(c.search_model_versions("name = 'anodfdnet-OLcluster'")) == 1
    champion = c.get_model_version_by_alias("anodfdnet-OLcluster", "champion")
    assert champion.version == "1"
    assert c.get_run(champion.tags["search_run"]).data.params["model.name"] == "fc-siam-diff"


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
