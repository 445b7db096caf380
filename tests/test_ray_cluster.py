"""Distillation through an existing multi-process Ray cluster (`ray start --head` on loopback plus a worker node of
1 CPU each): with RAY_ADDRESS set, `run_distill` joins it, ships the package as a py_module, places its 2 training
workers on the 2 nodes and lowers the held-out KL."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from moe2dense.distill.data import load_rows
from moe2dense.distill.driver import PACKAGE_DIR, run_distill
from moe2dense.heldout import kl as heldout_kl
from test_distill import SEQ, _params, _trained, setup  # noqa: F401  (setup is a fixture)

pytestmark = pytest.mark.slow
RAY = Path(sys.executable).parent / "ray"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _our_pids(temp_dir: str) -> list[int]:
    """Every process of this test's cluster: their command lines name its temp dir (`ray stop` would stop every
    Ray instance on the machine)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if temp_dir in (proc / "cmdline").read_bytes().decode(errors="ignore"):
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module")
def cluster():
    """A head and a worker node on 127.0.0.1, each a `ray start --block` in its own session; yields the address."""
    import ray

    from ray._private.authentication.authentication_token_setup import ensure_token_if_auth_enabled
    from ray._raylet import Config

    ray.shutdown()  # no local instance of this process may outlive the test or mix with the cluster
    # Ray (2.60 here) runs `ray start` nodes with token auth when a token exists, and a driver given an explicit address
    # sends its token (~/.ray/auth_token, created here if missing, as a local ray.init does) only with
    # RAY_AUTH_MODE=token. The nodes inherit the mode from this environment.
    old_mode = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "token"
    Config.initialize("")  # Ray caches the mode: refresh it, as ray.init does when it enables token auth
    ensure_token_if_auth_enabled(None, create_token_if_missing=True)
    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths are length-limited
    port = _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("PYTHONPATH", None)  # the workers get moe2dense from the py_module the driver ships
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0", f"--temp-dir={temp_dir}",
              "--disable-usage-stats", "--block"]
    nodes = []
    try:
        head = ["--head", f"--port={port}", "--include-dashboard=false", f"--dashboard-port={_free_port()}"]
        for args in (head, [f"--address=127.0.0.1:{port}"]):
            nodes.append(subprocess.Popen(
                [str(RAY), "start", *args, *common, f"--dashboard-agent-listen-port={_free_port()}"], env=env,
                cwd=temp_dir, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            if len(nodes) == 1:
                _wait_for(lambda: _alive_nodes(port) >= 1, 60, nodes)
        _wait_for(lambda: _alive_nodes(port) == 2, 60, nodes)
        yield f"127.0.0.1:{port}"
    finally:
        ray.shutdown()
        for node in reversed(nodes):
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGTERM)
        for pid in _our_pids(temp_dir):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 3  # the head's gcs_server and monitor may ignore SIGTERM
        while _our_pids(temp_dir) and time.time() < deadline:
            time.sleep(0.2)
        for pid in _our_pids(temp_dir):  # anything left (workers of the raylets)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for node in nodes:
            node.wait(timeout=10)
        shutil.rmtree(temp_dir, ignore_errors=True)
        if old_mode is None:
            os.environ.pop("RAY_AUTH_MODE")
        else:
            os.environ["RAY_AUTH_MODE"] = old_mode
        Config.initialize("")


def _alive_nodes(port: int) -> int:
    """Alive nodes as the GCS reports them (a throwaway client process, so this process stays unconnected)."""
    code = ("import ray; ray.init(address='127.0.0.1:%d', log_to_driver=False); "
            "print(sum(n['Alive'] for n in ray.nodes()))" % port)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}, cwd="/tmp")
    return int(proc.stdout.split()[-1]) if proc.returncode == 0 and proc.stdout.split() else 0


def _wait_for(cond, timeout: float, nodes) -> None:
    deadline = time.time() + timeout
    while not cond():
        dead = [n.args for n in nodes if n.poll() is not None]
        assert not dead, f"ray start exited: {dead}"
        assert time.time() < deadline, "the Ray cluster did not come up"
        time.sleep(0.5)


def test_distill_joins_the_cluster_at_ray_address(setup, cluster, tmp_path, monkeypatch):  # noqa: F811
    import ray
    from ray._private.state import actors

    monkeypatch.setenv("RAY_ADDRESS", cluster)
    res = run_distill(_params(tokens=24 * 4 * SEQ, checkpoint_every=24), student_dir=setup / "student",
                      teacher_dir=setup / "teacher", train_path=setup / "train.parquet",
                      eval_path=setup / "eval.parquet", storage=tmp_path / "runs")
    try:
        # The driver joined the existing cluster (not a local Ray) with the package as a py_module.
        assert ray.get_runtime_context().gcs_address.endswith(":" + cluster.split(":")[1])  # Ray resolves the IP
        assert sum(n["Alive"] for n in ray.nodes()) == 2
        py_modules = ray.get_runtime_context().runtime_env.get("py_modules", [])
        assert len(py_modules) == 1 and str(PACKAGE_DIR) not in py_modules[0], py_modules  # uploaded, gcs:// URI

        @ray.remote(num_cpus=1)
        def shipped_packages() -> list[str]:
            import sys
            return [p for p in sys.path if "py_modules_files" in p and os.path.isfile(p + "/moe2dense/distill/loop.py")]

        # (Ray also puts the driver's cwd on the workers' sys.path: on loopback that is this checkout.)
        assert ray.get(shipped_packages.remote()), "the package was not shipped to the workers as a py_module"
        # 2 workers, one per node (each node has 1 CPU).
        assert res["workers"] == 2 and res["steps"] == 24 and res["metrics"]["resumed_from"] == 0
        workers = [a for a in actors().values() if a["ActorClassName"] == "RayTrainWorker"]
        assert len(workers) == 2 and len({a["Address"]["NodeID"] for a in workers}) == 2, workers
    finally:
        ray.shutdown()
    eval_rows = load_rows(setup / "eval.parquet")[:8]
    teacher = AutoModelForCausalLM.from_pretrained(setup / "teacher").eval()
    before = heldout_kl(AutoModelForCausalLM.from_pretrained(setup / "student").eval(), teacher, eval_rows)
    student, history = _trained(setup, res)
    assert [h[0] for h in history] == list(range(1, 25))
    after = heldout_kl(student, teacher, eval_rows)
    assert after < 0.9 * before, (before, after)
    assert [res["metrics"][f"heldout_kl_{k}"] for k in ("before", "after")] == pytest.approx([before, after], rel=1e-5)
