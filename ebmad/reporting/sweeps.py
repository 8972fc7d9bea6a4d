"""The jobs of a finished sweep folder, grouped into replicates, and the published numbers to compare with.

A job's ``seed`` is a replicate, not a setting: jobs are grouped by (setting without seed, model, category)
and summarized as mean, sample standard deviation (ddof=1) and n over their completed seeds. Expected jobs
come from the sweep's ``multirun.yaml`` (the swept ``data.category`` and ``seed`` values) and otherwise
only from the jobs found; an Optuna search expects exactly the trials that ran (each trial is a setting).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PUBLISHED_CSV = Path(__file__).resolve().parent.parent / "reference" / "published.csv"
CATEGORY_KEY = "data.category"
MODEL_KEY = "model"
SEED_KEY = "seed"
MODEL_KEYS = (MODEL_KEY, "recipe")  # what picks the method: a column of the tables, not a setting
NOT_SETTINGS = (CATEGORY_KEY, SEED_KEY, *MODEL_KEYS)
INVOCATIONS = "invocations.jsonl"  # one line per multirun command that ran in the sweep folder
SWEEP_FUNCTIONS = ("choice", "range", "interval", "tag", "glob")
MODEL_ORDER = ("ebm", "draem", "ssae")


# ----------------------------------------------------------------------------------------- published
@dataclass(frozen=True)
class Protocol:
    """What a published number was measured under (the columns of ``published.csv``; None/"": not recorded)."""

    dataset: str = ""  # mvtec_ad | visa | mvtec_ad2 | ...
    image_size: int | None = None  # training and evaluation resolution (px)
    train_steps: int | None = None  # training length in optimizer steps, or
    train_epochs: float | None = None  # in epochs over the training images
    backbone: str = ""  # the pretrained backbone (PatchCore, PaDiM: model.backbone); "" = none


LENGTH_SHARE = 0.9  # a run trained at least this share of the paper's length counts as trained as long
LAYOUT_DATASETS = {"mvtec": "mvtec_ad"}  # data.layout -> the dataset name of published.csv (others: as is)


@dataclass
class Published:
    """Published numbers {(model, category or "mean", metric): value}; ``over``: the categories of a mean;
    ``protocols``: what each model's numbers were measured under, for the comparability rule
    (:meth:`not_comparable`)."""

    values: dict[tuple[str, str, str], float]
    over: dict[tuple[str, str], tuple[str, ...]]
    protocols: dict[tuple[str, str], Protocol] = field(default_factory=dict)  # {(model, metric): protocol}

    def get(self, model: str, category: str, metric: str) -> float | None:
        return self.values.get((model, category, metric))

    def has(self, model: str, metric: str) -> bool:
        return any(k[0] == model and k[2] == metric for k in self.values)

    def mean_over(self, model: str, metric: str, categories: Iterable[str]) -> tuple[float | None, str]:
        """The published mean over exactly ``categories`` and, when there is none, why (else "")."""
        cats = list(categories)
        per = [self.get(model, c, metric) for c in cats]
        if cats and all(v is not None for v in per):
            return sum(per) / len(per), ""  # type: ignore[arg-type]
        mean = self.get(model, "mean", metric)
        if mean is None:
            return None, ""
        over = self.over.get((model, metric), ())
        if over and set(cats) == set(over):
            return mean, ""
        n_over = f"{len(over)} categories" if over else "its categories"
        return None, (f"published {model} {metric} is {mean:.3f} as the mean over {n_over} only; this sweep "
                      f"completed {len(cats)} ({', '.join(cats) or 'none'}), so no mean difference is printed")  # fmt: skip

    def not_comparable(self, model: str, metric: str, jobs: Iterable[Job]) -> str:
        """Why the completed ``jobs`` of ``model`` do not match the protocol of its published ``metric``
        (data, resolution, training length), or "" when they do. A protocol field the CSV leaves empty
        cannot be matched: it is named too."""
        proto = self.protocols.get((model, metric))
        if proto is None:
            return ""
        why: dict[str, None] = {}
        for j in jobs:
            if j.done and j.model == model:
                for reason in protocol_mismatch(j, proto):
                    why[reason] = None
        return "; ".join(why)


def _optional(r: dict[str, str], key: str, kind: type) -> Any:
    text = (r.get(key) or "").strip()
    return kind(text) if text else None


def load_published(path: Path = PUBLISHED_CSV) -> Published:
    """Read ``published.csv`` (model, category, metric, value, source, mean_over and the protocol columns
    dataset, image_size, train_steps, train_epochs); a clear error on bad rows."""
    values: dict[tuple[str, str, str], float] = {}
    over: dict[tuple[str, str], tuple[str, ...]] = {}
    protocols: dict[tuple[str, str], Protocol] = {}
    with path.open() as fh:
        for line, r in enumerate(csv.DictReader(fh), start=2):
            try:
                values[(r["model"], r["category"], r["metric"])] = float(r["value"])
                proto = Protocol((r.get("dataset") or "").strip(), _optional(r, "image_size", int),
                                 _optional(r, "train_steps", int), _optional(r, "train_epochs", float),
                                 (r.get("backbone") or "").strip())  # fmt: skip
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{line}: bad published row {r} ({exc})") from exc
            if protocols.setdefault((r["model"], r["metric"]), proto) != proto:
                raise ValueError(f"{path}:{line}: {r['model']} {r['metric']} rows disagree on the protocol "
                                 f"({proto} vs {protocols[(r['model'], r['metric'])]})")  # fmt: skip
            if r["category"] == "mean" and (r.get("mean_over") or "").strip():
                over[(r["model"], r["metric"])] = tuple(r["mean_over"].split())
    return Published(values, over, protocols)


PUBLISHED = load_published()


# ----------------------------------------------------------------------------------------- jobs
@dataclass
class Job:
    folder: Path | None
    category: str
    setting: str
    status: str  # completed | failed | interrupted | incomplete | missing | diverged
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""
    model: str = "ebm"
    headline: dict[str, float] = field(default_factory=dict)  # {metric: the model's headline value}
    untrained: dict[str, float] = field(default_factory=dict)  # the untrained reference's metrics (EBM)
    scores: dict[str, str] = field(
        default_factory=dict
    )  # {"image_auroc": headline score, "pixel_auroc": map}
    seed: str = ""  # the replicate
    config: dict[str, Any] = field(default_factory=dict)  # the resolved config (completed jobs)
    validation: dict[str, float] = field(default_factory=dict)
    objective: float | None = None  # optimized_metric of the job (hyperparameter searches)
    trial: int | None = None  # Hydra job number
    params: dict[str, str] = field(default_factory=dict)  # the setting's swept values
    git: dict[str, Any] = field(default_factory=dict)
    device: dict[str, Any] = field(default_factory=dict)
    recipe: str = ""  # the model/recipe override, e.g. ebm_tiny
    examples: Path | None = None  # <run>/examples.npz when written
    trains_on: list[str] | None = None  # the validation kinds its training also draws (recorded by the run)
    global_step: int | None = None  # optimizer steps trained (recorded by the run)
    n_train: int | None = None  # training images

    @property
    def done(self) -> bool:
        return self.status == "completed"


def run_dataset(config: dict[str, Any]) -> str:
    """The dataset a run used, named as in ``published.csv``: ``synthetic`` for the generated categories."""
    data = config.get("data") or {}
    if data.get("synthetic"):
        return "synthetic"
    layout = str(data.get("layout") or "?")
    return LAYOUT_DATASETS.get(layout, layout)


def protocol_mismatch(job: Job, proto: Protocol) -> list[str]:
    """How a completed job differs from a published protocol in what matters: data, resolution, training
    length (``train_steps`` 0: fitted without training steps), pretrained backbone ([] = comparable)."""
    cfg = job.config or {}
    data = cfg.get("data") or {}
    out = []
    dataset = run_dataset(cfg)
    if not proto.dataset:
        out.append("the paper's dataset is not recorded")
    elif dataset != proto.dataset:
        out.append(f"{dataset} data, the paper's {proto.dataset}")
    size = data.get("image_size")
    if proto.image_size is None:
        out.append("the paper's resolution is not recorded")
    elif size != proto.image_size:
        out.append(f"{size} px, the paper's {proto.image_size} px")
    steps = job.global_step
    if proto.train_steps is None and proto.train_epochs is None:
        out.append("the paper's training length is not recorded")
    elif not isinstance(steps, int):
        out.append("the run's training length is not recorded")
    elif proto.train_steps is not None:
        if steps < LENGTH_SHARE * proto.train_steps:
            out.append(f"{steps} steps, the paper's {proto.train_steps}")
    else:
        batch, n = data.get("batch_size"), job.n_train
        epochs = steps * batch / n if isinstance(batch, int) and isinstance(n, int) and n > 0 else None
        if epochs is None:
            out.append("the run's epochs are not recorded")
        elif epochs < LENGTH_SHARE * proto.train_epochs:  # type: ignore[operator]
            out.append(f"{epochs:.0f} epochs, the paper's {proto.train_epochs:g}")
    backbone = (cfg.get("model") or {}).get("backbone")
    if proto.backbone and backbone != proto.backbone:
        out.append(f"{backbone or 'no'} backbone, the paper's {proto.backbone}")
    return out


@dataclass
class Sweep:
    """A sweep folder: its jobs (missing ones included) and what the sweep was."""

    folder: Path
    jobs: list[Job]
    search: bool = False  # a hyperparameter search (Optuna): trials, objective, ranking
    direction: str = "maximize"
    n_trials: int | None = None
    objective: str | None = None  # optimized_metric
    command: str = ""
    invocations: list[tuple[str, int]] = field(default_factory=list)  # (command, jobs it ran), in order
    categories: list[str] = field(default_factory=list)
    seeds: list[str] = field(default_factory=list)

    @property
    def settings(self) -> list[str]:
        return sorted({j.setting for j in self.jobs})

    def ranked_trials(self) -> list[Job]:
        """Trials by objective (best first; trials without one last, by job number)."""
        sign = -1.0 if self.direction == "maximize" else 1.0
        return sorted(self.jobs, key=lambda j: (j.objective is None or math.isnan(j.objective),
                                                sign * (j.objective or 0.0), j.trial or 0))  # fmt: skip


def _split(override: str) -> tuple[str, str]:
    """``"+key=value"`` -> ``("key", "value")``."""
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _multirun(sweep_dir: Path) -> dict[str, Any]:
    """The sweep's Hydra config: ``multirun.yaml`` (basic sweeper), else a job's ``.hydra/hydra.yaml`` (the
    Optuna sweeper writes no multirun.yaml; its task overrides are then that trial's, less the sampled keys)."""
    if (sweep_dir / "multirun.yaml").is_file():
        return (_read_yaml(sweep_dir / "multirun.yaml") or {}).get("hydra") or {}
    for job in sorted(sweep_dir.glob("*/.hydra/hydra.yaml")):
        hydra = (_read_yaml(job) or {}).get("hydra") or {}
        params = (hydra.get("sweeper") or {}).get("params") or {}
        if params:  # else the job's overrides say nothing about what the sweep varied
            overrides = dict(hydra.get("overrides") or {})
            overrides["task"] = [o for o in overrides.get("task") or [] if _split(str(o))[0] not in params]
            return {**hydra, "overrides": overrides}
    return {}


def _job_overrides(folder: Path) -> list[str]:
    overrides = _read_yaml(folder / ".hydra" / "overrides.yaml")
    if isinstance(overrides, list):
        return [str(o) for o in overrides]
    return folder.name.split(",") if "=" in folder.name else []


def _job_num(folder: Path) -> int | None:
    hydra = (_read_yaml(folder / ".hydra" / "hydra.yaml") or {}).get("hydra") or {}
    num = (hydra.get("job") or {}).get("num")
    return num if isinstance(num, int) else None


def _sweep_overrides(sweep_dir: Path) -> list[str]:
    """The sweep's command-line overrides and sweeper params, as ``key=value`` strings."""
    hydra = _multirun(sweep_dir)
    items = [str(o) for o in ((hydra.get("overrides") or {}).get("task") or [])]
    params = (hydra.get("sweeper") or {}).get("params") or {}
    return items + [f"{k}={v}" for k, v in params.items()]


def _is_swept(value: str) -> bool:
    return "," in value or value.split("(")[0].strip() in SWEEP_FUNCTIONS


def _swept_keys(sweep_dir: Path) -> set[str] | None:
    """Keys that vary across the sweep's jobs (None when the sweep left no Hydra config)."""
    if not _multirun(sweep_dir):
        return None
    return {key for key, value in map(_split, _sweep_overrides(sweep_dir)) if _is_swept(value)}


def _values(value: str) -> list[str]:
    """``a,b,c`` or ``range(0,3)`` -> the values; [] for other sweep functions."""
    value = value.strip()
    if value.startswith("range(") and value.endswith(")"):
        try:
            return [str(v) for v in range(*(int(float(a)) for a in value[6:-1].split(",")))]
        except ValueError:
            return []
    if "(" in value:
        return []
    return [v.strip() for v in value.split(",") if v.strip()]


def _swept_values(sweep_dir: Path, key: str) -> list[str]:
    for k, value in map(_split, _sweep_overrides(sweep_dir)):
        if k == key:
            return _values(value)
    return []


def expected_categories(sweep_dir: Path) -> list[str]:
    """Categories the sweep was launched with (from multirun.yaml), if recorded."""
    return _swept_values(Path(sweep_dir), CATEGORY_KEY)


def _model_name(override_value: str) -> str:
    """``draem_tiny`` -> ``draem``: config variants of a method report as the method."""
    return override_value.split("_")[0] if override_value else "ebm"


def _headline(res: dict[str, Any]) -> dict[str, float]:
    """The model's headline value of each metric (results.json top-level keys, else the EBM defaults)."""
    m = res.get("metrics", {})
    out = {
        "image_auroc": res.get("image_auroc", m.get("image_auroc/A_std_l2")),
        "pixel_auroc": res.get("pixel_auroc", m.get("pixel_auroc/a_std_l2")),
    }
    for key in ("pixel_ap", "aupro"):
        out[key] = res.get(key, m.get(key))
    return {k: float(v) for k, v in out.items() if isinstance(v, int | float)}


def _objective(res: dict[str, Any], metric: str | None) -> float | None:
    if not metric:
        return None
    value = {**(res.get("metrics") or {}), **(res.get("validation") or {})}.get(metric)
    return float(value) if isinstance(value, int | float) else None


def _read_results(folder: Path) -> dict[str, Any]:
    path = folder / "results.json"
    if not path.is_file():
        return {}
    try:
        res = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        return {"status": "incomplete", "error": f"unreadable {path}: {exc}"}
    return res if isinstance(res, dict) else {"status": "incomplete", "error": f"{path} is not a JSON object"}


def _read_job(folder: Path, sweep_keys: set[str] | None) -> Job:
    overrides = _job_overrides(folder)
    res = _read_results(folder)
    values = dict(map(_split, overrides))
    cfg = res.get("config") or {}
    params = {
        k: v for k, v in values.items() if k not in NOT_SETTINGS and (sweep_keys is None or k in sweep_keys)
    }
    recipe = values.get(MODEL_KEY) or values.get("recipe", "")
    seed = values.get(SEED_KEY, cfg.get(SEED_KEY, ""))
    examples = folder / "examples.npz"
    return Job(
        folder=folder, category=res.get("category") or values.get(CATEGORY_KEY, "?"),
        setting=",".join(f"{k}={v}" for k, v in sorted(params.items())) or "default",
        status=res.get("status", "incomplete"), metrics=res.get("metrics") or {}, error=res.get("error", ""),
        model=res.get("model") or _model_name(recipe), headline=_headline(res),
        untrained=(res.get("reference") or {}).get("untrained", {}),
        scores={"image_auroc": res.get("image_score", "A_std_l2"), "pixel_auroc": res.get("pixel_map", "a_std_l2")},
        seed=str(seed), config=cfg, validation=res.get("validation") or {},
        objective=_objective(res, cfg.get("optimized_metric")), trial=_job_num(folder), params=params,
        git=res.get("git") or {}, device=res.get("device") or {}, recipe=recipe,
        examples=examples if examples.is_file() else None,
        trains_on=(res.get("validation_set") or {}).get("trains_on_validation_kinds"),
        global_step=res.get("global_step"), n_train=res.get("n_train"),
    )  # fmt: skip


def command_of(hydra: dict[str, Any]) -> str:
    """The command line of a multirun from its Hydra config (``hydra.overrides``)."""
    overrides = hydra.get("overrides") or {}
    extra = [str(o) for o in overrides.get("hydra") or [] if o != "hydra.mode=MULTIRUN"]
    task = [str(o) for o in overrides.get("task") or []]
    if not (extra or task):
        return ""
    return " ".join(["python -m ebmad.train -m", *task, *extra])


def _command(sweep_dir: Path) -> str:
    return command_of(_multirun(sweep_dir))


def record_invocation(sweep_dir: Path, hydra: dict[str, Any]) -> None:
    """Append this multirun's command and start time to ``<sweep>/invocations.jsonl`` (a sweep resumed or
    extended by a second command keeps the first: ``multirun.yaml`` holds only the last)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with (sweep_dir / INVOCATIONS).open("a") as fh:
        fh.write(json.dumps({"started": time.time(), "command": command_of(hydra)}) + "\n")


def invocations(sweep_dir: Path, jobs: Iterable[Job]) -> list[tuple[str, int]]:
    """(command, jobs it ran) of every invocation that wrote a job's ``results.json``, in order: a job counts
    for the last invocation started before its results were written."""
    path = sweep_dir / INVOCATIONS
    if not path.is_file():
        return []
    starts = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            starts.append((float(rec["started"]), str(rec.get("command") or "")))
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash
    starts.sort()
    counts = [0] * len(starts)
    for j in jobs:
        res = j.folder / "results.json" if j.folder else None
        if res is None or not res.is_file():
            continue
        written = res.stat().st_mtime
        i = max((k for k, (t, _) in enumerate(starts) if t <= written), default=None)
        if i is not None:
            counts[i] += 1
    return [(cmd, n) for (_, cmd), n in zip(starts, counts, strict=True) if n]


def models_of(jobs: Iterable[Job]) -> list[str]:
    found = {j.model for j in jobs}
    return [m for m in MODEL_ORDER if m in found] + sorted(found - set(MODEL_ORDER))


def load_sweep(sweep_dir: str | Path, categories: list[str] | None = None) -> Sweep:
    """Every job of a sweep folder with its status; expected jobs without a folder are added as missing."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep folder {sweep_dir} does not exist")
    swept = _swept_keys(sweep_dir)
    sweep_keys = None if swept is None else swept - set(NOT_SETTINGS)
    jobs: list[Job] = []
    for folder in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        if any(m.exists() for m in (folder / "results.json", folder / "job.json", folder / ".hydra")):
            jobs.append(_read_job(folder, sweep_keys))
    hydra = _multirun(sweep_dir)
    sweeper = hydra.get("sweeper") or {}
    search = "optuna" in str(sweeper.get("_target_", "")).lower()
    objective = next(
        (j.config.get("optimized_metric") for j in jobs if j.config.get("optimized_metric")), None
    )
    sweep = Sweep(sweep_dir, jobs, search=search, direction=str(sweeper.get("direction") or "maximize"),
                  n_trials=sweeper.get("n_trials") if search else None, objective=objective,
                  command=_command(sweep_dir), invocations=invocations(sweep_dir, jobs))  # fmt: skip
    sweep.categories = list(categories or expected_categories(sweep_dir)) or list(dict.fromkeys(
        j.category for j in jobs))  # fmt: skip
    sweep.seeds = _swept_values(sweep_dir, SEED_KEY) or sorted(
        {j.seed for j in jobs if j.seed}, key=_seed_key
    )
    if len(sweep.seeds) == 1:  # a failed job's seed (not in its overrides) is the sweep's only seed
        for j in jobs:
            j.seed = j.seed or sweep.seeds[0]
    if not search:  # a search expects exactly its trials: no phantom jobs
        _add_missing(sweep)
    order = {c: i for i, c in enumerate(sweep.categories)}
    seeds = {s: i for i, s in enumerate(sweep.seeds)}
    jobs.sort(key=lambda j: (j.setting, order.get(j.category, len(order)), j.category, j.model,
                             seeds.get(j.seed, len(seeds)), j.seed))  # fmt: skip
    return sweep


