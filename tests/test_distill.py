"""Distillation on a real local Ray cluster of 2 CPU workers: the KL to the teacher drops (the workers' own held-out
KL equals `heldout.kl`), a worker killed mid-run is replaced and the run resumes from its last checkpoint to the same
weights (and the same "before" KL) as an uninterrupted run, cached teacher logits covering the whole vocabulary
train exactly like the online teacher, and the stage's driver never loads the teacher."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from moe2dense.arch import get_adapter
from moe2dense.assemble import assemble
from moe2dense.calibrate.capture import capture
from moe2dense.calibrate.store import read_meta
from moe2dense.checkpoint import CheckpointReader
from moe2dense.data.packing import PackedWriter
from moe2dense.distill.cache import CachedTeacher, write_cached_logits
from moe2dense.distill.data import load_rows, step_rows, worker_micro_rows
from moe2dense.distill.driver import plan_workers, run_distill, runtime_env, visited_rows
from moe2dense.distill.loop import student_state_from_checkpoint
from moe2dense.heldout import kl as heldout_kl
from moe2dense.params import DistillParams
from moe2dense.plan import build_plan
from moe2dense.selection import score_frame, select_from_scores
from conftest import REPO, free_port
from tiny_models import tiny_config

pytestmark = pytest.mark.slow
SEQ = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A trained-looking tiny Qwen3-MoE teacher (random), its assembled dense student, packed train/eval data whose
    tokens follow a simple pattern so the teacher's distribution is learnable."""
    root = tmp_path_factory.mktemp("distill")
    config = tiny_config("qwen3_moe")
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(config)
    rng = np.random.default_rng(0)
    for split, n_docs in (("train", 400), ("eval", 40)):
        w = PackedWriter(root / f"{split}.parquet", SEQ, sep_id=2, row_group_rows=64)
        for _ in range(n_docs):
            start = int(rng.integers(3, 60))
            w.add("toy", [(start + 3 * i) % 61 + 3 for i in range(int(rng.integers(20, 60)))])
        w.close()
    # A briefly trained teacher: peaked next-token distributions that its experts help produce.
    train = torch.from_numpy(load_rows(root / "train.parquet").astype(np.int64))
    opt = torch.optim.AdamW(teacher.parameters(), lr=1e-2)
    for step in range(40):
        batch = train[(step * 16) % len(train):][:16]
        teacher(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    teacher.eval().save_pretrained(root / "teacher")
    adapter = get_adapter(teacher)
    calib = root / "calibration"
    ids = torch.from_numpy(load_rows(root / "train.parquet")[:8].astype(np.int64))
    stats = capture(teacher, [(ids, ["toy"] * len(ids))], calib, needs={"routing"}, progress=False, writer_threads=0)
    scores = score_frame(stats, ["sf"])
    order = select_from_scores(scores, "sf", adapter.top_k, adapter.top_k)
    with CheckpointReader(root / "teacher") as reader:
        plan = build_plan(adapter, stats, order, scores=scores, score_method="sf", group_method="output", blocks=None,
                          align=False, scaling="uniform", reader=reader, calibration=calib,
                          shared_gate_mean=read_meta(calib)["shared_gate_mean"])
    (root / "student").mkdir()
    assemble(root / "teacher", plan, root / "student", progress=False)
    return root


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env())
    yield
    ray.shutdown()


def _params(**kw) -> DistillParams:
    base = dict(tokens=48 * 4 * SEQ, batch_size=4, lr=3e-3, warmup_steps=2, workers=2, checkpoint_every=4,
                chunk_tokens=48, eval_tokens=8 * SEQ, max_failures=2)
    return DistillParams(**{**base, **kw})


def _run(setup, storage, cached_logits=None, **kw):
    return run_distill(_params(**kw), student_dir=setup / "student", teacher_dir=setup / "teacher",
                       train_path=setup / "train.parquet", eval_path=setup / "eval.parquet", storage=storage,
                       cached_logits=cached_logits)


def _trained(setup, res):
    state, history = student_state_from_checkpoint(res["checkpoint"])
    student = AutoModelForCausalLM.from_pretrained(setup / "student").eval()
    student.load_state_dict(state)
    return student, history


