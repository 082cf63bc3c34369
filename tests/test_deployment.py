"""The deployment files, checked without a container engine or a cluster.

No Docker engine or Kubernetes cluster runs here, so each file is checked against what it
must agree with: the Compose specification and the Kubernetes schemas (both shipped offline
by check-jsonschema and kubernetes-validate), the package (console script, routes, config
schema), and each other (service names, ports, env vars, mounted files, user id).
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import httpx
import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser
from kubernetes_validate.utils import all_versions

from cli import build_parser
from nudging_core.config import Config, UpstreamConfig, load_config, parse_config
from nudging_core.methods import MAX_TOP_K
from server.app import create_app

from .servers import free_port, running

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / "docker" / ".env.example"
KUBERNETES = ROOT / "deploy" / "kubernetes"
CONFIG_IN_IMAGE = "/etc/nudging-proxy/config.yaml"
# The proxy service of each Compose profile and the config file it mounts.
PROFILES = {"gpu": ("proxy", "configs/compose.yaml"), "cpu": ("proxy-cpu", "configs/compose-cpu.yaml")}
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")
Compose = dict[str, Any]
Manifests = dict[str, dict[str, Any]]  # kind -> manifest


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _upstreams(config: Config) -> Iterator[UpstreamConfig]:
    for model in config.models:
        yield from (value for value in vars(model).values() if isinstance(value, UpstreamConfig))


def _env_names_read(config: Config) -> set[str]:
    """The environment variables a config reads its secrets from."""
    names = {config.server.api_keys_env} | {upstream.api_key_env for upstream in _upstreams(config)}
    return {name for name in names if name}


def _answers(config: Config, paths: list[str]) -> dict[str, int]:
    """Status of GET on each path of the proxy built from `config`, served on a real socket."""
    with running(create_app(config)) as url:
        return {path: httpx.get(url + path, timeout=60).status_code for path in paths}


def _option(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command else None


# ---------------------------------------------------------------------------------------------
# docker-compose.yml


@pytest.fixture(scope="module")
def compose() -> Compose:
    compose: Compose = yaml.safe_load(COMPOSE.read_text())  # expands the file's YAML anchors and merges
    return compose


def _services(compose: Compose, profile: str) -> dict[str, dict[str, Any]]:
    return {name: service for name, service in compose["services"].items()
            if profile in service.get("profiles", [])}


def test_compose_file_follows_the_compose_specification() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_service_belongs_to_one_profile(compose: Compose) -> None:
    # Without a profile a service would start with both the GPU and the CPU stack.
    for name, service in compose["services"].items():
        assert len(service.get("profiles", [])) == 1 and service["profiles"][0] in PROFILES, name


def test_compose_variables_are_documented_in_the_env_example() -> None:
    used = set(VARIABLE.findall(COMPOSE.read_text()))
    documented = {line.split("=", 1)[0] for line in ENV_EXAMPLE.read_text().splitlines()
                  if line and not line.startswith("#")}
    assert used == documented, f"used only: {used - documented}; documented only: {documented - used}"


def test_compose_mounts_and_builds_files_that_exist(compose: Compose) -> None:
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).is_file(), f"{name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name} uses undeclared volume {source}"
        if "build" in service:
            assert (ROOT / service["build"]["context"] / "Dockerfile").is_file(), name
            build_args = set(service["build"].get("args", {}))
            assert build_args <= set(DockerfileParser(str(ROOT / "Dockerfile")).args), name


@pytest.mark.parametrize("profile", PROFILES)
def test_proxy_config_points_at_the_services_of_its_profile(compose: Compose, profile: str) -> None:
    services = _services(compose, profile)
    proxy_name, config_file = PROFILES[profile]
    proxy = services[proxy_name]
    config = load_config(ROOT / config_file)
    assert f"./{config_file}:{CONFIG_IN_IMAGE}:ro" in proxy["volumes"]
    assert [port.split(":")[-1] for port in proxy["ports"]] == [str(config.server.port)]
    assert config.server.host == "0.0.0.0"  # reachable from outside its container
    assert _env_names_read(config) <= set(proxy["environment"])

    upstream_services = set()
    for upstream in _upstreams(config):
        for endpoint in upstream.endpoints:
            address = urlsplit(endpoint)
            service = services.get(str(address.hostname))
            assert service is not None, f"{endpoint}: no such service in profile {profile}"
            command = service["command"]
            assert str(address.port) == _option(command, "--port")
            assert str(address.port) in service["expose"]
            # vLLM serves the name given by --served-model-name, our local upstream by --name.
            assert upstream.model in (_option(command, "--served-model-name"), _option(command, "--name"))
            upstream_services.add(address.hostname)
    assert proxy["depends_on"] == {name: {"condition": "service_healthy"} for name in upstream_services}


@pytest.mark.parametrize("profile", PROFILES)
def test_docker_lets_the_proxy_finish_its_streams(compose: Compose, profile: str) -> None:
    proxy_name, config_file = PROFILES[profile]
    grace = load_config(ROOT / config_file).server.shutdown_grace_seconds
    assert int(compose["services"][proxy_name]["stop_grace_period"].rstrip("s")) > grace


@pytest.mark.parametrize("profile", PROFILES)
def test_compose_healthchecks_ask_the_port_the_service_listens_on(compose: Compose, profile: str) -> None:
    for name, service in _services(compose, profile).items():
        if "healthcheck" not in service:  # the proxies use the image's HEALTHCHECK
            continue
        url = urlsplit(service["healthcheck"]["test"][-1])
        assert url.path == "/health" and str(url.port) == _option(service["command"], "--port"), name


def test_vllm_services_are_pinned_and_started_for_nudging(compose: Compose) -> None:
    vllm = {name: service for name, service in _services(compose, "gpu").items()
            if service["image"].startswith("vllm/vllm-openai:")}
    assert set(vllm) == {"vllm-base", "vllm-nudging"}
    gpus: list[str] = []
    for name, service in vllm.items():
        assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", service["image"]), name
        command = service["command"]
        # The baselines ask for their top-k logprobs (proxy tuning: the paper's top 100).
        assert int(_option(command, "--max-logprobs") or 0) >= MAX_TOP_K, name
        assert "--enable-prefix-caching" in command and "--max-model-len" in command, name
        assert "hf-cache:/root/.cache/huggingface" in service["volumes"], name
        [device] = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"], name
        if name == "vllm-base":  # tensor parallel over exactly the GPUs it is given
            parallel = _option(command, "--tensor-parallel-size") or ""
            default = re.fullmatch(r"\$\{BASE_TENSOR_PARALLEL_SIZE:-(\d+)\}", parallel)
            assert default and int(default[1]) == len(device["device_ids"])
        gpus += device["device_ids"]
    assert len(gpus) == len(set(gpus)), "two vLLM servers share a GPU"


def test_healthcheck_script_tells_a_serving_proxy_from_a_closed_port() -> None:
    script = ROOT / "docker" / "healthcheck.py"

    def check(url: str) -> int:
        return subprocess.run([sys.executable, str(script), url], timeout=60).returncode

    with running(create_app(load_config(ROOT / "configs" / "compose.yaml"))) as url:
        assert check(url + "/health") == 0
        assert check(url + "/no-such-path") == 1
    assert check(f"http://127.0.0.1:{free_port()}/health") == 1


# ---------------------------------------------------------------------------------------------
# Dockerfile


@pytest.fixture(scope="module")
def dockerfile() -> DockerfileParser:
    return DockerfileParser(str(ROOT / "Dockerfile"))


def _instructions(dockerfile: DockerfileParser, name: str) -> list[str]:
    return [item["value"] for item in dockerfile.structure if item["instruction"] == name]


def _final_stage(dockerfile: DockerfileParser) -> list[dict[str, Any]]:
    froms = [index for index, item in enumerate(dockerfile.structure) if item["instruction"] == "FROM"]
    stage: list[dict[str, Any]] = dockerfile.structure[froms[-1]:]
    return stage


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a matched folder excludes its contents."""
    ignored = False
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[:length]) for length in range(1, len(parts) + 1)]
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!")
        candidates = [pattern, pattern[3:]] if pattern.startswith("**/") else [pattern]
        if any(fnmatch.fnmatchcase(prefix, candidate) for prefix in prefixes for candidate in candidates):
            ignored = not negated
    return ignored


