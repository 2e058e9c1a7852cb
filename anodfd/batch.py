"""`anodfd score`: batch scoring with Ray Data, for the thousands of pairs a night that need triage.

    pairs (driver) -> decode, parallel Ray tasks -> the model, an actor pool (`map_batches`) -> ranked parquet

Each actor holds one model: one actor per GPU on a cluster, CPU actors sharing the cores locally. An actor scores a
pair with `anodfd.predict.analyse` and writes its map, overlay and JSON with `anodfd.predict.write_outputs`, so the
files are the ones `anodfd predict` writes. The driver then ranks every pair's JSON into ``scores.parquet``
(pair, score, regions, anomalous fraction), highest score first.

Resumable: a pair whose JSON is in ``--out`` is skipped, and the JSON is written last and atomically, so a killed
run never leaves a pair that looks done. ``--out`` remembers which weights and threshold wrote it
(``score-run.json``); scoring into it with another model is refused before anything runs, so results of two models
never mix. On a cluster ``--out`` must be storage every node can write (as the search's ``--storage``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from anodfd.config import ConfigError

MANIFEST = "score-run.json"
PARQUET = "scores.parquet"
DECODE_CPUS = 0.25  # decoding is short; a whole CPU each would starve the actors of a 2-core machine
PAIRS_PER_BLOCK = 4  # one Ray task per pair costs more than decoding a 640x640 pair (measured: 39 s against 30 s
# for 200 DeepPCB pairs); a few pairs per block still keeps every actor fed


DECODE_MODES = ("auto", "tasks", "actors")


@dataclass
class ScoreOptions:
    actors: int | None = None  # default: one per GPU on a cluster with GPUs, else the CPUs shared out locally
    cpus_per_actor: float | None = None
    gpus_per_actor: float = 0.0
    # Where images are decoded. Tasks keep GPU actors fed while CPUs decode; CPU actors decode their own pairs,
    # since handing decoded arrays over costs more than it saves: on 2 cores, 200 pairs at 2048x1536 took 24 s in
    # the pipeline with decoding tasks against 18 s without (19 MB per pair through the object store).
    decode: str = "auto"  # auto: tasks when the actors have GPUs, else in the actors

    def __post_init__(self) -> None:
        if self.decode not in DECODE_MODES:
            raise ConfigError(f"--decode {self.decode!r}: choose one of {', '.join(DECODE_MODES)}")
        if self.actors is not None and not (isinstance(self.actors, int) and self.actors >= 1):
            raise ConfigError(f"--actors {self.actors!r}: must be 1 or more (left out: one per GPU, else the CPUs "
                              "shared out)")
        if self.cpus_per_actor is not None and not (self.cpus_per_actor > 0 and math.isfinite(self.cpus_per_actor)):
            raise ConfigError(f"--cpus-per-actor {self.cpus_per_actor!r}: must be above 0 (fractions such as 0.5 "
                              "work)")
        if not (self.gpus_per_actor >= 0 and math.isfinite(self.gpus_per_actor)):
            raise ConfigError(f"--gpus-per-actor {self.gpus_per_actor!r}: must be 0 (CPU actors) or more")


def weights_digest(ckpt: dict) -> str:
    """sha256 of the weights (names, shapes and values), independent of how the checkpoint file was written."""
    h = hashlib.sha256()
    for name, tensor in sorted(ckpt["model"].items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def claim_output(out: Path, identity: dict) -> None:
    """Create ``out`` for ``identity``'s results, or check that it already holds results of the same model."""
    manifest = out / MANIFEST
    if manifest.is_file():
        held = json.loads(manifest.read_text())
        if any(held.get(k) != identity.get(k) for k in ("weights", "threshold", "openvino")):
            raise ConfigError(
                f"{out} holds results of another model ({held.get('source')}, threshold {held.get('threshold')}, "
                f"IR {held.get('openvino')}); this run is {identity['source']}, threshold {identity['threshold']}, "
                f"IR {identity.get('openvino')}. Pass a new --out "
                "(nothing there was changed)")
        return
    out.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps(identity, indent=2))


