"""A message larger than the gateway's limit (flow.yml's `grpc.max_receive_message_length`), against
`jina flow --uses flow.yml`, in one run: how long Jina's client takes end to end (building the message on its own
CPU included), how long building it alone takes (docarray's protobuf of the document, then its bytes), and how
long gRPC takes to refuse it once the built message is handed to it.

    python -m benchmarks.transport [--mb 300] [--repeats 3]

Prints and writes `reports/transport/transport.json` (the goal: refused at the transport in under 2 s).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from benchmarks import harness

_SECRET = "transport-benchmark-secret-0123456789abcdef"


def _message(n_bytes: int, token: str):
    """A serialized DataRequest of one prompt document of `n_bytes`, and the seconds building it took: the
    documents' protobuf, then its bytes, as a client does before sending anything."""
    from docarray import DocList
    from docarray.documents import TextDoc
    from jina.types.request.data import DataRequest

    docs = DocList[TextDoc]([TextDoc(text="a" * n_bytes)])
    t0 = time.perf_counter()
    req = DataRequest()
    req.header.exec_endpoint = "/generate"
    req.data.docs = docs
    req.parameters = {"jwt": {"token": token}}
    data = req.proto.SerializeToString()
    return data, time.perf_counter() - t0


def measure(port: int, n_bytes: int, token: str, repeats: int = 1) -> dict:
    """Medians of `repeats` tries (each try's seconds under `runs`): a message of `n_bytes` built on the client,
    sent to the flow on `port` already serialized (handed to gRPC), and through Jina's client; each refusal's
    gRPC status and message are kept."""
    import grpc
    from docarray import DocList
    from docarray.documents import TextDoc
    from jina import Client

    # Jina's client first, as a client process meets a 300 MB document: its first one is the slowest to build.
    client, client_s, client_error = Client(host=f"grpc://127.0.0.1:{port}"), [], ""
    for _ in range(repeats):
        docs = DocList[TextDoc]([TextDoc(text="a" * n_bytes)])  # fresh: docarray keeps what it converted once
        t0 = time.perf_counter()
        try:
            client.post("/generate", inputs=docs, parameters={"jwt": {"token": token}})
        except Exception as e:  # noqa: BLE001 - the refusal is what is measured
            client_error = str(e)
        client_s.append(time.perf_counter() - t0)
        del docs
    build_s = []
    for _ in range(repeats):  # only the last message is kept, to send
        data, seconds = _message(n_bytes, token)
        build_s.append(seconds)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", -1)])
    call = channel.unary_unary("/jina.JinaSingleDataRequestRPC/process_single_data")
    raw, raw_error = [], ""
    for _ in range(repeats):
        t0 = time.perf_counter()
        try:
            call(data, timeout=60)
        except grpc.RpcError as e:
            raw_error = f"{e.code().name}: {e.details()}"
        raw.append(time.perf_counter() - t0)
    channel.close()
    r3 = lambda xs: [round(x, 3) for x in xs]  # noqa: E731
    return {"message_bytes": n_bytes, "refused_at_transport_s": round(statistics.median(raw), 3),
            "transport_error": raw_error, "client_post_s": round(statistics.median(client_s), 3),
            "client_builds_message_s": round(statistics.median(build_s), 3), "client_error": client_error[:300],
            "runs": {"refused_at_transport_s": r3(raw), "client_post_s": r3(client_s),
                     "client_builds_message_s": r3(build_s)}}


def main(argv=None) -> dict:
    from big.auth import mint_token
    from executor.flow_process import FlowProcess

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=300.0, help="the message's size, in MB (10^6 bytes)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="reports/transport")
    a = harness.parse_args(ap, argv, smoke=dict(repeats=1))
    with tempfile.TemporaryDirectory() as tmp:
        env = {"BIG_BASE_MODEL": "embedded", "BIG_WORKSPACE": f"{tmp}/workspace", "BIG_JWT_SECRET": _SECRET,
               "BIG_AUTH_MODE": "hs256", "JINA_LOG_LEVEL": "ERROR"}
        with FlowProcess(tmp, env=env) as proc:
            proc.wait_ready(timeout=180)
            report = measure(proc.port, int(a.mb * 1e6), mint_token("bench", _SECRET), a.repeats)
    report.update(repeats=a.repeats, preset=a.preset)
    harness.write_report(a.out, "transport", report)
    print(f"{report['message_bytes'] / 1e6:.0f} MB: refused at the transport in {report['refused_at_transport_s']} s "
          f"({report['transport_error'][:60]}...); Jina's client end to end {report['runs']['client_post_s']} s; "
          f"building the message on the client alone {report['runs']['client_builds_message_s']} s")
    return report


if __name__ == "__main__":
    main()
