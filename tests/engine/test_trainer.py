"""Training runs end to end (in-process, tiny CPU model): run directory, bitwise-exact resume after a
kill or SIGTERM mid-epoch, non-finite loss, corrupt images, fine-tune initialisation."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import (BASE_CONFIG, ROOT, TINY_RUN, run_main, subprocess_env, tiny_overrides, torchrun,
                      write_tiny_imagefolder)
from engine.config import load_config
from engine.schedule import WarmupCosineSchedule, scaled_lr
from engine.errors import SimulatedKill
from engine.trainer import fit


def run(data, out, **extra):
    return fit(load_config(BASE_CONFIG, tiny_overrides(data, out, **extra)))


def final_state(out) -> dict:
    return torch.load(out / "checkpoints" / "last.pth", weights_only=True)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])


RESUME = TINY_RUN  # 24 images / batch 4 = 6 steps per epoch, 2 epochs, a checkpoint every 2 steps


@pytest.fixture
def data(tiny_data):
    return tiny_data


@pytest.fixture
def reference(tiny_run):
    """The shared finished run (conftest.tiny_run, trained with fit and RESUME): (run dir, fit's summary)."""
    return tiny_run.dir, tiny_run.summary


def test_run_directory_layout(reference):
    out, summary = reference
    assert (out / "config.yaml").is_file() and (out / "checkpoints/last.pth").is_file()
    assert (out / "checkpoints/best.pth").is_file() and (out / "checkpoints/last.prev.pth").is_file()
    assert load_config(out / "config.yaml").train.checkpoint_every_steps == 2  # resolved config, reloadable
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("train_loss", "val_loss", "val_top1", "val_top5", "lr", "img_per_s", "epoch_time_s"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert rows[-1]["val_count"] == 12
    # each row's lr is the one its epoch's last step used (the cosine reaches 0 only after the run's last step)
    cfg = load_config(out / "config.yaml")
    schedule = WarmupCosineSchedule.from_epochs(scaled_lr(cfg.optim.base_lr, cfg.train.batch_size), 6, 2,
                                                cfg.train.warmup_epochs)
    assert [r["lr"] for r in rows] == [schedule.lr(5), schedule.lr(11)] and rows[-1]["lr"] > 0
    saved = json.loads((out / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    for key in ("best_top1", "final_top1", "final_top5", "epochs", "train_img_per_s", "wall_time_s", "gpu_hours",
                "git_commit"):
        assert key in saved
    assert saved["epochs"] == 2 and saved["final_top1"] == rows[-1]["val_top1"]
    assert saved["best_top1"] == max(r["val_top1"] for r in rows)
    ck = final_state(out)
    assert ck["global_step"] == 12 and not any(k.startswith(("module.", "_orig_mod.")) for k in ck["model"])


def test_kill_mid_epoch_then_resume_is_bitwise_identical(data, reference, tmp_path):
    # killed at global step 9 (epoch 2, step 3) with the last checkpoint at step 8: steps 9.. are redone
    with pytest.raises(SimulatedKill):
        run(data, tmp_path, **RESUME, **{"debug.kill_after_steps": 9})
    assert final_state(tmp_path)["global_step"] == 8 and final_state(tmp_path)["step_in_epoch"] == 2
    assert not (tmp_path / "summary.json").exists()
    summary = run(data, tmp_path, **RESUME)
    assert_same_weights(final_state(tmp_path), final_state(reference[0]))
    assert summary["final_top1"] == reference[1]["final_top1"]
    assert [json.loads(r)["epoch"] for r in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_sigterm_checkpoints_and_resume_is_bitwise_identical(data, reference, tmp_path):
    # SIGTERM after step 3 (odd, so no periodic checkpoint there): the handler checkpoints at that step
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    assert run(data, tmp_path, **RESUME, **{"debug.signal_after_steps": 3}) == {"status": "preempted"}
    ck = final_state(tmp_path)
    assert (ck["global_step"], ck["epoch"], ck["step_in_epoch"]) == (3, 0, 3)
    # the trainer's handlers are gone again: the caller's (here pytest's defaults) are back
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == before
    run(data, tmp_path, **RESUME)
    assert_same_weights(final_state(tmp_path), final_state(reference[0]))


def test_resume_with_more_epochs_follows_the_new_schedule(data, tmp_path):
    """Extending train.epochs of a finished run trains on with the new cosine, not at the old schedule's 0."""
    from engine.schedule import lr_at
    run(data, tmp_path, **{"train.epochs": 1, "train.warmup_epochs": 0, "train.tensorboard": "true"})
    before = final_state(tmp_path)
    run(data, tmp_path, **{"train.epochs": 3, "train.warmup_epochs": 0, "train.tensorboard": "true"})
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 2  # TensorBoard events, one file a session
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    peak = 0.1 * 4 / 256
    # lr of the last step of epoch 2 (global step 11, 0-based) of a 3-epoch (18-step) cosine
    assert rows[1]["lr"] == pytest.approx(lr_at(11, peak, 0, 18))
    after = final_state(tmp_path)
    assert not torch.equal(before["model"]["fc.weight"], after["model"]["fc.weight"])


def test_non_finite_loss_stops_with_step_and_keeps_checkpoint(data, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = torch.nn.CrossEntropyLoss

    class NaNAtStep5(real):
        def forward(self, logits, target):
            calls["n"] += 1
            loss = super().forward(logits, target)
            return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(torch.nn, "CrossEntropyLoss", NaNAtStep5)
    from engine.errors import NonFiniteLossError
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss at global step 5 .*last good checkpoint"):
        run(data, tmp_path, **{"train.checkpoint_every_steps": 2, "train.log_every_steps": 3})
    ck = final_state(tmp_path)
    assert ck["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_corrupt_image_is_a_clear_error_or_skipped(tmp_path, capsys):
    data = write_tiny_imagefolder(tmp_path / "data")
    (data / "train" / "class0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    from engine.entrypoints import train_main as main
    args = ["--config", str(BASE_CONFIG)] + tiny_overrides(data, tmp_path / "run", **{"train.epochs": 1})
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: corrupt or unreadable image ") and "broken.png" in err[0]
    assert main(args + ["data.skip_corrupt=true", f"output_dir={tmp_path}/run2"]) == 0
    skipped = [json.loads(r)["train_skipped"] for r in (tmp_path / "run2/metrics.jsonl").read_text().splitlines()]
    # Counted only if the file falls in a used batch (25 images, 6 batches of 4: one image is left out per
    # epoch): the count must equal how often epoch 0's batches really contain it.
    from engine.data.datasets import TrainBatchSampler
    from torchvision.datasets import ImageFolder
    sampler = TrainBatchSampler(25, 4, seed=0)
    sampler.set_epoch(0)
    paths = [p for p, _ in ImageFolder(str(data / "train")).samples]
    assert skipped == [sum(paths[i].endswith("broken.png") for batch in sampler for i, _ in batch)]
    # and the image count of that epoch excludes it: 24 used positions, minus the skipped ones
    rows = [json.loads(r) for r in (tmp_path / "run2/metrics.jsonl").read_text().splitlines()]
    assert rows[0]["img_per_s"] > 0 and rows[0]["val_count"] == 12


def test_finetune_from_plain_resnet(reference, data, tmp_path):
    """An FcaNet initialised from a plain ResNet checkpoint: backbone copied, attention fresh, fc re-initialised
    when the class count differs."""
    plain = torch.load(reference[0] / "checkpoints/best.pth", weights_only=True)["model"]
    summary = run(data, tmp_path, **{"model.name": "fcanet18", "model.num_classes": 5,
                                     "model.init_checkpoint": str(reference[0] / "checkpoints/best.pth"),
                                     "optim.base_lr": 0.0, "train.epochs": 1, "train.warmup_epochs": 0,
                                     "train.max_steps_per_epoch": 1})
    assert summary["epochs"] == 1
    tuned = final_state(tmp_path)["model"]
    assert torch.equal(tuned["conv1.weight"], plain["conv1.weight"])  # lr 0: still the plain ResNet weights
    assert torch.equal(tuned["layer4.1.conv2.weight"], plain["layer4.1.conv2.weight"])
    assert tuned["fc.weight"].shape == (5, 32) and any(".att." in k for k in tuned)
    # same number of classes: fc is loaded too (engine.builders.init_from_checkpoint)
    from engine.builders import build_model, init_from_checkpoint
    cfg = load_config(BASE_CONFIG, tiny_overrides(data, tmp_path / "x", **{"model.name": "fcanet18"}))
    model = build_model(cfg)
    report = init_from_checkpoint(model, str(reference[0] / "checkpoints/last.pth"), log=lambda m: None)
    assert torch.equal(model.state_dict()["fc.weight"], final_state(reference[0])["model"]["fc.weight"])
    assert report.new and all(".att." in k for k in report.new)


@pytest.mark.slow
def test_external_sigterm_exits_zero_with_checkpoint(data, tmp_path):
    cmd = [sys.executable, str(ROOT / "train_imagenet.py"), "--config", str(BASE_CONFIG)] + tiny_overrides(
        data, tmp_path, **{"train.epochs": 200, "train.warmup_epochs": 1})
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        for line in proc.stdout:
            if line.startswith("start training"):
                break
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "SIGTERM received: checkpointed" in out or "signal received: checkpointed" in out
    ck = final_state(tmp_path)
    assert 0 < ck["global_step"] < 200 * 6 and not (tmp_path / "summary.json").exists()


def test_progress_draws_a_bar_only_on_a_terminal():
    import io
    from engine.progress import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    bar, lines = Tty(), io.StringIO()
    p = Progress(total=4, desc="epoch 1/2", bar_stream=bar, line_stream=lines, interval_s=0.0)
    for _ in range(4):
        p.update()
        p.report(loss=1.5, lr=0.1)
    p.close()
    assert "\r" in bar.getvalue() and lines.getvalue() == ""  # a tqdm bar on the terminal, no plain lines
    redirected, lines = io.StringIO(), io.StringIO()
    p = Progress(total=4, initial=1, desc="epoch 1/2", bar_stream=redirected, line_stream=lines, interval_s=0.0)
    for _ in range(3):
        p.update()
        p.report(images_per_step=8, loss=1.5, lr=0.1)
    p.close()
    assert redirected.getvalue() == ""  # nothing written where a bar would have gone
    out = lines.getvalue().splitlines()
    assert out[0].startswith("epoch 1/2 step 2/4 (50%) | loss 1.5 lr 0.1 | ") and out[0].endswith(" img/s")
    assert len(out) == 3 and out[-1].startswith("epoch 1/2 step 4/4 (100%)")
    quiet = io.StringIO()
    p = Progress(total=4, bar_stream=io.StringIO(), line_stream=quiet, interval_s=3600.0)
    p.update()
    p.report(loss=1.0)
    assert quiet.getvalue() == ""  # at most one line per interval


def test_redirected_log_holds_no_progress_bar_frames(data, tmp_path, capsys):
    """Output that is not a terminal (here captured; a log file or pipe alike) gets lines, not bar frames."""
    proc = run_main("train_imagenet.py", ["--config", str(BASE_CONFIG)] + tiny_overrides(
        data, tmp_path, **{"train.epochs": 1, "train.progress": "true"}), capsys)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stdout + proc.stderr and "it/s" not in proc.stderr
    assert "epoch 1/1: train loss" in proc.stdout


@pytest.mark.slow
def test_fcanet_two_process_gloo_training(data, tmp_path):
    """Training under torchrun (2 processes, gloo): rank-0-only logging, the global batch's lr, per-rank RNG
    states and unwrapped keys in the checkpoint; with FcaNet, whose fixed DCT filters (buffers) stay the
    model's while the attention trains."""
    from engine.builders import build_model
    out = tmp_path / "ddp"
    ov = {"model.name": "fcanet18", "train.epochs": 1, "train.batch_size": 3, "train.checkpoint_every_steps": 2}
    proc = torchrun(2, "train_imagenet.py", ["--config", str(BASE_CONFIG)] + tiny_overrides(data, out, **ov))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("start training") == 1  # rank-0-only logging
    assert "global batch 6 / 256" in proc.stdout      # effective lr printed for the global batch
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["model"] == "fcanet18" and summary["val_count"] == 12
    assert summary["global_batch"] == 6 and summary["epochs"] == 1 and 0.0 <= summary["final_top1"] <= 100.0
    ck = final_state(out)
    assert ck["global_step"] == 24 // 2 // 3 and len(ck["rng"]) == 2  # per-rank RNG states
    assert not any(k.startswith("module.") for k in ck["model"])      # unwrapped keys
    fresh = build_model(load_config(BASE_CONFIG, tiny_overrides(data, out, **ov))).state_dict()
    dct = [k for k in ck["model"] if k.endswith("dct_layer.weight")]
    assert dct and all(torch.equal(ck["model"][k], fresh[k]) for k in dct)
    trained = [k for k in ck["model"] if ".att." in k and k.endswith("weight") and k not in dct]
    assert trained and any(not torch.equal(ck["model"][k], fresh[k]) for k in trained)  # attention trained


def test_structural_check_names_keys_and_ignores_equivalent_freq():
    from engine.checkpoint import StructureChangedError, check_structure
    from models.dct import parse_frequencies
    saved = load_config(BASE_CONFIG).to_dict()  # fcanet50, model.freq null (= top16)
    explicit = [list(f) for f in parse_frequencies("top16")]
    for same in (["model.freq=top16"], [f"model.freq={explicit}"], ["optim.base_lr=0.5", "train.epochs=30"]):
        check_structure(saved, load_config(BASE_CONFIG, same), "last.pth")
    with pytest.raises(StructureChangedError, match=r"^cannot resume last\.pth: its weights were trained with "
                       r"model\.num_classes=1000 \(now 10\), data\.image_size=224 \(now 160\); to train"):
        check_structure(saved, load_config(BASE_CONFIG, ["model.num_classes=10", "data.image_size=160"]), "last.pth")
    with pytest.raises(StructureChangedError, match=r"model\.freq=null \(now 'low4'\)"):
        check_structure(saved, load_config(BASE_CONFIG, ["model.freq=low4"]), "last.pth")
