"""Print the project's runtime dependencies from pyproject.toml, one per line, for `pip install -r /dev/stdin`.

Cluster nodes install these and not the project itself: a job's code then comes from the package the job
uploaded (cluster/runtime_env.yaml), whole, and never from a copy installed on the node.
"""

import tomllib
from pathlib import Path

if __name__ == "__main__":
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    print("\n".join(tomllib.loads(pyproject.read_text())["project"]["dependencies"]))
