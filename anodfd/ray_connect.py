"""Connecting to Ray: the cluster at an address, or a local instance of this process's own; torch threads per CPU.

Training, the search and batch scoring all start Ray through `init_ray`, so a laptop run and a cluster run differ
only in the address.
"""

from __future__ import annotations

import math
import os


def start_local_ray(num_cpus: int | None = None, dashboard: bool = True) -> None:
    """Start a local Ray instance that its own processes can tell apart from any other on this host.

    Ray's state API, which Train's placement-group cleaner calls from inside the instance, finds "its" instance
    by scanning the host; with two local runs it finds two and fails ("Found multiple active Ray instances").
    Pinning the dashboard to a free port and exporting that address before Ray starts makes every process of
    this instance (they inherit the environment) ask its own dashboard. Without ``dashboard`` (Ray Data, which does
    not place groups) it starts in a third of the time.
    """
    import socket

    import ray

    # One machine that no cloud provider can take back: Train's preemption watcher (an actor per run, seconds of
    # CPU to start on a laptop) would watch for nothing. Set before Ray starts, so every process of it inherits it.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    if not dashboard:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
             log_to_driver=True)


def init_ray(address: str | None, dashboard: bool = True) -> bool:
    """Join the cluster at ``address`` (or ``$RAY_ADDRESS``), else start a local instance; True if joined."""
    import ray

    joined = bool(address or os.environ.get("RAY_ADDRESS"))
    if not ray.is_initialized():
        if joined:
            ray.init(address=address or os.environ["RAY_ADDRESS"], log_to_driver=True)
        else:  # the embedded default; a second run on this machine gets its own instance
            start_local_ray(dashboard=dashboard)
    return joined


def threads_for(cpus: float) -> int:
    """Torch threads of a worker given ``cpus`` CPUs: its share rounded, at least one (0.9 -> 1, 1.9 -> 2)."""
    return max(1, math.floor(cpus + 0.5))
