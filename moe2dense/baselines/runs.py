"""Where each baseline's models, metrics and curves live: one table, read by the stages, the report and the tests
(dvc.yaml spells the same paths; tests/test_baselines.py keeps the two equal)."""
from __future__ import annotations

from dataclasses import dataclass

from moe2dense import methods as M

TEACHER = "models/teacher"
DENSE_TEACHER = "models/dense_teacher"
STUDENT = "models/student"  # the M2D student: its config sets every baseline's architecture or parameter count


@dataclass(frozen=True)
class Run:
    name: str
    teacher: str  # the model it is distilled from

    @property
    def initial(self) -> str:
        """The baseline before distillation (pruned dense teacher, or re-initialised student)."""
        return f"models/baseline_{self.name}"

    @property
    def distilled(self) -> str:
        return f"models/distilled_{self.name}"

    @property
    def metrics(self) -> str:
        return f"metrics/baselines/distill_{self.name}.json"

    @property
    def loss_plot(self) -> str:
        return f"plots/baselines/distill_{self.name}_loss.csv"

    @property
    def timings(self) -> str:
        return f"distill_{self.name}"


_TEACHERS = {"d2d": DENSE_TEACHER, "random_ffn": TEACHER, "random_init": TEACHER}
RUNS: dict[str, Run] = {name: Run(name, _TEACHERS[name]) for name in M.names("baseline")}


def eval_name(model_dir: str) -> str:
    """models/<name> -> the name evaluate and the report use (`eval/baselines/<name>.json`)."""
    return model_dir.removeprefix("models/")


#: The models `python -m stages.evaluate` runs for the baselines: the dense teacher, each baseline before and after.
EVAL_MODELS: tuple[str, ...] = (eval_name(DENSE_TEACHER),
                                *(eval_name(d) for r in RUNS.values() for d in (r.initial, r.distilled)))
