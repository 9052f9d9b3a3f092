"""The search loop: time every candidate of every task, check the winner, write the files as it goes.

After each task the progress file (``<out>/tuning_state/progress__<gpu>.json``) and the config file of
the task's family (``<out>/<family>__<gpu>.json``) are rewritten atomically, so the files on disk are
always complete and loadable, whatever stops the run; ``--resume`` skips the tasks the progress file
holds. A candidate that fails to compile or launch (shared memory, registers) is skipped with its error;
a winner that fails the correctness check is dropped for the next fastest that passes.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cascade_kernels import configs
from cascade_kernels.attention import TileConfig

from .space import Task

# A candidate replaces the heuristic only when it is at least this much faster: below it, run-to-run
# noise of do_bench medians would make the choice flip between runs.
MARGIN = 0.02
# The fastest candidates timed a second time (with the heuristic), each keeping its lower time: one timing
# each let a drifting clock decide (on an H200 the heuristic of a decode bucket, timed first, read 0.519
# ms once and 0.461 when timed again, so that a config 7% slower than it won).
FINALISTS = 3
STATE_DIR = "tuning_state"
REPO = Path(__file__).resolve().parents[1]


def environment(gpu: str) -> dict:
    """The file metadata: GPU name, Triton and torch versions, date (UTC) and the repository's commit."""
    import torch
    import triton

    return {"gpu": gpu, "triton": triton.__version__, "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "commit": git_commit()}


def git_commit() -> str:
    """``HEAD``'s sha, with ``+dirty`` when tracked files differ from it; ``unknown`` outside a checkout."""
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + "+dirty" if dirty else sha) or "unknown"


