"""The real thing: `jina flow --uses flow.yml` in a subprocess, driven over gRPC by jina's Client."""
import io
import os
import re
import time

import pytest
from docarray import DocList
from docarray.documents import ImageDoc, TextDoc
from jina.excepts import BadServer
from PIL import Image

from conftest import BASE_MODEL, SECRET, instance_images, pngs
from big.auth import mint_token
from executor.documents import ConceptDoc, ConceptFileDoc, GeneratedImageDoc, JobDoc
from executor.flow_process import REPO, FlowProcess


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("flow") / "workspace"


@pytest.fixture(scope="module")
def flow(workspace):
    tmp = workspace.parent
    env = {"BIG_BASE_MODEL": BASE_MODEL, "BIG_WORKSPACE": str(workspace), "BIG_JWT_SECRET": SECRET,
           "BIG_AUTH_MODE": "hs256", "JINA_LOG_LEVEL": "ERROR"}
    with FlowProcess(str(tmp), env=env) as proc:
        try:
            yield proc.wait_ready(timeout=180)
        except (RuntimeError, TimeoutError) as e:
            pytest.fail(f"flow did not start: {e}")


def jwt(user):
    return {"jwt": {"token": mint_token(user, SECRET)}}


def prompts(*texts):
    return DocList[TextDoc]([TextDoc(text=t) for t in texts])


def server_error(excinfo) -> str:
    status = excinfo.value.args[0].status
    return f"{status.exception.name}: {' '.join(status.exception.args)}"


def test_finetune_then_generate_with_the_new_identifier(flow):
    res = flow.post("/finetune", inputs=pngs(instance_images()), parameters={
        **jwt("alice"), "category": "shape", "target_model": "private", "max_train_steps": 6,
        "num_class_images": 4, "learning_rate": 1e-4}, return_type=DocList[ConceptDoc])
    ident = res[0].text
    assert res[0].category == "shape" and res[0].model_version == 1 and res[0].prompt == f"a {ident} shape"
    out = flow.post("/generate", inputs=prompts(f"a {ident} shape"), parameters={
        **jwt("alice"), "target_model": "private", "identifier": ident, "num_images": 2, "seed": 7,
        "num_inference_steps": 4}, return_type=DocList[GeneratedImageDoc])
    assert [d.seed for d in out] == [7, 8]
    with Image.open(io.BytesIO(out[0].bytes_)) as im:
        assert im.size == (32, 32) and "Seed: 7" in im.text["parameters"]

    # Another user can neither use nor see it, and cannot tell that it exists.
    with pytest.raises(BadServer) as e:
        flow.post("/generate", inputs=prompts("x"), parameters={**jwt("bob"), "target_model": "private",
                                                                 "identifier": ident}, return_type=DocList[ImageDoc])
    assert "NotFound" in server_error(e)
    listed = flow.post("/concepts", inputs=DocList[TextDoc](), parameters=jwt("bob"), return_type=DocList[ConceptDoc])
    assert ident not in [d.text for d in listed]


def test_meta_concepts_are_visible_to_every_user(flow):
    res = flow.post("/finetune", inputs=pngs(instance_images(style="checker", mark="none", shape="circle")),
                    parameters={**jwt("alice"), "category": "painting", "target_model": "meta",
                                "max_train_steps": 6, "num_class_images": 4}, return_type=DocList[ConceptDoc])
    ident = res[0].text
    listed = flow.post("/concepts", inputs=DocList[TextDoc](), parameters=jwt("carol"),
                       return_type=DocList[ConceptDoc])
    assert any(d.text == ident and d.target_model == "meta" and not d.mine for d in listed)
    out = flow.post("/generate", inputs=prompts(f"a {ident} painting"), parameters={
        **jwt("carol"), "target_model": "meta", "seed": 1, "num_inference_steps": 4},
        return_type=DocList[GeneratedImageDoc])
    assert out[0].model_version >= 1


