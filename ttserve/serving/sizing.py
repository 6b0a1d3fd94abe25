"""Ray Serve sizing, written once: replicas, resources, queue lengths and autoscaling of each deployment.

Two profiles: `cpu` (one 2-core machine, the project's dev VMs) and `gpu` (GPU hosts and KubeRay). Each value
carries the reason it is what it is, and the reason becomes the value's comment in the generated files:

    configs/serve.yaml        the cpu profile, in full                 (`serve run configs/serve.yaml`)
    configs/serve-gpu.yaml    the gpu profile, in full                 (`serve run configs/serve-gpu.yaml`)
    deploy/rayservice.yaml    only its `serveConfigV2: |` block, the gpu profile; the rest is hand-written

`python -m ttserve.serving.sizing` rewrites them, `--check` lists the stale ones (tests/test_deploy.py fails
on those). The `@serve.deployment` decorators in ttserve/serving/app.py, which `ttserve serve` runs with,
take their arguments from `deployment_options`, so they match configs/serve.yaml.

Plain Python and PyYAML only: the HTTP ingress imports the serving package, and Ray is not needed here.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import yaml

ProfileName = Literal["cpu", "gpu"]
PROFILES: tuple[str, ...] = get_args(ProfileName)
DEPLOYMENTS = ("Ingress", "Planner", "Generator")  # the order of the files and of build_app's graph
# One deployment per part of a sharded datastore (`datastore.shards`), named Shard0, Shard1, ...: not in the
# generated files, which name only the deployments every app has; each profile sizes them in SHARD.
SHARD = "Shard"
Scalar = bool | int | float | str

REGENERATE = "python -m ttserve.serving.sizing"
RAYSERVICE = Path("deploy/rayservice.yaml")
SERVE_CONFIG_V2 = "serveConfigV2: |"


# --- the vocabulary: a value and why ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One value of a Serve config and the reason for it, rendered as the value's YAML comment."""

    value: Scalar
    why: str = ""


@dataclass(frozen=True)
class ActorOptions:
    """`ray_actor_options`: what Ray reserves for each replica (logical units: they steer scheduling only)."""

    num_cpus: Setting
    num_gpus: Setting


@dataclass(frozen=True)
class Autoscaling:
    """`autoscaling_config`: Serve adds replicas when the ongoing requests per replica exceed the target, or
    as a custom `policy` says."""

    min_replicas: Setting
    max_replicas: Setting
    target_ongoing_requests: Setting | None = None  # the default policy's target (None: not used)
    upscale_delay_s: Setting | None = None  # None: Serve's default
    downscale_delay_s: Setting | None = None
    policy: Setting | None = None  # `module:callable` of a custom policy (None: Serve's default)
    policy_kwargs: dict[str, Setting] = field(default_factory=dict)


@dataclass(frozen=True)
class Router:
    """`request_router_config`: which request router the deployment's handles use, and how often replicas
    report the routing stats it reads."""

    request_router_class: Setting
    request_routing_stats_period_s: Setting


@dataclass(frozen=True)
class Deployment:
    """One deployment's sizing; either a fixed `num_replicas` or an `autoscaling` range."""

    name: str
    why: str  # what the deployment does that decides its sizing; the comment under its name
    max_ongoing_requests: Setting
    ray_actor_options: ActorOptions
    num_replicas: Setting | None = None
    max_queued_requests: Setting | None = None  # None: Serve's default (no bound on a caller's queue)
    autoscaling: Autoscaling | None = None
    graceful_shutdown_timeout_s: Setting | None = None  # None: Serve's default (20 s)
    router: Router | None = None  # None: Serve's default (power of two choices)

    def __post_init__(self) -> None:
        if (self.num_replicas is None) == (self.autoscaling is None):
            raise ValueError(f"{self.name}: give exactly one of num_replicas and autoscaling")

    def options(self) -> dict:
        """The deployment's settings without their reasons: `@serve.deployment` keyword arguments, and what
        its entry in a Serve config holds besides `name`."""
        entry = _plain(_deployment_node(self))
        del entry["name"]
        return entry


