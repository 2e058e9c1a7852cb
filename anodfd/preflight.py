"""The cluster preflight: before the first trial, every node answers from inside the job's own runtime env.

A trial that lands on a node which cannot run it fails late and obscurely: a missing shared mount loses
checkpoints, an old NVIDIA driver makes torch silently train on CPU or crash, code imported from a node's own
installation instead of the job's package trains something else than what was submitted. So each alive node
runs one 0-CPU probe task (`probe_node`) and reports versions, where it imported the project from, its GPUs
and driver, and whether it can write the storage, read the data and reach MLflow. `check_cluster` prints one
row per node and fails the job, naming the node and the fix, if any node cannot run a trial.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from anodfd import tracking
from anodfd.config import ConfigError
from anodfd.versions import mismatches, package_versions

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# The oldest Linux driver that runs each CUDA major release (NVIDIA's minor-version compatibility: any CUDA
# 13.x build runs on 580.65.06+, any 12.x on 525.60.13+). torch's wheels carry their CUDA runtime, so the
# driver is the one thing a node must bring.
MIN_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}


@dataclass
class NodeReport:
    node: str  # "IP (node id prefix)"
    cpus: float
    gpus: float  # GPUs Ray schedules on this node
    python: str = "?"
    ray: str = "?"
    torch: str = "?"
    torch_cuda: str | None = None  # the CUDA version torch was built for; None for a CPU build
    driver: str | None = None  # NVIDIA driver version, None where there is none
    cuda_devices: int | None = None  # what torch sees; None when not asked (node without GPUs)
    code: str = "?"  # the folder the project was imported from
    storage: str = "?"
    data: str = "?"
    mlflow: str = "?"
    packages: dict[str, str] = field(default_factory=dict)  # `anodfd.versions.package_versions` there
    problems: list[str] = field(default_factory=list)
    written: str | None = None  # a probe file left in a storage folder, for the shared-folder check


def pins(pyproject: Path = PROJECT_ROOT / "pyproject.toml") -> dict[str, str]:
    """The versions every node must run: Ray and torch as pyproject.toml pins them, Python as the driver's."""
    found = {"python": "{}.{}".format(*sys.version_info[:2])}
    if pyproject.is_file():
        for dep in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
            m = re.fullmatch(r"(ray|torch)(\[[^\]]*\])?==([\w.]+)", dep.replace(" ", ""))
            if m:
                found[m.group(1)] = m.group(3)
    return found


def driver_version() -> str | None:
    """The NVIDIA driver of this machine: from nvidia-smi, else the kernel module; None if there is neither."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             check=False, capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        m = re.search(r"Kernel Module\s+([\d.]+)", Path("/proc/driver/nvidia/version").read_text())
        return m.group(1) if m else None
    except OSError:
        return None


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v))


def gpu_problem(torch_version: str, torch_cuda: str | None, driver: str | None, devices: int | None) -> str | None:
    """Why torch cannot use this node's GPUs, with the fix; None if it can."""
    if torch_cuda is None:
        return f"torch {torch_version} is a CPU build: install the CUDA build of the pinned torch"
    need = MIN_DRIVER.get(_version_tuple(torch_cuda)[0])
    built = f"torch {torch_version} is built for CUDA {torch_cuda}" + (f" and needs NVIDIA driver >= {need}" if need else "")
    if driver is None:
        return f"no NVIDIA driver found (no nvidia-smi, no /proc/driver/nvidia/version); {built}"
    if need and _version_tuple(driver) < _version_tuple(need):
        return (f"NVIDIA driver {driver} is too old: {built}; boot the node from the AMI in cluster/aws.yaml "
                "or update its driver")
    if not devices:
        return f"torch sees no CUDA device although driver {driver} is loaded ({built})"
    return None


