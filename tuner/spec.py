"""Study specs: the YAML contract of DESIGN.md as pydantic models.

Every model forbids unknown keys, so a typo is refused before any trial starts, and every error
names the field's path (``search.batch_size.scale``) and what it allows.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from tuner.errors import SpecError


def _admits_number_not_bool(annotation: Any) -> bool:
    """Whether a field takes an int or a float (or None), and not a bool."""
    kinds = set(get_args(annotation)) if get_origin(annotation) in (Union, UnionType) else {annotation}
    return bool(kinds & {int, float}) and bool not in kinds


class _Strict(BaseModel):
    # Infinity passes ``gt=0``: a learning rate range up to .inf made a centre trial of an
    # infinite rate and then an overflow in the sampler, after the study was created.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _bool_is_not_a_number(cls, data: Any) -> Any:
        # Pydantic takes true as 1 and false as 0: ``n_trials: true`` was a budget of one trial.
        for name, value in data.items() if isinstance(data, dict) else ():
            field = cls.model_fields.get(name)
            if isinstance(value, bool) and field is not None and _admits_number_not_bool(field.annotation):
                raise ValueError(f"{name} must be a number, not {str(value).lower()}")
        return data


class _Range(_Strict):
    @model_validator(mode="after")
    def _low_not_above_high(self) -> "_Range":
        if self.low > self.high:  # type: ignore[attr-defined]
            raise ValueError(f"low ({self.low}) must not be above high ({self.high})")  # type: ignore[attr-defined]
        return self


class BatchSizeSpace(_Range):
    """Effective batch size: samples per optimizer step, whatever the hardware."""

    low: int = Field(ge=1)
    high: int = Field(ge=1)
    scale: Literal["pow2", "log", "linear"] = "pow2"

    @model_validator(mode="after")
    def _pow2_has_a_power(self) -> "BatchSizeSpace":
        if self.scale == "pow2" and not self.choices():
            raise ValueError(
                f"no power of two lies between low ({self.low}) and high ({self.high}); "
                "widen the range, or set scale: linear (or log) to search every size in it"
            )
        return self

    def choices(self) -> list[int]:
        """The powers of two in [low, high], for ``scale: pow2``."""
        first = math.ceil(math.log2(self.low))
        return [2**k for k in range(first, int(math.log2(self.high)) + 1) if 2**k >= self.low]


class LearningRateSpace(_Range):
    """The learning rate, optionally searched as a base rate at ``reference_batch_size``."""

    low: float = Field(gt=0)
    high: float = Field(gt=0)
    log: bool = True
    scale_with_batch: Literal["linear", "sqrt", "none"] = "none"
    reference_batch_size: int = Field(default=128, ge=1)


class EpochsSpace(_Range):
    """Epochs per trial, searched on a log scale unless told otherwise: a trial's cost grows
    with its epochs, what it learns much more slowly, so short trials deserve as much of the
    search as long ones."""

    low: int = Field(ge=1)
    high: int = Field(ge=1)
    log: bool = True


class FloatSpace(_Range):
    low: float = Field(ge=0)
    high: float = Field(ge=0)
    log: bool = False

    @model_validator(mode="after")
    def _log_needs_positive(self) -> "FloatSpace":
        if self.log and self.low <= 0:
            raise ValueError("low must be above 0 when log is true")
        return self


ScheduleName = Literal["constant", "ramp", "adaptive"]
# The optimizers that ``tuner.train.loop.make_optimizer`` builds.
OPTIMIZERS = ("sgd", "adamw", "adam")


def known_optimizer(name: str) -> str:
    """Refuse an optimizer the loop does not build: it would train with AdamW instead."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer; allowed: {', '.join(OPTIMIZERS)}")
    return name


def _repeated(values: list[str]) -> str | None:
    """The first value listed more than once, if any."""
    return next((value for value in values if values.count(value) > 1), None)


def listed_once(choices: list[str]) -> list[str]:
    """Refuse a choice listed twice: the sampler would draw it more often than the others,
    which no spec asks for that way."""
    choice = _repeated(choices)
    if choice is not None:
        raise ValueError(f"{choice!r} is listed twice; the sampler would draw it twice as often")
    return choices