def _seed_key(s: str) -> tuple[int, float, str]:
    try:
        return (0, float(s), s)
    except ValueError:
        return (1, 0.0, s)


def _add_missing(sweep: Sweep) -> None:
    jobs = sweep.jobs
    seeds = sweep.seeds or [""]
    for setting in sorted({j.setting for j in jobs}) or ["default"]:
        for model in models_of(j for j in jobs if j.setting == setting) or ["ebm"]:
            have = {(j.category, j.seed) for j in jobs if j.setting == setting and j.model == model}
            have_cat = {c for c, _ in have}
            for cat, seed in itertools.product(sweep.categories, seeds):
                if (cat, seed) in have or (seed == "" and cat in have_cat):
                    continue
                if seed and cat in have_cat and (cat, "") in have:  # a job whose seed is unknown
                    continue
                jobs.append(Job(None, cat, setting, "missing", model=model, seed=seed))


def collect_jobs(sweep_dir: str | Path, categories: list[str] | None = None) -> list[Job]:
    """Every job of a sweep folder with its status; categories without a job are added as missing."""
    return load_sweep(sweep_dir, categories).jobs


# ----------------------------------------------------------------------------------------- statistics
@dataclass
class Stat:
    """Mean, sample standard deviation (ddof=1; None for n < 2) and n of some values."""

    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None


def finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def stat(jobs: Iterable[Job], get: Callable[[Job], float | None]) -> Stat:
    """The statistics of ``get(job)`` over the completed jobs (non-finite values are left out)."""
    return Stat([float(v) for v in (get(j) for j in jobs if j.done) if finite(v)])


@dataclass
class CategoryMean:
    """A model's mean over categories: of the per-category means, and its spread over seeds."""

    mean: float | None
    std: float | None  # sample std over seeds of the per-seed category means (seeds that completed all)
    n_seeds: int
    categories: list[str]  # the categories with a completed value
    n_all: int  # categories expected


def category_mean(jobs: list[Job], get: Callable[[Job], float | None]) -> CategoryMean:
    cats = list(dict.fromkeys(j.category for j in jobs))
    means = {c: stat([j for j in jobs if j.category == c], get).mean for c in cats}
    done = [c for c in cats if means[c] is not None]
    mean = statistics.fmean([means[c] for c in done]) if done else None  # type: ignore[misc]
    per_seed = []
    for seed in dict.fromkeys(j.seed for j in jobs):
        vals = {j.category: get(j) for j in jobs if j.seed == seed and j.done and finite(get(j))}
        if done and all(c in vals for c in done):
            per_seed.append(statistics.fmean([float(vals[c]) for c in done]))  # type: ignore[arg-type]
    std = statistics.stdev(per_seed) if len(per_seed) > 1 else None
    return CategoryMean(mean, std, len(per_seed), done, len(cats))