def test_base_images_are_pinned(dockerfile: DockerfileParser) -> None:
    for image in dockerfile.parent_images:
        assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?", image), image


def test_the_image_runs_as_a_non_root_user(dockerfile: DockerfileParser) -> None:
    users = [item["value"] for item in _final_stage(dockerfile) if item["instruction"] == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")


def test_entrypoint_is_the_console_script_serving_the_baked_config(dockerfile: DockerfileParser) -> None:
    [entrypoint] = _instructions(dockerfile, "ENTRYPOINT")
    [cmd] = _instructions(dockerfile, "CMD")
    argv = json.loads(entrypoint) + json.loads(cmd)
    assert argv[0] in _pyproject()["project"]["scripts"]
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve" and args.config == CONFIG_IN_IMAGE
    baked = [value.split() for value in _instructions(dockerfile, "COPY") if value.endswith(CONFIG_IN_IMAGE)]
    assert baked == [["configs/compose.yaml", CONFIG_IN_IMAGE]]


def test_copied_files_exist_and_reach_the_build_context(dockerfile: DockerfileParser) -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    needed = ["pyproject.toml", "README.md", "docker/install.sh"]
    # The packages docker/install.sh installs: the folders pyproject's package search includes.
    for include in _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]:
        needed += [path.name for path in ROOT.glob(include.rstrip("*")) if (path / "__init__.py").is_file()]
    for value in _instructions(dockerfile, "COPY"):
        if value.startswith("--from="):
            continue
        *sources, _ = shlex.split(value)
        for source in sources:
            assert (ROOT / source).exists(), source
            if source != ".":
                needed.append(source)
    for path in needed:
        assert (ROOT / path).exists() and not _dockerignored(path, patterns), path
    for secret in ("docker/.env", ".env"):
        assert _dockerignored(secret, patterns), secret


