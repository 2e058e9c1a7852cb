"""The `anodfd` command: a thin face over the library. Each subcommand parses, validates, then calls one function."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from anodfd.config import (
    ALIGN_METHODS,
    CALIBRATIONS,
    CONFIRM_METHODS,
    DEPTHS,
    MODEL_NAMES,
    PRESETS,
    SCHEDULES,
    Config,
    ConfigError,
    check_output,
    with_window,
)
from anodfd.data.layouts import LAYOUTS, SPLITS, DatasetError


def _synth(args: argparse.Namespace) -> int:
    from anodfd.synth import parse_size, synthesize

    try:
        size = parse_size(args.size) if args.size else None
    except ValueError as e:
        raise ConfigError(f"--size {args.size!r}: {e}") from None
    check_output(args.out, "--out")
    out = synthesize(args.kind, args.out, pairs=args.pairs, seed=args.seed, size=size, workers=args.workers,
                     small=args.small_anomalies, force=args.force, test_pairs=args.test_pairs)
    print(f"wrote {out} (contact sheet: {out / 'contact_sheet.png'})")
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from anodfd.config import DataConfig
    from anodfd.data.check import check_dataset
    from anodfd.data.layouts import resolve_data_dir

    DataConfig(group_regex=args.group_regex or "", val_groups=args.val_groups or "")  # checked before any file is read
    root = resolve_data_dir(dataset=args.dataset, data=args.dir, data_root=args.data_root)
    report = check_dataset(root, args.layout, allow_normal_only=args.allow_normal_only,
                           group_regex=args.group_regex or "", val_groups=args.val_groups or "")
    print(report.format())
    return 0 if report.ok else 1


def _data_shift(args: argparse.Namespace) -> int:
    from anodfd.data.shift import MANIFEST, shift_dataset

    warps = shift_dataset(args.src, args.out, args.homography, args.photometric, args.seed, tuple(args.splits),
                          args.layout)
    print(f"{len(warps)} history images shifted (corners up to {args.homography:g} of the side"
          f"{', relit' if args.photometric else ''}) in {args.out}; homographies in {Path(args.out) / MANIFEST}")
    return 0


def _data_boxmasks(args: argparse.Namespace) -> int:
    from anodfd.data.shift import box_mask_dataset

    c = box_mask_dataset(args.src, args.out, args.align, tuple(args.splits), args.layout)
    print(f"{c['pairs']} masks derived from {c['boxes']} boxes on the registered pairs ({args.align}) in {args.out}; "
          f"{c['empty_boxes']} boxes show no difference once registered; {c['align_failed']} pairs fell back to "
          "the identity")
    return 0


def add_calibrate_flag(p: argparse.ArgumentParser) -> None:
    """`anodfd train` and the search: what the served threshold maximises on validation."""
    p.add_argument("--calibrate", choices=list(CALIBRATIONS), default=None,
                   help="the served threshold maximises validation pixel F1 (default; the search's smoke preset: "
                        "defect) or defect F (0.05 grid): defect suits a site that counts defects found and false "
                        "alarms")


# CLI flag -> dotted config keys it sets.
_FLAGS = {
    "model": ["model.name"], "depth": ["model.depth"], "pretrained": ["model.pretrained"],
    "resize": ["data.resize"], "scale": ["data.scale"], "crop": ["data.crop"],
    "crop_pos_fraction": ["data.crop_pos_fraction"], "align": ["data.align"], "relight": ["data.relight"],
    "confirm": ["data.confirm"], "layout": ["data.layout"],
    "augment": ["data.augment"], "misregister": ["data.misregister"], "num_workers": ["data.num_workers"],
    "cache_dir": ["data.cache_dir"], "group_regex": ["data.group_regex"], "val_groups": ["data.val_groups"],
    "epochs": ["train.epochs"], "batch_size": ["train.batch_size"],
    "lr": ["train.lr"], "schedule": ["train.schedule"], "calibrate": ["train.calibrate"],
    "bce_weight": ["train.bce_weight"],
    "dice_weight": ["train.dice_weight"],
    "focal_weight": ["train.focal_weight"], "pos_weight": ["train.pos_weight"], "seed": ["train.seed"],
    "device": ["train.device"], "max_steps_per_epoch": ["train.max_steps_per_epoch"],
    "log_every": ["train.log_every"],
}


def config_from_args(args: argparse.Namespace) -> Config:
    """Preset first, then every flag the user gave; the data folder resolved and validated to exist."""
    config = Config().with_flat(PRESETS[args.preset])
    overrides = {"data.data": str(resolve_data_dir_for(args))}
    for flag, keys in _FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides.update({k: value for k in keys})
    return with_window(config, overrides)


def add_data_flags(p: argparse.ArgumentParser, layout: bool = True) -> None:
    """Which dataset: `anodfd train`, `eval`, `data check` and the search (which reads the layout from the folder)."""
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--data", default=None, help="dataset folder (paper or A/B/label layout)")
    g.add_argument("--dataset", default=None, help="named dataset under the data root: OL, FB or Diff")
    p.add_argument("--data-root", default=None, help="folder holding named datasets (default $ANODFD_DATA_ROOT or ./data)")
    if layout:
        p.add_argument("--layout", choices=LAYOUTS, default=None)


def add_view_flags(p: argparse.ArgumentParser) -> None:
    """How the network sees a pair (each default: the preset's): `anodfd train` and the search."""
    p.add_argument("--resize", type=int, default=None,
                   help="squash every pair to N x N (the paper: 256); 0 keeps the aspect ratio (needs --crop)")
    p.add_argument("--scale", type=float, default=None,
                   help="with --resize 0: scale both sides by S (1 = native pixels)")
    p.add_argument("--crop", type=int, default=None,
                   help="train on random N x N crops; validation and inference slide N x N tiles")
    p.add_argument("--crop-pos-fraction", type=float, default=None,
                   help="share of training crops placed around a defect, each defect equally likely")
    p.add_argument("--align", choices=list(ALIGN_METHODS), default=None,
                   help="register history onto current before the network: none, ecc or features")
    p.add_argument("--relight", action="store_true", default=None,
                   help="after --align, match history's local lighting to current's (for tiles of large images)")
    p.add_argument("--confirm", choices=list(CONFIRM_METHODS), default=None,
                   help="diff: keep a detected region only where the registered pair's grey difference fires inside "
                        "it (cuts false alarms on unseen boards; the threshold is calibrated and served that way)")


def add_group_flags(p: argparse.ArgumentParser) -> None:
    """Groups (boards, parts, sites) and group-held-out validation: `anodfd train`, `data check` and the search."""
    p.add_argument("--group-regex", default=None,
                   help="a pair's group is this regex's first group (or whole match) on its name, e.g. '^(\\d{5})' "
                        "for DeepPCB's boards; validation cut from train then holds out whole groups")
    p.add_argument("--val-groups", default=None,
                   help="comma-separated groups validation holds, taken from the train and validation lists")


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    add_data_flags(p)
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper",
                   help="starting point; explicit flags override it (default: the paper's recipe)")
    p.add_argument("--model", choices=MODEL_NAMES, default=None)
    p.add_argument("--depth", type=int, choices=DEPTHS, default=None, help="Transformer layers (0 = none); AnoDFDNet only")
    p.add_argument("--pretrained", action="store_true", default=None, help="download ImageNet encoder weights (timm, U-Net, DeepLabV3+)")
    add_view_flags(p)
    p.add_argument("--augment", choices=["none", "paper", "strong"], default=None)
    p.add_argument("--misregister", type=float, default=None, help="max independent history misalignment (0.03 = 3%%)")
    add_group_flags(p)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--schedule", choices=list(SCHEDULES), default=None,
                   help="constant learning rate (default, the paper's) or cosine decay to 0 by the last epoch")
    add_calibrate_flag(p)
    p.add_argument("--bce-weight", type=float, default=None)
    p.add_argument("--dice-weight", type=float, default=None)
    p.add_argument("--focal-weight", type=float, default=None)
    p.add_argument("--pos-weight", type=float, default=None, help="BCE weight of anomalous pixels")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="auto (default), cpu or cuda")
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader processes")
    p.add_argument("--cache-dir", default=None, help="decode cache (default $ANODFD_CACHE_DIR or ~/.cache/anodfd)")
    p.add_argument("--max-steps-per-epoch", type=int, default=None)
    p.add_argument("--log-every", type=int, default=None, help="print a line every N steps")


