"""Every product benchmark's `--preset smoke`: each part of it runs and reports, in seconds, so none can break
unseen (the numbers of a smoke run mean nothing)."""
from benchmarks import adapter_speed, dreambooth_smoke, personal_bench, service_bench, studio_bench, train_threads


def test_service_bench_smoke(tmp_path):
    r = service_bench.main(["--preset", "smoke", "--out", str(tmp_path)])
    assert r["class_images"]["generated_by_second_finetune"] == 0
    assert r["finetune_throughput"]["speedup"] > 0 and r["generate_in_process"]["service_s"] > 0
    assert (tmp_path / "service_bench.json").exists()


def test_studio_bench_smoke(tmp_path):
    studio_bench.main(["--preset", "smoke", "--out", str(tmp_path)])
    assert {p.name for p in tmp_path.iterdir()} >= {"studio.json", "guidance_sweep.gif", "grid_4x4.png"}


def test_dreambooth_smoke_smoke(tmp_path):
    r = dreambooth_smoke.main(["--preset", "smoke", "--out", str(tmp_path)])
    assert 0.0 <= r["fidelity"] <= 1.0 and (tmp_path / "dreambooth_smoke.png").exists()


def test_personal_bench_smoke(tmp_path):
    r = personal_bench.main(["--preset", "smoke", "--out", str(tmp_path)])
    assert r["switching"] and (tmp_path / "lora.json").exists()


def test_adapter_speed_smoke(tmp_path):
    r = adapter_speed.main(["--preset", "smoke", "--out", str(tmp_path)])
    assert r and (tmp_path / "adapter_speed.json").exists()


def test_train_threads_smoke():
    times = train_threads.main(["--preset", "smoke"])
    assert set(times) == {"adapters/1", "naive/1"} and all(t > 0 for t in times.values())


def test_fairness_smoke(tmp_path):
    from benchmarks import fairness

    r = fairness.main(["--preset", "smoke", "--out", str(tmp_path)])
    assert {r[f"{p}/{b}"]["polite_served"] for p in ("fair", "first_come_first_served")
            for b in ("back_to_back", "pausing")} == {2}


def test_batching_smoke(tmp_path):
    from benchmarks import batching

    r = batching.main(["--preset", "smoke", "--out", str(tmp_path)])
    assert r["throughput_ratio"] > 0 and (tmp_path / "batching.json").exists()


def test_scale_smoke(tmp_path):
    from benchmarks import scale

    r = scale.main(["--preset", "smoke", "--out", str(tmp_path)])
    assert r["finetunes"]["two_over_one"] > 0 and r["worker_kill"]["kill_to_running_again_s"] > 0
    assert r["one_process"]["training"]["served"] == r["separate_processes_own_cores"]["training"]["served"] == 2
    assert (tmp_path / "scale.json").exists()


def test_time_to_concept_smoke(tmp_path):
    from benchmarks import time_to_concept

    r = time_to_concept.main(["--preset", "smoke", "--out", str(tmp_path)])
    jobs = r["models"][0]["jobs"]
    assert [j["run"] for j in jobs] == ["first_of_category", "class_images_cached"]
    assert jobs[0]["class_images"] > 0 and all(j["train"] > 0 and j["total"] > 0 for j in jobs)
    assert r["models"][0]["lora_vs_reference"] > 0 and (tmp_path / "time_to_concept.md").exists()