@dataclass(frozen=True)
class Application:
    """The Serve application: one per config, built by `import_path` with `args`."""

    name: str
    route_prefix: Setting
    import_path: str
    args: dict[str, Setting]
    env_vars: dict[str, Setting] = field(default_factory=dict)  # runtime_env.env_vars; empty: no runtime_env


@dataclass(frozen=True)
class Profile:
    """A whole Serve config: where it is written, its opening comment, and everything in it."""

    name: ProfileName
    path: Path  # relative to the repository root
    header: tuple[str, ...]  # paragraphs of the file's opening comment
    proxy_location: Setting
    http_host: Setting
    http_port: Setting
    application: Application
    deployments: tuple[Deployment, ...]

    def __post_init__(self) -> None:
        names = tuple(d.name for d in self.deployments)
        if names != DEPLOYMENTS:
            raise ValueError(f"profile {self.name}: deployments {names}, expected {DEPLOYMENTS}")

    shard: Deployment | None = None  # the sizing of each Shard<i> deployment

    def deployment(self, name: str) -> Deployment:
        for deployment in (*self.deployments, self.shard):
            if deployment is not None and deployment.name == name:
                return deployment
        raise KeyError(f"no deployment {name!r} (expected one of {', '.join((*DEPLOYMENTS, SHARD))})")


def cpus_at_full_scale(deployments: tuple[Deployment, ...]) -> str:
    """'Ingress 2 x 0.25 + ... = 2': the logical CPUs the deployments ask for at their maximum replicas."""
    terms = []
    for deployment in deployments:
        scale = deployment.autoscaling.max_replicas if deployment.autoscaling else deployment.num_replicas
        terms.append((deployment.name, scale.value, deployment.ray_actor_options.num_cpus.value))
    total = sum(replicas * cpus for _, replicas, cpus in terms)
    return " + ".join(f"{name} {replicas} x {cpus:g}" for name, replicas, cpus in terms) + f" = {total:g}"


# --- the two profiles ----------------------------------------------------------------------------------------
ROUTE_PREFIX = Setting("/", "the OpenAI-compatible routes sit at the root: /v1/..., /health, /metrics")
IMPORT_PATH = "ttserve.serving.app:build_app"
PLANNER_WHY = (
    "Plans each request before a Generator is chosen: embedding, Faiss (or the Shard deployments) and SIFT, "
    "then the policy; CPU-bound, tens of milliseconds per prompt. A short queue per replica keeps latency "
    "low; the autoscaler adds replicas instead of deepening queues."
)
SHARD_WHY = (
    "One part of a sharded datastore (datastore.shards): its Faiss index, rows and texts. Every prompt "
    "searches every shard, so shards scale together, for availability more than throughput."
)
# Generator replicas report the adapters they hold; the router sends a request to the one holding or owning
# its adapter (routing.py). The period bounds how long a new adapter is invisible to routers: until then
# rendezvous hashing still sends its requests to the replica that trained it.
ADAPTER_AFFINITY = Router(
    request_router_class=Setting(
        "ttserve.serving.routing:AdapterAffinityRouter",
        "requests go to the replica holding or owning their adapter (docs/scaling.md)",
    ),
    request_routing_stats_period_s=Setting(1.0, "replicas report the adapters they hold this often"),
)
GRACEFUL_SHUTDOWN = Setting(120, "let in-flight fine-tuning requests finish on redeploys")
NO_GPU = Setting(0)


def _generated_notice(profile: str) -> str:
    return (
        f"Generated from ttserve/serving/sizing.py (profile {profile}) by `{REGENERATE}`: change the values "
        "and their reasons there and regenerate; tests/test_deploy.py fails while this copy is stale."
    )


# Requests that wait at each caller (an Ingress replica) for room on a Generator replica. Beyond it Serve
# refuses at once (BackPressureError: 429 with Retry-After) instead of queueing until the client gives up.
# The replica queues more itself (server.max_waiting_generations), where it can tell how long the wait is.
def _queued_generations(n: int) -> Setting:
    return Setting(n, "beyond, 429 with Retry-After at once: backpressure, not timeouts")


