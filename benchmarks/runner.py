"""The loop every suite shares: check each implementation against the float64 reference, then time it.

A suite module (``benchmarks/suites/*.py``) provides ``NAME``, ``REQUIRES`` (our public API it needs),
``METRIC`` (``"bytes"`` or ``"flops"``: which rate is compared with its ceiling; a ``metric(case)``
function overrides it per case), ``cases(quick)``,
``check_cases(quick)``, ``build(case, ctx)``, ``reference(data)``, ``work(case, shape)`` and
``impls(ctx)``: a list of ``(name, factory)``, where ``factory(data)`` returns an :class:`Impl` or
raises :class:`Unavailable`. Ours come first; a row's ratio is its time over the row named ``"ours"``.

An implementation is timed only if it matched the reference on every check case where it applies; one
that fails is reported with its error and never timed. Errors are caught per implementation and per
case: a failing peer or suite is reported and skipped, it never stops the run.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
import traceback
from dataclasses import dataclass, field

import torch

from .layout import FULL_SHAPE, QUICK_SHAPE, Shape
from .timing import measure, plan_ms

# bf16 kernels against a float64 reference (METHOD.md: bf16 lands between 1e-3 and 1e-2).
O_REL_TOL = 2e-2
LSE_ABS_TOL = 2e-2


class Unavailable(Exception):
    """This implementation does not apply here (not installed, no CUDA, layout it cannot take)."""


@dataclass
class Impl:
    """One implementation bound to one case's data.

    ``run()`` is what is timed; ``finish(run())`` gives ``(o [N, Hq, D], lse [N, Hq] natural log or
    None)`` for the check only, so layout shuffles and base conversions stay out of the timing.
    ``plan()``, if any, redoes the host-side planning and is timed separately by wall clock.
    ``context()`` wraps check, planning and timing (e.g. a config switch); validation is switched off
    while timing.
    """

    run: object
    finish: object = None
    plan: object = None
    context: object = contextlib.nullcontext
    note: str = ""


@dataclass(frozen=True)
class Case:
    name: str
    params: dict


@dataclass(frozen=True)
class Work:
    """What a case must do at least: bytes moved (each input read once, each output written once),
    FLOPs, and which bandwidth ceiling the bytes are held against (``"read"`` or ``"copy"``)."""

    bytes: float
    flops: float
    bandwidth: str = "read"


@dataclass
class Row:
    suite: str
    case: str
    impl: str
    us: float
    us_runs: tuple
    spread: float
    tflops: float
    tbps: float
    frac_of_ceiling: float
    floor_us: float
    plan_ms: float | None
    method: str
    x_ours: float | None = None
    note: str = ""


@dataclass
class Ctx:
    """What a run shares: device, mode, head shape, ceilings, deadline and the log."""

    device: torch.device
    quick: bool
    ceilings: object
    deadline: float
    peers_without_ours: bool = False
    log: object = print
    notes: dict = field(default_factory=dict)  # suite -> list of notes for the report

    @property
    def shape(self) -> Shape:
        return QUICK_SHAPE if self.quick else FULL_SHAPE

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()

    def note(self, suite: str, text: str) -> None:
        self.log(f"  note: {text}")
        self.notes.setdefault(suite, []).append(text)


def free() -> None:
    """Drop garbage and cached device blocks between cases, so each case starts from a clean pool."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def no_validation():
    """Switch off our value checks (device-to-host copies) while timing; restore after."""
    import cascade_kernels as ck

    if not (hasattr(ck, "validation_enabled") and hasattr(ck, "set_validation")):
        yield
        return
    prev = ck.validation_enabled()
    ck.set_validation(False)
    try:
        yield
    finally:
        ck.set_validation(prev)


def _errors(got, ref) -> tuple[float, float]:
    """``(||o - ref|| / ||ref||, max |lse - ref|)`` on the host in float64; lse error None if not given."""
    o, lse = got
    ref_o, ref_lse = ref
    o = o.detach().to("cpu", torch.float64)
    if o.shape != ref_o.shape:
        raise ValueError(f"output shape {tuple(o.shape)}, expected {tuple(ref_o.shape)}")
    if not torch.isfinite(o).all():
        return math.inf, math.inf
    rel = float((o - ref_o).norm() / ref_o.norm().clamp_min(1e-30))
    lse_err = None
    if lse is not None:
        lse = lse.detach().to("cpu", torch.float64).reshape(ref_lse.shape)
        fin = torch.isfinite(ref_lse)
        if not torch.equal(fin, torch.isfinite(lse)):
            return rel, math.inf
        lse_err = float((lse[fin] - ref_lse[fin]).abs().max()) if fin.any() else 0.0
    return rel, lse_err


