"""The search space (tune/space.py): every sampled trial is a valid config, conditional dimensions appear only under
their parent, the command line's flags fix what they name, and each preset's first trials are its known recipes."""

from __future__ import annotations

import math

import optuna
import pytest

from anodfd.config import PRESETS, Config, with_window
from tune.search import SEARCH_PRESETS, TrialRow, format_table, optuna_plots, parse_args, search_space
from tune.space import PAPER, SMOKE, VIEW_KEYS

optuna.logging.set_verbosity(optuna.logging.WARNING)


def sampled(space, n: int, seed: int = 0) -> list[dict]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        space.suggest(trial)
        study.tell(trial, 0.0)
        out.append(dict(trial.params))
    return out


@pytest.mark.parametrize("preset", sorted(SEARCH_PRESETS))
def test_every_sampled_trial_is_a_valid_config_and_crop_settings_only_come_with_crops(preset):
    space = SEARCH_PRESETS[preset]["space"]
    base = with_window(Config().with_flat({**PRESETS[preset], "data.data": "d"}), {})
    trials = sampled(space, 150)
    seen: dict[str, set] = {}
    for params in trials:
        config = with_window(base, params)  # raises ConfigError on an impossible combination
        crops = params["data.resize"] == 0
        assert all((k in params) == crops for k in VIEW_KEYS[1:]), params
        assert config.model.image_size == config.data.window == (params["data.crop"] if crops else params["data.resize"])
        for k, v in params.items():
            seen.setdefault(k, set()).add(v)
    # Every choice of every categorical dimension is reached, and floats span their range.
    for key, dist in space.distributions().items():
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            assert seen[key] == set(dist.choices), (key, seen[key])
        else:
            lo, hi = min(seen[key]), max(seen[key])
            width = (math.log(dist.high) - math.log(dist.low)) if dist.log else dist.high - dist.low
            spread = (math.log(hi) - math.log(lo)) if dist.log else hi - lo
            assert spread > 0.8 * width, (key, lo, hi)


def test_the_space_covers_the_decisions_the_benchmarks_measured():
    for space in (SMOKE, PAPER):
        assert {"data.resize", "data.scale", "data.crop", "data.crop_pos_fraction", "data.align", "data.confirm",
                "data.misregister",
                "data.augment", "model.depth", "train.lr", "train.schedule", "train.bce_weight", "train.dice_weight",
                "train.focal_weight", "train.pos_weight"} <= set(space.distributions())
        assert 0 in space.resize and any(r > 0 for r in space.resize)  # native crops and squashed
    assert set(PAPER.models) == {"paper", "tiny"}


def test_flags_on_the_command_line_fix_their_dimensions():
    dims = lambda argv: set(search_space(parse_args(["--data", "d", *argv])).distributions())
    full = dims([])
    assert dims(["--resize", "0", "--crop", "256"]) == full - set(VIEW_KEYS)  # one view flag fixes the whole view
    assert dims(["--crop-pos-fraction", "0.5"]) == full - set(VIEW_KEYS)
    assert dims(["--align", "ecc"]) == full - {"data.align"}
    assert dims(["--confirm", "diff"]) == full - {"data.confirm"}
    assert dims(["--model", "tiny"]) == full - {"model.name"}
    assert "model.name" not in dims(["--preset", "smoke"])  # one variant: nothing to choose


def test_the_first_trials_are_the_presets_recipes_through_rays_optuna_searcher():
    from ray.tune.search.optuna import OptunaSearch

    for preset, expect in (("smoke", [{"data.resize": 96, "train.lr": 3e-3, "train.dice_weight": 1.0,
                                       "train.pos_weight": 20.0, "data.align": "none", "model.depth": 2}]),
                           ("paper", [{"model.name": "tiny", "data.resize": 0, "data.crop": 256, "data.scale": 1.0,
                                       "data.crop_pos_fraction": 0.5, "data.align": "ecc", "data.confirm": "diff",
                                       "train.schedule": "cosine"},
                                      {"model.name": "paper", "data.resize": 256, "train.lr": 2e-4,
                                       "train.dice_weight": 0.0, "train.pos_weight": 1.0}])):
        space = SEARCH_PRESETS[preset]["space"]
        searcher = OptunaSearch(space.suggest, metric="f1", mode="max",
                                points_to_evaluate=[space.point(r) for r in SEARCH_PRESETS[preset]["first"]],
                                sampler=optuna.samplers.TPESampler(seed=0))
        for i, want in enumerate(expect):
            got = searcher.suggest(f"t{i}")
            assert {k: got.get(k) for k in want} == want, (preset, i, got)
            if got["data.resize"]:
                assert not set(VIEW_KEYS[1:]) & set(got)  # a squashed trial carries no crop settings
        later = searcher.suggest("t9")
        assert set(later) <= set(space.distributions())


