"""BIG's gateway: Jina's gRPC gateway, refusing a request whose parameters hold NaN or infinity with a `BadRequest`
that names the parameter, and giving each /finetune and /import without an idempotency key its request id as one.

Jina's gateway reads a request's parameters with protobuf's `json_format.MessageToDict`, which raises on a
non-finite number before any executor code runs, and the client would get gRPC `UNKNOWN: Fail to serialize NaN for
Value.number_value`. A server interceptor sees each request first: a request with such a number is answered here,
as an executor answers a refused request (status ERROR, exception `BadRequest`, the client's `BadServer`), and
every other request goes on to Jina's gateway untouched.

On the way back, an answer that carries an error loses the server's traceback (Jina sends the executor's stack,
with the server's paths, to every client), and an error that is not one of BIG's documented errors (a full or
read-only store, a bug) reaches the client as a plain `BIGError` that names the request; its own text stays in
this gateway's and the executor's logs.
"""
from __future__ import annotations

import asyncio
import logging
import math

import grpc
from jina.serve.runtimes.gateway.grpc import GRPCGateway
from jina.types.request.data import DataRequest

from big.errors import ERRORS, BadRequest, BIGError

log = logging.getLogger("big.gateway")
DOCUMENTED = {cls.__name__ for cls in ERRORS}

_STREAM = "/jina.JinaRPC/Call"
_SINGLE = "/jina.JinaSingleDataRequestRPC/process_single_data"


def non_finite_parameter(value, path: str = "") -> str | None:
    """`name must be a finite number, not nan` for the first NaN or infinity in a protobuf Struct of parameters
    (nested structs and lists named by dots: `grid.guidance_scales.1`), else None."""
    items = value.fields.items() if hasattr(value, "fields") else enumerate(value.values)
    for key, v in items:
        name = f"{path}.{key}" if path else str(key)
        kind = v.WhichOneof("kind")
        if kind == "number_value" and not math.isfinite(v.number_value):
            return f"{name} must be a finite number, not {v.number_value}"
        nested = v.struct_value if kind == "struct_value" else v.list_value if kind == "list_value" else None
        problem = None if nested is None else non_finite_parameter(nested, name)
        if problem:
            return problem
    return None


def _refusal(request: DataRequest) -> DataRequest | None:
    """The answer to a request with a non-finite parameter (None for any other request)."""
    problem = non_finite_parameter(request.proto_wo_data.parameters)
    if problem is None:
        return None
    answer = DataRequest()
    answer.header.request_id = request.header.request_id
    answer.header.exec_endpoint = request.header.exec_endpoint
    answer.add_exception(BadRequest(problem))
    return answer


def _answered(answer):
    """`answer` as a client may see it: an error's stack removed, and an error BIG does not document replaced."""
    if not isinstance(answer, DataRequest) or answer.header.status.code != answer.header.status.ERROR:
        return answer
    status = answer.header.status
    exception = status.exception
    if exception.name not in DOCUMENTED:
        request_id = answer.header.request_id
        log.error("request %s (%s) failed with %s: %s", request_id, answer.header.exec_endpoint, exception.name,
                  " ".join(exception.args))
        shown = BIGError(f"the server could not answer this request ({exception.name}); its log has the details "
                         f"under request id {request_id}")
        exception.name, status.description = type(shown).__name__, repr(shown)
        del exception.args[:]
        exception.args.append(shown.args[0])
    del exception.stacks[:]
    return answer


def _keyed(request: DataRequest) -> DataRequest:
    """A /finetune or /import without an `idempotency_key` gets its request id as one: Jina's gateway sends a
    request whose replica died to another replica, and that try must find the job (the concept) the first one
    made, not make a second."""
    if request.header.exec_endpoint in ("/finetune", "/import"):
        fields = request.proto_wo_data.parameters.fields
        if "idempotency_key" not in fields or fields["idempotency_key"].WhichOneof("kind") == "null_value":
            fields["idempotency_key"].string_value = f"request:{request.header.request_id}"
    return request


class _Interceptor(grpc.aio.ServerInterceptor):
    """Each data request checked (`_refusal`) and keyed (`_keyed`) on its way in, each answer `_answered` on its
    way out."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method not in (_STREAM, _SINGLE):
            return handler
        if details.method == _SINGLE:
            async def single(request, context):
                return _answered(_refusal(request) or await handler.unary_unary(_keyed(request), context))

            return grpc.unary_unary_rpc_method_handler(single, request_deserializer=handler.request_deserializer,
                                                       response_serializer=handler.response_serializer)

        async def stream(requests, context):
            # Refusals join the gateway's own answers in one stream: a client's stream may mix both.
            answers: asyncio.Queue = asyncio.Queue()
            done = object()

            async def accepted():
                async for request in requests:
                    refusal = _refusal(request)
                    if refusal is None:
                        yield _keyed(request)
                    else:
                        await answers.put(_answered(refusal))

            async def forward():
                try:
                    async for answer in handler.stream_stream(accepted(), context):
                        await answers.put(_answered(answer))
                except Exception as e:  # noqa: BLE001 - raised below, in the stream the client reads (an abort too)
                    await answers.put(e)
                finally:
                    await answers.put(done)

            task = asyncio.create_task(forward())
            try:
                while (answer := await answers.get()) is not done:
                    if isinstance(answer, Exception):
                        raise answer
                    yield answer
            finally:
                task.cancel()

        return grpc.stream_stream_rpc_method_handler(stream, request_deserializer=handler.request_deserializer,
                                                     response_serializer=handler.response_serializer)


class BIGGateway(GRPCGateway):
    """flow.yml's gateway (`uses: BIGGateway`): Jina's gRPC gateway with the interceptor above."""

    def aio_tracing_server_interceptors(self):
        # Jina's only place for a server's interceptors; its tracing interceptor, when tracing is on, stays first.
        return [*(super().aio_tracing_server_interceptors() or []), _Interceptor()]
