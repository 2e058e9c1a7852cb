"""OpenVINO INT8 against FP32 and PyTorch on held-out data: does post-training quantisation keep the accuracy?

    python benchmarks/openvino_accuracy.py --checkpoint best.pt --export export/ --data FOLD --split test

``--export`` is the folder `anodfd export --format openvino --int8` wrote. Scores ``--split`` of ``--data`` (for
DeepPCB: boards neither the model nor its threshold saw) with the checkpoint as `predict` runs it (BatchNorm
folded), with ``model.xml`` (FP32) and with ``model-int8.xml``, each through `anodfd.scoring.score_native`, as
`anodfd eval` scores: pixel F1 and AUC at native resolution, defect-level F at the calibrated threshold, and the
box rules against the dataset's own boxes where it has them. Where the export rejected INT8 (no
``model-int8.xml``), one is quantised here the same way (``--calib-pairs`` tiles of ``--data``'s train split) so its
accuracy is still measured, and the row says so. Prints a Markdown table; ``--json`` keeps every figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from anodfd.checkpoint import inference_model, load_checkpoint
from anodfd.metrics import BoxCounts
from anodfd.openvino_ir import CALIB_PAIRS, INT8_FILE, IR_FILE, OpenVinoModel, calibration_tiles, quantize
from anodfd.scoring import score_native


def figures(model, data, split: str, threshold: float) -> dict[str, float]:
    boxes = BoxCounts()
    start = time.perf_counter()
    pixels, _, defects, _ = score_native(model, data, split, "cpu", threshold=threshold, boxes=boxes)
    m, d = pixels.compute(threshold), defects.compute()
    row = {"f1": m["f1"], "auc": m["auc"], "defect_f": d["defect_f"], "defect_recall": d["defect_recall"],
           "false_alarms_per_image": d["false_alarms_per_image"], "seconds": time.perf_counter() - start}
    if boxes.counts["pairs"]:
        b = boxes.compute()
        row.update(box_f=b["box_f"], strict_f=b["strict_f"])
    return row


def int8_model(export: Path, data, calib_pairs: int) -> tuple[OpenVinoModel, str]:
    if (export / INT8_FILE).is_file():
        return OpenVinoModel(export / INT8_FILE), "kept by the export"
    import openvino as ov

    fp32 = ov.Core().read_model(str(export / IR_FILE))
    return OpenVinoModel(quantize(fp32, calibration_tiles(data, calib_pairs))), "rejected by the export; re-quantised"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--export", required=True, help="the folder of `anodfd export --format openvino --int8`")
    parser.add_argument("--data", required=True, help="dataset folder whose --split is scored")
    parser.add_argument("--split", default="test")
    parser.add_argument("--calib-pairs", type=int, default=CALIB_PAIRS)
    parser.add_argument("--skip-pytorch", action="store_true", help="FP32 and INT8 only (FP32 equals PyTorch to 1e-4)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    ckpt = load_checkpoint(args.checkpoint)
    torch_model, config = inference_model(ckpt)
    data = dataclasses.replace(config.data, data=args.data, layout="auto")
    threshold = float(ckpt["threshold"])
    export = Path(args.export)
    int8, how = int8_model(export, data, args.calib_pairs)
    models = {"PyTorch (folded, as `predict`)": torch_model, "OpenVINO FP32": OpenVinoModel(export / IR_FILE),
              f"OpenVINO INT8 ({how})": int8}
    if args.skip_pytorch:
        del models["PyTorch (folded, as `predict`)"]
    rows = {name: figures(model, data, args.split, threshold) for name, model in models.items()}
    check = OpenVinoModel(export / IR_FILE).int8
    print(f"\n{args.checkpoint}: {config.model.name}, {args.split} split of {args.data}, threshold {threshold:.3f}")
    if check:
        print(f"export's validation check: FP32 {check['fp32']}, INT8 {check['int8']}, kept {check['accepted']}")
    keys = [k for k in ("f1", "auc", "defect_f", "defect_recall", "false_alarms_per_image", "box_f", "strict_f",
                        "seconds") if k in next(iter(rows.values()))]
    print("\n| model | " + " | ".join(keys) + " |\n|" + "---|" * (len(keys) + 1))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[k]:.4f}" if k != "seconds" else f"{row[k]:.0f}" for k in keys) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "export_check": check}, indent=2))


if __name__ == "__main__":
    main()