def _train(args: argparse.Namespace) -> int:
    from anodfd.tracking import ui_command
    from anodfd.train.launch import RayOptions, train_on_ray

    config = config_from_args(args)
    storage, name = args.storage, args.name
    if args.out:  # --out DIR is the run folder itself
        if args.name or args.storage:
            raise ConfigError("give either --out DIR, or --storage and --name, not both")
        out = Path(args.out).expanduser().resolve()
        storage, name = str(out.parent), out.name
    opts = RayOptions(
        workers=args.workers, gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
        address=args.address, storage=storage or "runs", name=name, max_failures=args.max_failures,
        keep=args.keep, mlflow_uri=args.mlflow_uri, experiment=args.experiment,
    )
    outcome = train_on_ray(config, opts)
    m = outcome.best_metrics
    if m:
        print(f"best epoch {int(m['epoch'])}: validation F1 {m['f1']:.4f} (calibrated {m['calibrated_f1']:.4f} "
              f"@ {m['calibrated_threshold']:.3f}), AUC {m['auc']:.4f}")
    print(f"run folder: {outcome.run_dir}" + (f"; best checkpoint {outcome.best_checkpoint}" if outcome.best_checkpoint else ""))
    print(f"MLflow run {outcome.mlflow_run_id}; to browse: {ui_command(outcome.mlflow_uri)}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from anodfd.checkpoint import inference_model
    from anodfd.inference import resolve_device
    from anodfd.metrics import BoxCounts, format_row, plot_roc
    from anodfd.predict import check_threshold
    from anodfd.scoring import score_native

    device = resolve_device(args.device)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be 1 or more (tiles scored at once)")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            check_output(path, flag, folder=False)  # found now, not after all the scoring
    ckpt = _load_checkpoint_for(args)
    model, config = inference_model(ckpt, device)
    data_cfg = config.data
    data_cfg.data = str(resolve_data_dir_for(args))
    data_cfg.layout = args.layout or "auto"
    threshold = check_threshold(args.threshold)
    calibrated = float(ckpt.get("threshold", threshold))
    calibrated = calibrated if 0.0 < calibrated < 1.0 else threshold
    # At each mask's own resolution, as the registry scores: a 64 px model and a 640 px one count the same pixels.
    # It checks every file of the split before any compute.
    boxes = BoxCounts()
    pixels, images, defects, _ = score_native(model, data_cfg, args.split, device, args.batch_size,
                                              threshold=calibrated, boxes=boxes)
    metrics = pixels.compute(threshold)
    normal, anomalous = (int(n) for n in images.state().sum(dim=1))
    print(f"{args.split} ({normal + anomalous} pairs, native resolution), threshold {metrics['threshold']:.3f}: "
          f"{format_row(metrics)}")
    print(f"{args.split}, calibrated threshold {calibrated:.3f}: {format_row(pixels.compute(calibrated))}")
    d = defects.compute()
    print(f"{args.split} defects at {calibrated:.3f}: F {d['defect_f']:.3f} | recall {d['defect_recall']:.3f} | "
          f"precision {d['defect_precision']:.3f} | {d['false_alarms_per_image']:.2f} false alarms per pair | "
          f"every defect found in {d['all_found']:.3f} of the pairs that have any")
    b = boxes.compute() if boxes.counts["pairs"] else None
    if b:
        print(f"{args.split} boxes ({boxes.counts['pairs']} pairs, {boxes.counts['boxes']} boxes) at {calibrated:.3f}: "
              f"overlap rule F {b['box_f']:.3f} | recall {b['box_recall']:.3f} | precision {b['box_precision']:.3f} | "
              f"{b['box_false_alarms_per_image']:.2f} false alarms per pair; DeepPCB's rule (IoU > 0.33, one to one) "
              f"F {b['strict_f']:.3f} | recall {b['strict_recall']:.3f} | precision {b['strict_precision']:.3f}")
    results = {k: metrics[k] for k in ("precision", "recall", "oa", "f1", "iou", "auc", "eer", "threshold")}
    results["image_auroc"] = images.auroc()
    undefined = {}  # metric -> why it has no value; NaN is not an answer (and not valid JSON)
    if not (pixels.pos.sum() and pixels.neg.sum()):
        why = f"the {args.split} split has no {'anomalous' if not pixels.pos.sum() else 'normal'} pixel"
        undefined.update(auc=why, eer=why)
    if not (normal and anomalous):
        undefined["image_auroc"] = (f"all {normal + anomalous} pairs of the {args.split} split are "
                                    f"{'anomalous' if anomalous else 'normal'}; it needs both kinds")
    for key, why in undefined.items():
        results[key] = None
        print(f"{key} undefined: {why}")
    if results["image_auroc"] is not None:
        print(f"image-level AUROC {results['image_auroc']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({**results, "undefined": undefined, "resolution": "native",
                                               "defect_threshold": calibrated, "defects": d,
                                               **({"boxes": b} if b else {})}, indent=2))
    if args.plot:
        plot_roc(pixels, args.plot, title=f"ROC, {args.split} split")
    return 0


