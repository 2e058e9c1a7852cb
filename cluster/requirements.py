"""Print the project's runtime dependencies from pyproject.toml, one per line, for
`pip install -c requirements.lock -r /dev/stdin`; with ``--lock-hash``, the short hash of requirements.lock that the
cluster image's tag and label carry.

Cluster nodes install these and not the project itself: a job's code then comes from the package the job
uploaded (cluster/runtime_env.yaml), whole, and never from a copy installed on the node. The lock, given as
constraints, makes every node install the exact versions a laptop's `make install` has.
"""

import hashlib
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lock_hash() -> str:
    return hashlib.sha256((ROOT / "requirements.lock").read_bytes()).hexdigest()[:12]


if __name__ == "__main__":
    if sys.argv[1:] == ["--lock-hash"]:
        print(lock_hash())
    else:
        print("\n".join(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]))
