"""cluster/ as Ray and KubeRay read it: the launcher config through Ray's own validation, the job package
built with Ray's own packaging code, the launcher's rsync run with Ray's own arguments, the IAM policies
against the EC2 calls Ray's autoscaler makes, and the RayJob's structure. No cluster is started here.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import tomllib
import zipfile
from pathlib import Path

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
SUBMIT = CLUSTER / "submit.py"
DLAMI = "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"


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


def quantity(q: str) -> int:
    """A Kubernetes memory quantity (8Gi, 512Mi) in bytes."""
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", q)
    return int(m.group(1)) * 1024 ** ["", "Ki", "Mi", "Gi", "Ti"].index(m.group(2) or "")


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
        # Every node boots the DLAMI family whose driver runs CUDA 13 (torch 2.14's wheels), not Ray's default.
        assert t["node_config"]["ImageId"] == DLAMI, t["node_config"]["ImageId"]
    assert head["node_config"]["IamInstanceProfile"]["Name"] == "anodfd-ray-head"
    assert {t["node_config"]["IamInstanceProfile"]["Name"] for t in workers.values()} == {"anodfd-ray-worker"}
    assert config["docker"]["image"].startswith(f"rayproject/ray:{pinned_ray_version()}-")
    assert (ROOT / config["file_mounts"]["/home/ray/anodfd"] / "tune" / "search.py").is_file()
    # Nodes get the dependencies, never the project: jobs run the code they upload.
    (setup,) = config["setup_commands"]
    assert "cluster/requirements.py" in setup and "pip install" in setup and "-e" not in setup.split()
    for c in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token" in c
    # ...and in the container's environment, so `ray exec` / `ray attach` shells have it too.
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
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
    assert all(f":{version}-gpu-" in i for i in images), images  # and the lock's hash: tests/test_lock.py
    # The image is cluster/Dockerfile: Ray at the same version, the project at /app.
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{version}-" in dockerfile and "ENV PYTHONPATH=/app" in dockerfile
    assert "cluster/requirements.py" in dockerfile and "pip install -e" not in dockerfile

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
    claims = {v["persistentVolumeClaim"]["claimName"] for v in head["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    assert claims == {pvc["metadata"]["name"]} and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert shared["ANODFD_STORAGE"].startswith("/mnt/anodfd/")  # the shared volume's mount path

    # Ray keeps its object store in /dev/shm: each pod's memory-backed /dev/shm holds at least the object store
    # it is given (else Ray falls back to /tmp), and both fit in the pod's memory limit.
    groups = [(head["rayStartParams"], head["template"]["spec"]), (gpu["rayStartParams"], gpu["template"]["spec"])]
    for params, pod in groups:
        store = int(params["object-store-memory"])
        (shm,) = [v for v in pod["volumes"] if v["name"] == "dshm"]
        assert shm["emptyDir"]["medium"] == "Memory" and quantity(shm["emptyDir"]["sizeLimit"]) >= store
        (container,) = pod["containers"]
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
        assert quantity(shm["emptyDir"]["sizeLimit"]) < quantity(container["resources"]["limits"]["memory"])
    # The cluster is removed a short, stated time after the job: what the comment says is what the field says.
    ttl = spec["ttlSecondsAfterFinished"]
    assert ttl <= 600 and f"ttlSecondsAfterFinished ({ttl} s)" in (CLUSTER / "kuberay" / "rayjob.yaml").read_text()


def test_no_credentials_in_cluster_files():
    secret = re.compile(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|(RAY_AUTH_TOKEN|password|secret)\s*[:=]\s*"
                        r"[A-Za-z0-9+/_-]{8,}|\b[0-9a-f]{32,}\b", re.IGNORECASE)
    files = [p for p in CLUSTER.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert len(files) >= 6
    for path in files:
        assert not secret.search(path.read_text()), f"{path}: {secret.search(path.read_text())}"


def test_a_password_in_the_mlflow_uri_never_reaches_the_job(monkeypatch):
    """The job's runtime env is readable by anyone who can list jobs: a URI with a password is refused, and the
    refusal does not print it."""
    submit = load_submit()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    search = submit.check_search_args(["--dataset", "OL", "--mlflow-uri", "http://ann:s3cr3t-pw@mlflow:5000",
                                       "--storage", "s3://bucket/runs"])
    with pytest.raises(submit.SubmitError) as e:
        submit.build_runtime_env(CLUSTER / "runtime_env.yaml", search)
    assert "s3cr3t-pw" not in str(e.value) and "MLFLOW_TRACKING_PASSWORD" in str(e.value)
    search.mlflow_uri = "http://mlflow:5000"
    assert submit.build_runtime_env(CLUSTER / "runtime_env.yaml", search)["env_vars"]["MLFLOW_TRACKING_URI"] == \
        "http://mlflow:5000"


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


# --- what leaves the laptop: the job package and the launcher's rsync ----------------------------------------

# What a working copy holds besides the code: data, runs, MLflow stores, caches, a virtualenv.
LOCAL_ONLY = ["data/OL/train.txt", "data/OL/A/0001.png", "runs/s1/train_runs/t1/epoch_0001/checkpoint.pt",
              "mlflow.db", "mlruns/0/meta.yaml", "mlartifacts/1/abc/artifacts/model.pt", ".cache/anodfd/x.npy",
              "anodfd/__pycache__/config.cpython-311.pyc", ".venv/bin/python", ".git/HEAD"]


def tracked(*folders: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", *folders], cwd=ROOT, capture_output=True, check=True)
    return [f for f in out.stdout.decode().split("\0") if f and (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def working_copy(tmp_path_factory) -> Path:
    """A copy of the project as a user's checkout looks: every tracked file, plus the local-only clutter."""
    root = tmp_path_factory.mktemp("checkout")
    for f in tracked():
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, root / f)
    for f in LOCAL_ONLY:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_bytes(b"x" * 64)
    return root