CPU_DEPLOYMENTS = (
    Deployment(
        name="Ingress",
        why=(
            "Async FastAPI: a request mostly waits on the Planner and the Generator (seconds when it "
            "trains), so one replica holds many requests for almost no CPU."
        ),
        max_ongoing_requests=Setting(128),
        autoscaling=Autoscaling(
            min_replicas=Setting(1),
            max_replicas=Setting(2),
            target_ongoing_requests=Setting(64, "half of max_ongoing_requests: scale before replicas fill"),
        ),
        ray_actor_options=ActorOptions(
            num_cpus=Setting(0.25, "I/O-bound: leave the cores to retrieval and training"),
            num_gpus=NO_GPU,
        ),
    ),
    Deployment(
        name="Planner",
        why=PLANNER_WHY,
        max_ongoing_requests=Setting(8),
        autoscaling=Autoscaling(
            min_replicas=Setting(1, "never zero: each replica loads the datastore"),
            max_replicas=Setting(2),
            target_ongoing_requests=Setting(2),
        ),
        ray_actor_options=ActorOptions(
            num_cpus=Setting(0.25, "one thread: SIFT pins BLAS to a single thread anyway"),
            num_gpus=NO_GPU,
        ),
    ),
    Deployment(
        name="Generator",
        why=(
            "A single replica: it holds the model, the trainer and the engine, and a second copy would "
            "not fit a small machine. Requests beyond max_ongoing_requests queue at the caller, up to "
            "max_queued_requests."
        ),
        num_replicas=Setting(1),
        max_ongoing_requests=Setting(
            32,
            "requests on the replica: 4 generating, the rest waiting for a slot (admission.py) or training",
        ),
        max_queued_requests=_queued_generations(16),
        graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN,
        router=ADAPTER_AFFINITY,
        ray_actor_options=ActorOptions(
            num_cpus=Setting(
                1,
                "Ray sets OMP_NUM_THREADS = floor(num_cpus) in the replica, which is torch's thread "
                "count: raise it on a bigger machine to give the trainer and the transformers engine "
                "more cores.",
            ),
            num_gpus=NO_GPU,
        ),
    ),
)

CPU = Profile(
    name="cpu",
    path=Path("configs/serve.yaml"),
    header=(
        "Ray Serve config for one CPU machine: `serve run configs/serve.yaml` from the repository root "
        "(or `serve deploy` to a running cluster). GPU hosts and Kubernetes use configs/serve-gpu.yaml.",
        _generated_notice("cpu"),
        # The sum comes from the values themselves, so the comment cannot go stale.
        "Sized so that every deployment at its maximum scale fits in 2 logical CPUs (the project's dev VMs): "
        f"{cpus_at_full_scale(CPU_DEPLOYMENTS)} (tests/test_deploy.py checks the sum). Logical CPUs only "
        "steer scheduling; a replica may use more cores than it asks for.",
    ),
    proxy_location=Setting("EveryNode", "Serve's default: a proxy on each node with replicas"),
    http_host=Setting("0.0.0.0", "reachable from other hosts and containers, not only from localhost"),
    http_port=Setting(8000, "Serve's default port"),
    application=Application(
        name="ttserve",
        route_prefix=ROUTE_PREFIX,
        import_path=IMPORT_PATH,
        args={
            "config": Setting(
                "configs/default.yaml",
                "Relative to the working directory (the repository root). TTSERVE_<SECTION>__<FIELD> "
                "environment variables override it.",
            )
        },
    ),
    deployments=CPU_DEPLOYMENTS,
    shard=Deployment(
        name=SHARD,
        why=SHARD_WHY,
        num_replicas=Setting(1, "one machine: a second copy adds memory, not speed"),
        max_ongoing_requests=Setting(16),
        ray_actor_options=ActorOptions(
            num_cpus=Setting(0.25, "a Faiss search and a row read"), num_gpus=NO_GPU
        ),
    ),
)