def pending(pairs: list[tuple[str, Path, Path]], out: Path) -> list[tuple[str, Path, Path]]:
    """The pairs without a result in ``out`` (no ``<name>.json``)."""
    return [p for p in pairs if not (out / f"{p[0]}.json").is_file()]


def _decode(row: dict, many: bool = False) -> dict:
    """One pair's files (or, with ``many``, lists of them) -> RGB arrays, as `anodfd predict` decodes them."""
    from anodfd.data.cache import read_rgb  # here: this runs in a Ray worker

    if many:
        return {f"{k}_rgb": [read_rgb(Path(f)) for f in row[k]] for k in ("history", "current")}
    return {**row, "history_rgb": read_rgb(Path(row["history"])), "current_rgb": read_rgb(Path(row["current"]))}


class _Scorer:
    """A Ray Data actor: the model loaded once, then each pair scored and its files written."""

    def __init__(self, ckpt: dict, threshold: float, out: str, threads: int, openvino: str | None = None) -> None:
        from anodfd.checkpoint import inference_model
        from anodfd.inference import resolve_device

        torch.set_num_threads(threads)
        self.device = resolve_device("auto")
        self.model, self.config = inference_model(ckpt, self.device)
        if openvino:
            from anodfd.openvino_ir import ir_for

            self.model, self.device = ir_for(openvino, self.config, threads), "cpu"
        self.threshold, self.out = threshold, Path(out)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from anodfd.predict import predict_pair

        if "history_rgb" not in batch:  # decoded here (CPU actors), not by tasks
            batch = {**batch, **_decode({"history": batch["history"], "current": batch["current"]}, many=True)}
        for name, hist, cur, hist_rgb, cur_rgb in zip(batch["name"], batch["history"], batch["current"],
                                                      batch["history_rgb"], batch["current_rgb"]):
            predict_pair(self.model, self.config.data, str(name), Path(hist), Path(cur), hist_rgb, cur_rgb, self.out,
                         self.threshold, self.device)
        return {"name": [str(n) for n in batch["name"]]}