def check_impl(name, factory, checks, ctx, suite) -> tuple[bool, str]:
    """Run ``factory`` on every check case where it applies and compare with the reference.

    Returns ``(passed, text)``; not applicable anywhere counts as not passed, with the reason.
    """
    results, reasons = [], []
    for data, ref in checks:
        try:
            impl = factory(data)
        except Unavailable as e:
            reasons.append(str(e))
            continue
        except Exception as e:
            return False, f"setup failed: {type(e).__name__}: {str(e)[:300]}"
        try:
            with impl.context():
                out = impl.run()
                got = impl.finish(out) if impl.finish else out
                rel, lse_err = _errors(got, ref)
        except Exception as e:
            return False, f"check run failed: {type(e).__name__}: {str(e)[:300]}"
        finally:
            del impl
        lse_text = "not returned" if lse_err is None else f"{lse_err:.1e}"
        if not (rel <= O_REL_TOL and (lse_err is None or lse_err <= LSE_ABS_TOL)):
            return False, (f"FAILED check: o rel err {rel:.2e} (tol {O_REL_TOL}), "
                           f"lse abs err {lse_text} (tol {LSE_ABS_TOL})")
        results.append(f"o {rel:.1e}, lse {lse_text}")
    if not results:
        return False, "not available: " + "; ".join(sorted(set(reasons)))
    na = f"; n/a on a check case: {'; '.join(sorted(set(reasons)))}" if reasons else ""
    return True, "check ok (" + "; ".join(results) + ")" + na


def time_impl(suite, case, name, impl, work, ctx) -> Row:
    """Warm up, time planning and the run of one implementation on one case, and make its row."""
    with impl.context():
        impl.run()  # warm-up: compilation, module loading, handle creation stay out of the numbers
        p_ms = plan_ms(impl.plan) if impl.plan is not None else None
        with no_validation():
            t = measure(impl.run, quick=ctx.quick)
    c = ctx.ceilings
    sec = t.best_ms * 1e-3
    floor_s = max(work.bytes / c.bandwidth(work.bandwidth), work.flops / c.matmul)
    tbps, tflops = work.bytes / sec / 1e12, work.flops / sec / 1e12
    metric = suite.metric(case) if hasattr(suite, "metric") else suite.METRIC
    frac = (tflops * 1e12 / c.matmul) if metric == "flops" else (tbps * 1e12 / c.bandwidth(work.bandwidth))
    return Row(suite.NAME, case.name, name, t.best_ms * 1e3, tuple(m * 1e3 for m in t.ms), t.spread,
               tflops, tbps, frac, floor_s * 1e6, p_ms, t.method, note=" ".join(x for x in (impl.note, t.note) if x))


def run_suite(suite, ctx, only_impls=None, on_case=None) -> list[Row]:
    """Check, then time, every implementation of ``suite`` on each of its cases. Returns the rows;
    ``on_case(rows so far)`` is called after every case (a child process saves them there)."""
    import cascade_kernels as ck

    ctx.log(f"\n=== suite {suite.NAME} ===")
    missing = [n for n in suite.REQUIRES if not hasattr(ck, n)]
    if missing:
        if not ctx.peers_without_ours:
            ctx.note(suite.NAME, f"skipped: cascade_kernels has no {', '.join(missing)} yet")
            return []
        ctx.note(suite.NAME, f"cascade_kernels has no {', '.join(missing)} yet: peers only")
    impls = [(n, f) for n, f in suite.impls(ctx) if only_impls is None or n in only_impls]

    checks = []
    for case in suite.check_cases(ctx.quick):
        data = suite.build(case, ctx)
        checks.append((data, suite.reference(data)))
    passed = {}
    for name, factory in impls:
        ok, text = check_impl(name, factory, checks, ctx, suite)
        passed[name] = ok
        if ok:
            ctx.log(f"  {name}: {text}")
        else:
            ctx.note(suite.NAME, f"{name}: {text}")
    del checks
    free()

    rows, not_applicable = [], {}
    for case in suite.cases(ctx.quick):
        if ctx.seconds_left() < 0:
            ctx.note(suite.NAME, f"{case.name}: skipped, time budget spent")
            continue
        ctx.log(f"  case {case.name}")
        try:
            data = suite.build(case, ctx)
        except Exception as e:
            ctx.note(suite.NAME, f"{case.name}: building the case failed: {type(e).__name__}: {str(e)[:300]}")
            free()
            continue
        work = suite.work(case, ctx.shape)
        case_rows = []
        for name, factory in impls:
            if not passed.get(name):
                continue
            try:
                impl = factory(data)
            except Unavailable as e:
                ctx.log(f"    {name}: n/a ({e})")
                not_applicable.setdefault((name, str(e)), []).append(case.name)
                continue
            except Exception as e:
                ctx.note(suite.NAME, f"{case.name} / {name}: setup failed: {type(e).__name__}: {str(e)[:300]}")
                free()
                continue
            try:
                row = time_impl(suite, case, name, impl, work, ctx)
                case_rows.append(row)
                ctx.log(f"    {name:<22} {row.us_runs[0]:10.1f} {row.us_runs[1]:10.1f} us  "
                        f"{row.tbps:7.3f} TB/s {row.tflops:8.1f} TFLOP/s  {row.frac_of_ceiling:6.1%} of ceiling"
                        + (f"  plan {row.plan_ms:.2f} ms" if row.plan_ms is not None else ""))
            except Exception as e:
                ctx.note(suite.NAME, f"{case.name} / {name}: failed while timing: {type(e).__name__}: {str(e)[:300]}")
                ctx.log(traceback.format_exc(limit=3))
            finally:
                del impl
                free()
        ours = next((r for r in case_rows if r.impl == "ours"), None)
        for r in case_rows:
            r.x_ours = r.us / ours.us if ours else None
        rows += case_rows
        del data
        free()
        if on_case is not None:
            on_case(rows)
    for (name, reason), names in not_applicable.items():
        ctx.note(suite.NAME, f"{name}: n/a on {', '.join(names)}: {reason}")
    return rows
