"""The deployment files: Kubernetes manifests, docker-compose.yml, Prometheus, Grafana, the container builds.

Every check here reads the real files and fails on a broken one:
- Kubernetes manifests validate (offline, strict) against the schemas `kubernetes-validate` ships, the
  ServiceMonitor against deploy/schemas/servicemonitor-monitoring-v1.json, and they agree with each other
  and with the service's own CLI and configuration loader (ports, probes, labels, config keys).
- docker-compose.yml validates against the compose-spec JSON schema (vendored in deploy/schemas/).
- `promtool check config` passes on deploy/prometheus/prometheus.yml (with its rule file).
- The Grafana dashboard's and the alerts' PromQL names only series that a live service exports.
- The Dockerfiles' RUN steps are `bash deploy/<script>.sh ...` and CI runs those exact command lines
  into a temporary root (no docker engine in CI), then checks what they installed.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s" / "daemonset"  # topology 1: a loader per node (DaemonSet), hostIPC
K8S_SIDECAR = DEPLOY / "k8s" / "sidecar"  # topology 2: the loader as a native sidecar in each trainer pod
K8S_POOL = DEPLOY / "k8s" / "pool"  # beside topology 1: CPU-only loaders any trainer pulls from (issue #17)
SCHEMAS = DEPLOY / "schemas"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "wsi-loader.json"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILES = (DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cuda")
K8S_VERSION = "1.30.0"  # oldest Kubernetes the manifests target (gRPC probes GA 1.27, internalTrafficPolicy GA 1.26)
IN_CI = bool(os.environ.get("CI"))


def _need(condition: bool, reason: str) -> None:
    """Skip on a developer machine without the tool; fail in CI, where .ci/run installs it."""
    if not condition:
        if IN_CI:
            pytest.fail(f"{reason} (CI is set: CI must provide it)")
        pytest.skip(reason)


# --- helpers: the service's own parsers -------------------------------------------------------------------
def _loader_args(argv: list[str]) -> Any:
    from loader_service.cli import _parser

    return _parser().parse_args(argv)


def _trainer_args(argv: list[str]) -> Any:
    from trainer_client.cli import _parser

    return _parser().parse_args(argv)


def _load_config(text: str) -> Any:
    from loader_service.config import config_from_mapping

    return config_from_mapping(yaml.safe_load(text) or {})


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


# === Kubernetes =============================================================================================
def _k8s_docs(folder: Path = K8S) -> dict[str, dict[str, Any]]:
    """kind/name -> manifest, from every YAML of one topology's folder except the kustomization."""
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                key = f"{doc['kind']}/{doc['metadata']['name']}"
                assert key not in docs, f"{key} defined twice"
                docs[key] = {**doc, "_file": path.name}
    return docs


def _servicemonitor_validator() -> jsonschema.protocols.Validator:
    import kubernetes_validate
    from referencing import Registry, Resource

    base = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    definitions = json.loads((base / f"v{K8S_VERSION}-local-strict" / "_definitions.json").read_text())
    registry = Registry().with_resource(definitions["$id"], Resource.from_contents(definitions))
    schema = json.loads((SCHEMAS / "servicemonitor-monitoring-v1.json").read_text())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _validate_k8s(doc: dict[str, Any]) -> None:
    """Raises on an invalid manifest."""
    body = {k: v for k, v in doc.items() if k != "_file"}
    if body["kind"] == "ServiceMonitor":
        _servicemonitor_validator().validate(body)
        return
    import kubernetes_validate

    kubernetes_validate.validate(body, K8S_VERSION, strict=True)


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict[str, Any]]:
    try:
        import kubernetes_validate  # noqa: F401
    except ImportError:
        _need(False, "kubernetes-validate is not installed (pip install kubernetes-validate; the dev extra has it)")
    return _k8s_docs()


