"""Sweeps as DVC experiments: a list or grid of param overrides is checked, queued (DVC's API:
`Repo.experiments.run(queue=True)`, i.e. `dvc exp run --queue`), run by `dvc exp run --run-all -j N` (each experiment
in its own temporary copy of the repo, at most N at a time, sharing the DVC cache, so unchanged stages are restored
rather than rerun) and collected from `Repo.experiments.show` (`dvc exp show`) into one comparison table. The same
table code tabulates committed results across git branches or revisions (`compare`).

Nothing runs in the user's workspace: experiments are built from the last commit, so uncommitted changes are refused
(they would silently ride along into every experiment), except the results of the user's own finished run, which
`record_baseline` commits on a branch of its own as the sweep's baseline; one sweep at a time holds a lock.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import fcntl
import itertools
import json
import logging
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from moe2dense.env import stage_env
from moe2dense.markdown import table as md_table
from moe2dense.params import ParamsError, parse_params, read_yaml

log = logging.getLogger(__name__)

TARGET = "report"  # experiments stop at the report; the screen is not part of a sweep
LOCK = ".dvc/tmp/moe2dense-sweep.lock"
# screen results table column -> the params key the pipeline reads it from
SCREEN_TO_PARAMS = {"method": "score.method", "experts": "select.experts", "grouping": "group.method",
                    "scaling": "group.scaling"}
# metrics shown in comparison tables (dotted: <metrics file stem>.<key...>), besides the params that differ
HEADLINE = (re.compile(r"^assemble\.parameter_ratio$"),
            re.compile(r"^distill\.heldout_kl_(before|after)$"),
            re.compile(r"^eval\.(student|distilled)\.[^.]+\.(bits_per_byte|acc|acc_mutual_info)$"))

# shorter headers for the markdown tables (the Prefect table artifact keeps the full keys)
LABELS = ((re.compile(r"^eval\.(\w+)\.demo_ppl_(\w+)\.bits_per_byte$"), r"\1 \2 bpb"),
          (re.compile(r"^eval\.(\w+)\.demo_continuation\.acc_mutual_info$"), r"\1 continuation acc_mi"),
          (re.compile(r"^eval\.(\w+)\.(\w+)\.(\w+)$"), r"\1 \2 \3"),
          (re.compile(r"^distill\.heldout_kl_(\w+)$"), r"KL \1"),
          (re.compile(r"^assemble\.parameter_ratio$"), "params / teacher"))
LEGEND = ("bpb: held-out bits per byte (lower is better); KL: held-out KL(teacher ‖ student) before / after "
          "distillation; acc_mi: continuation accuracy by mutual information (higher is better).")


class SweepError(RuntimeError):
    """A sweep that cannot start or did not finish; the message says why and what to do."""


@dataclass(frozen=True)
class Experiment:
    name: str
    overrides: dict[str, Any] = field(hash=False)


# ---------------------------------------------------------------- what to run
def parse_axes(items: Iterable[str]) -> dict[str, list[Any]]:
    """["select.experts=4,8", "group.method=output"] -> {"select.experts": [4, 8], "group.method": ["output"]}.
    Values are YAML scalars (`null`, `0.001`, `true`); a bracketed value is one list-valued param: `freeze=[a,b]`."""
    axes: dict[str, list[Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or not raw.strip():
            raise SweepError(f"sweep axis {item!r}: expected key=value[,value...], e.g. select.experts=4,8")
        raw = raw.strip()
        parts = [raw] if raw.startswith("[") else raw.split(",")
        axes[key.strip()] = [read_yaml(p) for p in parts]
    return axes


def grid(axes: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Cartesian product of the axes, first axis slowest."""
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


def from_screen(results: str | Path, best: int) -> list[dict[str, Any]]:
    """The `best` configurations of a screen's results.parquet as param overrides (grouping `none` = pure
    pruning at K == k, where group.method is ignored and left as it is)."""
    import polars as pl

    path = Path(results)
    if not path.is_file():
        raise SweepError(f"{path} not found: run the screen first (`dvc repro screen` or `python -m flows.screen`)")
    rows = pl.read_parquet(path).sort(["perplexity", "config"]).head(best).to_dicts()
    return [{key: row[col] for col, key in SCREEN_TO_PARAMS.items() if row[col] != "none"} for row in rows]


