"""summary.json names the machine and build that produced it (CPU numerics differ across them)."""
import json
import os

from engine.summary import KEYS, SCHEMA_VERSION, RunSummary, provenance


def test_provenance_fields():
    import torch
    prov = provenance()
    assert prov["torch_version"] == torch.__version__ and prov["cuda_version"] == torch.version.cuda
    assert prov["threads"] == torch.get_num_threads() >= 1 and prov["cpu_count"] == os.cpu_count()
    assert isinstance(prov["cpu_model"], str) and prov["cpu_model"]
    base = dict(status="complete", model="resnet18", epochs=1, best_top1=1.0, best_epoch=1, final_top1=1.0,
                final_top5=1.0, final_loss=1.0, val_count=1, global_steps=1, train_img_per_s=1.0, wall_time_s=1.0,
                gpu_hours=0.0, world_size=1, device="cpu", global_batch=1, peak_lr=0.1, git_commit=None,
                output_dir="x")
    data = json.loads(RunSummary(**base, **prov).to_json())
    assert set(data) == set(KEYS) and data["schema_version"] == SCHEMA_VERSION >= 2
    assert {k: data[k] for k in prov} == prov
