"""`benchmarks/gpu.py --tiny`: the GPU benchmark's every measurement on tiny configs of SD 1.5's and SDXL's classes, so
the script cannot break unseen between the rare runs on a GPU."""
import json
import os

from benchmarks import gpu


def test_gpu_benchmark_tiny_preset_measures_every_part(tmp_path):
    report = gpu.main(["--tiny", "--steps", "1", "--batches", "1", "--out", str(tmp_path)])
    training = {(r["family"], r["method"], r["batch"], r["checkpointing"], r["optimizer"]): r
                for r in report["training"]}
    # sd15: DreamBooth and LoRA with checkpointing off and on, DreamBooth with 8-bit AdamW, textual inversion;
    # sdxl: the same without textual inversion
    assert len(training) == 6 + 5
    assert ("sdxl", "dreambooth", 1, True, "adamw8bit") in training
    for row in training.values():
        assert row["reference"]["steps_per_s"] > 0 and row["big"]["steps_per_s"] > 0, row
    generation = report["generation"]
    assert {(r["family"], r["steps"], r["batch"]) for r in generation} == {
        (f, s, b) for f in ("sd15", "sdxl") for s in (2, 3) for b in (1, 4)}
    assert all(r["big_over_bare"] > 0 for r in generation)
    assert report["lora_switch"]["big_switch_ms"] > 0
    # The SDXL pipeline is the real architecture: two text encoders, 'text_time' conditioning.
    assert set(report["parameters_millions"]["sdxl"]) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert json.load(open(os.path.join(tmp_path, "gpu.json")))["tiny"] is True
    assert "| sd15 | dreambooth | 1 | off | adamw |" in open(os.path.join(tmp_path, "gpu.md")).read()
