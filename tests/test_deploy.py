"""Deployment files: the Serve configs validate with Ray Serve's own schema, deploy/rayservice.yaml validates
against the KubeRay CRD, and the copies of one setting (Serve config, Ray version, image, PVC, env) agree."""

from __future__ import annotations

import copy
import re
import tomllib
import warnings
from pathlib import Path

import pytest
import yaml

from ttserve.config import Settings, load_settings
from ttserve.serving import sizing

with warnings.catch_warnings():  # Ray Serve's pydantic models warn about pydantic v1 idioms on import
    warnings.simplefilter("ignore", DeprecationWarning)
    from ray import serve
    from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, RequestRouterConfig
    from ray.serve.schema import (
        DeploymentSchema,
        HTTPOptionsSchema,
        RayActorOptionsSchema,
        ServeApplicationSchema,
        ServeDeploySchema,
    )

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DEPLOY = ROOT / "deploy"
CRD_PATH = ROOT.parent / "shared" / "k8s" / "ray.io_rayservices.yaml"

SERVE_CONFIGS = ["serve.yaml", "serve-gpu.yaml"]
DEPLOYMENTS = ["Ingress", "Planner", "Generator"]
IMPORT_PATH = "ttserve.serving.app:build_app"
IMAGE = "ghcr.io/ttserve/ttserve:0.1.0-gpu"
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _rayservice() -> dict:
    (doc,) = _load_all(DEPLOY / "rayservice.yaml")
    return doc


def _deployments(serve_config: dict) -> dict[str, dict]:
    (app,) = serve_config["applications"]
    return {d["name"]: d for d in app["deployments"]}


def _pods(manifest: dict) -> dict[str, dict]:
    """Pod specs of the RayService by group: 'head' and each worker group's name."""
    cluster = manifest["spec"]["rayClusterConfig"]
    pods = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    pods.update({g["groupName"]: g["template"]["spec"] for g in cluster["workerGroupSpecs"]})
    return pods


# --- Serve configs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SERVE_CONFIGS)
def test_serve_config_validates(name):
    raw = _load(CONFIGS / name)
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = schema.applications
    assert app.import_path == IMPORT_PATH
    assert app.route_prefix == "/"
    assert [d.name for d in app.deployments] == DEPLOYMENTS
    assert (schema.http_options.host, schema.http_options.port) == ("0.0.0.0", 8000)
    # The ttserve settings file it names exists (relative to the repository root, /app in the image) and loads.
    assert load_settings(ROOT / app.args["config"])


# Ray's schemas ignore unknown keys (and keep autoscaling_config as a plain dict), so a typo such as
# `target_ongoing_request` would validate and silently fall back to a default. Check the keys ourselves.
_SERVE_MODELS = {
    "": ServeDeploySchema,
    "http_options": HTTPOptionsSchema,
    "application": ServeApplicationSchema,
    "deployment": DeploymentSchema,
    "ray_actor_options": RayActorOptionsSchema,
    "autoscaling_config": AutoscalingConfig,
    "policy": AutoscalingPolicy,
    "request_router_config": RequestRouterConfig,
}


def _unknown_keys(data: dict, kind: str, where: str) -> list[str]:
    fields = _SERVE_MODELS[kind].model_fields
    unknown = [f"{where}.{key}" for key in data if key not in fields]
    for key, value in data.items():
        if key == "http_options":
            unknown += _unknown_keys(value, "http_options", f"{where}.{key}")
        elif key == "applications":
            for i, app in enumerate(value):
                unknown += _unknown_keys(app, "application", f"{where}.applications[{i}]")
        elif key == "deployments":
            for i, deployment in enumerate(value):
                unknown += _unknown_keys(deployment, "deployment", f"{where}.deployments[{i}]")
        elif key in (
            "ray_actor_options",
            "autoscaling_config",
            "policy",
            "request_router_config",
        ) and isinstance(value, dict):
            unknown += _unknown_keys(value, key, f"{where}.{key}")
    return unknown


@pytest.mark.parametrize("name", SERVE_CONFIGS)
def test_serve_config_has_no_unknown_keys(name):
    raw = _load(CONFIGS / name)
    assert _unknown_keys(raw, "", name) == []
    for deployment in _deployments(raw).values():
        if "autoscaling_config" in deployment:
            AutoscalingConfig.model_validate(deployment["autoscaling_config"])  # min <= max, delays >= 0, ...