class OptimizerSpace(_Strict):
    choices: Annotated[list[Annotated[str, AfterValidator(known_optimizer)]], AfterValidator(listed_once)] = Field(
        min_length=1
    )


class MomentumSpace(FloatSpace):
    """At a momentum of 1 an update never forgets a gradient: training cannot settle."""

    high: float = Field(ge=0, lt=1)


class BatchScheduleSpace(_Strict):
    """How the effective batch changes over a trial's epochs; with several choices the sampler
    searches them. ``ramp`` multiplies the batch by ``ramp_factor`` at each fraction of the epochs
    in ``ramp_at``; ``adaptive`` follows the measured gradient noise scale."""

    choices: Annotated[list[ScheduleName], AfterValidator(listed_once)] = Field(default=["constant"], min_length=1)
    ramp_factor: int = Field(default=2, ge=2)
    ramp_at: list[Annotated[float, Field(gt=0, lt=1)]] = Field(default=[0.5, 0.75], min_length=1)


class SearchSpace(_Strict):
    batch_size: BatchSizeSpace
    lr: LearningRateSpace
    epochs: EpochsSpace
    optimizer: OptimizerSpace | None = None
    weight_decay: FloatSpace | None = None
    momentum: MomentumSpace | None = None
    batch_schedule: BatchScheduleSpace | None = None


# Metric names that are lowered, not raised: left to the default direction, maximize, such a
# metric would be searched for its worst, and the study would look like it works.
_LOWER_IS_BETTER = re.compile(r"loss|error|time|mse|mae|perplexity", re.IGNORECASE)


class Objective(_Strict):
    metric: str
    direction: Literal["maximize", "minimize"] = "maximize"

    @model_validator(mode="after")
    def _loss_is_not_maximized_unasked(self) -> "Objective":
        if "direction" not in self.model_fields_set and _LOWER_IS_BETTER.search(self.metric):
            raise ValueError(
                f"direction is not given, and its default, maximize, would maximize {self.metric!r}; "
                "write direction: minimize (or direction: maximize if that is meant)"
            )
        return self


def distinct_metrics(objectives: list[Objective]) -> list[Objective]:
    """Refuse a metric named twice: the trial tables and the note show each metric once, by name,
    so one of its objectives would go unseen."""
    metric = _repeated([objective.metric for objective in objectives])
    if metric is not None:
        raise ValueError(f"metric {metric!r} is named twice; each objective measures another metric")
    return objectives


class Budget(_Strict):
    """Shared by every worker of the study: finished trials and/or wall time since the first."""

    n_trials: int | None = Field(default=None, ge=1)
    timeout_s: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _some_limit(self) -> "Budget":
        if self.n_trials is None and self.timeout_s is None:
            raise ValueError("set n_trials, timeout_s or both")
        return self


# NumPy's seeds, which every Optuna sampler takes: the range a sampler's seed must lie in.
SEED_LIMIT = 2**32


# The samplers that search only after start-up trials of their own (``tuner.study.make_sampler``).
STARTUP_SAMPLERS = ("tpe", "gp", "cmaes")


class SamplerSpec(_Strict):
    name: Literal["tpe", "random", "gp", "cmaes", "nsga2", "qmc"] = "tpe"
    seed: int | None = Field(default=None, ge=0, lt=SEED_LIMIT)
    multivariate: bool = True
    n_startup_trials: int | None = Field(default=None, ge=0)
    # "centre": the first trial takes the middle of every range (see tuner.space.centre).
    first_trial: Literal["centre", "sampler"] = "centre"

    @model_validator(mode="after")
    def _startup_trials_where_taken(self) -> "SamplerSpec":
        # Random, NSGA-II and QMC sampling take no start-up count: it would change nothing.
        if self.n_startup_trials is not None and self.name not in STARTUP_SAMPLERS:
            raise ValueError(
                f"n_startup_trials is for samplers {', '.join(STARTUP_SAMPLERS)}; {self.name!r} has no start-up trials"
            )
        return self


class MedianPrunerSpec(_Strict):
    name: Literal["median"]
    n_startup_trials: int = Field(default=5, ge=0)
    # The first epochs of a trial that are never pruned.
    n_warmup_steps: int = Field(default=0, ge=0)