def test_run_steps_are_valid_shell(dockerfile: DockerfileParser) -> None:
    for command in _instructions(dockerfile, "RUN"):
        result = subprocess.run(["sh", "-n", "-c", command], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{command}\n{result.stderr}"


def test_healthcheck_asks_the_served_port_for_a_route_that_answers(dockerfile: DockerfileParser) -> None:
    [healthcheck] = _instructions(dockerfile, "HEALTHCHECK")
    url = urlsplit(json.loads(healthcheck.split("CMD", 1)[1])[-1])
    config = load_config(ROOT / "configs" / "compose.yaml")
    assert url.port == config.server.port and _instructions(dockerfile, "EXPOSE") == [str(url.port)]
    assert _answers(config, [url.path]) == {url.path: 200}


def test_image_labels_match_the_package(dockerfile: DockerfileParser) -> None:
    project = _pyproject()["project"]
    labels = dockerfile.labels
    assert labels["org.opencontainers.image.title"] == project["name"]
    assert labels["org.opencontainers.image.version"] == project["version"]
    assert labels["org.opencontainers.image.licenses"] == project["license"]


# ---------------------------------------------------------------------------------------------
# deploy/kubernetes


@pytest.fixture(scope="module")
def manifests() -> Manifests:
    """kind -> manifest, for every file the kustomization lists."""
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    listed = sorted(kustomization["resources"])
    files = sorted(path.name for path in KUBERNETES.glob("*.yaml") if path.name != "kustomization.yaml")
    assert listed == files
    documents = [yaml.safe_load((KUBERNETES / name).read_text()) for name in listed]
    return {document["kind"]: document for document in documents}


def _pod(manifests: Manifests) -> dict[str, Any]:
    return dict(manifests["Deployment"]["spec"]["template"])


def _container(manifests: Manifests) -> dict[str, Any]:
    [container] = _pod(manifests)["spec"]["containers"]
    return dict(container)


def _configmap_config(manifests: Manifests) -> Config:
    return parse_config(yaml.safe_load(manifests["ConfigMap"]["data"]["config.yaml"]))


@pytest.mark.parametrize("version", sorted({all_versions()[0], all_versions()[-1]}))
def test_manifests_match_the_kubernetes_schemas(manifests: Manifests, version: str) -> None:
    # The oldest and newest Kubernetes versions whose schemas the package ships; strict
    # rejects unknown fields (a misspelt probe would otherwise pass silently).
    for manifest in manifests.values():
        kubernetes_validate.validate(manifest, version, strict=True)


def test_manifests_cover_a_scalable_proxy(manifests: Manifests) -> None:
    kinds = {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    assert kinds <= set(manifests)
    assert manifests["HorizontalPodAutoscaler"]["apiVersion"] == "autoscaling/v2"
    assert manifests["PodDisruptionBudget"]["apiVersion"] == "policy/v1"


def test_probes_ask_routes_of_the_app_on_its_port(manifests: Manifests) -> None:
    container = _container(manifests)
    config = _configmap_config(manifests)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    probes = {kind: container[kind]["httpGet"] for kind in ("livenessProbe", "readinessProbe")}
    assert {kind: probe["path"] for kind, probe in probes.items()} == {
        "livenessProbe": "/health", "readinessProbe": "/ready"}
    for probe in probes.values():
        assert ports[probe["port"]] == config.server.port
    answers = _answers(config, [probe["path"] for probe in probes.values()])
    assert answers["/health"] == 200
    assert answers["/ready"] == 503  # the route exists; the configured upstreams are not running here


def test_pods_get_time_to_finish_their_streams(manifests: Manifests) -> None:
    spec = _pod(manifests)["spec"]
    pause = int(_container(manifests)["lifecycle"]["preStop"]["exec"]["command"][-1])
    grace = _configmap_config(manifests).server.shutdown_grace_seconds
    assert spec["terminationGracePeriodSeconds"] > pause + grace


def test_metrics_annotations_name_a_route_that_answers(manifests: Manifests) -> None:
    annotations = _pod(manifests)["metadata"]["annotations"]
    config = _configmap_config(manifests)
    assert annotations["prometheus.io/port"] == str(config.server.port)
    path = annotations["prometheus.io/path"]
    assert _answers(config, [path]) == {path: 200}


def test_deployment_serves_the_configmap_config_with_its_secrets(manifests: Manifests) -> None:
    pod, container = _pod(manifests), _container(manifests)
    config_path = PurePosixPath(build_parser().parse_args(["serve", *container["args"]]).config)
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == str(config_path.parent)]
    [volume] = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == manifests["ConfigMap"]["metadata"]["name"]
    assert config_path.name in manifests["ConfigMap"]["data"]
    from_secrets = {env["name"] for env in container["env"] if "secretKeyRef" in env.get("valueFrom", {})}
    assert _env_names_read(_configmap_config(manifests)) <= from_secrets


def test_pods_run_as_the_image_user_without_privileges(manifests: Manifests) -> None:
    pod_security = _pod(manifests)["spec"]["securityContext"]
    [user] = [item["value"] for item in _final_stage(DockerfileParser(str(ROOT / "Dockerfile")))
              if item["instruction"] == "USER"]
    assert pod_security["runAsNonRoot"] is True
    assert str(pod_security["runAsUser"]) == user.split(":")[0]
    security = _container(manifests)["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]
    assert "cpu" in _container(manifests)["resources"]["requests"]  # the autoscaler's measure


def test_service_autoscaler_and_budget_select_the_proxy_pods(manifests: Manifests) -> None:
    labels = _pod(manifests)["metadata"]["labels"]
    deployment = manifests["Deployment"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = manifests["Service"]["spec"]
    assert service["selector"].items() <= labels.items()
    port_names = {port["name"] for port in _container(manifests)["ports"]}
    assert {port["targetPort"] for port in service["ports"]} <= port_names
    target = manifests["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert manifests["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