def experiment_name(overrides: dict[str, Any]) -> str:
    """A readable git-ref-safe name: do_acp-K8-output-uniform for the screen's keys, leaf<value> for others."""
    parts = []
    for key, value in overrides.items():
        leaf = key.rsplit(".", 1)[-1]
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        parts.append(f"K{text}" if key == "select.experts" else text if key in SCREEN_TO_PARAMS.values()
                     else f"{leaf}{text}")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts)).strip("._-")
    return name[:80] or "baseline"


def experiments(configs: list[dict[str, Any]]) -> list[Experiment]:
    out, seen = [], set()
    for overrides in configs:
        name = experiment_name(overrides)
        if name in seen:
            raise SweepError(f"two configurations give the same experiment name {name!r}: {overrides}")
        seen.add(name)
        out.append(Experiment(name, dict(overrides)))
    return out


# ---------------------------------------------------------------- checks before anything is queued
def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for key in parents:
        if not isinstance(node.get(key, {}), dict):
            raise ParamsError(f"sweep: {dotted}: {key!r} is not a section")
        node = node.setdefault(key, {})
    node[leaf] = value


def validate(repo: str | Path, exps: list[Experiment]) -> None:
    """Every experiment's params must validate (unknown keys or methods are named) and pass the same pre-flight as
    a stage (K against the teacher, loss options, calibration passes, ...; lm-eval tasks when it changes them)."""
    from moe2dense.checks import problems

    repo = Path(repo)
    if not exps:
        raise SweepError("the sweep is empty: give a grid (--set key=v1,v2), a configs file or --from-screen N")
    base = read_yaml((repo / "params.yaml").read_text()) or {}
    errors = []
    for exp in exps:
        data = copy.deepcopy(base)
        label = f"{exp.name} ({', '.join(f'{k}={v}' for k, v in exp.overrides.items())})"
        try:
            for key, value in exp.overrides.items():
                _set_dotted(data, key, value)
            params = parse_params(data, origin=f"sweep experiment {exp.name!r}")
        except (ParamsError, ValueError) as err:
            errors.append(f"{label}: {err}")
            continue
        found = problems(params, repo, lm_eval=any(k.startswith("evaluate.") for k in exp.overrides))
        errors += [f"{label}: {p}" for p in found]
    if errors:
        raise SweepError("the sweep has invalid configurations; nothing was queued:\n" + "\n".join(errors))


def dirty_files(repo: str | Path) -> list[str]:
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=normal"], cwd=repo,
                         capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line.strip()]