GPU_DEPLOYMENTS = (
    Deployment(
        name="Ingress",
        why=(
            "Async FastAPI: a request mostly waits on the Planner and the Generator (seconds when it "
            "trains), so one replica holds many requests for little CPU."
        ),
        max_ongoing_requests=Setting(256),
        autoscaling=Autoscaling(
            min_replicas=Setting(2, "one replica failing or restarting drops no traffic"),
            max_replicas=Setting(8),
            target_ongoing_requests=Setting(128, "half of max_ongoing_requests: scale before replicas fill"),
        ),
        ray_actor_options=ActorOptions(
            num_cpus=Setting(0.5, "request validation and JSON (de)serialisation"),
            num_gpus=NO_GPU,
        ),
    ),
    Deployment(
        name="Planner",
        why=PLANNER_WHY,
        max_ongoing_requests=Setting(8),
        autoscaling=Autoscaling(
            min_replicas=Setting(1, "never zero: each replica loads the datastore (slow)"),
            max_replicas=Setting(8),
            target_ongoing_requests=Setting(2, "about one prompt per CPU of the replica"),
        ),
        ray_actor_options=ActorOptions(
            num_cpus=Setting(2, "the embedder's forward pass, then Faiss and SIFT"),
            num_gpus=NO_GPU,
        ),
    ),
    Deployment(
        name="Generator",
        why=(
            "One GPU per replica, shared by vLLM and the test-time trainer (engine.gpu_memory_utilization "
            "splits it; see deploy/README.md). Replicas are slow to start (weights, CUDA graphs), so "
            "scale up on sustained load only and keep them through lulls."
        ),
        max_ongoing_requests=Setting(32, "concurrent generations vLLM batches; training is serialised"),
        max_queued_requests=_queued_generations(64),
        autoscaling=Autoscaling(
            min_replicas=Setting(1),
            max_replicas=Setting(4, "= the GPU worker group's maxReplicas (deploy/rayservice.yaml)"),
            upscale_delay_s=Setting(60, "a new replica needs minutes: don't chase short bursts"),
            downscale_delay_s=Setting(600, "keep warm GPUs for ten minutes of low load"),
            policy=Setting(
                "ttserve.serving.autoscaling:GeneratorLoad",
                "scale on what limits a Generator, not on its request count (autoscaling.py)",
            ),
            policy_kwargs={
                "training_backlog_s": Setting(
                    5.0,
                    "queued fine-tuning per replica, in seconds at the measured step speed: past it, add a "
                    "replica. Small, because admission caps a queue (server.max_queued_trainings) and on a "
                    "GPU a full one holds only seconds (docs/scaling.md)",
                ),
                "generations": Setting(16.0, "half of max_ongoing_requests generating at once"),
            },
        ),
        graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN,
        router=ADAPTER_AFFINITY,
        ray_actor_options=ActorOptions(
            num_cpus=Setting(4, "tokenisation, the trainer's data handling, vLLM's processes"),
            num_gpus=Setting(1),
        ),
    ),
)

