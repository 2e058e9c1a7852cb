"""The model card: a registered version's description, in Markdown, as the MLflow UI shows it.

What the version scored (test metrics at 0.5 and at its served threshold, defects, boxes), under which protocol,
against which floor, trained how, from which runs. Text only: it reads the version's tags and talks to nobody.
"""

from __future__ import annotations

import json

from anodfd.scoring import MIN_AUC
from anodfd.tracking import redact

CARD_DIR = "card"  # the model's pictures (roc.png, overlays.jpg) sit here among its artifacts


def view_text(data: dict) -> str:
    """How a checkpoint's model sees a pair, from its config's data section (older ones: ``image_size``)."""
    resize, crop = data.get("resize", data.get("image_size", "?")), data.get("crop", 0)
    if resize:
        return f"pairs resized to {resize}x{resize} px" + (f", {crop} px crops and tiles" if crop else "")
    return f"pairs scaled by {data.get('scale', 1):g} keeping their aspect ratio, {crop} px crops and tiles"


def model_card(uri: str, name: str, version: int, tags: dict[str, str], experiment: str | None = None) -> str:
    """The version's description: what it scored, under which rules, against which floor, from which run."""
    uri = redact(uri)  # every version's description is readable by anyone who can read the registry

    def num(key: str) -> str:
        return f"{float(tags[key]):.4f}" if is_number(tags.get(key, "")) else "-"

    def link(run_id: str | None) -> str:
        if not run_id:
            return "-"
        if uri.startswith("http") and experiment:
            return f"[{run_id}]({uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id})"
        return f"{run_id} (`mlflow ui --backend-store-uri {uri}`)"

    protocol = json.loads(tags.get("protocol", "{}"))
    config = json.loads(tags.get("config", "{}"))
    model, train, data = config.get("model", {}), config.get("train", {}), config.get("data", {})
    cols = ("f1", "iou", "precision", "recall", "auc")
    rows = [f"| 0.5 (paper) | {' | '.join(num(f'test_{k}') for k in cols)} |",
            (f"| {num('served_threshold')} (calibrated, served) | "
            f"{' | '.join(num(f'test_{k}_calibrated') for k in cols)} |")]
    return "\n".join([
        f"## {name} v{version}",
        "",
        (f"Test split ({tags.get('test_pairs', '?')} pairs), scored at the masks' native resolution under protocol "
        f"`{tags.get('protocol_id', '-')}`."),
        "",
        "| threshold | F1 | IoU | precision | recall | AUC |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        (f"- **Serves with threshold** {num('served_threshold')} (calibrated on validation"
         f"{' defect F, `--calibrate defect`' if train.get('calibrate') == 'defect' else ''}); the champion gate "
         "compares F1 at that threshold."
         + (" Regions are kept only where the registered pair's grey difference confirms them (`--confirm diff`)."
            if data.get("confirm") == "diff" else "")),
        (f"- **Defects** at that threshold: F {num('test_defect_f')}, recall {num('test_defect_recall')}, precision "
         f"{num('test_defect_precision')}; {num('test_false_alarms_per_image')} false alarms per pair; every defect "
         f"found in {num('test_all_found')} of the pairs that have any."),
        *([(f"- **Against the dataset's boxes** at that threshold: overlap rule F {num('test_box_f')}, recall "
            f"{num('test_box_recall')}, precision {num('test_box_precision')}, {num('test_box_false_alarms_per_image')} "
            f"false alarms per pair; DeepPCB's rule (IoU > 0.33, one to one) F {num('test_strict_f')}, recall "
            f"{num('test_strict_recall')}, precision {num('test_strict_precision')}.")] if "test_box_f" in tags else []),
        (f"- **Floor**: template differencing test F1 {num('floor_f1')} (threshold {num('floor_threshold')} fitted "
        f"on train), which F1 at the served threshold must beat; pixel AUC must reach {MIN_AUC:g}."),
        (f"- **Protocol** `{tags.get('protocol_id', '-')}`: data fingerprint {protocol.get('fingerprint', '-')}, "
        f"split {protocol.get('split', '-')}; {protocol.get('resolution', '-')}; {protocol.get('thresholds', '-')}"
        + (f"; defects {protocol['defects']}." if "defects" in protocol else ".")),
        (f"- **Splits**: train {tags.get('split_train', '?')}, val {tags.get('split_val', '?')}, "
        f"test {tags.get('split_test', tags.get('test_pairs', '?'))} pairs."),
        (f"- **Training**: {model.get('name', '?')} depth {model.get('depth', '?')}, {view_text(data)}, "
        f"lr {train.get('lr', '?')} ({train.get('schedule', 'constant')}), batch {train.get('batch_size', '?')}, "
        f"loss bce {train.get('bce_weight', '?')} / "
        f"dice {train.get('dice_weight', '?')} / focal {train.get('focal_weight', '?')}; epoch "
        f"{tags.get('epoch', '?')} of {train.get('epochs', '?')}, seed {train.get('seed', '?')} "
        "(whole config: tag `config`)."),
        f"- **Search run**: {link(tags.get('search_run_id'))}; **trial run**: {link(tags.get('trial_run_id'))}.",
        f"- **Code**: anodfd {tags.get('code_version', '?')}"
        + (f", commit {tags['git_commit']}" if "git_commit" in tags else "") + ".",
        (f"- **Pictures**: `{CARD_DIR}/roc.png` (model against template differencing) and `{CARD_DIR}/overlays.jpg` "
        "among the model's artifacts."),
    ])


def is_number(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True