def test_async_finetune_reports_progress_as_a_job(flow):
    res = flow.post("/finetune", inputs=pngs(instance_images()), parameters={
        **jwt("dave"), "category": "shape", "max_train_steps": 6, "num_class_images": 4, "wait": False},
        return_type=DocList[ConceptDoc])
    job_id = res[0].job_id
    assert res[0].status == "queued" and job_id
    deadline = time.time() + 120
    while True:
        # A command line's "false" must not read as true and cancel the job.
        job = flow.post("/jobs", inputs=DocList[TextDoc](), parameters={**jwt("dave"), "job_id": job_id,
                                                                         "cancel": "false"},
                        return_type=DocList[JobDoc])[0]
        if job.status in ("succeeded", "failed", "cancelled") or time.time() > deadline:
            break
        time.sleep(0.5)
    assert job.status == "succeeded" and job.step == job.total_steps == 6 and job.identifier


@pytest.mark.parametrize("params,docs,error", [
    ({"jwt": {"token": "forged.token.value"}}, "images", "AuthError"),
    ({}, "images", "AuthError"),
    ({"category": "shape"}, "none", "BadRequest"),
    ({"category": "shape"}, "corrupt", "BadRequest"),
    ({"category": "shape", "max_train_steps": 10**7}, "images", "BadRequest"),
    ({"category": "shape", "target_model": "everyone"}, "images", "BadRequest"),
])
def test_bad_finetune_requests_get_clear_errors(flow, params, docs, error):
    inputs = {"images": pngs(instance_images(2)), "none": DocList[ImageDoc](),
              "corrupt": DocList[ImageDoc]([ImageDoc(bytes_=b"\x89PNG but not really")])}[docs]
    full = {**jwt("erin"), **params} if "jwt" not in params and error != "AuthError" else params
    with pytest.raises(BadServer) as e:
        flow.post("/finetune", inputs=inputs, parameters=full, return_type=DocList[ConceptDoc])
    assert error in server_error(e)
    # Nothing was created for erin.
    listed = flow.post("/concepts", inputs=DocList[TextDoc](), parameters=jwt("erin"), return_type=DocList[ConceptDoc])
    assert [d.text for d in listed if d.mine] == []


def test_a_finetune_request_sent_again_gets_the_job_its_first_try_queued(flow):
    """What Jina's gateway does when the replica serving a call dies: it sends the same request (same request id)
    to another replica. Here the same request reaches the gateway twice; BIG's gateway gives a /finetune without
    an idempotency key its request id as one, so the second try finds the first one's job."""
    import grpc
    from jina.proto import jina_pb2_grpc
    from jina.types.request.data import DataRequest

    request = DataRequest()
    request.header.exec_endpoint = "/finetune"
    request.data.docs = pngs(instance_images())
    request.parameters = {**jwt("ivan"), "category": "shape", "max_train_steps": 4, "num_class_images": 4,
                          "wait": False}
    with grpc.insecure_channel(f"{flow.args.host}:{flow.args.port}") as channel:
        stub = jina_pb2_grpc.JinaSingleDataRequestRPCStub(channel)
        answers = [stub.process_single_data(request, timeout=60) for _ in range(2)]
    assert [a.header.status.code for a in answers] == [0, 0]  # both answered, neither refused
    listed = flow.post("/jobs", inputs=DocList[TextDoc](), parameters=jwt("ivan"), return_type=DocList[JobDoc])
    assert len(listed) == 1  # one job for the request, however often it arrived