def _load_checkpoint_for(args: argparse.Namespace) -> dict:
    """The checkpoint behind ``--checkpoint FILE`` or ``--model models:/...`` (downloaded from the registry)."""
    if args.model:
        from anodfd.registry import load_checkpoint_from_registry
        from anodfd.tracking import resolve_tracking_uri

        return load_checkpoint_from_registry(resolve_tracking_uri(args.mlflow_uri), args.model)
    from anodfd.checkpoint import load_checkpoint

    return load_checkpoint(args.checkpoint)


def _add_model_source_flags(p: argparse.ArgumentParser, onnx: bool = False, ir: bool = False) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--checkpoint", default=None, help="a .pt file written by `anodfd train`")
    g.add_argument("--model", default=None,
                   help="a registered model: models:/anodfdnet-OL@champion or models:/anodfdnet-OL/VERSION")
    if onnx:
        g.add_argument("--onnx", default=None, help="a model.onnx written by `anodfd export`, run in ONNX Runtime")
        g.add_argument("--openvino", default=None, help="an IR (model.xml, model-int8.xml) written by `anodfd export "
                                                        "--format openvino`, run in OpenVINO")
    if ir:
        p.add_argument("--ir", action="store_true", help="with --model: run the OpenVINO IR the version carries "
                                                         "(`anodfd export --model M --format openvino`; INT8 if any)")
    p.add_argument("--mlflow-uri", default=None,
                   help="registry for --model (default $MLFLOW_TRACKING_URI, else ./mlflow.db)")


