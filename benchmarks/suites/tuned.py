"""Tuned suite: our decode, prefill and cascade with tuned configs against the same kernels with heuristic ones.

Needs ``ck.use_tuned_configs(enabled: bool)``, a context manager that chooses between the tuned
configs and the heuristic; until cascade_kernels has it, the suite is skipped with a note. The row
named ``ours`` is the heuristic, so a tuned row's ratio below 1 is the gain from tuning.
"""

from __future__ import annotations

from . import cascade, decode, prefill
from ..runner import Case, Impl, Unavailable

NAME = "tuned"
REQUIRES = ("use_tuned_configs",)
METRIC = "bytes"  # per case: see metric()


def _mark(kind: str, cs: list[Case]) -> list[Case]:
    return [Case(f"{kind}_{c.name}", {**c.params, "kind": kind}) for c in cs]


def cases(quick: bool) -> list[Case]:
    dec = [c for c in decode.cases(quick) if quick or c.name in ("b32_ctx4096", "b1_ctx131072")]
    pre = [c for c in prefill.cases(quick) if quick or c.name in ("4x4096_p16", "chunked_8x512_p16")]
    cas = cascade.cases(quick)[:1] if quick else [c for c in cascade.cases(quick)
                                                  if c.name in ("p32768_s256_b64", "p32768_s1024_b256")]
    return _mark("decode", dec) + _mark("prefill", pre) + _mark("cascade", cas)


def check_cases(quick: bool) -> list[Case]:
    return (_mark("decode", decode.check_cases(quick)) + _mark("prefill", prefill.check_cases(quick)[1:])
            + _mark("cascade", cascade.check_cases(quick)))


SUITES = {"decode": decode, "prefill": prefill, "cascade": cascade}


def _suite(case: Case):
    return SUITES[case.params["kind"]]


def metric(case: Case) -> str:
    return _suite(case).METRIC


def build(case: Case, ctx):
    data = _suite(case).build(case, ctx)
    data.kind = case.params["kind"]
    return data


def reference(data):
    return SUITES[data.kind].reference(data)


def work(case: Case, shape):
    return _suite(case).work(case, shape)


def _ours(tuned: bool):
    def factory(data) -> Impl:
        import cascade_kernels as ck

        if not hasattr(ck, "use_tuned_configs"):
            raise Unavailable("no ck.use_tuned_configs")
        with ck.use_tuned_configs(tuned):  # a plan made here already holds its configs
            impl = SUITES[data.kind].ours(data)
        impl.context = lambda: ck.use_tuned_configs(tuned)
        impl.note = "tuned configs" if tuned else "heuristic configs"
        family = "decode" if data.kind == "cascade" else data.kind  # a cascade uses both families
        if tuned and not ck.configs.config_path(family, ck.configs.device_name(data.q.device)).is_file():
            impl.note = "no tuned configs for this GPU: heuristic"
        return impl

    return factory


def impls(ctx) -> list:
    return [("ours", _ours(False)), ("ours-tuned", _ours(True))]