GPU = Profile(
    name="gpu",
    path=Path("configs/serve-gpu.yaml"),
    header=(
        "Ray Serve config for GPU hosts: `serve run configs/serve-gpu.yaml` on one GPU machine, and "
        "deploy/rayservice.yaml's serveConfigV2 on Kubernetes.",
        _generated_notice("gpu"),
        "Placement: only the Generator asks for a GPU. Ray's scheduler and autoscaler keep CPU-only replicas "
        "(Ingress, Planner, Shard<i>) off GPU nodes while other nodes have room (scheduler_avoid_gpu_nodes, "
        "AUTOSCALER_CONSERVE_GPU_NODES; both on by default), so on KubeRay they land in the CPU group.",
    ),
    proxy_location=Setting(
        "EveryNode", "a proxy on each node with replicas; KubeRay's serve Service spans them"
    ),
    http_host=Setting("0.0.0.0", "reachable from the Service, not only from localhost"),
    http_port=Setting(8000, "what <name>-serve-svc and KubeRay's readiness probe use"),
    application=Application(
        name="ttserve",
        route_prefix=ROUTE_PREFIX,
        import_path=IMPORT_PATH,
        args={
            "config": Setting(
                "configs/default.yaml",
                "Relative to the working directory: the repository root locally, /app (the WORKDIR) in the "
                "image. TTSERVE_<SECTION>__<FIELD> variables override it; deploy/rayservice.yaml sets the "
                "model and the datastore path that way.",
            )
        },
        env_vars={
            "TTSERVE_ENGINE__KIND": Setting(
                "vllm",
                "Application-wide, not on the Generator alone: Serve hands it to the task that calls "
                "build_app and to every replica, so all components read the same settings.",
            )
        },
    ),
    deployments=GPU_DEPLOYMENTS,
    shard=Deployment(
        name=SHARD,
        why=SHARD_WHY,
        max_ongoing_requests=Setting(16),
        autoscaling=Autoscaling(
            min_replicas=Setting(2, "a shard replica failing or restarting drops no candidates"),
            max_replicas=Setting(4),
            target_ongoing_requests=Setting(4),
        ),
        ray_actor_options=ActorOptions(num_cpus=Setting(2, "Faiss search threads"), num_gpus=NO_GPU),
    ),
)

PROFILE_BY_NAME: dict[str, Profile] = {"cpu": CPU, "gpu": GPU}


def profile_named(name: str) -> Profile:
    try:
        return PROFILE_BY_NAME[name]
    except KeyError:
        raise KeyError(f"no sizing profile {name!r} (expected one of {', '.join(PROFILES)})") from None


def deployment_options(name: str, profile: str = "cpu") -> dict:
    """Keyword arguments for `@serve.deployment(name=name, **deployment_options(name))`: ray_actor_options,
    max_ongoing_requests, autoscaling_config or num_replicas, and graceful_shutdown_timeout_s where set.
    A fresh dict each call, so the caller may change it."""
    return profile_named(profile).deployment(name).options()


def serve_config(profile: str) -> dict:
    """The profile's whole Serve config as plain data: what its YAML file parses to."""
    return _plain(_serve_config_node(profile_named(profile)))


# --- Serve config as a commented YAML tree ---------------------------------------------------------------------
# A small tree of what the files hold, so that one emitter writes the values with their reasons, and the
# same tree, stripped of the reasons, is what the text must parse back to.
@dataclass(frozen=True)
class Note:
    """A comment on lines of its own, between the keys of a mapping."""

    text: str


@dataclass(frozen=True)
class Key:
    """`name: value`, with the reason as a comment: after the value if it fits on the line, else above."""

    name: str
    value: Scalar | Block | list[Block]
    why: str = ""


@dataclass(frozen=True)
class Block:
    """A YAML mapping. `comment_column`: where trailing comments start (None: as in the enclosing mapping)."""

    items: list[Key | Note]
    comment_column: int | None = None


def _setting(name: str, setting: Setting | None) -> list[Key]:
    return [] if setting is None else [Key(name, setting.value, setting.why)]