def _models_list(args: argparse.Namespace) -> int:
    from anodfd.registry import format_versions, list_versions
    from anodfd.tracking import resolve_tracking_uri

    print(format_versions(list_versions(resolve_tracking_uri(args.mlflow_uri), args.dataset)))
    return 0


def _models_promote(args: argparse.Namespace) -> int:
    from anodfd.gate import promote
    from anodfd.registry import model_name
    from anodfd.tracking import resolve_tracking_uri

    promote(resolve_tracking_uri(args.mlflow_uri), args.dataset, args.version, args.alias, args.reason)
    print(f"{model_name(args.dataset)}@{args.alias} -> version {args.version}")
    return 0


def _models_gate(args: argparse.Namespace) -> int:
    from anodfd.data.layouts import fingerprint, resolve_data_dir
    from anodfd.gate import gate
    from anodfd.registry import list_versions, model_name, require_model
    from anodfd.scoring import Protocol, score_checkpoint
    from anodfd.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(args.mlflow_uri)
    (row,) = [r for r in list_versions(uri, args.dataset) if r["version"] == args.version] or [None]
    if row is None:
        raise ConfigError(f"--version {args.version}: no such version of {args.dataset}; see anodfd models list")
    rescore = None
    if args.data:
        data_dir = resolve_data_dir(data=args.data)
        protocol = Protocol.from_json(row["tags"]["protocol"]) if "protocol" in row["tags"] else None
        if protocol is None or fingerprint(data_dir) != protocol.fingerprint:
            raise ConfigError(f"--data {data_dir} is not the data version {args.version} was scored on "
                              f"(fingerprint {row['fingerprint']}); pass that dataset's folder")

        def rescore(ckpt: dict):
            return score_checkpoint(ckpt, data_dir, protocol.split)

    # By the model's own name: a version registered some other way may carry no dataset tag.
    reg = gate(uri, require_model(uri, model_name(args.dataset)).name, args.version, rescore=rescore)
    print(f"{reg.name} v{reg.version}: challenger; champion {'moved to it' if reg.champion else 'unchanged'}: "
          f"{reg.reason}")
    return 0


def _models_show(args: argparse.Namespace) -> int:
    from anodfd.registry import show
    from anodfd.tracking import resolve_tracking_uri

    print(show(resolve_tracking_uri(args.mlflow_uri), args.dataset, args.version))
    return 0


def _models_history(args: argparse.Namespace) -> int:
    from anodfd.registry import format_history, history
    from anodfd.tracking import resolve_tracking_uri

    print(format_history(history(resolve_tracking_uri(args.mlflow_uri), args.dataset)))
    return 0