def test_unknown_key_check_catches_typos():
    raw = _load(CONFIGS / "serve.yaml")
    _deployments(raw)["Ingress"]["autoscaling_config"]["target_ongoing_request"] = 3
    _deployments(raw)["Generator"]["ray_actor_options"]["num_gpu"] = 1
    _deployments(raw)["Generator"]["request_router_config"]["request_routing_stats_period"] = 1
    ServeDeploySchema.model_validate(raw)  # Ray accepts the typos...
    assert _unknown_keys(raw, "", "c") == [  # ...this check does not
        "c.applications[0].deployments[0].autoscaling_config.target_ongoing_request",
        "c.applications[0].deployments[2].request_router_config.request_routing_stats_period",
        "c.applications[0].deployments[2].ray_actor_options.num_gpu",
    ]


def _max_replicas(deployment: dict) -> int:
    autoscaling = deployment.get("autoscaling_config")
    return autoscaling["max_replicas"] if autoscaling else deployment["num_replicas"]


def test_cpu_serve_config_fits_two_cpus_without_gpus():
    deployments = _deployments(_load(CONFIGS / "serve.yaml"))
    assert all(d["ray_actor_options"]["num_gpus"] == 0 for d in deployments.values())
    assert "autoscaling_config" in deployments["Ingress"] and "autoscaling_config" in deployments["Planner"]
    assert deployments["Generator"]["num_replicas"] == 1
    # At full scale everything still schedules on the 2-core dev machines (the file's header says so).
    at_max = sum(_max_replicas(d) * d["ray_actor_options"]["num_cpus"] for d in deployments.values())
    assert at_max <= 2


def test_gpu_serve_config_gives_the_generator_a_gpu_and_vllm():
    raw = _load(CONFIGS / "serve-gpu.yaml")
    deployments = _deployments(raw)
    assert deployments["Generator"]["ray_actor_options"]["num_gpus"] == 1
    assert deployments["Ingress"]["ray_actor_options"]["num_gpus"] == 0
    assert deployments["Planner"]["ray_actor_options"]["num_gpus"] == 0
    autoscaling = deployments["Generator"]["autoscaling_config"]
    assert autoscaling["min_replicas"] == 1 and autoscaling["max_replicas"] > 1
    (app,) = raw["applications"]
    assert app["runtime_env"]["env_vars"]["TTSERVE_ENGINE__KIND"] == "vllm"


# --- Kubernetes manifests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(DEPLOY.glob("*.yaml")), ids=lambda p: p.name)
def test_manifests_parse_and_name_their_objects(path):
    docs = _load_all(path)
    assert docs, f"{path.name} holds no object"
    for doc in docs:
        assert isinstance(doc, dict)
        assert doc.get("apiVersion") and doc.get("kind"), f"{path.name}: apiVersion and kind are required"
        name = doc.get("metadata", {}).get("name")
        assert name and DNS_SUBDOMAIN.match(name) and len(name) <= 63, (
            f"{path.name}: bad metadata.name {name!r}"
        )


# --- sizing: the files are rendered from ttserve/serving/sizing.py -----------------------------------------


def test_generated_files_are_what_sizing_renders():
    outdated = [str(path.relative_to(ROOT)) for path in sizing.stale(ROOT)]
    assert outdated == [], (
        f"{', '.join(outdated)} differ from ttserve/serving/sizing.py: edit the sizes there, then run "
        "`python -m ttserve.serving.sizing` from the repository root"
    )


def test_serve_config_v2_is_the_gpu_profile():
    embedded = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    assert embedded == sizing.serve_config("gpu")  # proxy and HTTP options too
    assert embedded == _load(CONFIGS / "serve-gpu.yaml")


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_decorator_defaults_are_serve_yaml(name):
    """app.py's decorators take deployment_options(name): what `ttserve serve` runs is configs/serve.yaml."""
    in_serve_yaml = {
        k: v for k, v in _deployments(_load(CONFIGS / "serve.yaml"))[name].items() if k != "name"
    }
    assert sizing.deployment_options(name) == in_serve_yaml


@pytest.mark.parametrize("profile", sizing.PROFILES)
def test_deployment_options_are_accepted_by_serve_deployment(profile):
    for name in DEPLOYMENTS:
        options = sizing.deployment_options(name, profile)
        deployment = serve.deployment(name=name, **options)(type(name, (), {}))  # builds, starts nothing
        assert deployment.max_ongoing_requests == options["max_ongoing_requests"]
        assert deployment.ray_actor_options == options["ray_actor_options"]


