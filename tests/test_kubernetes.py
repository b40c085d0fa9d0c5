"""The Kubernetes manifests, rendered by ``kubectl kustomize`` and validated offline against the API
schemas ``kubernetes-validate`` ships (strict: an unknown field is an error), then cross-checked
against the code: probes on the service's health routes, settings the service reads, the user the
image runs as, a grace period longer than the drain, selectors that match the pods."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
KUBERNETES = REPO / "deploy" / "kubernetes"
#: The oldest API the manifests are written for and the newest the schema package knows.
VERSIONS = ("1.30.0", "latest")


def render(path: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (which carries kustomize) is not installed")
    done = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return list(yaml.safe_load_all(done.stdout))


@pytest.fixture(scope="module", params=["base", "gpu"])
def variant(request) -> tuple[str, list[dict]]:
    return request.param, render(KUBERNETES if request.param == "base" else KUBERNETES / request.param)


def by_kind(docs: list[dict]) -> dict[str, dict]:
    return {d["kind"]: d for d in docs}


def test_manifests_validate_against_the_kubernetes_schemas(variant):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    _, docs = variant
    loader = yaml.safe_load((KUBERNETES / "tools" / "bundle-loader.yaml").read_text())
    for version in VERSIONS:
        wanted = kubernetes_validate.latest_version() if version == "latest" else version
        for doc in [*docs, loader]:
            kubernetes_validate.validate(doc, wanted, strict=True)  # raises on any error
    assert set(by_kind(docs)) == {"ConfigMap", "Service", "PersistentVolumeClaim", "Deployment",
                                  "PodDisruptionBudget", "HorizontalPodAutoscaler"}


def test_a_typo_is_caught():
    """The validation can fail: a misspelt field and a wrong type are refused."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = render(KUBERNETES)
    deployment = by_kind(docs)["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {"path": "/"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.30.0", strict=True)
    service = by_kind(docs)["Service"]
    service["spec"]["ports"][0]["port"] = "eighty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, "1.30.0", strict=True)


def test_manifests_agree_with_the_service(variant):
    from service.cli import GRACEFUL_SHUTDOWN_S
    from service.settings import ENV_PREFIX, Settings

    name, docs = variant
    kinds = by_kind(docs)
    deployment, config = kinds["Deployment"], kinds["ConfigMap"]
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    # Probes on the routes the service has: readiness on /health/ready, liveness on /health/live.
    routes = set(re.findall(r'@app\.get\("([^"]+)"', (REPO / "service" / "app.py").read_text()))
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert {"/health/ready", "/health/live"} <= routes
    assert container["startupProbe"]["httpGet"]["path"] == "/health/live"
    # Every setting handed to the service is one it reads.
    fields = {f"{ENV_PREFIX}{f}".upper() for f in Settings.model_fields}
    given = set(config["data"]) | {e["name"] for e in container.get("env", [])}
    assert given <= fields, given - fields
    assert config["data"]["DETECTOR_DEVICE"] == ("cuda" if name == "gpu" else "cpu")
    assert "DETECTOR_BUNDLE_SHA256" in config["data"]
    assert container["envFrom"][0]["configMapRef"]["name"] == config["metadata"]["name"]
    # The bundle comes from the read-only volume, under its mount path.
    mount = next(m for m in container["volumeMounts"] if m["name"] == "bundles")
    assert mount["readOnly"] is True and config["data"]["DETECTOR_BUNDLE"].startswith(mount["mountPath"] + "/")
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "bundles")
    assert volume["persistentVolumeClaim"]["readOnly"] is True
    assert volume["persistentVolumeClaim"]["claimName"] == kinds["PersistentVolumeClaim"]["metadata"]["name"]
    # Graceful termination: the preStop pause and uvicorn's drain fit in the grace period.
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["spec"]["terminationGracePeriodSeconds"] > pause + GRACEFUL_SHUTDOWN_S
    # Rolling out never takes a serving pod away before its replacement is ready.
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    # The image's user, as the Dockerfile sets it.
    user = re.search(r"^USER (\d+):(\d+)", (REPO / "Dockerfile").read_text(), re.M)
    assert pod["spec"]["securityContext"]["runAsUser"] == int(user.group(1))
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # The container runs a console script the package installs.
    scripts = (REPO / "pyproject.toml").read_text()
    assert f'{container["command"][0]} = ' in scripts
    # Selectors match the pods: Service, PodDisruptionBudget, and the autoscaler's target.
    labels = pod["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        selector = kinds[kind]["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert selector and selector.items() <= labels.items(), kind
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = kinds["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    # The GPU overlay asks for a GPU and runs the CUDA image; the base asks for none.
    gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
    assert (gpus == 1) if name == "gpu" else gpus is None
    assert container["image"].endswith(":cu130" if name == "gpu" else ":cpu")
