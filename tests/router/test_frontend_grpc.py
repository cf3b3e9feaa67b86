"""The router's gRPC side (tandem.v1.Router, health, reflection) and cancellation: a client that
goes away (gRPC or HTTP) stops the decode worker's request."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tandem.engine import SamplingParams
from tandem.proto import router_pb2 as rpb
from tandem.proto import router_pb2_grpc as rpb_grpc
from tandem.proto.convert import VERSION, params_to_proto
from tests.router.conftest import MODEL_NAME


def stub(cluster):
    return rpb_grpc.RouterStub(grpc.insecure_channel(cluster.router.grpc_endpoint))


def generate(cluster, timeout=120, **kw):
    msgs = list(stub(cluster).Generate(rpb.RouterGenerateRequest(**{"version": VERSION, **kw}), timeout=timeout))
    return [t for m in msgs for t in m.token_ids], "".join(m.text for m in msgs), msgs


def test_generate_text_streams_offline_tokens(cluster, offline):
    sp = SamplingParams(max_tokens=12, temperature=0.0)
    want = offline.generate("The quick brown fox", sp)[0]
    ids, text, msgs = generate(cluster, model=MODEL_NAME, text="The quick brown fox", params=params_to_proto(sp))
    assert ids == want.token_ids and text == want.text
    assert msgs[0].request_id and len(msgs) > 1            # streamed, not one message
    assert msgs[-1].finish_reason == want.finish_reason
    assert msgs[-1].prompt_tokens == len(want.prompt_token_ids)
    assert msgs[-1].completion_tokens == len(want.token_ids)


def test_generate_token_ids_and_chat(cluster, offline):
    sp = SamplingParams(max_tokens=8, temperature=0.0)
    prompt = offline.tokenizer.encode("1 2 3 4 5")
    want = offline.generate([prompt], sp)[0]
    ids, _, _ = generate(cluster, token_ids=rpb.TokenIds(ids=prompt), params=params_to_proto(sp))
    assert ids == want.token_ids
    chat = [{"role": "user", "content": "Say hello."}]
    want = offline.chat(chat, sp)
    ids, text, _ = generate(cluster, chat=rpb.ChatInput(messages=[rpb.ChatMessage(role="user", content="Say hello.")]),
                            params=params_to_proto(sp))
    assert ids == want.token_ids and text == want.text


def test_generate_logprobs(cluster):
    sp = SamplingParams(max_tokens=4, temperature=0.0, logprobs=2)
    _, _, msgs = generate(cluster, text="abc", params=params_to_proto(sp))
    lps = [lp for m in msgs for lp in m.logprobs]
    assert len(lps) == 4 and all(len(lp.top) == 2 and lp.logprob <= 0 for lp in lps)


def test_generate_errors(cluster):
    with pytest.raises(grpc.RpcError) as e:
        generate(cluster, model="gpt-9", text="x")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        generate(cluster, text="x", params=params_to_proto(SamplingParams(temperature=-1.0)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        generate(cluster, params=params_to_proto(SamplingParams()))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    limit = stub(cluster).ListModels(rpb.ListModelsRequest(version=VERSION)).models[0].max_model_len
    with pytest.raises(grpc.RpcError) as e:
        generate(cluster, token_ids=rpb.TokenIds(ids=[5] * limit))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "context length" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        generate(cluster, version=7, text="x")
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_list_models(cluster):
    resp = stub(cluster).ListModels(rpb.ListModelsRequest(version=VERSION), timeout=10)
    assert [m.id for m in resp.models] == [MODEL_NAME] and resp.models[0].max_model_len > 0


def test_health_and_reflection(cluster):
    ch = grpc.insecure_channel(cluster.router.grpc_endpoint)
    h = health_pb2_grpc.HealthStub(ch)
    for service in ("", "tandem.v1.Router"):
        assert h.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(ch)
    resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                          timeout=10))
    names = {s.name for s in resp.list_services_response.service}
    assert {"tandem.v1.Router", "grpc.health.v1.Health"} <= names
    resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="tandem.v1.Router")]), timeout=10))
    assert resp.file_descriptor_response.file_descriptor_proto


def test_proto_stubs_are_current():
    r = subprocess.run([sys.executable, "-m", "tandem.proto_gen", "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# ---- cancellation ------------------------------------------------------------------------------------
def _wait_decode_idle(cluster, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = cluster.decode.info()
        if info.running == 0 and info.waiting == 0:
            return True
        time.sleep(0.1)
    return False


def test_grpc_cancel_aborts_worker_request(cluster):
    sp = SamplingParams(max_tokens=3000, temperature=0.0, ignore_eos=True)
    call = stub(cluster).Generate(rpb.RouterGenerateRequest(text="go on and on", params=params_to_proto(sp)))
    next(call)
    assert cluster.decode.info().running == 1
    call.cancel()
    assert _wait_decode_idle(cluster, 5.0), "the decode worker kept generating after the cancel"


def test_http_disconnect_aborts_worker_request(cluster):
    host, port = cluster.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps({
        "prompt": "go on and on", "max_tokens": 3000, "ignore_eos": True, "temperature": 0, "stream": True}),
        headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.readline().startswith(b"data:")
    assert cluster.decode.info().running == 1
    conn.sock.close()
    conn.close()
    assert _wait_decode_idle(cluster, 5.0), "the decode worker kept generating after the disconnect"