def test_a_store_that_refuses_writes_gets_a_documented_error_without_paths_and_loses_nothing(flow, workspace):
    """The store's staging folder is a file for a moment (as a full or read-only volume refuses a write): /finetune
    answers a plain BIGError naming the request, with no path and no stack of the server's; nothing is queued;
    /generate serves meanwhile; once the store takes writes, the same call teaches the concept."""
    staging, away = workspace / "tmp", workspace / "tmp.away"
    params = {**jwt("rita"), "category": "shape", "max_train_steps": 4, "num_class_images": 4}
    staging.rename(away)
    staging.write_text("not a folder")
    try:
        with pytest.raises(BadServer) as e:
            flow.post("/finetune", inputs=pngs(instance_images()), parameters=params, return_type=DocList[ConceptDoc])
        served = flow.post("/generate", inputs=prompts("a red star"), parameters={**jwt("rita"), "num_images": 1,
                           "num_inference_steps": 2}, return_type=DocList[GeneratedImageDoc])
    finally:
        staging.unlink()
        away.rename(staging)
    status = e.value.args[0].status
    assert status.exception.name == "BIGError" and "could not answer this request" in server_error(e)
    shown = f"{status}"
    assert str(workspace) not in shown and "Traceback" not in shown and list(status.exception.stacks) == []
    assert len(served) == 1
    assert len(flow.post("/jobs", inputs=DocList[TextDoc](), parameters=jwt("rita"), return_type=DocList[JobDoc])) == 0
    concept = flow.post("/finetune", inputs=pngs(instance_images()), parameters=params, return_type=DocList[ConceptDoc])
    assert concept[0].text


def test_cli_finetunes_a_folder_and_writes_pngs_and_a_contact_sheet(flow, tmp_path, capsys):
    from client_examples import cli

    host = f"grpc://{flow.args.host}:{flow.args.port}"
    token = mint_token("frank", SECRET)
    sample = os.path.join(REPO, "client_examples", "sample_concept")
    finetune = ["--host", host, "--token", token, "finetune", sample, "--category", "shape", "--steps", "5",
                "--idempotency-key", "frank-heart-1"]
    assert cli.main(finetune) == 0
    printed = capsys.readouterr().out
    ident = printed.split('identifier is "')[1].split('"')[0]
    assert re.search(r"took [0-9.]+ s: queue [0-9.]+, load [0-9.]+, class_images [0-9.]+, train [0-9.]+, commit", printed)
    assert cli.main(finetune) == 0  # run again with its key: the same concept, not a second one
    assert f'identifier is "{ident}"' in capsys.readouterr().out
    out = tmp_path / "out"
    assert cli.main(["--host", host, "--token", token, "generate", f"a {ident} shape", "--target", "private",
                     "--identifier", ident, "--num-images", "3", "--steps", "4", "--seed", "2", "--out", str(out)]) == 0
    files = sorted(os.listdir(out))
    assert files == ["000_seed2.png", "001_seed3.png", "002_seed4.png", "contact_sheet.png"]
    with Image.open(out / "000_seed2.png") as im:
        assert "Seed: 2" in im.text["parameters"]
    assert cli.main(["--host", host, "--token", token, "concepts"]) == 0
    mine = [line.split()[:3] for line in capsys.readouterr().out.splitlines()]  # identifier, category, target
    assert mine.count([ident, "shape", "private"]) == 1  # (the metamodel may hold the same word: its own)
    assert cli.main(["--host", host, "--token", token, "jobs"]) == 0  # each ended job with where its time went
    assert re.search(r"succeeded .*\n    took [0-9.]+ s: queue", capsys.readouterr().out)


