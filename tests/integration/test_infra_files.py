"""The deployment files, checked with the tools that run here (no Docker daemon, no
cluster): docker-compose's own validation, Kubernetes' published schemas (strict), and
cross-checks against the code: every variable they set is one the code reads, every queue a
worker consumes is one a task is routed to, and KEDA watches the GPU queues."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

import celeryconfig
from core import settings
from core.settings import Settings
from infra import gpu_worker

INFRA = Path(__file__).resolve().parents[2] / "infra"
K8S = INFRA / "k8s"
KUBERNETES_VERSION = "1.31.0"
# Read by the programs we run, not by our code: Flower's auth, Hugging Face's offline switch.
THIRD_PARTY_VARIABLES = {"FLOWER_BASIC_AUTH", "HF_HUB_OFFLINE", "HF_HOME", "POD_NAME"}
APP_IMAGE = "t2i-serve:latest"


def code_variables() -> set[str]:
    return {env for env, _, _ in settings.describe()} | THIRD_PARTY_VARIABLES


def routed_queues() -> set[str]:
    return {route["queue"] for route in celeryconfig.celery_options(Settings())["task_routes"]
            .values()}


def effective(command: list[str]) -> list[str]:
    """The worker command a container runs: t2i-gpu-worker's celery command, or itself."""
    if command[0] == "t2i-gpu-worker":
        return gpu_worker.celery_command(Settings(), command[1:])
    return command


def consumed_queues(command: list[str]) -> set[str]:
    command = effective(command)
    return set(command[command.index("-Q") + 1].split(",")) if "-Q" in command else set()