def test_batches_are_a_function_of_the_step():
    a = step_rows(7, 4, 10, seed=3)
    assert np.array_equal(a, step_rows(7, 4, 10, seed=3)) and len(set(a.tolist())) == 4
    epoch = np.concatenate([step_rows(s, 5, 10, seed=0) for s in range(2)])
    assert sorted(epoch.tolist()) == list(range(10)), "one epoch visits every row once"
    parts = worker_micro_rows(3, 8, 50, 0, rank=1, world=2, accum=2)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.sort(step_rows(3, 8, 50, 0)[1::2]))


def test_workers_are_clamped_with_a_warning(caplog):
    assert plan_workers(8, "auto", {"CPU": 2.0}) == (2, False, 1)
    assert "Ray sees only 2 CPUs" in caplog.text
    assert plan_workers(1, "auto", {"CPU": 2.0}) == (1, False, 2)
    assert plan_workers(4, "auto", {"CPU": 16.0, "GPU": 2.0}) == (2, True, 1)
    with pytest.raises(ValueError, match="no GPU"):
        plan_workers(1, "cuda", {"CPU": 2.0})


@pytest.fixture(scope="module")
def clean(setup, ray_cluster, tmp_path_factory):
    """An uninterrupted 2-worker run: the reference the other runs must reproduce."""
    return _run(setup, tmp_path_factory.mktemp("clean"))


def _reference_kl(setup, res) -> tuple[float, float]:
    """`heldout.kl` before and after the run `res`, over the rows the workers measure (eval_tokens = 8 rows)."""
    eval_rows = load_rows(setup / "eval.parquet")[:8]
    teacher = AutoModelForCausalLM.from_pretrained(setup / "teacher").eval()
    return (heldout_kl(AutoModelForCausalLM.from_pretrained(setup / "student").eval(), teacher, eval_rows),
            heldout_kl(_trained(setup, res)[0], teacher, eval_rows))


def test_two_workers_lower_the_heldout_kl(setup, clean):
    before, after = _reference_kl(setup, clean)
    assert clean["workers"] == 2 and clean["steps"] == 48 and clean["metrics"]["resumed_from"] == 0
    _, history = _trained(setup, clean)
    assert after < 0.8 * before, (before, after)
    assert [h[0] for h in history] == list(range(1, 49))
    # The workers' own measure (each rank its rows, all-reduced): `heldout.kl` on the same models and rows.
    m = clean["metrics"]
    assert m["heldout_kl_before"] == pytest.approx(before, rel=1e-5)
    assert m["heldout_kl_after"] == pytest.approx(after, rel=1e-5)


def test_killed_worker_resumes_to_the_same_weights(setup, clean, tmp_path):
    """A worker SIGKILLed once a checkpoint is registered: Ray replaces the worker group, which resumes from it."""
    storage = tmp_path / "killed"
    killed: list[int] = []
    killer = threading.Thread(target=_kill_a_worker_after_first_checkpoint, args=(storage, killed),
                              daemon=True)
    killer.start()
    resumed = _run(setup, storage)
    killer.join(timeout=5)
    assert killed, "no training worker was found to kill"
    assert resumed["metrics"]["resumed_from"] > 0, "the run did not restart from a checkpoint"
    student, _ = _trained(setup, clean)
    student2, history2 = _trained(setup, resumed)
    assert [h[0] for h in history2] == list(range(1, 49)), "steps repeated or skipped"
    # "before" was measured by the first worker group (on the untrained student) and came back with the checkpoint
    assert resumed["metrics"]["heldout_kl_before"] == clean["metrics"]["heldout_kl_before"]
    assert resumed["metrics"]["heldout_kl_after"] == pytest.approx(clean["metrics"]["heldout_kl_after"], rel=1e-4)
    for (n, a), b in zip(student.state_dict().items(), student2.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=n)


