"""The Kubernetes manifests (deploy/kubernetes/), validated offline against the Kubernetes API schemas that
kubernetes-validate bundles, and their containers' command lines checked against the real programs' options (the
`tritonllm` typer app, `tritonserver --help`), so a renamed option cannot drift out of the manifests unnoticed."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import typer
import yaml

from tritonllm.cli import app
from tritonllm.contract import SettingsError
from tritonllm.gateway.auth import parse_keys
from tritonllm.python_backends.metrics import GAUGES
from tritonllm.server import find_tritonserver

MANIFESTS = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.33.0"  # the oldest Kubernetes release still maintained upstream
QUEUE_DEPTH_METRIC = GAUGES["waiting"].name


def _documents(path: Path) -> list[dict]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


KUSTOMIZATION = _documents(MANIFESTS / "kustomization.yaml")[0]
RESOURCES = {(document["kind"], document["metadata"]["name"]): document for path in sorted(MANIFESTS.glob("*.yaml"))
             if path.name != "kustomization.yaml" for document in _documents(path)}


def _container(deployment: str) -> dict:
    (container,) = RESOURCES[("Deployment", deployment)]["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("kind, name", sorted(RESOURCES))
def test_every_manifest_is_valid_for_the_kubernetes_api(kind, name):
    kubernetes_validate.validate(RESOURCES[(kind, name)], KUBERNETES_VERSION, strict=True)  # strict: no unknown field


def test_the_kustomization_lists_every_manifest_except_the_adapter_rules():
    listed = set(KUSTOMIZATION["resources"])
    assert all((MANIFESTS / name).is_file() for name in listed)
    assert {path.name for path in MANIFESTS.glob("*.yaml")} - listed == {"kustomization.yaml",
                                                                          "prometheus-adapter-rules.yaml"}
    project_images = {_container(name)["image"] for kind, name in RESOURCES
                      if kind == "Deployment" and name != "tritonllm-redis"}
    assert project_images == {image["name"] for image in KUSTOMIZATION["images"]}


def test_only_the_gateway_is_exposed_outside_the_cluster():
    services = {name: service["spec"].get("type", "ClusterIP") for (kind, name), service in RESOURCES.items()
                if kind == "Service"}
    assert services == {"tritonllm-triton": "ClusterIP", "tritonllm-gateway": "LoadBalancer",
                        "tritonllm-redis": "ClusterIP"}


def test_triton_is_probed_on_its_health_endpoints_and_every_container_has_resources():
    triton = _container("tritonllm-triton")
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    for kind, name in RESOURCES:
        if kind == "Deployment":
            assert set(_container(name)["resources"]) == {"requests", "limits"}, name
            assert {"readinessProbe", "livenessProbe"} <= set(_container(name)), name
    for name in ("tritonllm-triton", "tritonllm-gateway"):
        budget = RESOURCES[("PodDisruptionBudget", name)]["spec"]
        assert budget["selector"] == RESOURCES[("Deployment", name)]["spec"]["selector"]


def _options(args: list[str]) -> set[str]:
    return {arg.split("=", 1)[0] for arg in args if arg.startswith("--")}


def test_the_gateway_command_line_parses_with_the_tritonllm_cli():
    gateway = _container("tritonllm-gateway")
    assert gateway["command"] == ["tritonllm"]
    subcommand, *args = gateway["args"]
    command = typer.main.get_command(app).commands[subcommand]
    context = command.make_context(subcommand, list(args))  # an unknown option or a bad value raises here
    assert context.params["model"].value == "auto"
    triton_service = RESOURCES[("Service", "tritonllm-triton")]["spec"]["ports"]
    grpc_port = next(port["port"] for port in triton_service if port["name"] == "grpc")
    assert context.params["triton"] == f"tritonllm-triton:{grpc_port}"
    assert context.params["port"] == gateway["ports"][0]["containerPort"]
    mount = next(mount["mountPath"] for mount in gateway["volumeMounts"] if mount["name"] == "api-keys")
    assert str(context.params["api_keys"]).startswith(mount + "/")


def test_the_triton_command_line_uses_tritonserver_options():
    triton = _container("tritonllm-triton")
    installation = find_tritonserver()
    shown = subprocess.run([str(installation.binary), "--help"], capture_output=True, text=True, timeout=60,
                           env=os.environ | installation.env)
    known = set(re.findall(r"--[a-z][a-z0-9-]+", shown.stdout + shown.stderr))
    assert "--model-repository" in known  # the help text was read
    assert triton["command"] == ["tritonserver"] and _options(triton["args"]) <= known
    # Its default ports are the ones the pod and the Service declare.
    assert [port["containerPort"] for port in triton["ports"]] == [8000, 8001, 8002]
    assert not _options(triton["args"]) & {"--http-port", "--grpc-port", "--metrics-port"}
    secret = RESOURCES[("Secret", "tritonllm-triton-admin")]
    variable = next(env for env in triton["env"] if env["name"] == "TRITON_ADMIN_KEY")
    assert variable["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]


def test_the_unedited_api_keys_secret_is_refused_so_the_gateway_never_starts_open():
    keys = RESOURCES[("Secret", "tritonllm-api-keys")]["stringData"]["keys.json"]
    with pytest.raises(SettingsError, match="sha256"):
        parse_keys(keys, "keys.json")


def test_the_autoscaler_scales_triton_on_the_engines_queue_depth_served_by_the_adapter_rule():
    autoscaler = RESOURCES[("HorizontalPodAutoscaler", "tritonllm-triton")]["spec"]
    assert autoscaler["scaleTargetRef"]["name"] == "tritonllm-triton"
    (metric,) = autoscaler["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == QUEUE_DEPTH_METRIC
    (rule,) = yaml.safe_load(RESOURCES[("ConfigMap", "prometheus-adapter")]["data"]["config.yaml"])["rules"]
    assert rule["seriesQuery"].startswith(QUEUE_DEPTH_METRIC + "{") and rule["name"]["as"] == QUEUE_DEPTH_METRIC
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