def test_rayservice_groups():
    manifest = _rayservice()
    cluster = manifest["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert len(groups) == len(cluster["workerGroupSpecs"]), "worker group names must be unique"
    for group in groups.values():
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]

    def gpus(pod: dict) -> int:
        return int(pod["containers"][0]["resources"].get("limits", {}).get("nvidia.com/gpu", 0))

    pods = _pods(manifest)
    gpu_groups = [name for name in groups if gpus(pods[name])]
    cpu_groups = [name for name in groups if not gpus(pods[name])]
    assert len(gpu_groups) == 1 and len(cpu_groups) == 1
    ((gpu_name,), (cpu_name,)) = gpu_groups, cpu_groups
    assert gpus(pods["head"]) == 0
    assert gpus(pods[gpu_name]) == 1
    assert groups[cpu_name]["rayStartParams"].get("num-gpus") == "0"
    assert any(t.get("key") == "nvidia.com/gpu" for t in pods[gpu_name].get("tolerations", []))

    # Serve's replicas fit the groups: one Generator per GPU pod, Ingress + Planner in the CPU group.
    deployments = _deployments(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    generator = deployments["Generator"]
    assert groups[gpu_name]["maxReplicas"] == _max_replicas(generator)

    def cpus(pod: dict) -> float:
        return float(pod["containers"][0]["resources"]["limits"]["cpu"])

    assert generator["ray_actor_options"]["num_cpus"] <= cpus(pods[gpu_name])
    cpu_demand = sum(
        _max_replicas(deployments[name]) * deployments[name]["ray_actor_options"]["num_cpus"]
        for name in ("Ingress", "Planner")
    )
    assert cpu_demand <= groups[cpu_name]["maxReplicas"] * cpus(pods[cpu_name])


def test_rayservice_pods_agree_on_image_env_and_datastore():
    manifest = _rayservice()
    (pvc,) = _load_all(DEPLOY / "datastore-pvc.yaml")
    (job,) = _load_all(DEPLOY / "datastore-job.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim"

    ttserve_env = {}
    for group, pod in _pods(manifest).items():
        container = pod["containers"][0]
        assert container["image"] == IMAGE, group
        env = {
            e["name"]: e.get("value") for e in container.get("env", []) if e["name"].startswith("TTSERVE_")
        }
        ttserve_env[group] = env
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        }
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert claims.get(mounts.get("/data")) == pvc["metadata"]["name"], f"{group}: the PVC is not at /data"
    # build_app may run in any pod: every pod must see the same settings.
    assert len({tuple(sorted(env.items())) for env in ttserve_env.values()}) == 1, ttserve_env
    env = ttserve_env["head"]
    assert env["TTSERVE_DATASTORE__PATH"].startswith("/data/")

    # The Job builds into the same volume, at the path the pods serve from, with the same image.
    job_pod = job["spec"]["template"]["spec"]
    (build,) = job_pod["containers"]
    assert build["image"] == IMAGE
    command = " ".join(build["command"])
    assert "ttserve index build" in command and f"--out {env['TTSERVE_DATASTORE__PATH']}" in command
    assert {v["persistentVolumeClaim"]["claimName"] for v in job_pod["volumes"]} == {pvc["metadata"]["name"]}


def test_ttserve_env_names_real_settings(monkeypatch):
    """Every TTSERVE_* variable the deployment sets names a real settings field and holds a valid value."""
    manifest = _rayservice()
    (app,) = _load(CONFIGS / "serve-gpu.yaml")["applications"]
    env = dict(app["runtime_env"]["env_vars"])
    for pod in _pods(manifest).values():
        env.update({e["name"]: e["value"] for e in pod["containers"][0].get("env", []) if "value" in e})
    env = {k: v for k, v in env.items() if k.startswith("TTSERVE_")}
    assert env
    for name in env:
        section, _, field = name.removeprefix("TTSERVE_").lower().partition("__")
        assert section in Settings.model_fields, name
        assert field in Settings.model_fields[section].annotation.model_fields, name
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(CONFIGS / "default.yaml")
    assert settings.engine.kind == "vllm"
    assert str(settings.datastore.path) == env["TTSERVE_DATASTORE__PATH"]


def test_dockerfile_matches_rayservice_and_extras():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    (ray_version,) = re.findall(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M)
    assert _rayservice()["spec"]["rayClusterConfig"]["rayVersion"] == ray_version
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311-gpu$", dockerfile, re.M)
    (extras,) = re.findall(r'"/app\[([^\]]+)\]"', dockerfile)
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras.split(",")) == {"gpu", "vllm"} <= set(declared)


# --- KubeRay CRD validation ----------------------------------------------------------------------------------


