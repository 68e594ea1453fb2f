"""Typed presets: validated by the trainer's config layer at `plan` time, with one-line errors naming file and key."""
from pathlib import Path

import pytest
import yaml

from ablation.cli import main
from ablation.errors import AblationError
from ablation.preset import available_presets, load_preset
from ablation.studies import STUDIES, build_plan

REPO = Path(__file__).resolve().parents[2]


def edited(tmp_path, name="mini", **changes):
    """A copy of a shipped preset with dotted keys changed (``None`` deletes a key)."""
    data = yaml.safe_load((REPO / "configs" / "ablation" / f"{name}.yaml").read_text())
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node[part]
        if value is None:
            del node[leaf]
        else:
            node[leaf] = value
    path = tmp_path / f"{name}_edited.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def refusal(capsys, preset, study="single_freq"):
    rc = main(["plan", "--study", study, "--preset", preset, "--runs-dir", str(Path(preset).parent / "runs")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_shipped_presets_are_typed_and_plan(tmp_path):
    for name in available_presets():
        preset, path = load_preset(name)
        assert preset.name == name and path.name == f"{name}.yaml"
        assert preset.throughput.img_per_s > 0 and preset.power.paired_sd > 0
        for study in ("single_freq", "lowk"):
            plan = build_plan(study, name, runs_root=tmp_path / name, seeds=1)
            assert all(run.settings["model"]["name"] for run in plan.runs)  # resolved as the trainer would


@pytest.mark.parametrize("change, needle", [
    ({"seedz": 3}, "unknown config key 'seedz' (did you mean 'seeds'?)"),
    ({"studies__topk__kss": [1]}, "unknown config key 'studies.topk.kss' (did you mean 'studies.topk.ks'?)"),
    ({"throughput__img_per_s": "fast"}, "config key 'throughput.img_per_s': expected float"),
    ({"throughput__img_per_s": 0}, "key 'throughput.img_per_s': must be > 0"),
    ({"seeds": 0}, "config key 'seeds': bad value 0; must be >= 1"),
    ({"studies__lowk__start": "middle"}, "config key 'studies.lowk.start': bad value 'middle'"),
    ({"studies__botk": None}, "config key 'studies.botk' is required"),
    ({"studies__topk__ks": [1, 20]}, "key 'studies.topk.ks': k=20 is outside 1..16"),
    ({"studies__single_freq__overrides": {"optim.lr": 0.1}}, "unknown config key 'optim.lr' (did you mean"),
    ({"studies__single_freq__overrides": {"train.epochz": 1}}, "did you mean 'train.epochs'?"),
])
def test_bad_preset_one_line(tmp_path, capsys, change, needle):
    err = refusal(capsys, edited(tmp_path, **change))
    assert needle in err and "_edited.yaml" in err, err


def test_trainer_override_error_names_the_run(tmp_path, capsys):
    err = refusal(capsys, edited(tmp_path, studies__single_freq__overrides={"optim.base_lr": -1}))
    assert "run single_freq/control-s0" in err and "optim.base_lr" in err and "-1" in err


def test_grid_larger_than_smallest_map_refused_at_plan(tmp_path, capsys):
    # the mini network at 16 px: maps 16/8/4/2, so a 4x4 grid does not fit the last stage
    common = yaml.safe_load((REPO / "configs/ablation/mini.yaml").read_text())["common_overrides"]
    common = dict(common, **{"data.image_size": 16, "data.val_resize": 16})
    common["model.kwargs"] = dict(common["model.kwargs"], input_size=16)
    err = refusal(capsys, edited(tmp_path, common_overrides=common))
    assert "key 'grid'" in err and "4x4 frequency grid is larger than stage 4's 2x2 map" in err
    assert not (tmp_path / "runs").exists()  # nothing planned, nothing written


def test_k_not_dividing_channels_refused_at_plan(tmp_path, capsys):
    err = refusal(capsys, edited(tmp_path, studies__lowk__ks=[1, 3]), study="lowk")
    assert "key 'studies.lowk.ks'" in err and "k=3 does not divide stage 1's 16 channels" in err


def test_seeds_bounded(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--study", "lowk", "--preset", "mini", "--seeds", "99999999999999999999"])
    rc = exc.value.code
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "from 1 to 100" in err


def test_stage_shapes_match_the_built_model():
    """ablation.network mirrors models.resnet without torch: same stage maps and channels as the real network
    of every shipped preset's fine-tunes, and the refused cases are the ones the model refuses."""
    import models
    from ablation.network import frequency_problem, stage_shapes
    from engine.builders import build_model
    from engine.config import ConfigError, load_config

    for name in ("mini", "imagenet"):
        run = build_plan("single_freq", name, runs_root=Path("/nonexistent"), seeds=1).points[0]
        cfg = load_config(REPO / run.config, run.override_args())
        shapes = stage_shapes(cfg)
        model = build_model(cfg)
        fca = [m for m in model.modules() if type(m).__name__ == "FCA"]
        stage_channels = [getattr(model, f"layer{i}")[0].att.fc[0].in_features for i in range(1, 5)]
        assert list(shapes.channels) == stage_channels and len(fca) >= 4
        assert max(shapes.maps) == (32 if name == "mini" else 56)
    kw = dict(widths=[16, 16, 32, 32], stem="cifar", grid=4, reduction=4)
    cfg = load_config(REPO / "configs/demo/fcanet_digits.yaml",
                      ["model.name=fcanet10", "model.kwargs={widths: [16, 16, 32, 32], stem: cifar, grid: 4, "
                       "input_size: 16}", "model.freq=[[0,0],[0,1],[1,0]]"])
    assert frequency_problem(cfg, 3, 4)[0] == "grid"
    with pytest.raises((ValueError, ConfigError)):
        models.create_model("fcanet10", num_classes=10, input_size=16, freq=[[0, 0]], **kw)
    assert frequency_problem(load_config(REPO / "configs/demo/fcanet_digits.yaml", ["model.name=fcanet10",
                             "model.kwargs={widths: [16, 16, 32, 32], stem: cifar, grid: 4}"]), 3, 4)[0] == "k"
    with pytest.raises(ValueError, match="k must divide"):
        models.create_model("fcanet10", num_classes=10, input_size=32, freq=[[0, 0], [0, 1], [1, 0]], **kw)


def test_every_study_plans_for_every_preset_without_torch(tmp_path):
    import subprocess
    import sys
    code = ("import sys; from ablation.studies import build_plan; "
            f"[build_plan(s, 'imagenet', runs_root={str(tmp_path)!r}) for s in {STUDIES!r}]; "
            "print('torch' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.stdout.strip() == "False", p.stderr


def test_load_preset_errors():
    with pytest.raises(AblationError, match="unknown preset 'nope'"):
        load_preset("nope")


def test_preset_headers_state_the_cost_plan_computes(capsys):
    """The GPU-hours a preset's header quotes are the ones `plan` prints (no stale figure in a header)."""
    import re
    for name, quotes in (("imagenet", {1: "about 413 GPU-hours for one seed", 3: "1,238 for three"}),
                         ("imagenet100", {1: "about 16.3 GPU-hours per seed", 3: "49 for three seeds"})):
        header = " ".join(line.lstrip("# ") for line in (REPO / f"configs/ablation/{name}.yaml").read_text()
                          .splitlines() if line.startswith("#"))
        for seeds, quote in quotes.items():
            assert quote in header, (name, quote)
            assert main(["plan", "--preset", name, "--seeds", str(seeds)]) == 0
            total = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("total"))
            quoted = float(re.search(r"([\d,.]+) (GPU-hours|for)", quote).group(1).replace(",", ""))
            assert float(total.split()[2]) == pytest.approx(quoted, rel=0.01), (name, seeds, total)