def _kill_a_worker_after_first_checkpoint(storage: Path, killed: list[int]) -> None:
    """SIGKILL one training worker once Ray has registered a checkpoint (its manager snapshot names one): reports
    still queued in a worker are lost with it."""
    deadline = time.time() + 240
    while time.time() < deadline and not any("checkpoint_" in _read(f) for f in
                                             storage.glob("*/checkpoint_manager_snapshot.json")):
        time.sleep(0.05)
    for pid in _train_worker_pids():
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        return


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _train_worker_pids() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().decode(errors="ignore")
            except OSError:
                continue
            if cmd.startswith("ray::RayTrainWorker"):  # Ray sets the actor's process title
                pids.append(int(proc.name))
    return sorted(pids)


def test_cached_full_vocabulary_logits_train_like_the_online_teacher(setup, clean, tmp_path):
    """On 1 worker (batches are global: the same training), whose held-out KL loads the teacher for the measure."""
    p = _params(teacher_logits="cached", cached_top_n=64)
    rows = load_rows(setup / "train.parquet")
    teacher = AutoModelForCausalLM.from_pretrained(setup / "teacher").eval()
    path = write_cached_logits(teacher, rows, visited_rows(p, len(rows), SEQ), tmp_path / "cache", top_n=64,
                               temperature=1.0, progress=False)
    assert CachedTeacher(path).meta["top_n"] == 64 == teacher.config.vocab_size
    cached = _run(setup, tmp_path / "cached", teacher_logits="cached", cached_top_n=64, cached_logits=path,
                  workers=1)
    assert cached["run_name"] != clean["run_name"] and cached["workers"] == 1
    (_, h_online), (_, h_cached) = _trained(setup, clean), _trained(setup, cached)
    # The history keeps 6 decimals.
    np.testing.assert_allclose([h[2] for h in h_cached], [h[2] for h in h_online], rtol=1e-4, atol=2e-6)
    before, after = _reference_kl(setup, cached)
    assert cached["metrics"]["heldout_kl_before"] == pytest.approx(before, rel=1e-5)
    assert cached["metrics"]["heldout_kl_after"] == pytest.approx(after, rel=1e-5)


# ---------------------------------------------------------------- the stage, run the way users run it
STAGE_ENV = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "token"}  # token: see test_ray_cluster.py
RAY_CHATTER = ("Failed to query Ray Train Controller", "core_worker", "TrainController", "RayTrainWorker",
               "Checkpoint successfully created", "Started a local Ray instance", "Token authentication")


def _stage_repo(setup, root: Path, **distill) -> Path:
    """A pipeline directory with the fixture's models and data and the smoke params (distill overridden)."""
    (root / "models").mkdir(parents=True)
    shutil.copytree(setup / "student", root / "models/student")
    _word_tokenizer().save_pretrained(root / "models/student")  # the stage copies it next to the distilled weights
    (root / "models/teacher").symlink_to(setup / "teacher")
    (root / "data/prepared/packed").mkdir(parents=True)
    for split in ("train", "eval"):
        (root / f"data/prepared/packed/{split}.parquet").symlink_to(setup / f"{split}.parquet")
    params = yaml.safe_load((REPO / "tests/smoke_params.yaml").read_text())
    params["distill"].update(distill)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(64)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")


def no_teacher_in_driver(stage: str) -> str:
    """`python -c` code running `stage` with every from_pretrained of the teacher's checkpoint raising: its driver
    must load none (stages.distill; stages.teacher_logits on its Ray path)."""
    return f"""
import runpy, sys
from pathlib import Path
from transformers import PreTrainedModel
teacher, real = Path("models/teacher").resolve(), PreTrainedModel.from_pretrained.__func__
def guarded(cls, path, *args, **kwargs):
    if Path(path).resolve() == teacher:
        raise AssertionError(f"the driver loaded the teacher {{path}}")
    return real(cls, path, *args, **kwargs)
PreTrainedModel.from_pretrained = classmethod(guarded)
print("teacher loads guarded", file=sys.stderr)
runpy.run_module({stage!r}, run_name="__main__", alter_sys=True)
"""


def _stage(repo: Path, guard: bool = False, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *(["-c", no_teacher_in_driver("stages.distill")] if guard else ["-m", "stages.distill"])],
                          cwd=repo, capture_output=True, text=True, env={**STAGE_ENV, **env}, timeout=600)


