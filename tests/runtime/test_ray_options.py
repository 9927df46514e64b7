"""`kiln serve --replicas` options, checked without Ray: what the flags become (threads = CPUs per replica,
Serve's autoscaling and admission settings) and the one-line refusals."""
import pytest
from click.testing import CliRunner

from kiln.cli import cli
from runtime.errors import EngineError
from runtime.ray_serve import ReplicaOptions, deployment_options, replica_threads
from runtime.server import ServerConfig


def test_threads_are_the_cpus_each_replica_reserves(monkeypatch):
    monkeypatch.setattr("runtime.ray_serve.local_cpus", lambda: 8)
    assert replica_threads(ReplicaOptions(replicas=2)) == 4
    assert replica_threads(ReplicaOptions(replicas=2, autoscale=(1, 8))) == 1  # the most there may be
    assert replica_threads(ReplicaOptions(replicas=3, threads=2)) == 2
    d = deployment_options(ServerConfig(max_batch=6, max_queue=0), ReplicaOptions(replicas=3, threads=2))
    assert d["num_replicas"] == 3 and d["ray_actor_options"] == {"num_cpus": 2}
    assert d["max_ongoing_requests"] == 6 and d["max_queued_requests"] == 1  # Serve takes -1 or >= 1


def test_autoscale_is_serves_autoscaling_on_ongoing_requests():
    d = deployment_options(ServerConfig(max_batch=8), ReplicaOptions(replicas=2, autoscale=(1, 4), threads=1))
    a = d["autoscaling_config"]
    assert "num_replicas" not in d
    got = (a["min_replicas"], a["initial_replicas"], a["max_replicas"], a["target_ongoing_requests"])
    assert got == (1, 2, 4, 4)


@pytest.mark.parametrize("kw,msg", [({"replicas": 3, "autoscale": (1, 2)}, "outside --autoscale"),
                                    ({"replicas": 1, "autoscale": (2, 1)}, "MIN <= MAX"),
                                    ({"replicas": 0}, "at least 1")])
def test_bad_replica_options(kw, msg):
    with pytest.raises(EngineError, match=msg):
        ReplicaOptions(**kw)


def test_loopback_addresses():
    assert ReplicaOptions().loopback and ReplicaOptions(ray_address="127.0.0.1:6379").loopback
    assert not ReplicaOptions(ray_address="10.0.0.5:6379").loopback


@pytest.mark.parametrize("args,msg", [(["--autoscale", "3"], "MIN:MAX"),
                                      (["--replicas", "3", "--autoscale", "1:2"], "outside --autoscale"),
                                      (["--autoscale", "1:2"], "go with --replicas"),
                                      (["--replicas", "0"], "--replicas")])
def test_cli_refusals_in_one_line(tiny_onnx, args, msg):
    r = CliRunner().invoke(cli, ["serve", str(tiny_onnx), "--port", "0", *args])
    assert r.exit_code == 2 and msg in r.output, r.output