def size_actors(opts: ScoreOptions, joined: bool) -> tuple[int, float, float, bool]:
    """(actors, CPUs each, GPUs each, decode in tasks) for the Ray instance in use: one actor per GPU when there are
    GPUs; else, on this machine, its CPUs shared out (less the decode tasks' share), and on a cluster, one CPU each."""
    import ray

    res = ray.cluster_resources()
    cpus_total, gpus_total = res.get("CPU", 0), res.get("GPU", 0)
    gpus = opts.gpus_per_actor or (1.0 if gpus_total >= 1 else 0.0)
    in_tasks = opts.decode == "tasks" or (opts.decode == "auto" and gpus > 0)
    spare = max(0.1, cpus_total - (2 * DECODE_CPUS if in_tasks else 0))  # decode tasks keep moving beside actors
    if gpus:
        cpus = opts.cpus_per_actor or 1.0
        actors = opts.actors or max(1, int(gpus_total // gpus))
    elif opts.cpus_per_actor:
        cpus = opts.cpus_per_actor
        actors = opts.actors or max(1, int(spare // cpus))
    elif joined:
        cpus = 1.0
        actors = opts.actors or max(1, int(spare))
    else:
        actors = opts.actors or max(1, int(cpus_total))
        cpus = spare / actors
    # An actor larger than every node, or a pool larger than the instance, would wait forever.
    biggest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=0)
    if cpus > biggest + 1e-9:
        raise ConfigError(f"an actor of {cpus:g} CPUs fits no node (the largest has {biggest:g}); lower "
                          "--cpus-per-actor")
    if actors * cpus > cpus_total + 1e-9 or actors * gpus > gpus_total + 1e-9:
        raise ConfigError(f"{actors} actors of {cpus:g} CPUs and {gpus:g} GPUs need more than the Ray instance has "
                          f"({cpus_total:g} CPUs, {gpus_total:g} GPUs); lower --actors or --cpus-per-actor")
    return actors, cpus, gpus, in_tasks


def score_pairs(ckpt: dict, source: str, pairs: list[tuple[str, Path, Path]], out: str | Path, threshold: float,
                address: str | None = None, opts: ScoreOptions | None = None, progress: bool = True,
                openvino: str | None = None) -> Path:
    """Score ``pairs`` not yet in ``out`` on Ray Data, then rank every pair's result into ``out``/scores.parquet.
    ``openvino``, an IR of the checkpoint (`anodfd export --format openvino`), runs in place of its network."""
    from anodfd.predict import check_pairs
    from anodfd.ray_connect import init_ray, threads_for

    opts = opts or ScoreOptions()
    out = Path(out)
    check_pairs(pairs, done={n for n, _, _ in pairs} - {n for n, _, _ in pending(pairs, out)})
    # An IR's own maps are not the checkpoint's (INT8): a folder scored by one is not continued by the other.
    claim_output(out, {"source": source, "weights": weights_digest(ckpt), "threshold": threshold,
                       **({"openvino": str(Path(openvino).resolve())} if openvino else {})})
    todo = pending(pairs, out)
    print(f"{len(todo)} of {len(pairs)} pairs to score ({len(pairs) - len(todo)} already in {out})", flush=True)
    if todo:
        import ray

        joined = init_ray(address, dashboard=False)  # Ray Data needs no dashboard; it costs 5 s to start
        actors, cpus, gpus, decode_in_tasks = size_actors(opts, joined)
        print(f"scoring with {actors} actor(s) of {cpus:g} CPU and {gpus:g} GPU, decoding in "
              f"{'parallel tasks' if decode_in_tasks else 'the actors'}", flush=True)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # one bar below, counting pairs, instead of one per operator
        ctx.execution_options.preserve_order = False
        slim = {**ckpt, "optimizer": None}
        rows = [{"name": n, "history": str(h.resolve()), "current": str(c.resolve())} for n, h, c in todo]
        blocks = -(-len(rows) // PAIRS_PER_BLOCK)
        ds = ray.data.from_items(rows, override_num_blocks=blocks)  # Ray: blocks of a few pairs
        if decode_in_tasks:
            ds = ds.map(_decode, num_cpus=DECODE_CPUS)  # Ray: parallel tasks, beside the actors
        ds = (ds.map_batches(_Scorer, batch_size=PAIRS_PER_BLOCK, compute=ray.data.ActorPoolStrategy(size=actors),
                           num_cpus=cpus, num_gpus=gpus,
                           fn_constructor_kwargs={"ckpt": slim, "threshold": threshold, "out": str(out.resolve()),
                                                  "threads": threads_for(cpus),
                                                  "openvino": openvino and str(Path(openvino).resolve())}))
        bar = tqdm(total=len(todo), unit="pair", desc="scoring", disable=not progress, file=sys.stderr)
        for _ in ds.iter_rows():  # Ray: runs the pipeline; each row is one pair scored and written
            bar.update()
        bar.close()
    return rank(pairs, out)


def rank(pairs: list[tuple[str, Path, Path]], out: Path) -> Path:
    """``out``/scores.parquet: one row per pair from its JSON, highest score first; written atomically."""
    import pandas as pd

    rows = []
    for name, _, _ in pairs:
        result = json.loads((out / f"{name}.json").read_text())
        rows.append({"pair": name, "score": result["score"], "regions": len(result["boxes"]),
                     "anomalous_fraction": result["anomalous_fraction"], "history": result["history"],
                     "current": result["current"], "align_ok": result["align"]["ok"]})
    table = pd.DataFrame(rows).sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
    tmp = out / f".{PARQUET}.tmp"
    table.to_parquet(tmp, index=False)
    os.replace(tmp, out / PARQUET)
    return out / PARQUET