class PercentilePrunerSpec(_Strict):
    name: Literal["percentile"]
    percentile: float = Field(default=25.0, ge=0, le=100)
    n_startup_trials: int = Field(default=5, ge=0)
    n_warmup_steps: int = Field(default=0, ge=0)


class HalvingPrunerSpec(_Strict):
    name: Literal["sha"]
    min_resource: int = Field(default=1, ge=1)
    reduction_factor: int = Field(default=3, ge=2)


class HyperbandPrunerSpec(_Strict):
    name: Literal["hyperband"]
    min_resource: int = Field(default=1, ge=1)
    reduction_factor: int = Field(default=3, ge=2)


class PatientPrunerSpec(_Strict):
    name: Literal["patient"]
    patience: int = Field(default=2, ge=0)
    min_delta: float = Field(default=0.0, ge=0)


class ThresholdPrunerSpec(_Strict):
    name: Literal["threshold"]
    lower: float | None = None
    upper: float | None = None
    n_warmup_steps: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _has_a_bound(self) -> "ThresholdPrunerSpec":
        if self.lower is None and self.upper is None:
            raise ValueError("set lower, upper or both: the metric values that stop a trial")
        if self.lower is not None and self.upper is not None and self.lower > self.upper:
            raise ValueError(f"lower ({self.lower}) must not be above upper ({self.upper})")
        return self


class NoPrunerSpec(_Strict):
    name: Literal["none"]


PrunerSpec = Annotated[
    Union[
        MedianPrunerSpec,
        PercentilePrunerSpec,
        HalvingPrunerSpec,
        HyperbandPrunerSpec,
        PatientPrunerSpec,
        ThresholdPrunerSpec,
        NoPrunerSpec,
    ],
    Field(discriminator="name"),
]


_PRUNER_NAMES = ", ".join(
    repr(name) for model in get_args(get_args(PrunerSpec)[0]) for name in get_args(model.model_fields["name"].annotation)
)


