"""One replica of `kiln serve --replicas`: a Ray Serve deployment that loads the artifact once and runs the
server's own ``App`` (routes, auth, limits, SSE) with its own continuous-batching ``Scheduler``. The front end
(``runtime.ray_front``) hands it each HTTP request as (scope, body) and relays the ASGI messages it yields.

Imported inside Ray worker processes only (never by `kiln serve` without --replicas).
"""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

from .errors import EngineError

DEPLOYMENT = "kiln"  # the replicas' deployment name (the front end is DEPLOYMENT-front)
SERVE_NAMESPACE = "serve"  # Ray Serve's actors live in this namespace
# scope keys that travel from the front end to a replica (all plain data)
SCOPE_KEYS = ("http_version", "method", "scheme", "path", "raw_path", "root_path", "query_string", "headers",
              "client", "server")


def keep_grpc_on_loopback() -> None:
    """Ray Serve 2.60 binds every replica's inter-deployment gRPC server to ``[::]:0`` (all interfaces,
    hard-coded in ``ReplicaActor._on_initialized``). On a Ray kept on 127.0.0.1 that server is bound to
    127.0.0.1 instead (it binds after the replica's constructor, so patching here is in time)."""
    from ray.serve._private import replica as serve_replica

    orig = getattr(serve_replica, "add_port_to_grpc_server", None)
    if orig is None:
        raise EngineError("this Ray version no longer binds the replica's gRPC server the way Ray 2.60 "
                          "does, so kiln cannot keep it on 127.0.0.1; install the Ray that llmkiln[ray] pins")
    if getattr(orig, "kiln_loopback", False):
        return

    def on_loopback(server, address: str):
        host, _, port = address.rpartition(":")
        if host in ("[::]", "0.0.0.0", ""):
            address = f"127.0.0.1:{port}"
        return orig(server, address)

    on_loopback.kiln_loopback = True
    serve_replica.add_port_to_grpc_server = on_loopback


def node_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class KilnReplica:
    """The deployment class. ``load``: Engine.load keywords (backend, threads, trust_engine_code); ``config``:
    ServerConfig fields; ``loopback``: this Ray runs on 127.0.0.1 only."""

    def __init__(self, art: str, load: dict, config: dict, loopback: bool):
        if loopback:
            keep_grpc_on_loopback()
        import ray
        from ray import serve

        from .engine import Engine
        from .server import KV_BUDGET_FRACTION, App, ServerConfig, mem_available

        self.node = ray.util.get_node_ip_address()
        if not Path(art).is_dir() or not os.access(art, os.R_OK | os.X_OK):
            raise EngineError(f"kiln: {art} is not readable on Ray node {self.node}; every node needs the "
                              "artifact at that same path (a shared filesystem, or copy it there first)")
        cfg = dict(config)
        threads = load.get("threads") or 1
        if cfg.get("kv_budget_mb") is None:  # this replica's share of the node: its CPUs out of the node's
            avail = mem_available()
            if avail:
                cfg["kv_budget_mb"] = avail * KV_BUDGET_FRACTION * min(1.0, threads / node_cpus()) / 2 ** 20
        self.engine = Engine.load(art, **load)
        self.app = App(self.engine, ServerConfig(**cfg))
        self.asgi = self.app.asgi()
        self.id = serve.get_replica_context().replica_id.unique_id
        self.pid = os.getpid()

    # ---- requests (from the front end) ---------------------------------------------------------------
    async def http(self, req: dict, body: bytes, end: str):
        """Run one HTTP request through the App; yield lists of its ASGI messages as they come. ``end`` says
        how the body ended at the front end: "end" (whole), "over" (past the limit: ``body`` has one byte
        more than it), "timeout" (it did not arrive in time) or "disconnect" (the client left). A cancel
        from the front end (its client disconnected) reaches the App as ``http.disconnect``."""
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, **req, "state": {}}
        out: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        first = True

        async def receive():
            nonlocal first
            if first:
                first = False
                if end == "timeout":
                    raise asyncio.TimeoutError  # read_body's own timeout answer (408)
                if end != "disconnect":
                    return {"type": "http.request", "body": body, "more_body": False}
            elif end != "disconnect":
                await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            out.put_nowait(message)

        task = asyncio.ensure_future(self.asgi(scope, receive, send))
        task.add_done_callback(lambda _: out.put_nowait(None))
        try:
            done = False
            while not done:
                batch = [await out.get()]
                while not out.empty():
                    batch.append(out.get_nowait())
                if batch[-1] is None:
                    done = True
                    batch.pop()
                if batch:
                    yield batch
            task.result()  # an error the App did not answer itself
        except asyncio.CancelledError:
            gone.set()  # the App cancels the generation and counts the request as the plain server does
            try:
                await asyncio.wait_for(asyncio.shield(task), 10)
            except BaseException:
                pass
            raise
        finally:
            if not task.done():
                task.cancel()

    # ---- control plane (broadcast by the front end) --------------------------------------------------
    def record_routing_stats(self) -> dict:
        """This replica's /health and /metrics figures. Serve's per-replica stats hook: the front end calls
        it on the replica actor, outside the request path (which a busy replica's max_ongoing_requests
        holds), and Serve's controller polls it now and then as well."""
        s = self.app.scheduler
        m = self.app.snapshot()
        m["requests"] = [[ep, st, n] for (ep, st), n in m["requests"].items()]
        return {"replica": self.id, "model": self.app.model, "pid": self.pid, "node": self.node,
                "alive": s.alive, "active": s.active,
                "queued": s.queued, "crash": s.crash, "backend": self.engine.backend.describe(),
                "metrics": m}

    def check_health(self) -> None:
        """Serve's health check: a replica whose generation worker stopped is replaced."""
        s = self.app.scheduler
        if not s.alive:
            raise EngineError(f"the generation worker stopped ({s.crash})")

    def __del__(self):
        app = getattr(self, "app", None)
        if app is not None:
            app.close()


def replica_details(app: str, deployment: str = DEPLOYMENT) -> list[dict]:
    """Serve's details of a deployment's replicas (replica_id, state, actor_name, pid, node_ip, ...)."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    dep = details.get("applications", {}).get(app, {}).get("deployments", {}).get(deployment, {})
    return list(dep.get("replicas", []))