def test_cli_sweep_and_grid_write_frames_a_gif_and_a_sheet(flow, tmp_path):
    from client_examples import cli

    host = f"grpc://{flow.args.host}:{flow.args.port}"
    token = mint_token("gina", SECRET)
    out = tmp_path / "sweep"
    assert cli.main(["--host", host, "--token", token, "sweep", "a red star", "--values", "1", "4", "8",
                     "--steps", "3", "--seed", "5", "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["000_seed5.png", "001_seed5.png", "002_seed5.png", "contact_sheet.png",
                                       "sweep.gif"]
    with Image.open(out / "sweep.gif") as im:
        assert im.n_frames == 3
    out = tmp_path / "grid"
    assert cli.main(["--host", host, "--token", token, "grid", "a red star", "a blue heart", "--guidance-scales",
                     "2", "6", "--steps", "3", "--num-seeds", "2", "--split", "2", "--out", str(out)]) == 0
    files = sorted(os.listdir(out))
    assert len([f for f in files if f.endswith("png") and f[:3].isdigit()]) == 8 and "grid.png" in files


def test_cli_textual_inversion_export_and_import_over_grpc(flow, tmp_path, capsys):
    """A concept trained with prepared images (filename captions, template, focal crop, flip) leaves the server
    as files and comes back to another user as a new private concept."""
    import shutil

    from client_examples import cli

    host = f"grpc://{flow.args.host}:{flow.args.port}"
    token, other = mint_token("hana", SECRET), mint_token("ivan", SECRET)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, name in enumerate(sorted(os.listdir(os.path.join(REPO, "client_examples", "sample_concept")))[:3]):
        if name.endswith(".png"):
            shutil.copy(os.path.join(REPO, "client_examples", "sample_concept", name), folder / f"orange heart_{i}.png")
    assert cli.main(["--host", host, "--token", token, "finetune", str(folder), "--category", "shape", "--steps", "4",
                     "--method", "textual_inversion", "--num-vectors", "2", "--init-text", "heart",
                     "--captions-from", "filename", "--template", "a [name] [category] like [filewords]",
                     "--crop", "focal", "--flip"]) == 0
    ident = capsys.readouterr().out.split('identifier is "')[1].split('"')[0]
    out = tmp_path / "concept"
    assert cli.main(["--host", host, "--token", token, "export", ident, "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == sorted(["learned_embeds.safetensors", f"{ident}.pt"])
    files = flow.post("/export", inputs=DocList[TextDoc](), parameters={  # a null format is the default, all
        **jwt("hana"), "identifier": ident, "format": None}, return_type=DocList[ConceptFileDoc])
    assert sorted(f.text for f in files) == sorted(os.listdir(out))
    assert cli.main(["--host", host, "--token", other, "import", str(out / f"{ident}.pt"), "--category",
                     "shape"]) == 0
    printed = capsys.readouterr().out
    assert "(textual_inversion)" in printed
    new = printed.split('imported as "')[1].split('"')[0]
    images = flow.post("/generate", inputs=prompts(f"a {new} shape"), parameters={
        **jwt("ivan"), "target_model": "private", "num_inference_steps": 3, "seed": 1},
        return_type=DocList[GeneratedImageDoc])
    assert images[0].target_model == f"private:{new}"
    with pytest.raises(BadServer) as e:  # hana's concept is not jon's to export
        flow.post("/export", inputs=DocList[TextDoc](), parameters={**jwt("jon"), "identifier": ident})
    assert "NotFound" in server_error(e)


def test_a_message_beyond_the_limits_is_refused_by_grpc_before_it_is_read(flow):
    """flow.yml's `grpc.max_receive_message_length` (Limits().max_message_bytes): gRPC refuses the message from its
    length, and the next request is served."""
    from benchmarks import transport
    from big.config import Limits

    # benchmarks/transport.py's measurement, once: through Jina's client and as a built message handed to gRPC.
    r = transport.measure(int(flow.args.port), Limits().max_message_bytes + 1, mint_token("alice", SECRET))
    assert "RESOURCE_EXHAUSTED" in r["client_error"] and r["transport_error"].startswith("RESOURCE_EXHAUSTED")
    out = flow.post("/generate", inputs=prompts("a red star"), parameters={**jwt("alice"), "num_inference_steps": 2},
                    return_type=DocList[GeneratedImageDoc])
    assert len(out) == 1


@pytest.mark.parametrize("params,named", [
    ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number, not nan"),
    ({"grid": {"guidance_scales": [2.0, float("inf")]}}, "grid.guidance_scales.1 must be a finite number, not inf"),
])
def test_non_finite_parameters_get_a_bad_request_naming_them_from_the_gateway(flow, params, named):
    """Jina's own gateway would answer UNKNOWN ("Fail to serialize NaN") before BIG sees the request
    (executor/gateway.py); streamed or not, the client gets BadServer with BadRequest, as from the executor."""
    for stream in (True, False):
        with pytest.raises(BadServer) as e:
            flow.post("/generate", inputs=prompts("a red star"), parameters={**jwt("alice"), **params}, stream=stream)
        assert server_error(e) == f"BadRequest: {named}"
    out = flow.post("/generate", inputs=prompts("a red star"), parameters={**jwt("alice"), "num_inference_steps": 2},
                    return_type=DocList[GeneratedImageDoc])
    assert len(out) == 1