def _torch_gpu_view() -> tuple[str, str | None, int]:
    """(torch version, its CUDA version, devices it sees) from a fresh interpreter that sees every GPU.

    The probe task holds no GPU, so Ray hides them from its own process (CUDA_VISIBLE_DEVICES); a child without
    that variable sees the node as a trial would, and never leaves a CUDA context in a reused worker.
    """
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    code = ("import json, torch; print(json.dumps([torch.__version__, torch.version.cuda, "
            "torch.cuda.device_count() if torch.cuda.is_available() else 0]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, check=False, capture_output=True, text=True,
                         timeout=300)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "torch failed to import")
    version, cuda, devices = json.loads(out.stdout.strip().splitlines()[-1])
    return version, cuda, devices


def probe_node(report: NodeReport, storage: str, data: str, uri: str, want: dict[str, str],
               driver_root: str | None, check_gpu: bool) -> NodeReport:
    """Runs on one node (a Ray task in the job's runtime env) and fills in ``report``."""
    import socket
    import uuid

    import ray

    problems = report.problems
    report.packages = package_versions()
    report.python = "{}.{}.{}".format(*sys.version_info[:3])
    report.ray = ray.__version__
    for name, have in (("python", report.python), ("ray", report.ray)):
        if name in want and not (have == want[name] or have.startswith(want[name] + ".")):
            problems.append(f"{name} {have}, but the project pins {want[name]}: use the image cluster/ names")

    # The code: every module of the project must come from one folder, the job's package when it has one.
    try:
        import anodfd
        import anodfd.data.layouts

        root = Path(anodfd.__file__).resolve().parents[1]
        sub = Path(anodfd.data.layouts.__file__).resolve().parents[2]
        report.code = str(root)
        if sub != root:
            problems.append(f"anodfd comes from {root} but anodfd.data from {sub}: the job package lacks "
                            "anodfd/data; check the excludes in cluster/runtime_env.yaml")
        if driver_root is not None and root != Path.cwd().resolve():
            problems.append(f"anodfd is imported from {root}, not from the job's package in {Path.cwd()}: "
                            "install only the project's dependencies on the nodes, not the project")
    except ImportError as e:
        report.code = "missing"
        problems.append(f"cannot import the project ({e}): check the excludes in cluster/runtime_env.yaml")

    if check_gpu and report.gpus > 0:
        report.driver = driver_version()
        try:
            report.torch, report.torch_cuda, report.cuda_devices = _torch_gpu_view()
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            problems.append(f"torch does not import: {e}")
        else:
            p = gpu_problem(report.torch, report.torch_cuda, report.driver, report.cuda_devices)
            if p:
                problems.append(p)
    else:
        import torch

        report.torch, report.torch_cuda = torch.__version__, torch.version.cuda
    if "torch" in want and report.torch.split("+")[0] != want["torch"] and report.torch != "?":
        problems.append(f"torch {report.torch}, but the project pins {want['torch']}")

    name = f".anodfd-probe-{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    report.storage = "ok"
    try:
        if "://" in storage:
            import pyarrow.fs

            fs, path = pyarrow.fs.FileSystem.from_uri(storage)
            fs.create_dir(path, recursive=True)
            with fs.open_output_stream(f"{path}/{name}") as f:
                f.write(b"ok")
            fs.delete_file(f"{path}/{name}")
        else:
            Path(storage).mkdir(parents=True, exist_ok=True)
            (Path(storage) / name).write_text("ok")
            report.written = name
    except Exception as e:  # noqa: BLE001 - whatever the cause, this node cannot write there
        report.storage = "FAIL"
        problems.append(f"cannot write storage {storage} ({type(e).__name__}: {e})")
    report.data = "ok" if Path(data).is_dir() else "FAIL"
    if report.data != "ok":
        problems.append(f"dataset folder {data} does not exist here")
    report.mlflow = "ok"
    try:
        tracking.check_tracking(uri)
    except ConfigError as e:
        report.mlflow = "FAIL"
        problems.append(str(e).split(";")[0])
    return report


