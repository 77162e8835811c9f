"""Triton's control plane is closed by default: model control, the shared-memory registry, log settings and tracing
answer only a client that sends the admin key (tritonllm.server.RESTRICTED_APIS); serving stays open."""

from __future__ import annotations

import pytest
import requests

pytestmark = [pytest.mark.server, pytest.mark.model]

# (method, path, JSON body) of each restricted HTTP API; `x` is a model nobody serves
RESTRICTED = [
    ("POST", "/v2/repository/models/x/unload", {}),
    ("POST", "/v2/repository/models/x/load", {}),
    ("POST", "/v2/repository/index", {}),
    ("POST", "/v2/logging", {"log_verbose_level": 1}),
    ("GET", "/v2/trace/setting", None),
    ("POST", "/v2/systemsharedmemory/region/stub/register",
     {"key": "/triton_python_backend_shm_region_0", "offset": 0, "byte_size": 64}),
]
OPEN = ["/v2/health/ready", "/v2/models/ensemble", "/v2/models/ensemble/config", "/v2/models/engine/stats"]


@pytest.mark.parametrize("method,path,body", RESTRICTED)
def test_restricted_http_apis_refuse_a_client_without_the_admin_key(server, method, path, body):
    url = f"http://{server.endpoints.http_url}{path}"
    for headers in ({}, {"tritonllm-admin-key": "not-the-key-at-all"}):
        reply = requests.request(method, url, json=body, headers=headers, timeout=30)
        assert reply.status_code == 403 and "restricted" in reply.text, (path, reply.status_code, reply.text)


def test_the_admin_key_unlocks_them(server):
    base, headers = f"http://{server.endpoints.http_url}", server.admin_headers()
    assert requests.post(f"{base}/v2/logging", json={}, headers=headers, timeout=30).status_code == 200
    index = requests.post(f"{base}/v2/repository/index", json={}, headers=headers, timeout=30)
    assert index.status_code == 200 and {"ensemble", "engine"} <= {model["name"] for model in index.json()}
    unload = requests.post(f"{base}/v2/repository/models/x/unload", json={}, headers=headers, timeout=30)
    assert unload.status_code != 403 and "restricted" not in unload.text  # past the key; Triton's own answer
    assert requests.get(f"{base}/v2/systemsharedmemory/status", headers=headers, timeout=30).json() == []


def test_grpc_control_needs_the_key_too(server):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(server.endpoints.grpc_url)
    try:
        for call in (lambda **kw: client.register_system_shared_memory("stub", "/triton_python_backend_shm_region_0",
                                                                       64, **kw),
                     lambda **kw: client.unload_model("x", **kw), lambda **kw: client.get_log_settings(**kw)):
            with pytest.raises(InferenceServerException, match="restricted"):
                call()
        assert client.get_log_settings(headers=server.admin_headers("grpc"), as_json=True)
        assert client.get_system_shared_memory_status(headers=server.admin_headers("grpc"), as_json=True) == {}
        assert client.is_model_ready("ensemble")  # serving stays open
    finally:
        client.close()


@pytest.mark.parametrize("path", OPEN)
def test_serving_health_metadata_and_statistics_stay_open(server, path):
    assert requests.get(f"http://{server.endpoints.http_url}{path}", timeout=30).status_code == 200