def resolve_data_dir_for(args: argparse.Namespace) -> Path:
    from anodfd.data.layouts import resolve_data_dir

    return resolve_data_dir(dataset=args.dataset, data=args.data, data_root=args.data_root)


def _predict(args: argparse.Namespace) -> int:
    from anodfd.checkpoint import inference_model
    from anodfd.inference import resolve_device
    from anodfd.predict import check_pairs, check_threshold, find_pairs, predict_pairs

    if not args.list and not (args.hist and args.cur):
        raise ConfigError("give --hist H --cur C (files or folders), or --list FILE")
    pairs = find_pairs(args.hist, args.cur, args.list)
    check_pairs(pairs)  # every image, before the first output is written
    check_output(args.out, "--out")
    with tempfile.TemporaryDirectory() as tmp:  # --ir's download, kept while the pairs run
        if args.ir:
            args.openvino = str(_registered_ir(args, tmp))
        if args.onnx or args.openvino:
            from anodfd.export import OnnxModel

            if args.openvino:
                from anodfd.openvino_ir import OpenVinoModel

            model = OpenVinoModel(args.openvino) if args.openvino else OnnxModel(args.onnx)
            config, saved, device = model.config, model.threshold, "cpu"
        else:
            device = resolve_device(args.device)
            ckpt = _load_checkpoint_for(args)
            model, config = inference_model(ckpt, device)
            saved = ckpt.get("threshold", 0.5)
        threshold = check_threshold(args.threshold if args.threshold is not None else saved)
        for p in predict_pairs(model, config, pairs, args.out, threshold, device):
            print(f"{p.name}: score {p.score:.4f}, {len(p.boxes)} region(s) -> {p.overlay_path}")
    return 0


def _registered_ir(args: argparse.Namespace, dst: str | Path) -> Path:
    """``--ir``: the OpenVINO IR that ``--model``'s version carries, downloaded into ``dst``."""
    if not args.model:
        raise ConfigError("--ir runs the OpenVINO IR a registered version carries: add --model models:/NAME@ALIAS, "
                          "or give an IR file with --openvino")
    from anodfd.registry import download_ir
    from anodfd.tracking import resolve_tracking_uri

    return download_ir(resolve_tracking_uri(args.mlflow_uri), args.model, dst)


def _score(args: argparse.Namespace) -> int:
    from anodfd.batch import ScoreOptions, score_pairs
    from anodfd.predict import check_threshold, find_pairs

    if not args.list and not (args.hist and args.cur):
        raise ConfigError("give --hist DIR --cur DIR (folders, matched by file name), or --list FILE")
    opts = ScoreOptions(args.actors, args.cpus_per_actor, args.gpus_per_actor, args.decode)
    pairs = find_pairs(args.hist, args.cur, args.list)  # every file checked before Ray starts
    check_output(args.out, "--out")
    ckpt = _load_checkpoint_for(args)
    threshold = check_threshold(args.threshold if args.threshold is not None else ckpt.get("threshold", 0.5))
    if args.ir and args.openvino:
        raise ConfigError("--ir runs the IR the registered version carries; --openvino names one: give one of them")
    if args.ir:  # into the output folder, which every node of a cluster can read
        args.openvino = str(_registered_ir(args, Path(args.out) / "ir"))
    if args.openvino:  # checked here, before Ray starts
        from anodfd.checkpoint import check_checkpoint
        from anodfd.openvino_ir import ir_for

        ir_for(args.openvino, check_checkpoint(ckpt))
    table = score_pairs(ckpt, args.model or str(Path(args.checkpoint).resolve()), pairs, args.out, threshold,
                        args.address, opts, openvino=args.openvino)
    print(f"ranked {len(pairs)} pairs by score: {table}")
    return 0