def k8s_documents() -> list[dict]:
    return [doc for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml"
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def app_containers() -> list[dict]:
    return [container for doc in k8s_documents() if doc["kind"] in ("Deployment", "StatefulSet")
            for container in doc["spec"]["template"]["spec"]["containers"]
            if container["image"] == APP_IMAGE]


def compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def test_compose_file_validates_and_demands_its_secrets(tmp_path: Path) -> None:
    tool = shutil.which("docker-compose")
    assert tool, "docker-compose is not installed (scripts/test.sh installs it with apt)"
    base = [tool, "-f", str(INFRA / "compose.yaml")]
    checked = subprocess.run([*base, "--env-file", str(INFRA / "compose.env.example"), "config",
                              "-q"], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    (tmp_path / "empty.env").write_text("")
    unset = subprocess.run([*base, "--env-file", str(tmp_path / "empty.env"), "config", "-q"],
                           capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin"})
    assert unset.returncode != 0 and "T2I_S3_SECRET_KEY" in unset.stderr  # no default secret


def test_compose_services_set_only_variables_the_code_reads() -> None:
    services = compose()["services"]
    app = {name: s for name, s in services.items() if s.get("image") == APP_IMAGE}
    assert set(app) == {"api", "triage-worker", "webhook-worker", "gpu-worker-0", "gpu-worker-1",
                        "beat", "flower"}
    for name, service in app.items():
        assert set(service["environment"]) <= code_variables(), name
    example = {line.split("=")[0] for line in (INFRA / "compose.env.example").read_text()
               .splitlines() if line and not line.startswith("#")}
    assert example <= code_variables()
    consumed = set().union(*(consumed_queues(s["command"]) for s in app.values()))
    assert consumed == routed_queues()
    gpus = [s for name, s in app.items() if name.startswith("gpu-worker")]
    pinned = []
    for gpu in gpus:  # one service per GPU, each pinned to its own (a scaled service is not)
        assert consumed_queues(gpu["command"]) == {"gen.full", "gen.resume"}
        devices = gpu["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "count" not in devices[0]
        pinned += devices[0]["device_ids"]
    assert len(pinned) == len(set(pinned)) == len(gpus)
    nodes = [effective(gpu["command"])[effective(gpu["command"]).index("-n") + 1]
             for gpu in gpus]
    assert len(set(nodes)) == len(nodes)  # a lease and Flower tell them apart by node name
    published = [port for s in services.values() for port in s.get("ports", [])]
    assert published and all(port.startswith("127.0.0.1:") for port in published)


def test_kubernetes_manifests_pass_the_schemas_strictly() -> None:
    documents = k8s_documents()
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml")
                                    if p.name != "kustomization.yaml")
    checked = 0
    for doc in documents:
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: checked against the code below
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        checked += 1
    assert checked >= 10


def test_offline_pods_keep_the_hugging_face_cache_on_the_models_volume_a_job_fills() -> None:
    """With HF_HUB_OFFLINE a hub model loads only from HF_HOME: it must be on a volume that
    outlives the pod (not the image's home, not an emptyDir), and the fetch job writes
    there."""
    documents = k8s_documents()
    config = next(d for d in documents if d["kind"] == "ConfigMap")["data"]
    assert config["HF_HUB_OFFLINE"] == "1"
    claims = {d["metadata"]["name"] for d in documents if d["kind"] == "PersistentVolumeClaim"}
    job = yaml.safe_load((K8S / "jobs" / "fetch-model.yaml").read_text())
    kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)
    gpu = next(d for d in documents if d["kind"] == "Deployment" and
               d["metadata"]["name"] == "gpu-worker")
    for pod in (gpu["spec"]["template"]["spec"], job["spec"]["template"]["spec"]):
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = pod["containers"][0]["volumeMounts"]
        holding = [m for m in mounts if config["HF_HOME"].startswith(m["mountPath"] + "/")]
        assert holding, "HF_HOME is on no mounted volume"
        assert volumes[holding[0]["name"]]["persistentVolumeClaim"]["claimName"] in claims
    fetch_env = {e["name"]: e["value"] for e in job["spec"]["template"]["spec"]["containers"][0]
                 ["env"]}
    assert fetch_env["HF_HUB_OFFLINE"] == "0"
    compose_env = compose()["x-app"]["environment"]
    mounted = compose()["x-app"]["volumes"][0].split(":")[1]
    assert compose_env["HF_HOME"].startswith(mounted + "/")


def test_kubernetes_apps_read_known_variables_and_have_probes() -> None:
    documents = k8s_documents()
    config = next(d for d in documents if d["kind"] == "ConfigMap")
    assert set(config["data"]) <= code_variables()
    consumed = set()
    for container in app_containers():
        assert {e["name"] for e in container.get("env", [])} <= code_variables()
        if container["name"] != "beat":  # beat is the container's process: no more to probe
            assert "livenessProbe" in container, container["name"]
        consumed |= consumed_queues(container["command"])
    assert consumed == routed_queues()
    api = next(d for d in documents if d["kind"] == "Deployment" and d["metadata"]["name"] == "api")
    probes = api["spec"]["template"]["spec"]["containers"][0]
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/livez"  # no store outage restarts it


def test_no_liveness_probe_asks_the_broker() -> None:
    """A Redis outage must not restart pods (a GPU pod would reload its model): worker probes
    read the file the worker touches (T2I_WORKER_ALIVE_FILE), never `celery inspect`."""
    config = next(d for d in k8s_documents() if d["kind"] == "ConfigMap")["data"]
    for container in app_containers():
        for kind in ("livenessProbe", "startupProbe"):
            probe = json.dumps(container.get(kind, {}))
            assert "inspect" not in probe and "healthz" not in probe, (container["name"], kind)
            if "exec" in probe:
                assert config["T2I_WORKER_ALIVE_FILE"] in probe, container["name"]


def test_keda_scales_the_gpu_workers_on_their_queue_lengths() -> None:
    documents = k8s_documents()
    scaled = next(d for d in documents if d["kind"] == "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    target = scaled["spec"]["scaleTargetRef"]["name"]
    deployment = next(d for d in documents
                      if d["kind"] == "Deployment" and d["metadata"]["name"] == target)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    watched = {t["metadata"]["listName"] for t in scaled["spec"]["triggers"]
               if t["type"] == "redis"}
    assert watched == consumed_queues(container["command"]) == {"gen.full", "gen.resume"}
    # KEDA's operator resolves the address from its own namespace: the service's full name
    namespace = yaml.safe_load((K8S / "kustomization.yaml").read_text())["namespace"]
    port = next(d for d in documents if d["kind"] == "Service" and
                d["metadata"]["name"] == "redis")["spec"]["ports"][0]["port"]
    assert {t["metadata"]["address"] for t in scaled["spec"]["triggers"]} == \
        {f"redis.{namespace}.svc.cluster.local:{port}"}
    # several triggers scale on the larger of them; the modifier sums the two queues
    modifier = scaled["spec"]["advanced"]["scalingModifiers"]
    names = {t["name"] for t in scaled["spec"]["triggers"]}
    assert set(modifier["formula"].replace(" ", "").split("+")) == names and len(names) == 2


@pytest.mark.parametrize("path", sorted(INFRA.glob("**/*.yaml")), ids=lambda p: p.name)
def test_no_secret_values_are_committed(path: Path) -> None:
    text = path.read_text()
    assert "kind: Secret" not in text
    for line in text.splitlines():
        if "SECRET" in line and ":" in line and "${" not in line:
            assert "secretKeyRef" in line or line.lstrip().startswith("#"), line


def constraints() -> dict[str, str]:
    pinned = {}
    for line in (INFRA.parent / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pinned[name.lower().replace("_", "-")] = version
    return pinned


def test_every_install_uses_the_constraints_and_they_pin_every_dependency() -> None:
    """setup.sh (so CI) and the image install the exact versions of constraints.txt; every
    dependency the project names is pinned there, and the servers that must match a client
    run that client's version."""
    import re
    import tomllib

    pinned = constraints()
    project = tomllib.loads((INFRA.parent / "pyproject.toml").read_text())["project"]
    named = project["dependencies"] + project["optional-dependencies"]["test"]
    for requirement in named:
        name = re.split(r"[\[<>=!~ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        assert name == "torch" or name in pinned, name
    assert "-c constraints.txt" in (INFRA.parent / "scripts" / "setup.sh").read_text()
    assert "-c constraints.txt" in (INFRA / "Dockerfile").read_text()
    images = [c["image"] for d in k8s_documents() if d["kind"] == "StatefulSet"
              for c in d["spec"]["template"]["spec"]["containers"]]
    images.append(compose()["services"]["chroma"]["image"])
    chroma = [image for image in images if image.startswith("chromadb/chroma:")]
    assert len(chroma) == 2 and {i.split(":")[1] for i in chroma} == {pinned["chromadb"]}


def test_the_image_copies_every_package_the_project_installs() -> None:
    import tomllib

    project = tomllib.loads((INFRA.parent / "pyproject.toml").read_text())
    copied = {line.split()[1] for line in (INFRA / "Dockerfile").read_text().splitlines()
              if line.startswith("COPY ")}
    assert set(project["tool"]["setuptools"]["packages"]) <= copied


def test_gpu_workers_take_the_pool_t2i_gpu_batch_asks_for() -> None:
    """Compose, Kubernetes and the local stack start GPU workers through one rule."""
    import dataclasses

    from infra import servers

    one = gpu_worker.celery_command(Settings(), ["-n", "gpu0@%h"])
    assert one[one.index("-c") + 1] == "1" and one[one.index("-P") + 1] == "prefork"
    batching = dataclasses.replace(Settings(), gpu_batch=4)
    four = gpu_worker.celery_command(batching, [])
    assert four[four.index("-c") + 1] == "4" and four[four.index("-P") + 1] == "threads"
    assert four[four.index("-n") + 1] == "gpu@%h"  # a node name, unless one is given
    stack = servers.gpu_worker("gpu", batching).argv
    assert stack[stack.index("-P") + 1] == "threads" and stack[stack.index("-c") + 1] == "4"
    services = compose()["services"]
    pods = [d for d in k8s_documents() if d["kind"] == "Deployment" and
            d["metadata"]["name"] == "gpu-worker"]
    commands = [services[name]["command"] for name in services if name.startswith("gpu-")] + \
        [pod["spec"]["template"]["spec"]["containers"][0]["command"] for pod in pods]
    assert len(commands) == 3 and all(command[0] == "t2i-gpu-worker" for command in commands)