def _deployment_node(deployment: Deployment) -> Block:
    # The key order of today's files: how many, how busy, how it scales, how it stops, what it reserves.
    items: list[Key | Note] = [Key("name", deployment.name), Note(deployment.why)]
    items += _setting("num_replicas", deployment.num_replicas)
    items += _setting("max_ongoing_requests", deployment.max_ongoing_requests)
    items += _setting("max_queued_requests", deployment.max_queued_requests)
    if (autoscaling := deployment.autoscaling) is not None:
        scaling = Block(
            _setting("min_replicas", autoscaling.min_replicas)
            + _setting("max_replicas", autoscaling.max_replicas)
            + _setting("target_ongoing_requests", autoscaling.target_ongoing_requests)
            + _setting("upscale_delay_s", autoscaling.upscale_delay_s)
            + _setting("downscale_delay_s", autoscaling.downscale_delay_s)
        )
        if autoscaling.policy is not None:
            kwargs = [Key(name, s.value, s.why) for name, s in autoscaling.policy_kwargs.items()]
            policy = [Key("policy_function", autoscaling.policy.value, autoscaling.policy.why)]
            scaling.items.append(Key("policy", Block(policy + [Key("policy_kwargs", Block(kwargs))])))
        items.append(Key("autoscaling_config", scaling))
    items += _setting("graceful_shutdown_timeout_s", deployment.graceful_shutdown_timeout_s)
    if (router := deployment.router) is not None:
        routing = _setting("request_router_class", router.request_router_class)
        routing += _setting("request_routing_stats_period_s", router.request_routing_stats_period_s)
        items.append(Key("request_router_config", Block(routing)))
    actor = deployment.ray_actor_options
    items.append(
        Key(
            "ray_actor_options",
            Block(_setting("num_cpus", actor.num_cpus) + _setting("num_gpus", actor.num_gpus)),
        )
    )
    return Block(items, comment_column=40)


def _serve_config_node(profile: Profile) -> Block:
    app = profile.application
    app_items: list[Key | Note] = [
        Key("name", app.name),
        *_setting("route_prefix", app.route_prefix),
        Key("import_path", app.import_path),
        Key("args", Block([Key(name, s.value, s.why) for name, s in app.args.items()])),
    ]
    if app.env_vars:
        env_vars = Block([Key(name, s.value, s.why) for name, s in app.env_vars.items()])
        app_items.append(Key("runtime_env", Block([Key("env_vars", env_vars)])))
    app_items.append(Key("deployments", [_deployment_node(d) for d in profile.deployments]))
    http = Block(_setting("host", profile.http_host) + _setting("port", profile.http_port))
    return Block(
        [
            *_setting("proxy_location", profile.proxy_location),
            Key("http_options", http),
            Key("applications", [Block(app_items)]),
        ],
        comment_column=28,
    )


def _plain(node: Scalar | Block | list[Block]):
    """What a YAML parser reads from the node: the same data without the comments."""
    if isinstance(node, list):
        return [_plain(item) for item in node]
    if isinstance(node, Block):
        return {key.name: _plain(key.value) for key in node.items if isinstance(key, Key)}
    return node


# --- YAML text -------------------------------------------------------------------------------------------------
WIDTH = 106  # the files' line length: rayservice.yaml indents its copy 4 more, to the project's 110


def _wrap(text: str, indent: int) -> list[str]:
    """`text` as comment lines at `indent`, within WIDTH; an `inline code` span is never split."""
    prefix = " " * indent + "# "
    unbroken = re.sub(r"`[^`]*`", lambda code: code.group(0).replace(" ", "\0"), text)
    lines = textwrap.wrap(unbroken, WIDTH - len(prefix), break_long_words=False, break_on_hyphens=False)
    return [prefix + line.replace("\0", " ") for line in lines]