def check_cluster(storage: str, data: str, uri: str, gpus_per_worker: float = 0.0, all_gpus: bool = False,
                  timeout: float = 300, allow_version_mismatch: bool = False) -> list[NodeReport]:
    """Probe every alive node of the joined cluster and print one row per node.

    GPU nodes are checked when trials will use GPUs (``gpus_per_worker > 0``) or ``all_gpus`` is set. A node whose
    version of a package that decides a model's numbers (`anodfd.versions.NUMERIC_PACKAGES`) is not the driver's
    cannot run a trial, unless ``allow_version_mismatch``: then each difference is printed and the search goes on.
    Raises ConfigError naming each node that cannot run a trial and what to fix.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # Ray

    want = pins()
    # The driver's own project folder, when the job runs from an uploaded package: nodes must use theirs.
    driver_root = str(PROJECT_ROOT) if PROJECT_ROOT == Path.cwd().resolve() else None
    probe = ray.remote(num_cpus=0)(probe_node)  # Ray: zero CPUs, so it runs even on a full or CPU-less node
    nodes = [n for n in ray.nodes() if n["Alive"]]
    check_gpus = gpus_per_worker > 0 or all_gpus
    reports, refs = [], []
    for n in nodes:
        r = NodeReport(node=f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})", cpus=n["Resources"].get("CPU", 0),
                       gpus=n["Resources"].get("GPU", 0))
        reports.append(r)
        refs.append(probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                    .remote(r, storage, data, uri, want, driver_root, check_gpus))
    for i, (r, ref) in enumerate(zip(reports, refs, strict=True)):
        try:
            reports[i] = r = ray.get(ref, timeout=timeout)
        except ray.exceptions.GetTimeoutError:  # Ray
            r.problems.append(f"no answer in {timeout:g} s")
            continue
        except ray.exceptions.RayTaskError as e:  # Ray: the probe itself could not run there
            r.problems.append(str(e).strip().splitlines()[-1])
            continue
        if r.written and "://" not in storage:  # a folder: the file that node wrote must be visible here too
            mine = Path(storage) / r.written
            if mine.exists():
                mine.unlink()
            else:
                r.storage = "FAIL"
                r.problems.append(f"storage {storage} is that node's own disk, not a folder shared with this one "
                                  "(checkpoints written there would be lost)")
    mine = package_versions()
    for r in reports:
        for name, theirs, ours in mismatches(r.packages, mine):
            line = f"{name} {theirs} there, {ours} on the driver"
            if allow_version_mismatch:
                print(f"warning: {r.node}: {line} (--allow-version-mismatch)", flush=True)
            else:
                r.problems.append(f"{line}: install requirements.lock on every node (cluster/Dockerfile), or pass "
                                  "--allow-version-mismatch to run anyway")
    print(format_table(reports, want, check_gpus), flush=True)
    if check_gpus and gpus_per_worker > 0 and not any(r.gpus > 0 for r in reports):
        print("no GPU node is up yet (GPU nodes may autoscale from 0): each trial's workers check their GPU "
              "when they start", flush=True)
    bad = [r for r in reports if r.problems]
    if bad:
        lines = [f"{r.node}: {p}" for r in bad for p in r.problems]
        raise ConfigError(f"{len(bad)} of {len(reports)} node(s) cannot run trials:\n  " + "\n  ".join(lines))
    return reports


def format_table(reports: list[NodeReport], want: dict[str, str], gpus: bool = True) -> str:
    """One row per node; a driver need column names the oldest driver the pinned torch runs on."""
    head = ["node", "CPU", "GPU", "python", "ray", "torch (CUDA)", "driver", "CUDA devices", "code from",
            "storage", "data", "MLflow", "status"]
    rows = []
    for r in reports:
        torch_col = f"{r.torch} ({r.torch_cuda or 'cpu'})"
        gpu_cols = [r.driver or "-", "-" if r.cuda_devices is None else str(r.cuda_devices)] if gpus and r.gpus else ["-", "-"]
        rows.append([r.node, f"{r.cpus:g}", f"{r.gpus:g}", r.python, r.ray, torch_col, *gpu_cols, r.code,
                     r.storage, r.data, r.mlflow, "ok" if not r.problems else "FAIL"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]

    def line(cells: list) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    pinned = ", ".join(f"{k} {v}" for k, v in want.items())
    return "\n".join([f"cluster preflight ({len(reports)} node(s); pins: {pinned}):", line(head),
                      line(["-" * w for w in widths]), *map(line, rows)])