def job_package(root: Path, excludes: list[str], include_gitignore: bool, target: Path) -> set[str]:
    """The files of the package Ray's job client would upload for ``root``: Ray's own code path (its default
    excludes added to ours, .gitignore honoured or not), writing the zip locally instead of to the cluster."""
    from ray._private.runtime_env.packaging import create_package
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    def build(working_dir, excludes, is_file=False):
        create_package(working_dir, target, include_gitignore=include_gitignore, excludes=excludes)

    upload_working_dir_if_needed({"working_dir": str(root), "excludes": excludes}, include_gitignore, upload_fn=build)
    with zipfile.ZipFile(target) as z:
        return {n for n in z.namelist() if not n.endswith("/")}


def runtime_env_excludes() -> list[str]:
    return yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())["excludes"]


@pytest.mark.parametrize("include_gitignore", [True, False], ids=["with-gitignore", "excludes-alone"])
def test_job_package_carries_the_code_and_nothing_local(working_copy, tmp_path, include_gitignore):
    files = job_package(working_copy, runtime_env_excludes(), include_gitignore, tmp_path / "pkg.zip")
    code = tracked("anodfd", "tune", "cluster")
    assert "anodfd/data/layouts.py" in code
    assert not set(code) - files, f"left out of the job package: {sorted(set(code) - files)}"
    assert not set(LOCAL_ONLY) & files, f"uploaded with the job: {sorted(set(LOCAL_ONLY) & files)}"
    assert {"pyproject.toml", "tune/search.py"} <= files


def test_unanchored_excludes_would_drop_the_data_package(working_copy, tmp_path):
    """The check above bites: the old unanchored patterns leave anodfd/data/ behind."""
    files = job_package(working_copy, ["data", "runs"], True, tmp_path / "pkg.zip")
    assert "anodfd/data/layouts.py" not in files and "anodfd/train/loop.py" in files