class StudySpec(_Strict):
    name: str = Field(min_length=1)
    workload: str = Field(min_length=1)
    objective: Objective | None = None
    objectives: Annotated[list[Objective], AfterValidator(distinct_metrics)] | None = Field(default=None, min_length=1)
    budget: Budget
    search: SearchSpace
    sampler: SamplerSpec = SamplerSpec()
    # Median, not Hyperband: Hyperband shows TPE only the trials of a trial's own bracket, a third
    # of a small study (benchmarks/search_efficiency.py).
    pruner: PrunerSpec = MedianPrunerSpec(name="median")
    max_retries: int = Field(default=2, ge=0)
    precision: Literal["fp32", "bf16"] = "fp32"
    measure_noise_scale: bool = False
    # With a decay (0.99), a trial is evaluated, pruned and kept on the moving average of its
    # weights (``tuner.train.averaging``). Off by default: it takes a second copy of the weights
    # in device memory, and it helped digits_cnn, not breast_cancer_mlp (benchmarks/README.md,
    # "A sixth round").
    ema_decay: float = Field(default=0.0, ge=0, lt=1)
    # The PNG costs about 0.1 s of CPU per trial: nothing next to minutes of training, most of
    # a trial's coordination cost when trials last a few seconds. The JSON curve is always kept.
    learning_curve_png: bool = True

    @model_validator(mode="after")
    def _one_objective_form(self) -> "StudySpec":
        if (self.objective is None) == (self.objectives is None):
            raise ValueError("set exactly one of objective or objectives")
        if len(self.all_objectives) > 1 and self.sampler.name == "cmaes":
            raise ValueError(
                "sampler 'cmaes' takes one objective; with several use tpe, gp, nsga2, qmc or random"
            )
        return self

    @model_validator(mode="after")
    def _pruner_has_an_epoch_to_prune_at(self) -> "StudySpec":
        # A trial is never pruned at its last epoch (its compute is spent), so a pruner that waits
        # until the longest trial's last epoch would never stop one, without a word.
        last = self.search.epochs.high
        pruner = self.pruner
        # Each key with the most that leaves an epoch before that one (none at all where
        # epochs.high is 1: then only a value other than the default is refused).
        waits = [
            ("n_warmup_steps", getattr(pruner, "n_warmup_steps", 0), max(last - 2, 0)),
            ("min_resource", getattr(pruner, "min_resource", 1), max(last - 1, 1)),
        ]
        for key, value, most in waits:
            if key in pruner.model_fields_set and value > most:
                raise ValueError(
                    f"pruner.{key} ({value}) leaves no epoch to prune at: no trial is pruned at its last epoch, "
                    f"and the longest trains search.epochs.high ({last}); use at most {most}"
                )
        return self

    @property
    def all_objectives(self) -> list[Objective]:
        return [self.objective] if self.objective is not None else list(self.objectives or [])

    @property
    def directions(self) -> list[str]:
        return [objective.direction for objective in self.all_objectives]

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain data, as stored inside the study."""
        return self.model_dump(mode="json", exclude_none=True)


def _describe(error: dict[str, Any]) -> str:
    path = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    # A dataclass such as ``Hyperparameters`` reports an unknown key as an unexpected argument.
    if error["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        return f"spec field '{path}' is not a known field"
    if error["type"] == "missing":
        return f"spec field '{path}' is required"
    if error["type"] == "union_tag_invalid":  # a pruner's name, say
        context = error["ctx"]
        return f"spec field '{path}.name': must be one of {context['expected_tags']} (got {context['tag']!r})"
    if error["type"] == "union_tag_not_found":
        # Pydantic names neither the field nor its values here; the pruner is the one such union.
        return f"spec field '{path}.name' is required: one of {_PRUNER_NAMES}"
    if error["type"] in ("model_type", "dataclass_type", "model_attributes_type"):
        # Pydantic would name the class (Hyperparameters, BatchSchedule), which the user never sees,
        # or, for the pruner, ask for "a valid dictionary or object to extract fields from".
        message = "must be a mapping of fields (key: value)"
    where = f"spec field '{path}'" if path else "spec"
    given = error.get("input")
    shown = "" if isinstance(given, (dict, list)) or given is None else f" (got {given!r})"
    return f"{where}: {message}{shown}{_one_value_hint(error)}"


def _one_value_hint(error: dict[str, Any]) -> str:
    """How to write a search field given as one value (``epochs: 10``, ``optimizer: sgd``), the
    way to fix a hyperparameter, which only a range or a list of one does."""
    given = error.get("input")
    if error["type"] != "model_type" or len(error["loc"]) != 2 or error["loc"][0] != "search" or isinstance(given, bool):
        return ""
    if isinstance(given, (int, float)):
        return f"; to search {given} alone, write {{low: {given}, high: {given}}}"
    if isinstance(given, str):
        return f"; to search {given} alone, write {{choices: [{given}]}}"
    return ""


M = TypeVar("M", bound=BaseModel)


def parse_model(model: type[M], data: Any, *, source: str) -> M:
    """Validate plain data as ``model``; raise SpecError naming each bad field."""
    if data is None:
        raise SpecError(f"{source} is empty.")
    if not isinstance(data, dict):
        raise SpecError(f"{source} must be a mapping of fields (key: value), not {data!r:.60}.")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        details = "; ".join(_describe(item) for item in error.errors())
        raise SpecError(f"{source} is invalid: {details}.") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping, where YAML would keep
    the last without a word and a spec's mistake would pass unseen."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            # A merge key (<<: *anchor) is YAML's own, flattened by the SafeLoader; its keys may be
            # given again, which is what it is for.
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"found the key {key!r} twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_model(model: type[M], path: str | Path) -> M:
    """Read a YAML file (safe, a key given twice refused) and validate it as ``model``."""
    path = Path(path)
    if path.is_dir():
        raise SpecError(f"Spec file {str(path)!r} is a folder; name a YAML file in it.")
    if not path.is_file():
        raise SpecError(f"Spec file {str(path)!r} does not exist.")
    try:
        # From the open file, so that YAML's error marks name it.
        with path.open(encoding="utf-8") as stream:
            data = yaml.load(stream, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as error:
        raise SpecError(f"{path} is not valid YAML: {error}") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path} is not a text file (UTF-8 YAML).") from None
    return parse_model(model, data, source=str(path))


def parse_spec(data: Any, *, source: str = "spec") -> StudySpec:
    """Validate plain data as a spec; raise SpecError naming each bad field."""
    return parse_model(StudySpec, data, source=source)


def load_spec(path: str | Path) -> StudySpec:
    """Read a YAML spec file and validate it."""
    return load_model(StudySpec, path)