def _int8_data(args: argparse.Namespace, config) -> object:
    """The data config whose train split calibrates ``--int8`` and whose val split checks it; every file of both
    checked before any compute."""
    import dataclasses

    from anodfd.data.dataset import make_dataset

    if args.calib_pairs < 1:
        raise ConfigError(f"--calib-pairs {args.calib_pairs}: must be 1 or more (training pairs to calibrate on)")
    if args.calib_data is not None and not Path(args.calib_data).is_dir():
        raise ConfigError(f"--calib-data {args.calib_data}: no such folder; pass a dataset folder with train and "
                          "val splits")
    source = f"--calib-data {args.calib_data}" if args.calib_data else f"the checkpoint's data {config.data.data!r}"
    if args.calib_data is None and not (config.data.data and Path(config.data.data).is_dir()):
        raise ConfigError(f"--int8: {source} is not a folder here; pass --calib-data DIR (the run's dataset)")
    data = dataclasses.replace(config.data, **({"data": str(args.calib_data), "layout": "auto"}
                                               if args.calib_data else {}))
    for split in ("train", "val"):
        try:
            if not len(make_dataset(data, split).pairs):
                raise DatasetError("no pairs")
        except DatasetError as e:
            raise ConfigError(f"--int8: {source} has no usable {split} split to {'calibrate' if split == 'train' else 'check'}"
                              f" INT8 on ({str(e).splitlines()[0]}); pass --calib-data DIR") from None
    return data