def _git(repo: str | Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


def pipeline_outputs(repo: str | Path) -> set[str]:
    """The git-tracked files a pipeline run rewrites: dvc.lock and every `cache: false` output (metrics, plots),
    repo-relative (from DVC's own index of dvc.yaml)."""
    root = Path(repo).resolve()
    with dvc_repo(root) as dvc:
        outs = {Path(o.fs_path).relative_to(root).as_posix() for st in dvc.index.stages for o in st.outs
                if not o.use_cache}
    return outs | {"dvc.lock"}


def record_baseline(repo: str | Path, target: str = TARGET) -> str | None:
    """Make the workspace a commit the experiments can start from; return the new branch, or None if it was clean.

    Experiments are built from the last commit plus the uncommitted changes, so any change would silently ride along
    into every experiment. The one change the sweep takes care of itself is the user's own finished run: when the
    workspace differs from HEAD only in pipeline outputs (dvc.lock, metrics/, plots/: e.g. `make demo` on another
    machine than the one that produced the committed results) and DVC finds `target` up to date, those results are
    committed on a new branch `moe2dense-baseline-<HEAD>` (the current branch is left as it was), which becomes the
    sweep's baseline. Anything else (an edited params.yaml, code, a file of one's own, an unfinished run) is refused
    with the files named."""
    dirty = dirty_files(repo)
    if not dirty:
        return None
    outputs = pipeline_outputs(repo)
    ours = [line[3:] for line in dirty if line[:2] == " M" and line[3:] in outputs]
    theirs = [line for line in dirty if line[3:] not in ours]
    if theirs:
        shown = "\n  ".join(theirs[:10]) + (f"\n  ... and {len(theirs) - 10} more" if len(theirs) > 10 else "")
        raise SweepError(
            f"the workspace {repo} has uncommitted changes; experiments are built from the last commit plus these, "
            f"so they would run into every experiment:\n  {shown}\n"
            "commit them (`git add -A && git commit`, with dvc.lock after `dvc repro`) or stash them "
            "(`git stash -u`), then start the sweep again; nothing was queued")
    with dvc_repo(repo) as dvc:
        stale = dvc.status(targets=[target])
    if stale:
        raise SweepError(
            f"the workspace {repo} holds the results of an unfinished run ({', '.join(ours)} changed, and "
            f"{', '.join(sorted(stale))} not up to date): finish it with `dvc repro {target}` (`make demo`), then "
            "start the sweep again, which records them as its baseline; nothing was queued")
    head = _git(repo, "rev-parse", "--short", "HEAD")
    branches = set(_git(repo, "branch", "--format=%(refname:short)").split())
    branch = next(name for name in (f"moe2dense-baseline-{head}" + (f"-{i}" if i else "") for i in itertools.count())
                  if name not in branches)
    identity = [] if _git_identity(repo) else ["-c", "user.name=moe2dense", "-c", "user.email=moe2dense@localhost"]
    _git(repo, "switch", "--quiet", "-c", branch)  # the working tree stays as it is
    _git(repo, "add", "--", *ours)
    _git(repo, *identity, "commit", "--quiet", "-m",
         f"Baseline for a sweep: the results of the pipeline run in this workspace on {head}\n\n"
         f"Recorded by moe2dense's sweep ({', '.join(ours)}).", "--", *ours)
    log.info("recorded this workspace's results (%s) as commit %s on the new branch %s: the sweep's baseline; "
             "`git switch -` returns to the branch you were on", ", ".join(ours), _git(repo, "rev-parse", "--short",
                                                                                     "HEAD"), branch)
    return branch


def _git_identity(repo: str | Path) -> bool:
    return all(subprocess.run(["git", "config", key], cwd=repo, capture_output=True).returncode == 0
               for key in ("user.name", "user.email"))


@contextlib.contextmanager
def sweep_lock(repo: str | Path) -> Iterator[None]:
    """One sweep per repository at a time (each of its experiments runs in its own temporary workspace)."""
    path = Path(repo) / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SweepError(f"another sweep is running in {repo} (lock {path}); wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ---------------------------------------------------------------- DVC
@contextlib.contextmanager
def dvc_repo(repo: str | Path) -> Iterator[Any]:
    """`dvc.repo.Repo`, closed (and its lock released) on the way out; DVC's errors as a SweepError. The calls run
    from the repository's root, the cwd restored after: DVC's experiments API reads `-S` overrides' params files and
    the targets against the cwd (dvc/utils/hydra.py `apply_overrides`), as its CLI does."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    root = Path(repo).resolve()
    if not root.is_dir():
        raise SweepError(f"{root}: no such directory")
    try:
        with contextlib.chdir(root), Repo(str(root)) as opened:
            yield opened
    except DvcException as err:
        raise SweepError(f"DVC, in {root}: {err}") from None


def set_arg(key: str, value: Any) -> str:
    """A `key=value` param override (`dvc exp run -S`) whose value DVC (Hydra's override grammar) parses back to
    `value`."""
    text = json.dumps(value) if not isinstance(value, str) else value
    return f"{key}={text}"


def queue(repo: str | Path, exps: list[Experiment], target: str = TARGET) -> list[str]:
    """Queue the experiments that have no successful run on this baseline, and return those the queue now holds for
    this sweep: the newly queued plus any left queued or running by an interrupted sweep (not queued twice). A
    repeated sweep queues only what is missing or failed. `Repo.experiments.run(queue=True)`: `dvc exp run --queue`."""
    have = {r["name"]: r["state"] for r in exp_rows(exp_show(repo)) if not r["baseline"] and r["state"] != "failed"}
    to_run = []
    with dvc_repo(repo) as dvc:
        for exp in exps:
            state = have.get(exp.name)
            if state == "success":
                log.info("experiment %s already ran on this baseline; not queued again", exp.name)
                continue
            if state is None:
                dvc.experiments.run(targets=[target], params=[set_arg(k, v) for k, v in exp.overrides.items()],
                                    queue=True, name=exp.name)
                log.info("queued experiment %s", exp.name)
            to_run.append(exp.name)
    return to_run


def run_queue(repo: str | Path, jobs: int, on_line=None, names: Iterable[str] = (), on_done=None) -> None:
    """`dvc exp run --run-all -j jobs`: every queued experiment, at most `jobs` at a time, each in its own temp
    workspace; output lines go to `on_line` (the Prefect log) as they come, and `on_done(n)` (from another thread)
    whenever the number of `names` that finished (succeeded or failed) changes, polled every PROGRESS_POLL_S.
    A subprocess: DVC's API for it (`Repo.experiments.run(run_all=True)`) prints the workers' output to this
    process's console, where it could not reach the run log, and its workers inherit os.environ (stage_env here)."""
    names = set(names)
    poller = _Progress(repo, names, on_done or (lambda n: None)) if names else None
    cmd = [sys.executable, "-m", "dvc", "exp", "run", "--run-all", "-j", str(max(1, jobs))]
    try:
        with subprocess.Popen(cmd, cwd=repo, env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) as proc:
            if poller:
                poller.stop_when_done(proc, len(names))
            for line in proc.stdout:
                if line.strip() and on_line:
                    on_line(line.rstrip())
            rc = proc.wait()
    finally:
        if poller:
            poller.close()
    if rc != 0 and not (poller and poller.stopped_idle):
        raise SweepError(f"`dvc exp run --run-all` failed (exit {rc}); see `dvc queue logs <name>`")


PROGRESS_POLL_S = 5.0  # a look at DVC's queue costs ~20 ms
#: After every experiment of the sweep has finished, how long `dvc exp run --run-all` may take to exit. With -j 2, a
#: queue worker told to shut down by the other (whose queue ran empty) mid-task was seen hanging in celery's warm
#: shutdown after finishing it, holding `--run-all` forever; past this the sweep stops the queue's workers itself.
QUEUE_EXIT_GRACE_S = 60.0


def finished_experiments(repo: str | Path) -> dict[str, str | None]:
    """stash rev -> name of every experiment DVC's queue has finished (succeeded or failed)."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        return {entry.stash_rev: entry.name for entry, _ in dvc_repo.experiments.celery_queue.iter_done()}


class _Progress:
    """Counts the sweep's experiments DVC's queue finishes after now (earlier runs of the same names excluded)."""

    def __init__(self, repo: str | Path, names: set[str], on_done):
        self.repo, self.names, self.on_done = repo, names, on_done
        self.before = set(finished_experiments(repo))
        self.done = 0
        self.stop = threading.Event()
        self.proc, self.total, self.all_done_at, self.stopped_idle = None, 0, None, False
        # the caller's context (Prefect's run and settings, e.g. the API URL of a temporary server, are contextvars)
        self.thread = threading.Thread(target=contextvars.copy_context().run, args=(self._poll,),
                                       name="sweep-progress", daemon=True)
        self.thread.start()

    def _count(self) -> None:
        try:
            done = sum(1 for rev, name in finished_experiments(self.repo).items()
                       if rev not in self.before and name in self.names)
        except Exception as err:  # noqa: BLE001 - a queue DVC is writing to: the next poll reads it
            log.debug("sweep progress: %s", err)
            return
        if done != self.done:
            self.done = done
            try:
                self.on_done(done)
            except Exception as err:  # noqa: BLE001 - a progress display must not fail the sweep
                log.warning("sweep progress not updated: %s", err)

    def stop_when_done(self, proc: subprocess.Popen, total: int) -> None:
        """Stop the queue's workers and `proc` (`dvc exp run --run-all`) if it outlives the sweep's `total`
        experiments by QUEUE_EXIT_GRACE_S (no unbounded wait on a stuck worker)."""
        self.proc, self.total = proc, total

    def _poll(self) -> None:
        while not self.stop.wait(PROGRESS_POLL_S):
            self._count()
            if self.proc is None or self.proc.poll() is not None or self.done < self.total:
                continue
            self.all_done_at = self.all_done_at or time.monotonic()
            if time.monotonic() - self.all_done_at > QUEUE_EXIT_GRACE_S:
                log.warning("all %d experiments finished %.0f s ago but `dvc exp run --run-all` has not exited: "
                            "stopping DVC's queue workers", self.total, time.monotonic() - self.all_done_at)
                self.stopped_idle = True
                self._stop_workers()
                self.proc.terminate()
                return

    def _stop_workers(self) -> None:
        """DVC's own `dvc queue stop --kill`; a worker that does not answer is terminated by its pid file."""
        import os
        import signal

        try:
            with dvc_repo(self.repo) as dvc:
                dvc.experiments.celery_queue.shutdown(kill=True)
        except Exception as err:  # noqa: BLE001 - the pid files below are the fallback
            log.debug("dvc queue stop: %s", err)
        for pid_file in (Path(self.repo) / ".dvc/tmp/exps/celery").glob("*.pid"):
            with contextlib.suppress(ValueError, OSError):
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self._count()


def exp_show(repo: str | Path, *revs: str, all_branches: bool = False) -> list[Any]:
    """`dvc exp show` through DVC's API (`Repo.experiments.show`, dvc/repo/experiments/show.py): one ExpState per
    commit (HEAD, the given revisions, or every branch head), its experiments under it."""
    with dvc_repo(repo) as dvc:
        return dvc.experiments.show(revs=list(revs) or None, all_branches=all_branches, hide_workspace=True)


def _record(state: Any, baseline: bool, baseline_rev: str, state_name: str = "success") -> dict[str, Any]:
    from dvc.utils.flatten import flatten

    data = state.data
    params, metrics = {}, {}
    for result in (data.params if data else {}).values():
        params.update(flatten(result.get("data") or {}))
    for path, result in (data.metrics if data else {}).items():  # keyed <file stem>.<key...>: one name per metric
        metrics.update(flatten({Path(path).stem: result.get("data") or {}}))
    return {"name": state.name or state.rev[:7], "rev": state.rev[:7], "baseline": baseline,
            "baseline_rev": baseline_rev[:7], "state": state_name, "params": params, "metrics": metrics}


def exp_rows(states: list[Any]) -> list[dict[str, Any]]:
    """One record per commit (baseline) and per experiment on it, from `exp_show`'s ExpStates: name, rev, state
    (queued | running | failed | success), flat params and metrics."""
    rows = []
    for commit in states:
        rows.append(_record(commit, True, commit.rev))
        for exp in commit.experiments or []:
            state = exp.executor.state if exp.executor else "success"
            rows += [_record(run, False, commit.rev, state) for run in exp.revs]
    return rows


def columns(rows: list[dict], params: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """Param columns (those given plus any that differ between rows) and the headline metric columns present."""
    keys = list(params)
    for key in sorted({k for r in rows for k in r["params"]}):
        if key not in keys and len({json.dumps(r["params"].get(key)) for r in rows}) > 1:
            keys.append(key)
    metric_keys = sorted({k for r in rows for k in r["metrics"] if any(p.match(k) for p in HEADLINE)})
    return keys, metric_keys


def table(rows: list[dict], params: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Flat records (name, rev, params..., metrics...) ready for a Prefect table artifact or markdown."""
    pkeys, mkeys = columns(rows, params)
    return [{"name": r["name"], "rev": r["rev"], **{k: r["params"].get(k) for k in pkeys},
             **{k: r["metrics"].get(k) for k in mkeys}} for r in rows]


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def label(column: str) -> str:
    for pattern, repl in LABELS:
        if pattern.match(column):
            return pattern.sub(repl, column)
    return column


def markdown(records: list[dict[str, Any]], title: str, note: str = "") -> str:
    if not records:
        return f"# {title}\n\nNothing to compare.\n"
    cols = list(records[0])
    lines = [f"# {title}", ""] + ([note, ""] if note else [])
    lines += md_table([label(c) for c in cols], ([_cell(r.get(c)) for c in cols] for r in records))
    if any(label(c) != c for c in cols):
        lines += ["", LEGEND]
    return "\n".join(lines) + "\n"


def sweep_rows(repo: str | Path, names: Iterable[str]) -> list[dict]:
    """The baseline (HEAD) and the named experiments on it, from `dvc exp show`."""
    rows = exp_rows(exp_show(repo))
    order = {n: i for i, n in enumerate(names)}
    head = [r for r in rows if r["baseline"]][:1]
    found = [r for r in rows if not r["baseline"] and r["name"] in order and r["state"] == "success"]
    missing = set(order) - {r["name"] for r in found}
    if missing:
        raise SweepError(f"experiment(s) {', '.join(sorted(missing))} did not finish; see `dvc queue logs <name>` "
                         "and `dvc exp show`")
    return head + sorted(found, key=lambda r: order[r["name"]])