def _to_json_schema(node: dict) -> dict:
    """A CRD's structural OpenAPI v3 schema as a JSON Schema with the API server's semantics:
    - `x-kubernetes-*` keys are dropped; `x-kubernetes-int-or-string` becomes integer-or-string;
    - `nullable: true` also admits null;
    - objects with declared properties reject unknown fields, as `kubectl apply` does by default (strict
      field validation), unless `x-kubernetes-preserve-unknown-fields` keeps them open.
    """
    out = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if "properties" in node:
        out["properties"] = {name: _to_json_schema(sub) for name, sub in node["properties"].items()}
        if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = _to_json_schema(node["additionalProperties"])
    if isinstance(node.get("items"), dict):
        out["items"] = _to_json_schema(node["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            out[key] = [_to_json_schema(sub) for sub in node[key]]
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node and "type" not in node:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    return out


@pytest.fixture(scope="module")
def crd_validator():
    if not CRD_PATH.is_file():
        pytest.skip(f"the KubeRay RayService CRD is not present at {CRD_PATH}; manifest validation needs it")
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema validates the manifest against the CRD")
    crd = yaml.load(CRD_PATH.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    group, version = _rayservice()["apiVersion"].split("/")
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == "RayService"
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    schema = _to_json_schema(served["schema"]["openAPIV3Schema"])
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _errors(validator, manifest: dict) -> list[str]:
    return sorted(
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator.iter_errors(manifest)
    )


def test_rayservice_validates_against_the_crd(crd_validator):
    manifest = _rayservice()
    assert manifest["kind"] == "RayService"
    assert _errors(crd_validator, manifest) == []


def _set(manifest: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    node = manifest
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[last] = value


HEAD = "spec.rayClusterConfig.headGroupSpec"
WORKER0 = "spec.rayClusterConfig.workerGroupSpecs.0"
BAD_EDITS = {
    # rayStartParams is map[string]string: an unquoted YAML number is the classic mistake.
    "int-in-rayStartParams": (f"{HEAD}.rayStartParams", {"num-gpus": 0}, f"{HEAD}.rayStartParams.num-gpus"),
    "list-as-rayStartParams": (f"{HEAD}.rayStartParams", ["num-gpus=0"], f"{HEAD}.rayStartParams"),
    "unknown-enum": ("spec.rayClusterConfig.autoscalerOptions.upscalingMode", "Eager", "upscalingMode"),
    "unknown-field": (f"{HEAD}.replicas", 1, HEAD),
    "bad-quantity": (
        f"{WORKER0}.template.spec.containers.0.resources.limits.memory",
        "lots",
        "limits.memory",
    ),
    "float-env-value": (f"{WORKER0}.template.spec.containers.0.env.2.value", 0.5, "env.2.value"),
}


@pytest.mark.parametrize("edit", BAD_EDITS.values(), ids=BAD_EDITS.keys())
def test_crd_validation_rejects_bad_manifests(crd_validator, edit):
    path, value, where = edit
    manifest = copy.deepcopy(_rayservice())
    _set(manifest, path, value)
    errors = _errors(crd_validator, manifest)
    assert errors, f"setting {path} = {value!r} should not validate"
    assert any(where in error for error in errors), errors


def test_crd_validation_requires_worker_group_names(crd_validator):
    manifest = copy.deepcopy(_rayservice())
    del manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["groupName"]
    assert any("'groupName' is a required property" in e for e in _errors(crd_validator, manifest))


def test_ray_loads_the_generators_router_and_autoscaling_policy_as_configured():
    """What Serve does with the names in the configs: import and pickle the router class, import (by value)
    and instantiate the policy with its kwargs, then call it on a controller's context."""
    from ray.serve._private.autoscaling_state import _resolve_policy_callable

    from ttserve.serving.autoscaling import GENERATIONS, TRAINING_BACKLOG_S, GeneratorLoad
    from ttserve.serving.routing import AdapterAffinityRouter

    for profile in sizing.PROFILES:
        router = RequestRouterConfig(
            **sizing.deployment_options("Generator", profile)["request_router_config"]
        )
        router._serialize_request_router_cls()
        assert router.get_request_router_class().__name__ == AdapterAffinityRouter.__name__
    scaling = AutoscalingConfig(**sizing.deployment_options("Generator", "gpu")["autoscaling_config"])
    scaling.policy.serialize_policy()
    policy = _resolve_policy_callable(scaling.policy)
    assert type(policy).__name__ == GeneratorLoad.__name__ and policy.training_backlog_s == 5.0
    context = type("Context", (), {"aggregated_metrics": {TRAINING_BACKLOG_S: {"r1": 12.0}, GENERATIONS: {"r1": 3.0}},
                                    "total_queued_requests": 0})()  # fmt: skip
    assert policy(context) == (pytest.approx(12.0 / 5.0), {})
    for profile in sizing.PROFILES:  # each Shard<i> deployment is built with these options
        options = sizing.deployment_options(sizing.SHARD, profile)
        assert serve.deployment(name="Shard0", **options)(type("Shard0", (), {})).max_ongoing_requests == 16