def _scalar(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    # Plain when YAML reads it back as the same string (and no comment can start inside it), else quoted:
    # a JSON string is a valid double-quoted YAML scalar.
    if value and "#" not in value and yaml.safe_load(value) == value:
        return value
    return json.dumps(value)


def _block_lines(block: Block, indent: int, column: int) -> list[str]:
    column = block.comment_column or column
    lines: list[str] = []
    for item in block.items:
        if isinstance(item, Note):
            lines += _wrap(item.text, indent)
            continue
        code = " " * indent + f"{item.name}:"
        if not isinstance(item.value, Block | list):
            code += f" {_scalar(item.value)}"
        if item.why:
            # At the column, or two spaces after the code where it reaches the column.
            trailing = f"{code.ljust(column - 2)}  # {item.why}"
            if len(trailing) <= WIDTH:
                code = trailing
            else:
                lines += _wrap(item.why, indent)
        lines.append(code)
        if isinstance(item.value, Block):
            lines += _block_lines(item.value, indent + 2, column)
        elif isinstance(item.value, list):
            for entry in item.value:
                # `- ` takes the place of the entry's indentation on its first line.
                first, *rest = _block_lines(entry, indent + 4, column)
                lines += [" " * (indent + 2) + "- " + first[indent + 4 :], *rest]
    return lines


def serve_config_text(profile: Profile) -> str:
    """The profile's Serve config file: the header, then the config with each reason as a comment."""
    header = ["#"] * (2 * len(profile.header) - 1)  # paragraphs, with an empty comment line between
    header[::2] = ["\n".join(_wrap(paragraph, 0)) for paragraph in profile.header]
    node = _serve_config_node(profile)
    text = "\n".join([*header, *_block_lines(node, 0, 0)]) + "\n"
    if yaml.safe_load(text) != _plain(node):
        raise ValueError(f"the {profile.name} profile's YAML does not read back as written:\n{text}")
    return text


def _with_serve_config(manifest: str, serve_config: str) -> str:
    """The RayService manifest with its `serveConfigV2: |` literal block replaced by `serve_config`; every
    other line, blank lines after the block included, stays as it was."""
    lines = manifest.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.strip() == SERVE_CONFIG_V2]
    if len(starts) != 1:
        raise ValueError(f"{RAYSERVICE} needs exactly one `{SERVE_CONFIG_V2}` line, found {len(starts)}")
    (start,) = starts
    key_indent = len(lines[start]) - len(lines[start].lstrip())
    end = start + 1  # the block: every following line that is blank or indented deeper than the key
    while end < len(lines) and (
        not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > key_indent
    ):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    block_indent = " " * (key_indent + 2)
    block = "".join(f"{block_indent}{line}\n" if line else "\n" for line in serve_config.splitlines())
    text = "".join(lines[: start + 1]) + block + "".join(lines[end:])
    if yaml.safe_load(yaml.safe_load(text)["spec"]["serveConfigV2"]) != yaml.safe_load(serve_config):
        raise ValueError(f"{RAYSERVICE}'s serveConfigV2 does not read back as the config embedded in it")
    return text


# --- the generated files ---------------------------------------------------------------------------------------
def render(root: Path) -> dict[Path, str]:
    """Each generated file under the repository `root` and the exact text it should hold."""
    root = Path(root)
    texts = {root / p.path: serve_config_text(p) for p in (CPU, GPU)}
    rayservice = root / RAYSERVICE
    if not rayservice.is_file():
        raise FileNotFoundError(
            f"{rayservice} is missing: it is hand-written, only its serveConfigV2 is generated"
        )
    texts[rayservice] = _with_serve_config(rayservice.read_text(encoding="utf-8"), texts[root / GPU.path])
    return texts


def _differing(texts: dict[Path, str]) -> list[Path]:
    return [
        path for path, text in texts.items() if not path.is_file() or path.read_text(encoding="utf-8") != text
    ]


def stale(root: Path) -> list[Path]:
    """The generated files under `root` whose content is not what `render` gives (missing ones included)."""
    return _differing(render(root))


def write(root: Path) -> list[Path]:
    """Rewrites the stale files under `root`; returns them. Everything is rendered before anything is
    written, so an error leaves the files as they were."""
    texts = render(root)
    written = _differing(texts)
    for path in written:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(texts[path], encoding="utf-8")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=REGENERATE, description="Write the Ray Serve configs from ttserve/serving/sizing.py."
    )
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is stale")
    parser.add_argument("--root", type=Path, default=Path("."), help="the repository root (default: .)")
    args = parser.parse_args(argv)
    if not (args.root / RAYSERVICE).is_file():
        parser.error(f"no {RAYSERVICE} under {args.root}: run from the repository root or pass --root")
    if args.check:
        outdated = stale(args.root)
        for path in outdated:
            print(f"stale: {path.relative_to(args.root)}", file=sys.stderr)
        if outdated:
            print(f"run `{REGENERATE}` from the repository root to regenerate", file=sys.stderr)
        return 1 if outdated else 0
    for path in write(args.root):
        print(f"wrote {path.relative_to(args.root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
