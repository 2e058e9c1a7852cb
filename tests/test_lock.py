"""requirements.lock: every install path uses it, it satisfies pyproject.toml's ranges, the test environment is
exactly it, and the cluster image's tag names it."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
# Installed beside the lock's packages by the venv itself, or the project (editable) over them.
NOT_LOCKED = {"pip", "setuptools", "anodfd"}


def locked() -> dict[str, Version]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"requirements.lock: {line!r} is not pinned with =="
            pins[canonicalize_name(name)] = Version(version)
    return pins


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in project["dependencies"] + extras["dev"] + extras["openvino"]]


def test_the_lock_satisfies_every_range_of_pyproject():
    pins = locked()
    for req in project_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is in pyproject.toml but not in requirements.lock: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"requirements.lock pins {name}=={pins[name]} outside pyproject.toml's {req}: run `make lock`"
    # Every range has a floor: the version the suite passed on when the lock was made (see pyproject.toml).
    for req in project_requirements():
        assert any(s.operator in (">=", "==") for s in req.specifier), f"{req} has no lower bound"


@pytest.mark.skipif(os.environ.get("ANODFD_UNLOCKED") == "1", reason="make test-latest runs off the lock on purpose")
def test_the_test_environment_is_exactly_the_lock():
    pins = locked()
    # The environment's own site-packages: Ray puts its vendored copies (psutil, colorama) on sys.path on import.
    site = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    installed = {canonicalize_name(d.metadata["Name"]): Version(d.version)
                 for d in importlib.metadata.distributions(path=sorted(site))}
    extra = sorted(set(installed) - set(pins) - NOT_LOCKED)
    missing = sorted(set(pins) - set(installed))
    wrong = sorted(f"{n} {installed[n]} (lock {pins[n]})" for n in set(pins) & set(installed) if installed[n] != pins[n])
    assert not (extra or missing or wrong), f"not installed from the lock (make install): extra {extra}, " \
                                            f"missing {missing}, other versions {wrong}"


def test_every_install_path_uses_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    install = makefile.split("$(STAMP):", 1)[1].split("\n\n", 1)[0]
    assert "LOCK := requirements.lock" in makefile
    assert "-r $(LOCK)" in install and "sync" in install and "--no-deps -e ." in install, install
    assert "pip install -e '.[dev]'" not in makefile.replace("$(PY) -m ", "")
    # The cluster image and the launcher's nodes take the lock's versions as constraints of the runtime deps.
    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    assert re.search(r"cluster/requirements\.py \| pip install [^\n]*-c requirements\.lock -r /dev/stdin", dockerfile)
    (setup,) = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())["setup_commands"]
    assert "-c /home/ray/anodfd/requirements.lock" in setup and "cluster/requirements.py" in setup
    # .ci/run calls make test, which installs through the same stamp.
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_the_cluster_image_is_tagged_and_labelled_with_the_locks_hash():
    out = subprocess.run([sys.executable, str(ROOT / "cluster" / "requirements.py"), "--lock-hash"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{12}", out)
    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    assert "ARG LOCK" in dockerfile and "LABEL io.anodfd.lock=$LOCK" in dockerfile
    job = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayjob.yaml").read_text())
    images = re.findall(r"image: (\S+)", (ROOT / "cluster" / "kuberay" / "rayjob.yaml").read_text())
    assert images and all(i.endswith(f"-{out}") for i in images), \
        f"rayjob.yaml's images {images} must end with the lock's hash -{out} (python cluster/requirements.py --lock-hash)"
    assert job["spec"]["rayClusterSpec"]["rayVersion"] in images[0]