@pytest.fixture(scope="module")
def sidecar(k8s: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return _k8s_docs(K8S_SIDECAR)


def test_k8s_manifests_validate_against_their_schemas(k8s: dict[str, dict[str, Any]],
                                                      sidecar: dict[str, dict[str, Any]]) -> None:
    expected = {"Namespace/wsi-loader", "ConfigMap/wsi-loader-config", "DaemonSet/wsi-loader", "Service/wsi-loader",
                "ServiceMonitor/wsi-loader", "Job/wsi-train", "PersistentVolumeClaim/wsi-slides",
                "PersistentVolumeClaim/wsi-tissue-cache", "NetworkPolicy/wsi-loader"}
    assert expected <= set(k8s), f"missing: {expected - set(k8s)}"
    expected_sidecar = {"Namespace/wsi-train", "ConfigMap/wsi-loader-sidecar-config", "Job/wsi-train",
                        "PersistentVolumeClaim/wsi-slides", "PersistentVolumeClaim/wsi-tissue-cache"}
    assert expected_sidecar <= set(sidecar), f"missing: {expected_sidecar - set(sidecar)}"
    for key, doc in [*k8s.items(), *sidecar.items()]:
        try:
            _validate_k8s(doc)
        except Exception as err:  # noqa: BLE001 - name the file in the failure
            pytest.fail(f"{doc['_file']}: {key} does not validate: {getattr(err, 'message', err)}")


@pytest.mark.parametrize("breakage", ["probe-port-name", "unknown-container-key", "shm-medium", "monitor-interval",
                                      "monitor-typo", "sidecar-restart-policy"])
def test_k8s_validation_rejects_broken_manifests(k8s: dict[str, dict[str, Any]], sidecar: dict[str, dict[str, Any]],
                                                breakage: str) -> None:
    """The validators are strict: each of these small mistakes must be caught."""
    ds = copy.deepcopy(k8s["DaemonSet/wsi-loader"])
    job = copy.deepcopy(sidecar["Job/wsi-train"])
    sm = copy.deepcopy(k8s["ServiceMonitor/wsi-loader"])
    container = ds["spec"]["template"]["spec"]["containers"][0]
    broken = ds
    if breakage == "probe-port-name":  # kubelet gRPC probes take a number, not a port name
        container["readinessProbe"]["grpc"]["port"] = "grpc"
    elif breakage == "unknown-container-key":
        container["readinesProbe"] = container.pop("readinessProbe")
    elif breakage == "shm-medium":
        next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"] = []
        broken = job
    elif breakage == "sidecar-restart-policy":  # only Always makes an init container a sidecar
        job["spec"]["template"]["spec"]["initContainers"][0]["restartPolicy"] = ["Always"]
        broken = job
    elif breakage == "monitor-interval":
        sm["spec"]["endpoints"][0]["interval"] = "15 seconds"
        broken = sm
    elif breakage == "monitor-typo":
        sm["spec"]["endpoint"] = sm["spec"].pop("endpoints")
        broken = sm
    with pytest.raises(jsonschema.ValidationError):
        _validate_k8s(broken)


@pytest.mark.parametrize("folder", [K8S, K8S_SIDECAR, K8S_POOL], ids=lambda p: p.name)
def test_kustomization_lists_the_manifests(folder: Path) -> None:
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"}
    # The trainer Job is started per run (kubectl create -f), not applied with the service.
    assert listed == on_disk - {"trainer-job.yaml"}, (listed, on_disk)


def _loader_container(k8s: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return k8s["DaemonSet/wsi-loader"]["spec"]["template"]["spec"]["containers"][0]


def test_k8s_config_map_is_a_valid_service_config(k8s: dict[str, dict[str, Any]]) -> None:
    pod = k8s["DaemonSet/wsi-loader"]["spec"]["template"]
    container = _loader_container(k8s)
    config = _load_config(k8s["ConfigMap/wsi-loader-config"]["data"]["config.yaml"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    host, port = _host_port(config.listen)
    assert host == "0.0.0.0", "in a pod the service must listen on all interfaces for probes and the Service"
    assert port == ports["grpc"]
    assert config.metrics_host == "0.0.0.0" and config.metrics_port == ports["metrics"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(config.metrics_port)
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    # The args are what `loader-service` accepts, and point at the mounted ConfigMap.
    argv = container["args"]
    assert argv[0] == "loader-service"
    args = _loader_args(argv[1:])
    assert args.command == "serve"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[args.config]["name"] == "config" and mounts[args.config]["subPath"] == "config.yaml"
    # Drain finishes before the kubelet's SIGKILL.
    assert config.shutdown_grace_s < pod["spec"]["terminationGracePeriodSeconds"]
    # Datasets live on the read-only slide volume.
    assert all(str(d.manifest).startswith("/data/") for d in config.datasets)
    assert [str(p) for p in config.data_roots] == ["/data"]
    assert mounts["/data"]["readOnly"] is True
    # The tokens file named in the args is in the mounted Secret.
    tokens_mount = mounts[str(Path(args.tokens_file).parent)]
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == tokens_mount["name"])
    assert Path(args.tokens_file).name in {i["path"] for i in volume["secret"]["items"]}


def test_k8s_daemonset_runs_on_gpu_nodes_with_probes_and_shm(k8s: dict[str, dict[str, Any]]) -> None:
    from loader_service.cli import _parser

    health_service = _parser().parse_args(["health"]).service  # what `loader-service health` checks
    ds = k8s["DaemonSet/wsi-loader"]
    pod = ds["spec"]["template"]["spec"]
    container = _loader_container(k8s)
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert pod["hostNetwork"] is False
    for kind in ("requests", "limits"):
        assert {"cpu", "memory", "nvidia.com/gpu"} <= set(container["resources"][kind]), kind
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    # Readiness: ready to serve; start-up and liveness: the process answers (a long index restarts nothing).
    assert container["readinessProbe"]["grpc"] == {"port": grpc_port, "service": health_service}
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": grpc_port, "service": ""}, probe
    # Shared memory with the trainers: the node's IPC namespace, and no private /dev/shm hiding it.
    assert pod["hostIPC"] is True
    assert "/dev/shm" not in {m["mountPath"] for m in container["volumeMounts"]}
    trainer = k8s["Job/wsi-train"]["spec"]["template"]["spec"]
    assert trainer["hostIPC"] is True
    assert "/dev/shm" not in {m["mountPath"] for m in trainer["containers"][0]["volumeMounts"]}
    cache = next(m for m in container["volumeMounts"] if m["mountPath"] == "/var/cache/wsi-loader")
    claim = next(v for v in pod["volumes"] if v["name"] == cache["name"])["persistentVolumeClaim"]["claimName"]
    assert "ReadWriteMany" in k8s[f"PersistentVolumeClaim/{claim}"]["spec"]["accessModes"]
    slides = next(v for v in pod["volumes"] if v["name"] == "slides")
    assert slides["persistentVolumeClaim"]["readOnly"] is True
    # Non-root, the same uid as the image's USER.
    image_uid = int(_instructions(DOCKERFILES[1])["USER"][-1].split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == image_uid
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    config = _load_config(k8s["ConfigMap/wsi-loader-config"]["data"]["config.yaml"])
    assert any(str(config.tissue_cache_dir).startswith(w) for w in writable), "tissue cache must be writable"


def test_k8s_service_monitor_and_network_policy_select_the_loader(k8s: dict[str, dict[str, Any]]) -> None:
    pod_labels = k8s["DaemonSet/wsi-loader"]["spec"]["template"]["metadata"]["labels"]
    container_ports = {p["name"]: p["containerPort"] for p in _loader_container(k8s)["ports"]}
    service = k8s["Service/wsi-loader"]
    assert service["spec"]["internalTrafficPolicy"] == "Local"
    assert service["spec"]["selector"].items() <= pod_labels.items()
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in container_ports, port
    monitor = k8s["ServiceMonitor/wsi-loader"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service["metadata"]["namespace"] in monitor["namespaceSelector"]["matchNames"]
    assert {e["port"] for e in monitor["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    policy = k8s["NetworkPolicy/wsi-loader"]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    allowed = {p["port"] for rule in policy["ingress"] for p in rule["ports"]}
    assert allowed == set(container_ports.values())


def test_k8s_trainer_job_uses_torchrun_against_the_node_local_service(k8s: dict[str, dict[str, Any]]) -> None:
    job = k8s["Job/wsi-train"]
    pod = job["spec"]["template"]
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    argv = container["command"] + container["args"]
    # Kubernetes expands $(VAR) from env: every reference must be defined.
    for ref in re.findall(r"\$\((\w+)\)", " ".join(argv)):
        assert ref in env, f"$({ref}) is not in the container's env"
    expanded = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)].get("value", "TOKEN-FROM-SECRET-0123456789"), a)
                for a in argv]
    assert expanded[0] == "torchrun"
    m = expanded.index("-m")
    nproc = [a for a in expanded[1:m] if a.startswith("--nproc-per-node")]
    assert nproc and int(nproc[0].split("=")[1]) == int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert expanded[m + 1] == "trainer_client.cli"
    args = _trainer_args(expanded[m + 2:])  # the module's own parser accepts the arguments
    assert args.command == "train"
    host, port = _host_port(args.endpoint)
    service = k8s["Service/wsi-loader"]
    assert host.split(".")[:3] == [service["metadata"]["name"], service["metadata"]["namespace"], "svc"]
    assert port == next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert env["WSI_LOADER_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "wsi-loader-tokens"
    # Admitted by the loader's NetworkPolicy, on a GPU node.
    client_selector = k8s["NetworkPolicy/wsi-loader"]["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert client_selector.items() <= pod["metadata"]["labels"].items()
    assert pod["spec"]["nodeSelector"] == k8s["DaemonSet/wsi-loader"]["spec"]["template"]["spec"]["nodeSelector"]


_RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                       "projected", "secret"}


def pod_security_violations(pod: dict[str, Any]) -> set[str]:
    """What in a pod spec the "restricted" Pod Security level forbids (the checks of the Kubernetes
    Pod Security Standards that these manifests can touch; an empty set passes)."""
    found = set()
    for key in ("hostIPC", "hostPID", "hostNetwork"):
        if pod.get(key):
            found.add(key)
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= _RESTRICTED_VOLUMES:
            found.add(f"volume {volume['name']}: {sorted(kinds - _RESTRICTED_VOLUMES)}")
    pod_ctx = pod.get("securityContext", {})
    for container in pod.get("initContainers", []) + pod.get("containers", []):
        ctx = container.get("securityContext", {})
        name = container["name"]
        if ctx.get("privileged"):
            found.add(f"{name}: privileged")
        if ctx.get("allowPrivilegeEscalation") is not False:
            found.add(f"{name}: allowPrivilegeEscalation must be false")
        if ctx.get("capabilities", {}).get("drop") != ["ALL"] or ctx.get("capabilities", {}).get("add"):
            found.add(f"{name}: capabilities must drop ALL and add none")
        if not ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")):
            found.add(f"{name}: runAsNonRoot")
        if ctx.get("runAsUser", pod_ctx.get("runAsUser", 1)) == 0:
            found.add(f"{name}: runAsUser 0")
        seccomp = ctx.get("seccompProfile", pod_ctx.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.add(f"{name}: seccompProfile")
        if any("hostPort" in port for port in container.get("ports", [])):
            found.add(f"{name}: hostPort")
    return found


def test_pod_security_checker_catches_what_restricted_forbids(sidecar: dict[str, dict[str, Any]]) -> None:
    pod = copy.deepcopy(sidecar["Job/wsi-train"]["spec"]["template"]["spec"])
    assert pod_security_violations(pod) == set()
    pod["hostIPC"] = True
    pod["volumes"].append({"name": "host", "hostPath": {"path": "/dev/shm"}})
    pod["initContainers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    assert pod_security_violations(pod) == {"hostIPC", "volume host: ['hostPath']",
                                            "loader: allowPrivilegeEscalation must be false"}


def test_k8s_pod_security_levels_are_stated_and_met(k8s: dict[str, dict[str, Any]],
                                                     sidecar: dict[str, dict[str, Any]]) -> None:
    """Sidecar: every pod passes "restricted". DaemonSet: hostIPC is the only thing beyond it, and its
    namespace says "privileged" (the level hostIPC needs: baseline forbids host namespaces)."""
    level = "pod-security.kubernetes.io/enforce"
    assert sidecar["Namespace/wsi-train"]["metadata"]["labels"][level] == "restricted"
    assert pod_security_violations(sidecar["Job/wsi-train"]["spec"]["template"]["spec"]) == set()
    assert k8s["Namespace/wsi-loader"]["metadata"]["labels"][level] == "privileged"
    for key in ("DaemonSet/wsi-loader", "Job/wsi-train"):
        assert pod_security_violations(k8s[key]["spec"]["template"]["spec"]) == {"hostIPC"}, key


def test_k8s_sidecar_shares_memory_with_the_trainer(sidecar: dict[str, dict[str, Any]]) -> None:
    from loader_service.cli import _parser

    pod = sidecar["Job/wsi-train"]["spec"]["template"]
    spec = pod["spec"]
    (loader,) = spec["initContainers"]
    (trainer,) = spec["containers"]
    assert loader["restartPolicy"] == "Always", "a native sidecar is an init container with restartPolicy Always"
    # One in-memory emptyDir at /dev/shm in both containers: the loader's slots are the trainer's to map.
    shm = {c["name"]: next(m["name"] for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm")
           for c in (loader, trainer)}
    assert shm["loader"] == shm["trainer"]
    volume = next(v for v in spec["volumes"] if v["name"] == shm["loader"])
    assert volume["emptyDir"]["medium"] == "Memory" and volume["emptyDir"]["sizeLimit"]
    # The loader's configuration: loopback (the pod's network namespace is shared), CPU augmentation
    # (the GPUs are the trainer's, and the loader's container is given none).
    mounts = {m["mountPath"]: m for m in loader["volumeMounts"]}
    args = _parser().parse_args(loader["args"][1:])
    config_volume = next(v for v in spec["volumes"] if v["name"] == mounts[args.config]["name"])
    config = _load_config(sidecar[f"ConfigMap/{config_volume['configMap']['name']}"]["data"]["config.yaml"])
    host, port = _host_port(config.listen)
    assert host == "127.0.0.1" and config.device == "cpu"
    assert "nvidia.com/gpu" not in loader["resources"]["limits"]
    assert {"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"} in loader["env"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(config.metrics_port)
    # The trainer waits for the loader to be ready (start-up probe on the readiness service) and connects
    # to it on loopback.
    health_service = _parser().parse_args(["health"]).service
    assert loader["startupProbe"]["grpc"] == {"port": port, "service": health_service}
    assert loader["livenessProbe"]["grpc"] == {"port": port, "service": ""}
    argv = trainer["command"] + trainer["args"]
    train = _trainer_args(argv[argv.index("-m") + 2:])
    assert train.command == "train" and train.endpoint == f"127.0.0.1:{port}"
    # The tissue cache is on a persistent volume, writable by the loader; the slides are read-only.
    assert any(str(config.tissue_cache_dir).startswith(m) for m, v in mounts.items() if not v.get("readOnly"))
    cache = next(m for m in loader["volumeMounts"] if str(config.tissue_cache_dir).startswith(m["mountPath"]))
    claim = next(v for v in spec["volumes"] if v["name"] == cache["name"])["persistentVolumeClaim"]["claimName"]
    assert "ReadWriteMany" in sidecar[f"PersistentVolumeClaim/{claim}"]["spec"]["accessModes"]
    assert mounts["/data"]["readOnly"] is True
    assert config.shutdown_grace_s < spec["terminationGracePeriodSeconds"]


# === docker compose =========================================================================================
def _volume(spec: str) -> tuple[str, str, str]:
    """(source, target, mode) of a short-syntax compose volume."""
    parts = spec.split(":")
    return parts[0], parts[1], parts[2] if len(parts) > 2 else "rw"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # resolves the `<<: *image` merge keys, as compose does


def _compose_validator() -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    return jsonschema.Draft201909Validator(schema)


def test_compose_file_validates_against_the_compose_spec(compose: dict[str, Any]) -> None:
    errors = sorted(_compose_validator().iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


@pytest.mark.parametrize("breakage", ["typo", "ports-type", "depends-condition"])
def test_compose_schema_rejects_broken_files(compose: dict[str, Any], breakage: str) -> None:
    broken = copy.deepcopy(compose)
    loader = broken["services"]["loader"]
    if breakage == "typo":
        loader["helthcheck"] = loader.pop("healthcheck")
    elif breakage == "ports-type":
        loader["ports"] = 50051
    else:
        loader["depends_on"]["demo-data"]["condition"] = "service_finished"
    assert list(_compose_validator().iter_errors(broken))


def test_compose_services_fit_together(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"demo-data", "loader", "prometheus", "grafana", "trainer"} <= set(services)
    for name, service in services.items():
        for dep in service.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for volume in service.get("volumes", []):
            source = _volume(volume)[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: bind mount {source} does not exist"
            else:
                assert source in compose["volumes"], f"{name}: volume {source} is not declared"
    # The init service writes the demo dataset with the service's own CLI.
    init = " ".join(services["demo-data"]["command"])
    make = shlex.split(init.split("||")[-1])
    assert make[0] == "loader-service"
    made = _loader_args(make[1:])
    assert made.command == "make-demo-data" and made.directory == "/data" and made.slides == 6
    # The loader serves the mounted config, which listens on 0.0.0.0 and lists a dataset under /data.
    loader = services["loader"]
    args = _loader_args(loader["command"][1:])
    mounts = {target: source for source, target, _ in map(_volume, loader["volumes"])}
    config_source = ROOT / mounts[args.config]
    config = _load_config(config_source.read_text())
    host, port = _host_port(config.listen)
    assert host == "0.0.0.0", "other containers cannot reach a loopback listener"
    assert ("slides", "/data", "ro") in map(_volume, loader["volumes"]), "slides must be mounted read-only"
    assert all(str(d.manifest).startswith("/data/") for d in config.datasets)
    health = loader["healthcheck"]["test"]
    assert health[0] == "CMD" and _loader_args(health[2:]).command == "health"
    assert _loader_args(health[2:]).endpoint == f"127.0.0.1:{port}"
    # The trainer reaches the loader by its service name.
    trainer = _trainer_args(services["trainer"]["command"][1:])
    assert trainer.command == "train" and trainer.endpoint == f"loader:{port}" and trainer.steps >= 10_000
    assert services["trainer"]["depends_on"]["loader"]["condition"] == "service_healthy"
    # Shared memory between the two containers: the loader's IPC (and /dev/shm) is shareable, the trainer joins it.
    assert loader["ipc"] == "shareable" and loader["shm_size"]
    assert services["trainer"]["ipc"] == "service:loader"
    # Prometheus scrapes the loader's metrics port.
    prom = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets = [t for job in prom["scrape_configs"] if job["job_name"] == "wsi-loader"
               for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"loader:{config.metrics_port}"]
    # Grafana: provisioning mounted, home dashboard is the mounted JSON.
    grafana = services["grafana"]
    g_mounts = {target: source for source, target, _ in map(_volume, grafana["volumes"])}
    home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert (ROOT / g_mounts[str(home.parent)] / home.name) == DASHBOARD
    provider = yaml.safe_load((ROOT / g_mounts["/etc/grafana/provisioning"] / "dashboards" / "wsi-loader.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == str(home.parent)
    # Published ports stay on the host's loopback.
    for name, service in services.items():
        for published in service.get("ports", []):
            assert published.startswith("127.0.0.1:"), f"{name} publishes {published} beyond loopback"


# === Prometheus =============================================================================================
def test_promtool_check_config() -> None:
    promtool = shutil.which("promtool")
    _need(promtool is not None, "promtool not installed (Debian package `prometheus`)")
    result = subprocess.run([promtool, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr and "1 rule files found" in result.stdout + result.stderr


def test_alerts_fire_on_failures_and_stay_quiet_through_a_normal_start() -> None:
    """deploy/prometheus/alerts_test.yml: promtool's rule unit tests (normal start, slides left out, no usable
    slide, a dead process)."""
    promtool = shutil.which("promtool")
    _need(promtool is not None, "promtool not installed (Debian package `prometheus`)")
    result = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], capture_output=True, text=True,
                            timeout=60, cwd=ALERTS.parent)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def _dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) for every query of the dashboard, template variables included."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
            assert m, f"variable {variable['name']}: unexpected query {query!r}"
            found.append((f"variable {variable['name']}", m.group(1)))
    return found


def _alert_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [(f"alert {r['alert']}", r["expr"]) for g in rules["groups"] for r in g["rules"]]


def _grafana_to_promql(expr: str) -> str:
    return expr.replace("$__rate_interval", "1m").replace("$__interval", "1m").replace("$instance", ".*")


def test_dashboard_and_alert_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every query (as recording rules), after substituting Grafana's variables."""
    promtool = shutil.which("promtool")
    _need(promtool is not None, "promtool not installed (Debian package `prometheus`)")
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": _grafana_to_promql(expr)}
        for i, (_, expr) in enumerate(_dashboard_exprs() + _alert_exprs())]}]}
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    result = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
             "inf", "nan"}
_PROMETHEUS_OWN = {"up"}  # series Prometheus makes itself for each target


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords, labels or numbers."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # string literals
    e = re.sub(r"\$\{?\w+\}?", " ", e)  # Grafana variables
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # ranges and subqueries
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)  # label lists
    names = set()
    for m in re.finditer(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", e):
        if e[m.end():].lstrip().startswith("("):  # a function call
            continue
        if m.group(0).lower() in _KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def test_promql_metric_name_parser() -> None:
    assert promql_metric_names(
        'histogram_quantile(0.95, sum by (le, stage) (rate(wsi_loader_stage_seconds_bucket{instance=~"$instance",'
        'stage="read"}[$__rate_interval]))) / clamp_min(sum(rate(x_total[5m])) + 1e-9, 1) > bool 0 or vector(0)'
    ) == {"wsi_loader_stage_seconds_bucket", "x_total"}
    assert promql_metric_names('up{job="wsi-loader"} == 0') == {"up"}
    assert promql_metric_names("sum(rate(wsi_loader_errors_total[5m])) without (kind)") == {"wsi_loader_errors_total"}


@pytest.fixture(scope="module")
def scraped(server: Any) -> dict[str, Any]:
    """A live /metrics scrape of the `server` fixture, after a client streamed a few batches through it."""
    from prometheus_client.parser import text_string_to_metric_families

    from trainer_client import LoaderClient, StreamConfig

    with LoaderClient(f"127.0.0.1:{server.port}", timeout_s=30) as client:
        config = StreamConfig(dataset="train", batch_size=4, patch_size=64, samples_per_epoch=16, transport="grpc",
                              timeout_s=60)
        with client.stream(config) as stream:
            assert sum(1 for _ in stream) == 4
    assert server.metrics_endpoint is not None
    with urllib.request.urlopen(server.metrics_endpoint.url, timeout=10) as reply:
        text = reply.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    series: dict[str, set[str]] = {}  # sample (series) name -> label names seen on it
    for family in families.values():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                    "summary": ("_sum", "_count", "")}.get(family.type, ("",))
        for suffix in suffixes:  # families without samples yet still export these names once they have some
            series.setdefault(family.name + suffix, set())
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    type_lines = set(re.findall(r"^# TYPE (\S+) ", text, flags=re.M))
    return {"families": families, "series": series, "type_lines": type_lines}


def test_metric_names_list_matches_the_live_scrape(scraped: dict[str, Any]) -> None:
    from loader_service.metrics import METRIC_NAMES

    # The text format's TYPE lines name counters with `_total`, like METRIC_NAMES; `*_created` are
    # prometheus_client's creation-time gauges that go with each counter and histogram.
    exported = {n for n in scraped["type_lines"] if n.startswith("wsi_loader_") and not n.endswith("_created")}
    assert set(METRIC_NAMES) == exported, f"listed, not exported: {set(METRIC_NAMES) - exported}; " \
                                          f"exported, not listed: {exported - set(METRIC_NAMES)}"


def test_dashboard_and_alerts_query_only_exported_metrics(scraped: dict[str, Any]) -> None:
    series: dict[str, set[str]] = scraped["series"]
    checked: set[str] = set()
    targets = {"instance", "job", "node", "pod"}  # target labels: Prometheus' own and the ServiceMonitors' relabelings
    for where, expr in _dashboard_exprs() + _alert_exprs():
        names = promql_metric_names(expr) - _PROMETHEUS_OWN
        assert names or "up{" in expr, f"{where}: no metric found in {expr!r}"
        for name in names:
            assert name in series, f"{where}: {name} is not exported by the service ({expr!r})"
            checked.add(name)
        # Label names in the selectors exist on those series (when the scrape has samples of them).
        for metric, matchers in re.findall(r"([a-zA-Z_:][\w:]*)\{([^}]*)\}", expr):
            known = series.get(metric)
            if not known:
                continue
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
                assert label in known | targets, f"{where}: {metric} has no label {label!r}"
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            labels = {lbl.strip() for lbl in group.split(",") if lbl.strip()}
            have = set().union(*(series.get(n, set()) for n in names)) | targets
            if any(series.get(n) for n in names):
                assert labels <= have, f"{where}: grouping by {labels - have} that no series carries"
    # The dashboard covers what the issue asks for.
    needed = {"wsi_loader_patches_total", "wsi_loader_bytes_total", "wsi_loader_batches_total",
              "wsi_loader_stage_seconds_bucket", "wsi_loader_credits_available", "wsi_loader_batches_in_flight",
              "wsi_loader_active_sessions", "wsi_loader_tile_cache_hits_total", "wsi_loader_errors_total",
              "wsi_loader_shm_slots", "wsi_loader_sessions_resumed_total"}
    dashboard_names = set().union(*(promql_metric_names(e) for _, e in _dashboard_exprs()))
    assert needed <= dashboard_names, needed - dashboard_names
    assert series["wsi_loader_patches_total"], "streaming 4 batches should have produced labelled patch counts"


def test_dashboard_json_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    variable = next(v for v in dashboard["templating"]["list"] if v["type"] == "datasource")
    assert variable["current"]["value"] == uid
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert '$instance' in target["expr"], f"{panel['title']}: not filtered by the instance variable"


# === Container images =======================================================================================
def _instructions(dockerfile: Path) -> dict[str, list[str]]:
    """Instruction -> arguments (continuations joined, comments dropped), in file order."""
    found: dict[str, list[str]] = {}
    buffer = ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not buffer):
            continue
        if stripped.endswith("\\"):
            buffer += stripped[:-1].strip() + " "
            continue
        buffer += stripped
        word, _, rest = buffer.partition(" ")
        found.setdefault(word.upper(), []).append(rest.strip())
        buffer = ""
    assert not buffer, f"{dockerfile}: dangling line continuation"
    return found


_RUN_FORM = re.compile(r"bash (deploy/[a-z0-9_-]+\.sh)( .*)?")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_shape(dockerfile: Path) -> None:
    ins = _instructions(dockerfile)
    # Every RUN calls a script that CI also runs (test_dockerfile_run_steps_in_ci).
    assert ins["RUN"], "no RUN step"
    for run in ins["RUN"]:
        m = _RUN_FORM.fullmatch(run)
        assert m, f"RUN {run!r}: must be `bash deploy/<script>.sh ARGS` so CI can run it without docker"
        assert (ROOT / m.group(1)).is_file()
    user = ins["USER"][-1]
    uid = int(user.split(":")[0])
    assert uid != 0, "the service must not run as root"
    layout = next(r for r in ins["RUN"] if "layout.sh" in r)
    assert f"--uid {uid}" in layout
    # The health check and the command are the service's real CLI.
    health = ins["HEALTHCHECK"][-1]
    options, _, command = health.partition(" CMD ")
    assert "--interval=" in options and "--start-period=" in options
    argv = json.loads(command)
    assert argv[0] == "loader-service"
    args = _loader_args(argv[1:])
    config_text = (DEPLOY / "config" / "container.yaml").read_text()
    config = _load_config(config_text)
    assert args.command == "health" and args.endpoint == f"127.0.0.1:{config.listen_port}"
    cmd = json.loads(ins["CMD"][-1])
    assert cmd[0] == "loader-service" and _loader_args(cmd[1:]).config == "/etc/wsi-loader/config.yaml"
    # Compiled kernels persist on the cache volume (tests/test_kernel_cache.py: numba needs a writable folder).
    numba_dir = re.search(r"NUMBA_CACHE_DIR=(\S+)", " ".join(ins["ENV"]))
    assert numba_dir and numba_dir.group(1).startswith("/var/cache/wsi-loader/"), "set NUMBA_CACHE_DIR on the cache volume"
    exposed = {int(p) for line in ins["EXPOSE"] for p in line.split()}
    assert exposed == {config.listen_port, config.metrics_port}
    # The build context holds every package that pyproject installs.
    copied = {shlex.split(c)[0].rstrip("/") for c in ins["COPY"]}
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    assert {"pyproject.toml", "loader_service", "trainer_client", "wsi_loader", "deploy"} <= copied
    # Dependencies (torch: ~3 GB) are installed before the source is copied: a code edit does not redo them.
    order = [line.split()[:2] for line in dockerfile.read_text().splitlines() if line.startswith(("COPY ", "RUN "))]
    deps = order.index(["RUN", "bash"]) if ["RUN", "bash"] in order else -1
    assert "--stage deps" in next(r for r in ins["RUN"] if "install.sh" in r), "install dependencies as their own step"
    first_source = min(i for i, (word, src) in enumerate(order) if word == "COPY" and src.rstrip("/") in
                       {"loader_service", "trainer_client", "wsi_loader"})
    assert 0 <= deps < first_source, order
    assert {src for word, src in order[:deps] if word == "COPY"} <= {"pyproject.toml", "deploy/install.sh"}, order


def test_image_torch_pin_matches_the_tested_one() -> None:
    install = (DEPLOY / "install.sh").read_text()
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    for name in ("torch", "torchvision"):
        pinned = re.search(rf"^{name.upper()}_VERSION=(\S+)$", install, flags=re.M)
        tested = re.search(rf'"{name}==([^"]+)"', setup)
        assert pinned and tested, name
        assert pinned.group(1) == tested.group(1), f"{name}: image {pinned.group(1)}, CI {tested.group(1)}"


def _seed_base_image(root: Path) -> None:
    """The few files a base image has that the RUN steps rely on (useradd edits /etc/passwd et al.)."""
    etc = root / "etc"
    etc.mkdir(parents=True)
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
    (etc / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    for name in ("shadow", "gshadow"):
        (etc / name).write_text("")
        (etc / name).chmod(0o600)


def _copy_build_context(dockerfile: Path, root: Path) -> Path:
    """Apply the Dockerfile's COPY instructions into ROOT/<WORKDIR>."""
    ins = _instructions(dockerfile)
    workdir = root / ins["WORKDIR"][0].lstrip("/")
    workdir.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for copy_line in ins["COPY"]:
        *sources, dest = shlex.split(copy_line)
        for source in sources:
            src = ROOT / source
            target = workdir / dest if dest not in ("./", ".") else workdir
            if dest.endswith("/"):  # a folder, made if missing (as docker does)
                target.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, workdir / dest.rstrip("/"), ignore=ignore, dirs_exist_ok=True)
            else:
                shutil.copy2(src, target / src.name if target.is_dir() else target)
    return workdir


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_run_steps_in_ci(dockerfile: Path, tmp_path: Path) -> None:
    """The Dockerfile's exact RUN command lines, run into a temporary root.

    Differences from `docker build`, all through the scripts' environment: WSI_ROOT=<tmp> (nothing outside it
    is written), WSI_DEPS=reuse (torch and the other dependencies come from this test's environment instead of
    a 3 GB download; `pip check` and the torch pin are still checked) and WSI_PYTHON=this interpreter.
    """
    if os.geteuid() != 0:
        _need(False, "layout.sh adds a user with `useradd --prefix` and sets owners: needs root")
    ins = _instructions(dockerfile)
    root = tmp_path / "root"
    _seed_base_image(root)
    workdir = _copy_build_context(dockerfile, root)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSI_") and k != "PYTHONPATH"}
    for line in ins.get("ENV", []):
        for item in shlex.split(line):
            key, _, value = item.partition("=")
            if key != "PATH":
                env[key] = value
    env.update(WSI_ROOT=str(root), WSI_DEPS="reuse", WSI_REUSE_PYTHON=sys.executable, WSI_PYTHON=sys.executable)
    for run in ins["RUN"]:
        result = subprocess.run(["bash", "-c", run], cwd=workdir, env=env, capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, f"RUN {run}\n{result.stdout}\n{result.stderr}"
    # What the image then has:
    venv = root / "opt" / "wsi-loader"
    uid = int(ins["USER"][-1].split(":")[0])
    passwd = {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").read_text().splitlines()}
    assert passwd["wsi"][2] == str(uid) and passwd["wsi"][6] == "/usr/sbin/nologin"
    assert (root / "data").is_dir() and (root / "data").stat().st_uid == 0
    cache = root / "var/cache/wsi-loader"
    assert cache.stat().st_uid == uid, "the tissue cache must be writable by the service user"
    installed = root / "etc/wsi-loader/config.yaml"
    assert installed.read_text() == (DEPLOY / "config" / "container.yaml").read_text()
    assert installed.stat().st_mode & 0o777 == 0o644
    # The HEALTHCHECK and CMD programs are in the venv, and the installed CLI loads the installed config.
    for argv in (json.loads(ins["HEALTHCHECK"][-1].partition(" CMD ")[2]), json.loads(ins["CMD"][-1])):
        assert (venv / "bin" / argv[0]).is_file()
    health = subprocess.run([str(venv / "bin/loader-service"), "health", "--endpoint", "127.0.0.1:1", "--timeout", "1"],
                            capture_output=True, text=True, timeout=60, cwd="/")
    assert health.returncode == 1 and "unhealthy" in health.stderr  # nothing listens there: the probe says so


# --- the CPU-only loader pool (deploy/k8s/pool) ---------------------------------------------------------------
def _cpu_count(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _gib(quantity: str) -> float:
    units = {"Gi": 1.0, "Mi": 1 / 1024}
    return next(float(quantity[: -len(u)]) * f for u, f in units.items() if quantity.endswith(u))


def test_k8s_pool_validates_and_fits_beside_the_daemonset(k8s: dict[str, dict[str, Any]]) -> None:
    pool = _k8s_docs(K8S_POOL)
    expected = {"ConfigMap/wsi-loader-pool-config", "Deployment/wsi-loader-pool", "Service/wsi-loader-pool",
                "NetworkPolicy/wsi-loader-pool", "ServiceMonitor/wsi-loader-pool"}
    assert set(pool) == expected, set(pool) ^ expected
    for key, doc in pool.items():
        try:
            _validate_k8s(doc)
        except Exception as err:  # noqa: BLE001 - name the file in the failure
            pytest.fail(f"{doc['_file']}: {key} does not validate: {getattr(err, 'message', err)}")
        assert doc["metadata"]["namespace"] == "wsi-loader", f"{key}: beside the per-node loader"
    deployment = pool["Deployment/wsi-loader-pool"]
    pod = deployment["spec"]["template"]
    labels, spec = pod["metadata"]["labels"], pod["spec"]
    container = spec["containers"][0]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # Headless: DNS answers every ready member, which PoolConfig's dns:/// endpoint resolves to.
    service = pool["Service/wsi-loader-pool"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["publishNotReadyAddresses"] is False, "draining or indexing members leave the answer"
    # The per-node Service, NetworkPolicy and monitor do not pick up pool pods, and the pool's own ones do.
    assert not k8s["Service/wsi-loader"]["spec"]["selector"].items() <= labels.items()
    for key in ("NetworkPolicy/wsi-loader-pool", "ServiceMonitor/wsi-loader-pool"):
        selector = pool[key]["spec"]["podSelector" if key.startswith("Network") else "selector"]["matchLabels"]
        assert selector.items() <= labels.items(), key
    # CPU-only, sized per core: decode threads = requested cores, memory per core bounded, Guaranteed QoS.
    resources = container["resources"]
    assert resources["requests"] == resources["limits"]
    assert not any("gpu" in name for name in resources["requests"]), "the pool has no GPU"
    config = _load_config(pool["ConfigMap/wsi-loader-pool-config"]["data"]["config.yaml"])
    cores = _cpu_count(resources["requests"]["cpu"])
    assert config.device == "cpu" and config.workers == cores
    assert 1.0 <= _gib(resources["requests"]["memory"]) / cores <= 4.0
    assert config.tile_cache_bytes < _gib(resources["requests"]["memory"]) * 2**30
    assert config.shutdown_grace_s < spec["terminationGracePeriodSeconds"]
    assert spec["hostIPC"] is False
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    assert _host_port(config.listen) == ("0.0.0.0", grpc_port)
    assert container["readinessProbe"]["grpc"]["service"] == "wsi_loader.v1.Loader"
    # The volumes are the per-node topology's claims, and the ConfigMap it mounts is the pool's.
    claims = {v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
    assert claims and all(f"PersistentVolumeClaim/{c}" in k8s for c in claims)
    assert {v["configMap"]["name"] for v in spec["volumes"] if "configMap" in v} == {"wsi-loader-pool-config"}
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert pod_security_violations(spec) == set(), "the pool needs no privileges"