@dataclass
class Progress:
    """Results so far: ``results[family][bucket key]`` holds the winner and its timings, or why there is none."""

    path: Path
    meta: dict
    results: dict = field(default_factory=dict)

    @classmethod
    def start(cls, path: Path, meta: dict, resume: bool) -> "Progress":
        if not resume or not path.exists():
            return cls(path, meta)
        try:
            doc = json.loads(path.read_text())
            old, results = doc["meta"], doc["results"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: cannot resume from it ({e}); run without --resume to start afresh") from None
        for name in ("gpu", "triton", "torch"):
            if old.get(name) != meta[name]:
                raise ValueError(f"{path}: made with {name} {old.get(name)!r}, this run has {meta[name]!r}; "
                                 f"run without --resume to start afresh")
        return cls(path, meta, results)

    def done(self, task: Task) -> bool:
        """Finished with a config; a bucket where every candidate failed is tried again."""
        return bool(self.results.get(task.family, {}).get(task.key, {}).get("config"))

    def record(self, task: Task, result: dict) -> None:
        self.results.setdefault(task.family, {})[task.key] = result

    def save(self, out: Path, family: str) -> Path | None:
        """Write the progress file and ``family``'s config file (once it has a config); returns the latter."""
        configs.atomic_write_json(self.path, {"meta": self.meta, "results": self.results})
        found = {k: r for k, r in self.results.get(family, {}).items() if r.get("config")}
        if not found:
            return None
        meta = {**self.meta, "family": family,
                "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
        return configs.write_configs(
            configs.config_path(family, self.meta["gpu"], out), meta,
            {k: TileConfig(**r["config"]) for k, r in found.items()},
            {k: {n: r[n] for n in ("ms", "heuristic_ms", "batch_ms", "heuristic_batch_ms", "candidates", "failed")
                 if n in r} for k, r in found.items()})


class Log:
    """Lines to stdout (above the progress bar) and to ``tuning_state/log__<gpu>.txt``."""

    def __init__(self, path: Path, bar=None):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a")
        self.bar = bar

    def __call__(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def progress_bar(total: int, enabled: bool = True):
    """tqdm when it is installed and stderr is a terminal, else a counter printed once per task."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None and enabled and sys.stderr.isatty():
        return tqdm(total=total, unit="bucket", mininterval=2.0, dynamic_ncols=True)

    class Counter:
        def __init__(self):
            self.n = 0

        def update(self, k=1):
            self.n += k
            print(f"[{self.n}/{total}]", flush=True)

        def set_postfix_str(self, s):
            pass

        def write(self, line):
            print(line, flush=True)

        def close(self):
            pass

    return Counter()


def _name(c: TileConfig) -> str:
    return (f"m{c.block_m}_n{c.block_n}_w{c.num_warps}_s{c.num_stages}" + ("_pf" if c.prefetch else "")
            + ("_la" if c.lookahead else "") + (f"_x{c.waves}" if c.waves != 2 else ""))


def describe_error(e: Exception) -> str:
    """An error's class and the first line of its message (200 characters at most)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


class DeviceLost(RuntimeError):
    """The device is unusable after an error (e.g. an illegal address): no later timing can be trusted."""


@dataclass
class Summary:
    tuned: int = 0
    skipped: int = 0
    no_config: int = 0
    stopped_by_budget: bool = False
    files: set = field(default_factory=set)


def run(tasks: list[Task], *, out: Path, device, candidates, make_problem, timer, check, deadline: float,
        resume: bool = False, meta: dict, healthy=lambda: True, clock=time.monotonic, bar: bool = True,
        cleanup=lambda: None, refine=lambda task, best: [], precompile=None) -> Summary:
    """Tune ``tasks`` in order until done or ``clock() >= deadline``; write files after every task.

    ``candidates(task)`` lists configs (the heuristic first), ``refine(task, best)`` a second stage of
    variants of the first stage's fastest config, ``make_problem(task, device)`` the timed input,
    ``timer(problem, config)`` milliseconds (raises if the config cannot run), ``check(task, config,
    device)`` ``None`` or what is wrong, ``healthy()`` whether the device survived an error, and
    ``precompile(work, deadline)`` (optional) compiles every ``(task, candidates)`` pair of ``work``
    before the timing starts, returning ``(seconds, errors)``.
    """
    out = Path(out)
    slug = configs.device_slug(meta["gpu"])
    state = out / STATE_DIR
    progress = Progress.start(state / f"progress__{slug}.json", meta, resume)
    todo = [t for t in tasks if not progress.done(t)]
    summary = Summary(skipped=len(tasks) - len(todo))
    pbar = progress_bar(len(todo), enabled=bar)
    log = Log(state / f"log__{slug}.txt", pbar)
    log(f"tuning {len(todo)} buckets on {meta['gpu']} (triton {meta['triton']}, torch {meta['torch']}); "
        f"{summary.skipped} already done; out {out}")
    checked: dict = {}  # (shape class, config) -> None or the check's complaint
    try:
        if precompile is not None and todo:
            work = [(t, candidates(t)) for t in todo]
            seconds, errors = precompile(work, deadline)
            stopped = errors.pop(None, None)
            log(f"precompiled {sum(len(c) for _, c in work)} (bucket, candidate) pairs in {seconds:.1f} s; "
                f"{len(errors)} failed there (run again when timed)" + (f"; {stopped}" if stopped else ""))
        for task in todo:
            if clock() >= deadline:
                summary.stopped_by_budget = True
                break
            pbar.set_postfix_str(f"{task.family} {task.key}")
            t0 = clock()
            result = _tune(task, device, candidates, refine, make_problem, timer, check, deadline, healthy, clock,
                           checked, log, cleanup)
            if result is None:
                summary.stopped_by_budget = True
                break
            progress.record(task, result)
            written = progress.save(out, task.family)
            if written is not None:
                summary.files.add(written)
            if result.get("config"):
                summary.tuned += 1
                gain = result["heuristic_ms"] / result["ms"] if result.get("heuristic_ms") else float("nan")
                log(f"{task.family} {task.key}: {_name(TileConfig(**result['config']))} {result['ms']:.4f} ms, "
                    f"heuristic {result.get('heuristic_ms') or float('nan'):.4f} ms ({gain:.2f}x)"
                    + _per_batch(result, task) + f"; {result['candidates']} candidates, {result['failed']} failed; "
                    f"{clock() - t0:.1f} s")
            else:
                summary.no_config += 1
                log(f"{task.family} {task.key}: NO CONFIG ({result['reason']}); {clock() - t0:.1f} s")
            pbar.update(1)
    finally:
        pbar.close()
        if summary.stopped_by_budget:
            log("stopped by the time budget: the files hold every finished bucket; rerun with --resume to go on")
        log.file.close()
    return summary


def _tune(task, device, candidates, refine, make_problem, timer, check, deadline, healthy, clock, checked, log,
          cleanup):
    """One task: its result dict, or None when the deadline came first (nothing recorded, resumable)."""
    cands = candidates(task)
    try:
        problem = make_problem(task, device)
    except Exception as e:  # e.g. out of memory: nothing to time on
        cleanup()
        return {"config": None, "reason": f"input: {type(e).__name__}: {str(e)[:200]}"}
    times: dict = {}
    errors: dict = {}

    def time_all(problem, todo) -> bool:
        """Time the configs ``todo`` into ``times``/``errors``; False when the deadline came first."""
        for c in todo:
            if clock() >= deadline:
                return False
            try:
                times[c] = timer(problem, c)
            except Exception as e:
                errors[c] = describe_error(e)
                if c == cands[0]:  # the heuristic should always run: worth the whole traceback
                    log("".join(traceback.format_exception(type(e), e, e.__traceback__))[-2000:])
                if not healthy():
                    raise DeviceLost(f"device unusable after {_name(c)} on {task.key}: {errors[c]}") from e
        return True

    try:
        if not time_all(problem, cands):
            return None
        if times:  # the second stage: variants of the fastest (the split policy)
            extra = [c for c in refine(task, min(times, key=times.get)) if c not in times and c not in errors]
            cands = cands + extra
            if not time_all(problem, extra):
                return None
        # the confirmation: the heuristic and the fastest few again, in one pass, each keeping its lower time
        first = dict(times)
        finalists = dict.fromkeys(c for c in [cands[0], *sorted(first, key=first.get)[:FINALISTS]] if c in first)
        if not time_all(problem, list(finalists)):
            return None
        for c in finalists:
            if c in errors:  # ran once, then failed: not to be trusted
                del times[c]
            else:
                times[c] = _lower(first[c], times[c])
    finally:
        del problem
        cleanup()
    base = cands[0]
    ranked = sorted(times, key=times.get)
    if base in times and ranked and times[ranked[0]] > (1 - MARGIN) * times[base]:
        ranked.remove(base)
        ranked.insert(0, base)  # within the margin of the heuristic: keep the heuristic
    for c in ranked:
        if clock() >= deadline:
            return None
        verdict_key = (task.shape_class, c)
        if verdict_key not in checked:
            try:
                checked[verdict_key] = check(task, c, device)
            except Exception as e:
                checked[verdict_key] = f"{type(e).__name__}: {str(e)[:200]}"
            if checked[verdict_key] is not None:
                log(f"{task.family} {task.key}: {_name(c)} FAILED the correctness check: {checked[verdict_key]}")
        if checked[verdict_key] is None:
            result = {"config": asdict(c), "ms": round(times[c], 5),
                      "heuristic_ms": round(times[base], 5) if base in times else None,
                      "candidates": len(cands), "failed": len(errors), "errors": _errors(errors)}
            for name, config in (("batch_ms", c), ("heuristic_batch_ms", base)):
                per_batch = getattr(times.get(config), "per_batch", None)  # a bucket timed on several batches
                if per_batch is not None:
                    result[name] = [round(t, 5) for t in per_batch]
            return result
    reason = "every candidate failed" if not times else "no candidate passed the correctness check"
    first = next(iter(errors.values()), "")
    return {"config": None, "reason": f"{reason}; first error: {first}" if first else reason,
            "candidates": len(cands), "failed": len(errors), "errors": _errors(errors)}


def _lower(a: float, b: float) -> float:
    """The lower of two timings of one config; batch by batch for a bucket timed on several."""
    if hasattr(a, "per_batch") and hasattr(b, "per_batch"):
        return type(a)(map(min, a.per_batch, b.per_batch))
    return min(a, b)


def _per_batch(result: dict, task: Task) -> str:
    """`` [batch 151: 0.1234 / 0.1301 ms, ...]``: winner / heuristic on each batch, when timed on several."""
    ours, base = result.get("batch_ms"), result.get("heuristic_batch_ms")
    if not ours:
        return ""
    base = base or [float("nan")] * len(ours)
    return " [" + ", ".join(f"batch {b}: {t:.4f} / {h:.4f} ms" for b, t, h in zip(task.batches, ours, base)) + "]"


def _errors(errors: dict) -> dict:
    return {_name(c): text for c, text in errors.items()}
