"""`kiln serve ART --replicas N`: the same OpenAI-compatible server as N Ray Serve replicas.

    this process: the HTTP front end on --host:--port (runtime.ray_front) ── DeploymentHandle ──▶
        replica 1..N (runtime.ray_replica): Engine.load(ART) once + the server's App + its own Scheduler

Without ``ray_address`` a local Ray is started with every socket on 127.0.0.1 (node, GCS, raylet, workers,
agents; no dashboard, no usage statistics) and stopped on exit; with one, this process joins that cluster
and deletes its application on exit. No Serve HTTP proxy is started: the front end is this process.

Imported only by `kiln serve --replicas`; nothing here imports Ray at module level.
"""
from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .errors import EngineError
from .http_guard import is_loopback
from .ray_replica import DEPLOYMENT, replica_details

LOOPBACK_ENV = {
    # Ray on Linux turns a node address of 127.0.0.1 into the machine's network address
    # (services.resolve_ip_for_localhost) unless Ray runs as a single-machine cluster, which this variable
    # (its Windows/macOS switch) selects; every Ray process started from here inherits it.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}
INSTALL = "pip install 'llmkiln[ray]'"


@dataclass(frozen=True)
class ReplicaOptions:
    replicas: int = 2  # replicas at start (with autoscaling: the initial number)
    autoscale: tuple[int, int] | None = None  # (min, max) replicas, scaled on ongoing requests per replica
    ray_address: str | None = None  # None: start a local Ray on 127.0.0.1
    threads: int | None = None  # intra-op threads = CPUs reserved per replica (None: this machine's / max)
    backend: str = "auto"
    trust_engine_code: bool = False
    ready_timeout_s: float = 600.0  # replicas that are not running by then: give up

    def __post_init__(self):
        if self.replicas < 1:
            raise EngineError(f"--replicas must be at least 1, got {self.replicas}")
        if self.autoscale is not None:
            lo, hi = self.autoscale
            if not 1 <= lo <= hi:
                raise EngineError(f"--autoscale MIN:MAX needs 1 <= MIN <= MAX, got {lo}:{hi}")
            if not lo <= self.replicas <= hi:
                raise EngineError(f"--replicas {self.replicas} is outside --autoscale {lo}:{hi}")

    @property
    def max_replicas(self) -> int:
        return self.autoscale[1] if self.autoscale else self.replicas

    @property
    def loopback(self) -> bool:
        """Ray stays on 127.0.0.1: a local Ray, or a cluster whose address is a loopback one."""
        if self.ray_address is None:
            return True
        host = self.ray_address.split("://")[-1].rsplit(":", 1)[0]
        return is_loopback(host)


def local_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def replica_threads(opts: ReplicaOptions) -> int:
    """Intra-op threads of each replica, which is also the CPUs Ray reserves for it: --threads, else this
    machine's CPUs shared by the most replicas there may be (at least 1)."""
    return opts.threads or max(1, local_cpus() // opts.max_replicas)


def connect(opts: ReplicaOptions, say=None) -> bool:
    """ray.init: a local Ray on 127.0.0.1, or join ``opts.ray_address``. Returns whether a local Ray was
    started (to be stopped on exit)."""
    if opts.loopback:
        if "ray" in sys.modules:
            from ray._private import ray_constants

            if ray_constants.ENABLE_RAY_CLUSTER:
                raise EngineError("Ray was imported before kiln could keep it on 127.0.0.1; run kiln serve "
                                  "--replicas in a fresh process")
        os.environ.update(LOOPBACK_ENV)
    else:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "ray":
            raise EngineError(f"kiln serve --replicas needs ray[serve], which is not installed: {INSTALL}") \
                from None
        raise
    quiet = logging.WARNING
    if opts.ray_address is None:
        if say:
            say(f"starting a local Ray on 127.0.0.1 ({local_cpus()} CPUs)")
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
                 num_cpus=local_cpus(), logging_level=quiet, namespace="kiln")
        started = True
    else:
        if say:
            say(f"joining the Ray cluster at {opts.ray_address}")
        _reachable(opts.ray_address)
        try:
            ray.init(address=opts.ray_address, logging_level=quiet, namespace="kiln")
        except ConnectionError as e:
            hint = "" if os.environ.get("RAY_AUTH_MODE") else (
                "; a cluster with token authentication (Ray's default) needs RAY_AUTH_MODE=token here and "
                "its token (~/.ray/auth_token or RAY_AUTH_TOKEN)")
            raise EngineError(f"cannot join the Ray cluster at {opts.ray_address} ({e}){hint}") from None
        started = False
    ip = ray.util.get_node_ip_address()
    if opts.loopback and ip != "127.0.0.1":
        ray.shutdown()
        raise EngineError(f"Ray chose the node address {ip}, not 127.0.0.1; refusing to serve off loopback")
    return started


def _reachable(address: str, timeout: float = 5.0) -> None:
    """Ray retries an address that does not answer for minutes: a plain TCP connect first (host:port only)."""
    import socket

    if "://" in address or ":" not in address:
        return
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise EngineError(f"cannot reach the Ray cluster at {address} ({getattr(e, 'strerror', None) or e}); "
                          "--ray-address is the head's GCS address, HOST:PORT (`ray start --head --port`)") \
            from None


def deployment_options(config, opts: ReplicaOptions) -> dict:
    """The replicas' Serve deployment options (``serve.deployment(KilnReplica, **these)``)."""
    threads = replica_threads(opts)
    scaling: dict = {"num_replicas": opts.replicas}
    if opts.autoscale:
        lo, hi = opts.autoscale
        scaling = {"autoscaling_config": {
            "min_replicas": lo, "max_replicas": hi, "initial_replicas": opts.replicas,
            # ongoing = decoding + waiting at the front end; half a batch per replica before adding one
            "target_ongoing_requests": max(1, config.max_batch // 2),
            "upscale_delay_s": 10.0, "downscale_delay_s": 60.0, "metrics_interval_s": 2.0,
            "look_back_period_s": 10.0}}
    return {"name": DEPLOYMENT, **scaling,
            "ray_actor_options": {"num_cpus": threads},  # = the replica's intra-op threads
            # a replica takes a batch at a time; the rest wait at the front end's router, which sends each to
            # a replica that has room; beyond max_queue waiting the front end answers 429
            "max_ongoing_requests": config.max_batch, "max_queued_requests": max(1, config.max_queue),
            "health_check_period_s": 2.0, "health_check_timeout_s": 30.0, "graceful_shutdown_timeout_s": 5.0,
            "logging_config": {"log_level": "WARNING", "enable_access_log": False}}


def _deployment(art: str, config, opts: ReplicaOptions, loopback: bool | None = None):
    from ray import serve

    from .ray_replica import KilnReplica

    dep = serve.deployment(KilnReplica, **deployment_options(config, opts))
    load = {"backend": opts.backend, "threads": replica_threads(opts),
            "trust_engine_code": opts.trust_engine_code}
    cfg = {k: getattr(config, k) for k in config.__dataclass_fields__}
    return dep.bind(art, load, cfg, opts.loopback if loopback is None else loopback)


def build_app(args: dict):
    """A Serve application builder for Serve config files and KubeRay RayService (``serveConfigV2``)::

        import_path: runtime.ray_serve:build_app
        args: {art: /models/smollm2, replicas: 2, threads: 1, autoscale: "1:4", api_key: ..., max_batch: 8}

    The replicas as with `kiln serve --replicas`, and the front end as a deployment (``kiln-front``) behind
    Ray's HTTP proxy (its host and port come from the config's http_options). ``args``: ``art`` (the same
    path on every node), ``replicas``, ``autoscale`` ("MIN:MAX"), ``threads``, ``backend``,
    ``trust_engine_code``, ``front_replicas`` (default 1) and any ServerConfig field (``host`` only decides
    the Host-header check: loopback names only when it is a loopback address; default 0.0.0.0)."""
    import ray
    from ray import serve

    from .ray_front import FrontDeployment
    from .server import ServerConfig

    args = dict(args)
    art = str(args.pop("art"))
    auto = args.pop("autoscale", None)
    if isinstance(auto, str):
        lo, _, hi = auto.partition(":")
        auto = (int(lo), int(hi))
    opts = ReplicaOptions(replicas=int(args.pop("replicas", 2)), autoscale=tuple(auto) if auto else None,
                          ray_address="cluster", threads=args.pop("threads", None),
                          backend=args.pop("backend", "auto"),
                          trust_engine_code=bool(args.pop("trust_engine_code", False)))
    front_replicas = int(args.pop("front_replicas", 1))
    config = ServerConfig(**{"host": "0.0.0.0", **args})
    loopback = is_loopback(ray.util.get_node_ip_address())
    replicas = _deployment(art, config, opts, loopback)
    front = serve.deployment(serve.ingress()(FrontDeployment), name=f"{DEPLOYMENT}-front",
                             num_replicas=front_replicas, ray_actor_options={"num_cpus": 0},
                             max_ongoing_requests=config.max_connections,
                             logging_config={"log_level": "WARNING", "enable_access_log": False})
    cfg = {k: getattr(config, k) for k in config.__dataclass_fields__}
    return front.bind(replicas, cfg, DEPLOYMENT)


def _wait_running(app: str, timeout_s: float, say=None):
    from ray import serve

    end = time.monotonic() + timeout_s
    last = None
    while True:
        st = serve.status().applications.get(app)
        status = str(getattr(st, "status", "")).rsplit(".", 1)[-1]
        if status == "RUNNING":
            return
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise EngineError(_failure_line(st))
        dep = st.deployments.get(DEPLOYMENT) if st else None
        states = dict(dep.replica_states) if dep else {}
        if say and states != last and states:
            say("replicas: " + ", ".join(f"{n} {str(k).rsplit('.', 1)[-1].lower()}"
                                         for k, n in states.items()))
            last = states
        if time.monotonic() > end:
            raise EngineError(f"the replicas were not running after {timeout_s:.0f} s ({states}); the "
                              "cluster may lack the CPUs they ask for (--threads per replica)")
        time.sleep(0.5)


def _failure_line(st) -> str:
    """One line from a failed deployment: the replica's own EngineError if it raised one."""
    text = str(getattr(st, "message", "")) + " " + " ".join(
        str(getattr(d, "message", "")) for d in getattr(st, "deployments", {}).values())
    for line in text.splitlines():
        if "Error: kiln: " in line:  # the replica's own one-line EngineError, not its source line
            return line[line.index("Error: kiln: ") + 13:].strip()
    for line in reversed(text.splitlines()):
        if "Error:" in line:
            return "a replica failed to start: " + line.strip()[:300]
    return "the replicas failed to start: " + " ".join(text.split())[:300]


def serve_replicated(art, config, opts: ReplicaOptions, on_ready=None, say=None) -> None:
    """Serve ``art`` as Ray Serve replicas behind a front end on config.host:config.port until interrupted."""
    from .server import bind, uvicorn_server

    art = str(Path(art).resolve())
    if not opts.loopback and is_loopback(config.host) and say:
        say("note: the front end listens on loopback; replicas on other nodes are reached through Ray")
    sock = bind(config.host, config.port)
    host, port = sock.getsockname()[:2]
    started = False
    app = f"kiln-{port}-{uuid.uuid4().hex[:6]}"
    try:
        started = connect(opts, say)
        import ray
        from ray import serve

        threads = replica_threads(opts)
        cpus = ray.cluster_resources().get("CPU", 0)
        if threads * opts.replicas > cpus:
            msg = (f"{opts.replicas} replicas x {threads} threads need {threads * opts.replicas} CPUs; the "
                   f"Ray cluster has {cpus:g}: lower --replicas or --threads")
            if started:
                raise EngineError(msg)
            if say:
                say(f"note: {msg} (waiting for the cluster to grow)")
        if opts.autoscale and started and threads * opts.autoscale[1] > cpus and say:
            say(f"note: --autoscale up to {opts.autoscale[1]} replicas x {threads} threads is more than the "
                f"{cpus:g} CPUs here; Ray will place only what fits")
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # no INFO lines from Serve's client here
        serve.start(proxy_location="Disabled", logging_config={"log_level": "WARNING"})
        target = serve.RunTarget(_deployment(art, config, opts), name=app, route_prefix=None)
        [handle] = serve.run_many([target], wait_for_applications_running=False)
        _wait_running(app, opts.ready_timeout_s, say)
        from .ray_front import Front

        front = Front(handle, config, lambda: replica_details(app))
        server = uvicorn_server(front, config)
        if on_ready:
            on_ready(f"http://{host}:{port}")
        server.run(sockets=[sock])
    finally:
        sock.close()
        _teardown(app, started)


def _teardown(app: str, started: bool) -> None:
    if "ray" not in sys.modules:
        return
    import ray

    if not ray.is_initialized():
        return
    try:
        from ray import serve

        if started:
            serve.shutdown()
        else:
            serve.delete(app)
    except Exception as e:  # still stop Ray below
        logging.getLogger("kiln.ray").warning("could not remove the Serve application %s: %s", app, e)
    ray.shutdown()