def docker_context(root: Path) -> set[str]:
    """The files a plain `docker build .` of ``root`` sends, by .dockerignore's rules as Docker applies them: a
    pattern is matched from the context's root (a leading / changes nothing), `*` stays within a folder, `**/` spans
    any folders, and an excluded folder takes everything under it."""
    def regex(pattern: str) -> re.Pattern:
        out = re.escape(pattern.strip().lstrip("/")).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*")
        return re.compile(out.replace(r"\?", "[^/]") + "(?:/.*)?")

    patterns = [regex(line) for line in (root / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    return {f for f in files if not any(p.fullmatch(f) for p in patterns)}


def test_a_plain_docker_build_gets_what_the_job_package_gets(working_copy, tmp_path):
    """.dockerignore keeps data, runs, MLflow stores, caches and the virtualenv out of an image built with a plain
    `docker build .`, like the job package's excludes: both leave out the same local clutter, and keep all code."""
    context = docker_context(working_copy)
    package = job_package(working_copy, runtime_env_excludes(), False, tmp_path / "pkg.zip")
    assert not set(LOCAL_ONLY) & context, f"baked into the image: {sorted(set(LOCAL_ONLY) & context)}"
    assert set(tracked()) <= context | {".git/HEAD"}
    assert context - {".dockerignore"} == package - {".dockerignore"}, (
        f"only in the image: {sorted(context - package)}; only in the job: {sorted(package - context)}")
    # Every exclude of the job is one of the image's, anchored the same way.
    ignore = [line.strip() for line in (working_copy / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert {e if e.startswith("/") else f"**/{e}" for e in runtime_env_excludes()} <= set(ignore)


def rsync_copy(source: Path, target: Path, options: dict) -> set[str]:
    """rsync as `ray up` runs it for a file mount (Ray's own filter arguments), to a local folder."""
    from ray.autoscaler._private.command_runner import SSHCommandRunner

    args = SSHCommandRunner._create_rsync_filter_args(None, options)  # Ray's code, no SSH needed for it
    target.mkdir()
    subprocess.run(["rsync", "-a", *args, f"{source}/", f"{target}/"], check=True)
    return {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()}


@pytest.mark.parametrize("with_filter", [True, False], ids=["as-configured", "excludes-alone"])
def test_launcher_rsync_carries_the_code_and_nothing_local(working_copy, tmp_path, with_filter):
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    assert config["file_mounts"]["/home/ray/anodfd"] == "."
    options = {"rsync_exclude": config["rsync_exclude"], "rsync_filter": config["rsync_filter"] if with_filter else []}
    files = rsync_copy(working_copy, tmp_path / "node", options)
    code = tracked("anodfd", "tune", "cluster")
    assert not set(code) - files, f"left out by rsync: {sorted(set(code) - files)}"
    assert not set(LOCAL_ONLY) & files, f"copied to the nodes: {sorted(set(LOCAL_ONLY) & files)}"
    bad = rsync_copy(working_copy, tmp_path / "old", {"rsync_exclude": ["data", "runs"]})
    assert "anodfd/data/layouts.py" not in bad, "rsync matches unanchored patterns at any depth"


def test_nodes_install_the_projects_dependencies_and_not_the_project():
    out = subprocess.run(["python3", str(CLUSTER / "requirements.py")], capture_output=True, text=True, check=True)
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert out.stdout.split("\n")[:-1] == deps and not any(d.startswith("anodfd") for d in deps)


# --- IAM ------------------------------------------------------------------------------------------------------

# The EC2 calls of Ray's AWS node provider (what the head's autoscaler makes) and the IAM action each needs.
AUTOSCALER_CALLS = {"create_instances(": "ec2:RunInstances", "create_tags(": "ec2:CreateTags",
                    "instances.filter(": "ec2:DescribeInstances", ".terminate()": "ec2:TerminateInstances"}


def allowed(policy: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for st in policy["Statement"]:
        assert st["Effect"] == "Allow"
        for action in [st["Action"]] if isinstance(st["Action"], str) else st["Action"]:
            out.setdefault(action, []).append(st)
    return out


def test_iam_policies_grant_what_the_autoscaler_and_the_storage_need():
    # Read, not imported: importing it needs boto3, which only `ray up` machines have.
    source = (Path(ray.__file__).parent / "autoscaler" / "_private" / "aws" / "node_provider.py").read_text()
    head = allowed(json.loads((CLUSTER / "iam-policy.json").read_text()))
    worker = allowed(json.loads((CLUSTER / "iam-policy-worker.json").read_text()))
    for call, action in AUTOSCALER_CALLS.items():
        assert call in source, f"Ray's node provider no longer calls {call}: revisit the policy"
        assert action in head, f"the head's autoscaler calls {call} and needs {action}"
    # It gives new workers their role (and only that role), and resolves the AMI parameter aws.yaml names.
    (pass_role,) = head["iam:PassRole"]
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    worker_profile = config["available_node_types"]["gpu-spot"]["node_config"]["IamInstanceProfile"]["Name"]
    assert pass_role["Resource"].endswith(f":role/{worker_profile}")
    (ssm,) = head["ssm:GetParameters"]
    assert DLAMI.removeprefix("resolve:ssm:").startswith(ssm["Resource"].split(":parameter")[1].rstrip("*"))
    # Both reach the storage bucket; workers get nothing else (no EC2, no IAM).
    for policy in (head, worker):
        assert {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"} <= set(policy)
        assert policy["s3:GetObject"][0]["Resource"] == "arn:aws:s3:::BUCKET/*"
    assert all(a.startswith("s3:") for a in worker)
    assert not [a for a in head if a.endswith("*")], "no wildcard actions"
    readme = (ROOT / "README.md").read_text()
    assert "cluster/iam-policy.json" in readme and "cluster/iam-policy-worker.json" in readme


def test_the_head_launches_tags_and_terminates_only_its_own_clusters_instances():
    """Ray tags every instance it launches with ray-cluster-name = the cluster's name, in the launch request itself;
    the head's policy allows launching, retagging and terminating instances only under that tag, so a head (or
    whoever takes its role) cannot terminate the account's other instances."""
    from ray.autoscaler.tags import TAG_RAY_CLUSTER_NAME

    source = (Path(ray.__file__).parent / "autoscaler" / "_private" / "aws" / "node_provider.py").read_text()
    assert '"Key": TAG_RAY_CLUSTER_NAME' in source and '"TagSpecifications": tag_specs' in source
    cluster = yaml.safe_load((CLUSTER / "aws.yaml").read_text())["cluster_name"]
    tag = {"StringEquals": {f"ec2:ResourceTag/{TAG_RAY_CLUSTER_NAME}": cluster}}
    head = allowed(json.loads((CLUSTER / "iam-policy.json").read_text()))

    def on_instances(action: str) -> list[dict]:
        return [st for st in head[action] if "instance/" in str(st["Resource"]) or st["Resource"] == "*"]

    assert [st["Condition"] for st in on_instances("ec2:TerminateInstances")] == [tag]
    assert [st["Condition"] for st in on_instances("ec2:RunInstances")] == [
        {"StringEquals": {f"aws:RequestTag/{TAG_RAY_CLUSTER_NAME}": cluster}}]
    assert sorted(map(str, (st["Condition"] for st in on_instances("ec2:CreateTags")))) == sorted(
        map(str, [tag, {"StringEquals": {"ec2:CreateAction": "RunInstances"}}]))
    assert all(st["Resource"] != "*" for a in ("ec2:RunInstances", "ec2:CreateTags", "ec2:TerminateInstances")
               for st in head[a]), "no mutating EC2 call on every resource"