def test_stage_shows_a_progress_bar_keeps_ray_in_a_log_and_reproduces_the_weights(setup, clean, tmp_path):
    """The stage (joining the fixture's Ray, as with RAY_ADDRESS) with the params of `clean`: its terminal shows the
    bar and none of Ray's chatter, Ray's logs are in the run's ray.log, the metrics hold no wall-clock figure, and
    the distilled weights are bit-identical to the `clean` run's, trained by other worker processes; its driver
    never loads the teacher, and the held-out KLs are the workers'."""
    import ray

    repo = _stage_repo(setup, tmp_path / "repo", **_params().model_dump())
    proc = _stage(repo, guard=True, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "teacher loads guarded" in out
    assert (f"[distill] held-out KL(teacher || student) before training = "
            f"{clean['metrics']['heldout_kl_before']:.4f} over 256 tokens") in out, out[-3000:]
    assert re.search(r"distill: 100%\|.*\| 6\.14k/6\.14k \[.*tok/s, loss=0\.\d{4}\]", out), out[-2000:]
    assert not [c for c in RAY_CHATTER if c in out], out[-3000:]
    ray_log = Path(re.search(r"Ray's logs: (\S+)", out).group(1))
    assert ray_log.parent.parent == repo / ".distill_runs" and out.count("Ray's logs:") == 1
    assert "RayTrainWorker" in ray_log.read_text() and "\x1b[" not in ray_log.read_text()
    metrics = json.loads((repo / "metrics/distill.json").read_text())
    assert "tokens_per_s" not in metrics and metrics["run_name"] == clean["run_name"]
    assert [metrics[f"heldout_kl_{k}"] for k in ("before", "after")] == [
        round(clean["metrics"][f"heldout_kl_{k}"], 6) for k in ("before", "after")]
    assert json.loads((repo / "timings/distill.json").read_text())["tokens_per_s"] > 0
    distilled = AutoModelForCausalLM.from_pretrained(repo / "models/distilled").state_dict()
    reference, _ = _trained(setup, clean)
    for name, weight in reference.state_dict().items():
        assert torch.equal(weight, distilled[name]), name


def test_unreachable_ray_address_fails_fast_before_any_model_loads(tmp_path):
    """No models at all here: the stage must stop at the RAY_ADDRESS check, in bounded time, with one line."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(REPO / "tests/smoke_params.yaml", repo / "params.yaml")
    address = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    proc = _stage(repo, RAY_ADDRESS=address)
    assert time.monotonic() - start < 60 and proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and f"RAY_ADDRESS = {address}" in errors[0], proc.stderr[-2000:]


@pytest.mark.parametrize("reply", [None, b"HTTP/1.1 400 Bad Request\r\n\r\n"])
def test_ray_address_that_accepts_but_is_no_ray_head_is_one_bounded_error(reply):
    """A port that accepts and stays silent (ray.init would retry for ever) or answers as another service."""
    import socket
    import threading

    from moe2dense.distill.driver import check_ray_address

    server = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{server.getsockname()[1]}"

    def serve():
        conn, _ = server.accept()
        if reply:
            conn.recv(64)
            conn.sendall(reply)
        time.sleep(3)
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    start = time.monotonic()
    expected = "no Ray head answered within 1 s" if reply is None else "is not a Ray head"
    with pytest.raises(ValueError, match=f"RAY_ADDRESS = {address}: .*{expected}"):
        check_ray_address(address, timeout=1.0)
    assert time.monotonic() - start < 3
    server.close()


@pytest.mark.parametrize("distill, error", [({"batch_size": 3}, "distill.batch_size = 3 sequences per step must "
                                                                 "split evenly over 2 worker(s)"),
                                            ({"device": "cuda"}, "distill.device = cuda, but the Ray cluster "
                                                                 "reports no GPU")])
def test_cluster_checks_fail_before_any_model_loads(setup, ray_cluster, tmp_path, distill, error):
    import ray

    repo = _stage_repo(setup, tmp_path / "repo", **{"workers": 2, **distill})
    proc = _stage(repo, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    assert proc.returncode == 2 and error in proc.stderr, proc.stderr[-2000:]
    assert "Loading weights" not in proc.stderr + proc.stdout and "held-out KL" not in proc.stderr
