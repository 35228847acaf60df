"""Concurrent /generate requests of one model route share pipeline calls, and each gets the images it gets alone."""
from conftest import assert_same_but_rounding
from big.errors import BadRequest


def test_requests_served_together_get_the_images_they_get_alone(service):
    calls = [("alice", ["a red star"], {"seed": 1, "num_images": 2, "num_inference_steps": 6}),
             ("bob", ["a blue circle", "a green heart"], {"seed": 7, "guidance_scale": 6.0, "num_inference_steps": 6}),
             ("carol", ["a purple square"], {"seed": 3, "num_inference_steps": 6, "num_images": 0}),  # refused alone
             ("dave", ["a yellow cross"], {"num_inference_steps": 6})]  # no seed: drawn, as alone
    keys = {service.generator.batch_key(u, p, params) for u, p, params in calls[:2] + calls[3:]}
    assert len(keys) == 1 and None not in keys
    together = service.generate_many(calls)
    assert isinstance(together[2], BadRequest)
    for (user, prompts, params), images in zip(calls[:2], together[:2]):
        alone = service.generate(user, prompts, params)
        assert [i.parameters_text() for i in images] == [i.parameters_text() for i in alone]
        assert_same_but_rounding(images, alone, service.device)
    assert len(together[3]) == 1


def test_a_refused_prompt_in_a_batch_fails_its_own_request_only(service):
    calls = [("alice", ["a red star"], {"seed": 1, "num_inference_steps": 4}),
             ("bob", ["a <lora:qzq:0.5> star"], {"seed": 2, "num_inference_steps": 4})]  # tags need 'private'
    assert len({service.generator.batch_key(u, p, params) for u, p, params in calls}) == 1
    good, bad = service.generate_many(calls)
    assert isinstance(bad, BadRequest) and "<lora:...>" in str(bad)
    assert_same_but_rounding(good, service.generate(*calls[0]), service.device)


def test_what_cannot_share_a_call_is_served_alone(service):
    g = service.generator
    assert g.batch_key("a", ["x"], {"height": 32}) != g.batch_key("a", ["x"], {"height": 64})
    assert g.batch_key("a", ["x"], {"scheduler": "euler"}) != g.batch_key("a", ["x"], {})
    assert g.batch_key("a", ["x"], {"target_model": "private", "identifier": "qzq"}) is None
    assert g.batch_key("a", ["x"], {"parameters": "a red star\nSteps: 4, Seed: 1"}) is None
    assert g.batch_key("a", ["x"], {"num_images": -1}) is None  # its error comes alone
    assert g.batch_key("a", ["x"], {"target_model": "private_meta"}) != g.batch_key("b", ["x"], {"target_model": "private_meta"})