def _export(args: argparse.Namespace) -> int:
    from anodfd.checkpoint import check_checkpoint, model_from_checkpoint
    from anodfd.export import check_exportable, export_checked

    if args.int8 and args.format != "openvino":
        raise ConfigError("--int8 quantises an OpenVINO IR: add --format openvino")
    check_output(args.out, "--out")
    if args.format == "openvino":
        from anodfd.openvino_ir import check_installed

        check_installed()
    ckpt = _load_checkpoint_for(args)
    check_exportable(check_checkpoint(ckpt), args.format)
    model, config = model_from_checkpoint(ckpt, "cpu")
    int8_data = _int8_data(args, config) if args.int8 else None
    threshold = float(ckpt.get("threshold", config.train.threshold))
    print(f"exporting {config.model.name} to ONNX (dynamic batch, height and width) ...", flush=True)
    path, worst = export_checked(model, config, threshold, args.out)
    print(f"wrote {path}: ONNX Runtime matches PyTorch to {worst:.1e} on the probability maps")
    paths = [path]
    if args.format == "openvino":
        from anodfd.openvino_ir import INT8_FILE, export_openvino

        ir, worst, verdict = export_openvino(model, config, threshold, path, int8_data, args.calib_pairs)
        print(f"wrote {ir}: OpenVINO FP32 matches PyTorch to {worst:.1e} on the probability maps")
        paths.append(ir)
        if verdict is not None:
            print(verdict.line())
            if verdict.accepted:
                print(f"wrote {ir.parent / INT8_FILE}")
                paths.append(ir.parent / INT8_FILE)
    if args.model:
        from anodfd.registry import log_export
        from anodfd.tracking import resolve_tracking_uri

        for p in paths:
            print(log_export(resolve_tracking_uri(args.mlflow_uri), args.model, p,
                             verdict.as_dict() if args.int8 and p != path else None))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anodfd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic stand-in for one of the paper's datasets")
    p.add_argument("kind", choices=["OL", "FB", "Diff"])
    p.add_argument("--out", required=True, help="output folder (the paper's layout)")
    p.add_argument("--pairs", type=int, default=None, help="total pairs (default: the paper's count)")
    p.add_argument("--test-pairs", type=int, default=None,
                   help="pairs in the test split, out of --pairs (default: the paper's share)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default=None,
                   help="WxH for every pair, e.g. 512x384, sides 32 to 8192 (default: the paper's sizes)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--small-anomalies", action="store_true",
                   help="every anomaly 0.001-0.03%% of the image's area (at 2048x1536, about 6-60 px across)")
    p.add_argument("--force", action="store_true", help="write into --out even where it holds files already")
    p.set_defaults(func=_synth)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("check", help="validate a dataset: every listed file exists and decodes")
    p.add_argument("dir", nargs="?", default=None, help="dataset folder (or use --dataset)")
    p.add_argument("--dataset", default=None, help="named dataset under the data root: OL, FB or Diff")
    p.add_argument("--data-root", default=None, help="folder holding named datasets (default $ANODFD_DATA_ROOT or ./data)")
    p.add_argument("--layout", choices=LAYOUTS, default="auto")
    p.add_argument("--allow-normal-only", action="store_true",
                   help="accept splits without a single anomalous pixel (normal-only data on purpose)")
    add_group_flags(p)
    p.set_defaults(func=_data_check)
    p = data.add_parser("shift", help="copy a dataset with its history images moved by random homographies "
                                      "(and optionally relit): a viewpoint stress test")
    p.add_argument("src", help="dataset folder (any layout)")
    p.add_argument("--out", required=True, help="new folder for the copy (must not exist)")
    p.add_argument("--homography", type=float, required=True,
                   help="corners move by up to this fraction of the side, e.g. 0.02")
    p.add_argument("--photometric", action="store_true", help="also change brightness, contrast and noise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS),
                   help="splits whose history images move (default: all the dataset has)")
    p.add_argument("--layout", choices=LAYOUTS, default="auto")
    p.set_defaults(func=_data_shift)
    p = data.add_parser("boxmasks", help="copy a dataset with masks derived from its boxes on the registered pair "
                                         "(|registered history - current| > half the range, inside each box)")
    p.add_argument("src", help="dataset folder with boxes (boxes/<id>.txt, or cur_boxes.txt in the paper's layout)")
    p.add_argument("--out", required=True, help="new folder for the copy (must not exist)")
    p.add_argument("--align", choices=[m for m in ALIGN_METHODS if m != "none"], default="ecc",
                   help="how history is registered onto current first")
    p.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS),
                   help="splits whose masks are derived (default: all the dataset has)")
    p.add_argument("--layout", choices=LAYOUTS, default="auto")
    p.set_defaults(func=_data_boxmasks)

    p = sub.add_parser("train", help="train AnoDFDNet on Ray Train (the paper's recipe by default)")
    _add_train_flags(p)
    p.add_argument("--out", default=None, help="run folder (best.pt, last.pt, Ray checkpoints); rerun to resume")
    p.add_argument("--storage", default=None, help="where runs live: a folder (default ./runs) or s3://... URI")
    p.add_argument("--name", default=None, help="run name under --storage; rerunning with it resumes")
    p.add_argument("--workers", type=int, default=1, help="DDP workers (default 1)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--cpus-per-worker", type=float, default=None,
                   help="CPUs (and torch threads) per worker; default: a local run shares the machine's cores, 1 on a cluster")
    p.add_argument("--address", default=None, help="Ray cluster address (default $RAY_ADDRESS, else local Ray)")
    p.add_argument("--max-failures", type=int, default=2, help="worker failures survived from the last checkpoint")
    p.add_argument("--keep", type=int, default=2, help="best checkpoints kept by validation F1, besides the latest")
    p.add_argument("--mlflow-uri", default=None, help="tracking URI (default $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--experiment", default="anodfd", help="MLflow experiment")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="the paper's metrics of a checkpoint on a split")
    _add_model_source_flags(p)
    add_data_flags(p)
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.add_argument("--threshold", type=float, default=0.5, help="the paper's fixed 0.5 by default")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="write precision, recall, oa, f1, iou, auc, eer, threshold")
    p.add_argument("--plot", default=None, help="write the ROC curve PNG")
    p.set_defaults(func=_eval)

    p = sub.add_parser("predict", help="anomaly maps, overlays and boxes for pairs of any resolution")
    _add_model_source_flags(p, onnx=True, ir=True)
    p.add_argument("--hist", default=None, help="history image, or a folder of them")
    p.add_argument("--cur", default=None, help="current image, or a folder (matched to history by file name)")
    p.add_argument("--list", default=None, help="a list file of 'cur,hist[,gt]' lines relative to its folder")
    p.add_argument("--out", required=True)
    p.add_argument("--threshold", type=float, default=None, help="default: the checkpoint's calibrated threshold")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_predict)

    p = sub.add_parser("score", help="batch scoring on Ray Data: maps, overlays and JSON per pair, plus "
                                     "scores.parquet ranked for triage; reruns skip pairs already scored")
    _add_model_source_flags(p, ir=True)
    g = p.add_argument_group("pairs")
    g.add_argument("--hist", default=None, help="folder of history images (matched to --cur by file name)")
    g.add_argument("--cur", default=None, help="folder of current images")
    g.add_argument("--list", default=None, help="a split list (cur,hist[,gt] per line) instead of --hist/--cur")
    p.add_argument("--out", required=True, help="output folder (on a cluster: storage every node can write)")
    p.add_argument("--threshold", type=float, default=None, help="default: the checkpoint's calibrated threshold")
    p.add_argument("--address", default=None, help="Ray cluster address (default $RAY_ADDRESS, else local Ray)")
    p.add_argument("--openvino", default=None, help="an IR of this checkpoint (`anodfd export --format openvino`, "
                                                    "FP32 or INT8) to run in place of its network, on CPU actors")
    p.add_argument("--actors", type=int, default=None,
                   help="model actors (default: one per GPU, else the local CPUs shared out)")
    p.add_argument("--cpus-per-actor", type=float, default=None)
    p.add_argument("--gpus-per-actor", type=float, default=0.0, help="default: 1 when the cluster has GPUs")
    p.add_argument("--decode", choices=["auto", "tasks", "actors"], default="auto",
                   help="decode images in parallel tasks or in the model actors (auto: tasks for GPU actors)")
    p.set_defaults(func=_score)

    p = sub.add_parser("export", help="a trained model as an ONNX graph (dynamic batch, height and width), and as "
                                      "an OpenVINO IR, FP32 and INT8")
    _add_model_source_flags(p)
    p.add_argument("--format", choices=["onnx", "openvino"], default="onnx",
                   help="openvino: also model.xml (FP32) beside model.onnx; needs anodfd[openvino]")
    p.add_argument("--int8", action="store_true",
                   help="with --format openvino: also model-int8.xml, NNCF post-training quantisation, kept only if "
                        "no validation figure (pixel F1, AUC, defect F) falls more than 0.005 below FP32")
    p.add_argument("--calib-data", default=None,
                   help="dataset whose train split calibrates --int8 and val split checks it (default: the "
                        "checkpoint's own data)")
    p.add_argument("--calib-pairs", type=int, default=300, help="training pairs to calibrate --int8 on")
    p.add_argument("--out", required=True, help="folder for model.onnx (and model.xml, model-int8.xml)")
    p.set_defaults(func=_export)

    models = sub.add_parser("models", help="the MLflow Model Registry: anodfdnet-<dataset> versions and aliases")
    models = models.add_subparsers(dest="models_command", required=True)
    p = models.add_parser("list", help="versions with their aliases, test metrics and data fingerprint")
    p.add_argument("--dataset", required=True, help="dataset name, e.g. OL (registered model anodfdnet-OL)")
    p.add_argument("--mlflow-uri", default=None, help="registry (default $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.set_defaults(func=_models_list)
    p = models.add_parser("promote", help="point an alias (default champion) at a version, bypassing the F1 gate")
    p.add_argument("--dataset", required=True, help="dataset name, e.g. OL (registered model anodfdnet-OL)")
    p.add_argument("--version", type=int, required=True)
    p.add_argument("--alias", default="champion", type=str.lower,
                   help="alias to point at the version (default champion); aliases are lower case: Champion means "
                        "champion")
    p.add_argument("--reason", default=None, help="recorded with the move (default: promoted by hand)")
    p.add_argument("--mlflow-uri", default=None, help="registry (default $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.set_defaults(func=_models_promote)
    p = models.add_parser("gate", help="run the champion gate for a registered version again (after a failed one)")
    p.add_argument("--dataset", required=True, help="dataset name, e.g. OL (registered model anodfdnet-OL)")
    p.add_argument("--version", type=int, required=True)
    p.add_argument("--data", default=None, help="the dataset folder the version was scored on: lets the gate "
                                                "re-score a champion scored under another protocol")
    p.add_argument("--mlflow-uri", default=None, help="registry (default $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.set_defaults(func=_models_gate)
    p = models.add_parser("show", help="a version's model card: scores, protocol, floor, config, links, moves")
    p.add_argument("--dataset", required=True, help="dataset name, e.g. OL (registered model anodfdnet-OL)")
    p.add_argument("--version", type=int, required=True)
    p.add_argument("--mlflow-uri", default=None, help="registry (default $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.set_defaults(func=_models_show)
    p = models.add_parser("history", help="every alias move: when, which version, from which, by whom and why")
    p.add_argument("--dataset", required=True, help="dataset name, e.g. OL (registered model anodfdnet-OL)")
    p.add_argument("--mlflow-uri", default=None, help="registry (default $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.set_defaults(func=_models_history)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DatasetError, ConfigError) as e:
        from anodfd.tracking import redact  # a URI quoted in an error may carry a password

        # Bad input is the user's to fix: one clear line, no traceback.
        print(f"anodfd: error: {redact(str(e))}", file=sys.stderr)
        return 2
    except Exception as e:
        from mlflow.exceptions import MlflowException

        if not isinstance(e, MlflowException):
            raise
        # The tracking server failed (down, timed out, refused): one line; nothing was changed by the command.
        from anodfd.tracking import redact

        print(f"anodfd: error: MLflow failed: {redact(e.message.strip().splitlines()[0])[:300]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
