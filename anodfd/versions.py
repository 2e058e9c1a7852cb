"""The versions of the packages that decide a model's numbers, compared between a driver and its nodes (the cluster
preflight) and between a checkpoint and the process that loads it (predict, score, serving).

Registration differs between OpenCV releases, resizing between numpy and albumentations releases, kernels between
torch releases: a model trained under one set and served under another can give other maps from the same pair.
"""

from __future__ import annotations

import functools
import importlib.metadata
import sys

# Distribution names, as pip and requirements.lock spell them.
NUMERIC_PACKAGES = ("torch", "torchvision", "timm", "numpy", "opencv-python-headless", "albumentations", "mlflow",
                    "ray")
_warned: set[tuple] = set()


def package_versions() -> dict[str, str]:
    """This environment's version of each of `NUMERIC_PACKAGES` ("missing" where one is not installed)."""
    return dict(_installed())


@functools.cache
def _installed() -> dict[str, str]:  # read once: every checkpoint of a run records them
    found = {}
    for name in NUMERIC_PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "missing"
    return found


def mismatches(theirs: dict[str, str], mine: dict[str, str], level: int | None = None) -> list[tuple[str, str, str]]:
    """(package, their version, mine) for each package both name whose versions differ: in full, or only in the
    first ``level`` parts (2: major and minor). Local tags (``+cu130``) do not count."""
    def cut(v: str) -> str:
        v = v.split("+")[0]
        return ".".join(v.split(".")[:level]) if level else v

    return [(n, theirs[n], mine[n]) for n in NUMERIC_PACKAGES if n in theirs and n in mine
            and cut(theirs[n]) != cut(mine[n])]


def warn_if_trained_elsewhere(ckpt: dict, source: str = "the checkpoint") -> None:
    """One line on stderr, once per process and set of differences, when ``ckpt`` was trained under other major or
    minor versions of `NUMERIC_PACKAGES` than this process runs. Checkpoints from before versions were recorded
    say nothing."""
    recorded = ckpt.get("versions")
    if not isinstance(recorded, dict):
        return
    diff = tuple(mismatches(recorded, package_versions(), level=2))
    if diff and diff not in _warned:
        _warned.add(diff)
        listed = ", ".join(f"{n} {theirs} (here {mine})" for n, theirs, mine in diff)
        print(f"warning: {source} was trained under {listed}: its maps may differ from training's; install "
              "requirements.lock's versions to serve it as trained", file=sys.stderr, flush=True)
