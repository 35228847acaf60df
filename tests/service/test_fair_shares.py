"""A light user's call runs between the denoising steps of a heavy user's call, and neither image changes."""
import threading
import time

from conftest import assert_same_image
from big.scheduling import FairScheduler


def test_a_call_nested_between_anothers_steps_leaves_both_images_as_they_are_alone(service):
    flood_params = {"seed": 3, "num_images": 2, "num_inference_steps": 12}
    polite = [(["a blue circle"], {"seed": 5, "num_inference_steps": 6}),
              (["a green heart"], {"seed": 6, "num_inference_steps": 6, "scheduler": "euler_a"}),  # noise each step
              (["a red star AND a blue circle"], {"seed": 7, "num_inference_steps": 6})]  # composable: its own loop
    sched = FairScheduler(max_queued=16, window=0)
    started, finished = threading.Event(), {}

    def timed(name, fn, *args):
        if name == "flood":
            started.set()
        out = fn(*args)
        finished[name] = time.perf_counter()
        return out

    sched.submit("flood", service.generate, "flood", ["a red star"], {"num_inference_steps": 4}).result(timeout=60)
    flood = sched.submit("flood", timed, "flood", service.generate, "flood", ["a purple square"], flood_params)
    started.wait(timeout=60)  # the flood has had the thread before this call began, the others never
    nested = [sched.submit(f"polite{i}", timed, f"polite{i}", service.generate, f"polite{i}", prompts, params)
              for i, (prompts, params) in enumerate(polite)]
    results = [f.result(timeout=120) for f in [flood] + nested]
    sched.close()
    assert all(finished[f"polite{i}"] < finished["flood"] for i in range(len(polite)))  # none waited for the flood
    alone = [service.generate("flood", ["a purple square"], flood_params)] + [
        service.generate("x", prompts, params) for prompts, params in polite]
    for got, want in zip(results, alone):
        assert [g.parameters_text() for g in got] == [w.parameters_text() for w in want]
        for g, w in zip(got, want):
            assert_same_image(g, w, service.device)