def test_a_first_point_outside_the_space_is_refused():
    with pytest.raises(ValueError, match=r"data.augment='wild' is not among"):
        SMOKE.point({"data.resize": 96, "data.augment": "wild"})


def test_table_and_importances_over_a_conditional_space(tmp_path):
    """Trials with and without the crop dimensions: the table marks what a trial did not have; Optuna's plots use
    the dimensions every trial has."""
    trials = sampled(SMOKE, 8, seed=1)
    assert {p["data.resize"] == 0 for p in trials} == {True, False}
    rows = [TrialRow(f"t{i}", p, 0.1 * i, 2, False, "TERMINATED") for i, p in enumerate(trials)]
    table = format_table(rows, "f1")
    head = table.splitlines()[0]
    assert head.startswith("| rank | trial | f1 | depth | lr | resize | scale | crop | crop_pos | align |")
    squashed = next(r for r in rows if r.params["data.resize"])
    line = next(ln for ln in table.splitlines() if f"| {squashed.trial_id} |" in ln)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[6:9] == ["-", "-", "-"]  # scale, crop, crop_pos: only native crops have them
    names = [p.name for p in optuna_plots(rows, SMOKE, tmp_path)]
    assert names == ["optimization_history.png", "param_importances.png"]


def test_with_groups_the_search_ranks_trials_on_groups_held_out_of_training(synth_ol, tmp_path, capsys):
    """The stand-in ships a validation list that shares every group (here: the name's last digit) with train; the
    search replaces it with whole groups cut from both lists. A validation list that already holds a group out, or
    --val-groups, is kept."""
    from anodfd.data.dataset import make_dataset
    from anodfd.data.layouts import group_of
    from tune.search import rank_on_held_out_groups

    regex = r"(\d)$"
    base = Config().with_flat({**PRESETS["smoke"], "data.data": str(synth_ol), "data.group_regex": regex})
    ranked = rank_on_held_out_groups(base)
    groups = lambda config, split: {group_of(p, regex) for p in make_dataset(config.data, split).pairs}
    assert groups(base, "val") <= groups(base, "train")  # as shipped: validation saw training's groups
    chosen = set(ranked.data.val_groups.split(","))
    assert chosen == groups(ranked, "val") and not chosen & groups(ranked, "train")
    assert len(make_dataset(ranked.data, "train")) + len(make_dataset(ranked.data, "val")) == \
        len(make_dataset(base.data, "train")) + len(make_dataset(base.data, "val"))  # no pair lost or doubled
    assert f"ranks trials on group(s) {ranked.data.val_groups} held out" in capsys.readouterr().out

    assert rank_on_held_out_groups(base.with_flat({"data.val_groups": "3"})).data.val_groups == "3"
    assert rank_on_held_out_groups(base.with_flat({"data.group_regex": ""})).data.val_groups == ""
    import shutil

    data = shutil.copytree(synth_ol, tmp_path / "OL")
    lines = (data / "train.txt").read_text().splitlines() + (data / "validation.txt").read_text().splitlines()
    (data / "validation.txt").write_text("".join(f"{ln}\n" for ln in lines if ln.split("\\")[0].endswith("9")))
    (data / "train.txt").write_text("".join(f"{ln}\n" for ln in lines if not ln.split("\\")[0].endswith("9")))
    held = base.with_flat({"data.data": str(data)})
    assert rank_on_held_out_groups(held).data.val_groups == ""  # group 9 is held out already


def test_defect_f_ranks_a_search():
    from anodfd.train.loop import selection_key

    assert parse_args(["--data", "d", "--metric", "defect_f"]).metric == "defect_f"
    better, worse = {"defect_f": 0.9, "calibrated_f1": 0.1}, {"defect_f": 0.5, "calibrated_f1": 0.8}
    assert selection_key(better, "defect_f") > selection_key(worse, "defect_f")


def test_search_benchmark_counts_the_epochs_the_search_trained():
    """benchmarks/search.py gives the single run as many epochs as the search's trials trained in all: read from the
    search's own summary table, which a trial without crop settings fills with '-'."""
    from conftest import load_benchmark

    bench = load_benchmark("search")
    rows = [TrialRow("a", {"model.depth": 2, "data.resize": 0, "data.crop": 256}, 0.9, 8, False, "TERMINATED"),
            TrialRow("b", {"model.depth": 1, "data.resize": 256}, 0.5, 4, True, "TERMINATED"),
            TrialRow("c", {"model.depth": 0, "data.resize": 256}, float("nan"), 0, False, "TERMINATED")]
    stdout = "starting search\n\n" + format_table(rows, "defect_f") + "\n\nbest trial a: defect_f 0.9000\n"
    assert bench.epochs_trained(stdout) == 12
