"""Tuned launch configs (``cascade_kernels.configs``) and the tuning script (``python -m tuning``).

What is held: file and bucket names; a written file loads back with its metadata apart from its buckets;
the lookup takes the nearest bucket (same head-dim class and dtype, nearest group, page size, lengths);
a missing file or bucket gives the heuristic with one warning; ``CASCADE_KERNELS_CONFIG_DIR`` points
the kernels at another folder; a corrupt or mismatched file is rejected naming the file (or, on the
serving path, ignored with a warning); ``use_tuned_configs`` switches to the heuristic; the search loop
picks the fastest correct candidate, stops on its time budget and resumes; ``--dry-run`` runs the whole
script under the interpreter. On a GPU, every shipped config for it passes the correctness check.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import cascade_kernels as ck
import cascade_kernels.attention as attention_module
import cascade_kernels.cascade as cascade_module
import reference
from cascade_kernels import configs
from cascade_kernels._triton import interpreter_problem
from cascade_kernels.attention import TileConfig, heuristic_config
from conftest import DEVICE, assert_close

ROOT = Path(__file__).resolve().parents[1]
FAKE_GPU = "NVIDIA Fake GPU 80GB"
META = dict(triton="3.6.0", torch="2.11.0", date="2025-01-01T00:00:00Z", commit="0" * 40)
A, B, C, D, E = (TileConfig(16, 32, 4, 2), TileConfig(16, 64, 4, 5), TileConfig(16, 128, 8, 2),
                 TileConfig(16, 32, 4, 6), TileConfig(16, 16, 2, 2, prefetch=True))
BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def fresh_lookup(monkeypatch):
    """No env override, no cached files or warnings from another test, the switch on."""
    monkeypatch.delenv(configs.ENV_VAR, raising=False)
    configs.clear_cache()
    with configs.use_tuned_configs(True):
        yield
    configs.clear_cache()


def write(directory, family, gpu, entries, **meta):
    return configs.write_configs(configs.config_path(family, gpu, directory),
                                 {**META, "family": family, "gpu": gpu, **meta}, entries)


def lookup(family="decode", device=FAKE_GPU, head_dim=128, group=4, page_size=16, dtype=BF16, q_len=1,
           kv_len=1024):
    return configs.config_for(family, device, head_dim=head_dim, group=group, page_size=page_size, dtype=dtype,
                              q_len=q_len, kv_len=kv_len)


def no_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    assert not caught, [str(w.message) for w in caught]
    return result


# ------------------------------------------------------------------------------------------------------------
# Names


@pytest.mark.parametrize("name, slug", [("NVIDIA H200", "nvidia_h200"),
                                        ("NVIDIA H100 80GB HBM3", "nvidia_h100_80gb_hbm3"),
                                        ("AMD Instinct MI300X", "amd_instinct_mi300x"), ("cpu", "cpu")])
def test_device_slug_and_file_name(name, slug, tmp_path):
    assert configs.device_slug(name) == slug
    assert configs.config_path("prefill", name, tmp_path) == tmp_path / f"prefill__{slug}.json"
    assert configs.config_path("decode", name).parent == configs.PACKAGE_DIR


def test_env_var_names_the_folder(monkeypatch, tmp_path):
    assert configs.config_dir() == configs.PACKAGE_DIR
    monkeypatch.setenv(configs.ENV_VAR, str(tmp_path))
    assert configs.config_path("decode", "NVIDIA H200") == tmp_path / "decode__nvidia_h200.json"


def test_bucket_keys():
    assert configs.bucket_key(128, 4, 16, BF16, 1, 8192) == "d128_g4_p16_bf16_q1_kv8k"
    assert configs.bucket_key(96, 1, 1, torch.float16, 4096, 100) == "d128_g1_p1_fp16_q4k_kv100"  # head-dim class
    assert configs.bucket_key(64, 8, 256, torch.float32, 0, 1536) == "d64_g8_p256_fp32_q1_kv1536"
    b = configs.parse_bucket("d256_g8_p256_fp16_q512_kv64k")
    assert b == configs.Bucket(256, 8, 256, "fp16", 512, 65536) and b.key == "d256_g8_p256_fp16_q512_kv64k"
    for bad in ("d128_g4_p16_bf16_q1", "d96_g4_p16_bf16_q1_kv8k", "d128_g0_p16_bf16_q1_kv8k", "x",
                "d128_g4_p16_i8_q1_kv1"):
        with pytest.raises(ValueError, match="bad bucket key"):
            configs.parse_bucket(bad)


# ------------------------------------------------------------------------------------------------------------
# Files


def test_written_file_loads_back_with_meta_apart(tmp_path):
    path = write(tmp_path, "decode", FAKE_GPU, {"d128_g4_p16_bf16_q1_kv1k": A, "d64_g8_p1_fp16_q1_kv64k": E})
    doc = json.loads(path.read_text())
    assert set(doc) == {"meta", "configs", "timings"}
    assert set(doc["meta"]) == {"family", "gpu", "triton", "torch", "date", "commit"}
    assert doc["configs"]["d64_g8_p1_fp16_q1_kv64k"] == {"block_m": 16, "block_n": 16, "num_warps": 2,
                                                         "num_stages": 2, "prefetch": True, "waves": 2, "tma": True,
                                                         "lookahead": False}
    loaded = configs.load_configs(path)
    assert loaded.family == "decode" and loaded.meta["gpu"] == FAKE_GPU
    assert loaded.configs == {configs.parse_bucket("d128_g4_p16_bf16_q1_kv1k"): A,
                              configs.parse_bucket("d64_g8_p1_fp16_q1_kv64k"): E}
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write leaves no temporary file


def _valid_doc():
    return {"meta": {**META, "family": "prefill", "gpu": FAKE_GPU},
            "configs": {"d128_g4_p16_bf16_q512_kv4k": {"block_m": 128, "block_n": 64, "num_warps": 8,
                                                       "num_stages": 2}}}


def _set(path, value):
    def edit(doc):
        *parents, last = path
        for p in parents:
            doc = doc[p]
        if value is KeyError:
            del doc[last]
        else:
            doc[last] = value
    return edit


BUCKET = ("configs", "d128_g4_p16_bf16_q512_kv4k")
CORRUPT = {
    "not json": (None, "not valid JSON"),
    "a list": (lambda doc: [doc], "expected a JSON object"),
    "no meta": (_set(("meta",), KeyError), "missing top-level key 'meta'"),
    "no configs": (_set(("configs",), KeyError), "missing top-level key 'configs'"),
    "bucket beside meta": (_set(("d128_g4_p16_bf16_q1_kv1k",), {}), "unknown top-level keys"),
    "meta without gpu": (_set(("meta", "gpu"), KeyError), "meta.gpu must be a non-empty string"),
    "meta date a number": (_set(("meta", "date"), 20250101), "meta.date must be a non-empty string"),
    "meta for decode": (_set(("meta", "family"), "decode"), "meta.family is 'decode' but the file is for 'prefill'"),
    "meta for another gpu": (_set(("meta", "gpu"), "NVIDIA H200"), "meta.gpu is 'NVIDIA H200'"),
    "configs a list": (_set(("configs",), []), "'configs' must be an object"),
    "bad key": (_set(("configs", "d128-g4"), {}), "bad bucket key 'd128-g4'"),
    "block_m a string": (_set((*BUCKET, "block_m"), "128"), "block_m must be an int"),
    "block_n a bool": (_set((*BUCKET, "block_n"), True), "block_n must be an int"),
    "block_n not a power of two": (_set((*BUCKET, "block_n"), 48), "block_n must be a power of two"),
    "no num_stages": (_set((*BUCKET, "num_stages"), KeyError), "missing 'num_stages'"),
    "unknown field": (_set((*BUCKET, "blockm"), 64), "unknown fields ['blockm']"),
    "prefetch a string": (_set((*BUCKET, "prefetch"), "yes"), "prefetch must be a bool"),
    "num_warps 3": (_set((*BUCKET, "num_warps"), 3), "num_warps must be a power of two"),
    "waves 0": (_set((*BUCKET, "waves"), 0), "waves must be an int in [1, 16]"),
    "waves a float": (_set((*BUCKET, "waves"), 2.0), "waves must be an int in [1, 16]"),
    "tma not a bool": (_set((*BUCKET, "tma"), 1), "tma must be a bool"),
    "lookahead a string": (_set((*BUCKET, "lookahead"), "on"), "lookahead must be a bool"),
    "lookahead with prefetch": (lambda doc: doc["configs"][BUCKET[1]].update(prefetch=True, lookahead=True),
                                "lookahead and prefetch exclude each other"),
}


def test_optional_fields_default(tmp_path):
    """A config without ``prefetch`` and ``waves`` (files from before the split policy was tuned) loads
    with the defaults; ``waves`` sets the automatic split count's target."""
    path = configs.config_path("prefill", FAKE_GPU, tmp_path)
    path.write_text(json.dumps(_valid_doc()))
    (config,) = configs.load_configs(path).configs.values()
    assert config == TileConfig(128, 64, 8, 2, prefetch=False, waves=2, tma=True, lookahead=False)
    from cascade_kernels.attention import choose_splits, num_sms

    sms = num_sms(torch.device(DEVICE))
    assert choose_splits(sms, 1 << 20, 64, torch.device(DEVICE), waves=4) == 4
    assert choose_splits(sms, 1 << 20, 64, torch.device(DEVICE)) == 2
    # in whole rounds (prefill), a count that would spill into another round of programs gives way to
    # the most that fit in one; decode keeps the count that reaches the target
    slots = 4 * sms
    for programs, splits, decode_splits in ((slots // 3 + 1, 2, 3), (slots // 2 + 1, 1, 2), (slots // 4, 4, 4)):
        assert choose_splits(programs, 1 << 20, 64, torch.device(DEVICE), 4, whole_rounds=True) == splits, programs
        assert choose_splits(programs, 1 << 20, 64, torch.device(DEVICE), 4) == decode_splits, programs


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_or_mismatched_file_is_rejected_naming_it(case, tmp_path):
    edit, message = CORRUPT[case]
    path = configs.config_path("prefill", FAKE_GPU, tmp_path)
    if edit is None:
        path.write_text('{"meta": {"gpu": ')
    else:
        doc = _valid_doc()
        doc = edit(doc) or doc
        path.write_text(json.dumps(doc))
    with pytest.raises(ValueError) as info:
        configs.load_configs(path)
    assert str(path) in str(info.value) and message in str(info.value), str(info.value)


def test_decode_bucket_needs_one_query(tmp_path):
    path = configs.config_path("decode", FAKE_GPU, tmp_path)
    doc = _valid_doc()
    doc["meta"]["family"] = "decode"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="must have q1"):
        configs.load_configs(path)


def test_write_refuses_what_load_would_reject(tmp_path):
    with pytest.raises(ValueError, match="meta.triton must be a non-empty string"):
        configs.write_configs(tmp_path / "prefill__x.json", {"family": "prefill", "gpu": "x"}, {})
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------------------
# The lookup


@pytest.fixture
def table(tmp_path, monkeypatch):
    monkeypatch.setenv(configs.ENV_VAR, str(tmp_path))
    write(tmp_path, "decode", FAKE_GPU, {"d128_g4_p16_bf16_q1_kv1k": A, "d128_g4_p16_bf16_q1_kv64k": B,
                                         "d128_g8_p16_bf16_q1_kv1k": C, "d128_g4_p256_bf16_q1_kv1k": D,
                                         "d64_g4_p16_bf16_q1_kv8k": E})
    return tmp_path


@pytest.mark.parametrize("query, expected", [
    (dict(), A),                                   # exact bucket
    (dict(kv_len=2000), A),                        # lengths: nearest in log scale
    (dict(kv_len=20000), B),
    (dict(kv_len=10 ** 6), B),
    (dict(group=16), C),                           # nearest group
    (dict(group=2, kv_len=64 * 1024), B),          # group first, then lengths
    (dict(page_size=128), D),                      # nearest page size, log scale
    (dict(page_size=1), A),
    (dict(head_dim=96), A),                        # head-dim class 128
    (dict(head_dim=64, group=1, page_size=1, kv_len=3), E),  # the only d64 bucket
])
def test_nearest_bucket(table, query, expected):
    assert no_warnings(lambda: lookup(**query)) == expected


@pytest.mark.parametrize("query", [dict(dtype=torch.float16), dict(head_dim=256), dict(head_dim=32),
                                   dict(dtype=torch.float32)])
def test_no_bucket_for_head_dim_or_dtype_warns_once_and_uses_the_heuristic(table, query):
    args = dict(dict(head_dim=128, group=4, dtype=BF16), **query)
    with pytest.warns(UserWarning, match="has no decode config"):
        assert lookup(**query) == heuristic_config("decode", args["head_dim"], args["group"], args["dtype"], 16)
    no_warnings(lambda: lookup(**query))


@pytest.mark.parametrize("head_dim, group, dtype, page_size, expected", [
    (128, 4, BF16, 16, TileConfig(16, 16, 1, 6, waves=4)),          # one page per tile, one warp
    (64, 8, torch.float16, 256, TileConfig(16, 16, 1, 6, waves=4)),
    (128, 32, BF16, 32, TileConfig(32, 16, 2, 6, waves=4)),         # one warp per 16 query rows
    (128, 4, BF16, 7, TileConfig(16, 64, 4, 5)),                    # tiles would cross pages
    (128, 4, BF16, None, TileConfig(16, 64, 4, 5)),
    (256, 4, BF16, 16, TileConfig(16, 32, 4, 2)),                   # wide rows: the small-tile config
    (128, 4, torch.float32, 16, TileConfig(16, 32, 4, 2)),
])
def test_decode_heuristic(head_dim, group, dtype, page_size, expected):
    assert heuristic_config("decode", head_dim, group, dtype, page_size) == expected


def test_missing_file_warns_once_and_uses_the_heuristic(tmp_path, monkeypatch):
    monkeypatch.setenv(configs.ENV_VAR, str(tmp_path))
    with pytest.warns(UserWarning, match=r"no tuned prefill configs for 'NVIDIA Fake GPU 80GB' .*python -m tuning"):
        assert lookup("prefill", q_len=512) == heuristic_config("prefill", 128, 4, BF16, 16)
    assert no_warnings(lambda: lookup("prefill", q_len=7, group=8)) == heuristic_config("prefill", 128, 8, BF16, 16)
    # on the CPU (the interpreter) the heuristic is the expected choice: no warning
    assert no_warnings(lambda: lookup("decode", device="cpu")) == heuristic_config("decode", 128, 4, BF16, 16)


def test_bad_file_on_the_serving_path_warns_once_and_uses_the_heuristic(tmp_path, monkeypatch):
    monkeypatch.setenv(configs.ENV_VAR, str(tmp_path))
    path = configs.config_path("decode", FAKE_GPU, tmp_path)
    path.write_text("{not json")
    with pytest.warns(UserWarning, match=re.escape(f"ignoring a bad config file: {path}: not valid JSON")):
        assert lookup() == heuristic_config("decode", 128, 4, BF16, 16)
    assert no_warnings(lambda: lookup(kv_len=99)) == heuristic_config("decode", 128, 4, BF16, 16)


def test_switch_and_pin(table):
    assert ck.use_tuned_configs is configs.use_tuned_configs and ck.tuned_configs_enabled()
    heuristic = heuristic_config("decode", 128, 4, BF16, 16)
    with ck.use_tuned_configs(False):
        assert not ck.tuned_configs_enabled() and lookup() == heuristic
        with ck.use_tuned_configs(True):
            assert lookup() == A
        assert lookup() == heuristic
    with pytest.raises(RuntimeError), ck.use_tuned_configs(False):
        raise RuntimeError
    assert ck.tuned_configs_enabled() and lookup() == A
    with pytest.raises(TypeError, match="must be a bool"):
        ck.set_tuned_configs(1)
    with configs.pinned_config("decode", E):
        assert lookup() == E
        with pytest.warns(UserWarning, match="no tuned prefill configs"):  # pinned for decode only
            assert lookup("prefill", q_len=64) == heuristic_config("prefill", 128, 4, BF16, 16)
    assert lookup() == A


def _small_problem(q_lens, kv_lens, page_size=5):
    from tuning import measure, space

    task = space.Task("prefill", 32, 2, page_size, "bf16", 1, 1, 1, num_kv_heads=2)
    return measure.make_problem(task, q_lens, kv_lens, DEVICE, seed=3)


def test_kernels_use_the_tuned_file_from_the_env_folder(tmp_path, monkeypatch):
    """paged_prefill, paged_decode and a cascade plan launch with the file's config, and stay exact."""
    launched = []

    def spy(*args, **kwargs):
        launched.append(args[10])  # the TileConfig argument
        return real(*args, **kwargs)

    real = attention_module.launch_attention
    monkeypatch.setattr(attention_module, "launch_attention", spy)
    monkeypatch.setattr(cascade_module, "launch_attention", spy)
    monkeypatch.setenv(configs.ENV_VAR, str(tmp_path))
    gpu = configs.device_name(DEVICE)
    prefill_cfg, decode_cfg = TileConfig(16, 16, 4, 2), TileConfig(16, 16, 4, 2, prefetch=True)
    write(tmp_path, "prefill", gpu, {"d32_g2_p5_bf16_q8_kv32": prefill_cfg})
    write(tmp_path, "decode", gpu, {"d32_g2_p5_bf16_q1_kv32": decode_cfg})

    p = _small_problem([9, 7], [30, 33])
    expected = reference.paged_prefill(p.q, p.q_pos, p.qo_indptr, p.k_cache, p.v_cache, p.kv)
    for o, lse in (ck.paged_prefill(p.q, p.q_pos, p.qo_indptr, p.k_cache, p.v_cache, p.kv),
                   ck.cascade_attention(p.q, p.q_pos, p.k_cache, p.v_cache, [ck.CascadeLevel(p.qo_indptr, p.kv)])):
        assert launched.pop() == prefill_cfg
        assert_close(o, expected[0], BF16, "o")
        assert_close(lse, expected[1], BF16, "lse")

    d = _small_problem([1, 1, 1], [40, 1, 30])
    expected = reference.paged_decode(d.q, d.q_pos, d.k_cache, d.v_cache, d.kv)
    o, lse = ck.paged_decode(d.q, d.q_pos, d.k_cache, d.v_cache, d.kv)
    assert launched.pop() == decode_cfg
    assert_close(o, expected[0], BF16, "o")
    with ck.use_tuned_configs(False):
        ck.paged_decode(d.q, d.q_pos, d.k_cache, d.v_cache, d.kv)
    assert launched.pop() == heuristic_config("decode", 32, 2, BF16, 5)


# ------------------------------------------------------------------------------------------------------------
# The tuning script


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _fake_search(tmp_path, tasks, times, bad, clock, deadline=1e9, resume=False, calls=None, healthy=lambda: True,
                 refine=lambda task, best: []):
    """search.run with a fake timer (``times[config]`` ms, a missing config raises) and a fake check."""
    from tuning import search

    def timer(problem, c):
        clock.now += 1.0
        if calls is not None:
            calls.append((problem, c))
        if c not in times:
            raise RuntimeError("out of resource: shared memory, Required: 262144")
        return times[c]

    return search.run(tasks, out=tmp_path, device="cpu", candidates=lambda t: [A, B, C, D],
                      make_problem=lambda t, dev: t, timer=timer,
                      check=lambda t, c, dev: "o: wrong" if c in bad else None,
                      deadline=deadline, resume=resume, clock=clock, bar=False, healthy=healthy,
                      meta={**META, "gpu": FAKE_GPU}, refine=refine)


def _tasks():
    from tuning import space

    return [space.Task("decode", 128, 4, 16, "bf16", 1, kv, 4) for kv in (1024, 8192, 65536)]


def test_search_picks_the_fastest_correct_candidate(tmp_path):
    # A is the heuristic (listed first); C fails the check; D cannot run.
    summary = _fake_search(tmp_path, _tasks(), {A: 1.0, B: 0.9, C: 0.5}, bad={C}, clock=FakeClock())
    assert summary.tuned == 3 and not summary.stopped_by_budget
    loaded = configs.load_configs(configs.config_path("decode", FAKE_GPU, tmp_path))
    assert set(loaded.configs.values()) == {B}
    timing = loaded.timings["d128_g4_p16_bf16_q1_kv8k"]
    assert timing == {"ms": 0.9, "heuristic_ms": 1.0, "candidates": 4, "failed": 1}
    # within 2% of the heuristic, the heuristic stays
    configs.clear_cache()
    _fake_search(tmp_path, _tasks()[:1], {A: 1.0, B: 0.99}, bad=set(), clock=FakeClock())
    assert set(configs.load_configs(configs.config_path("decode", FAKE_GPU, tmp_path)).configs.values()) == {A}


def test_search_tries_the_split_policy_of_the_fastest(tmp_path):
    """The second stage times the first stage's winner at other ``waves`` and keeps a faster one."""
    from dataclasses import replace

    from tuning import space

    assert space.refinements(None, B) == [replace(B, waves=w) for w in (1, 4, 8)]
    times = {A: 1.0, B: 0.9, replace(B, waves=4): 0.7}  # waves=1 and 8 cannot run
    _fake_search(tmp_path, _tasks()[:1], times, bad=set(), clock=FakeClock(), refine=space.refinements)
    loaded = configs.load_configs(configs.config_path("decode", FAKE_GPU, tmp_path))
    assert set(loaded.configs.values()) == {replace(B, waves=4)}
    assert loaded.timings["d128_g4_p16_bf16_q1_kv1k"] == {"ms": 0.7, "heuristic_ms": 1.0, "candidates": 7,
                                                          "failed": 4}


def test_search_records_each_batch_of_a_bucket_timed_on_several(tmp_path):
    """The files keep the winner's and the heuristic's time on every batch beside their geometric means."""
    from tuning import measure, space

    tasks = [space.Task("decode", 128, 4, 16, "bf16", 1, 65536, 9, 8, (1, 32))]
    times = {A: measure.BatchTimes([0.5, 0.08, 1.6]), B: measure.BatchTimes([0.56, 0.05, 1.7])}
    _fake_search(tmp_path, tasks, times, bad=set(), clock=FakeClock())
    loaded = configs.load_configs(configs.config_path("decode", FAKE_GPU, tmp_path))
    assert set(loaded.configs.values()) == {B}
    timing = loaded.timings["d128_g4_p16_bf16_q1_kv64k"]
    assert timing["batch_ms"] == [0.56, 0.05, 1.7] and timing["heuristic_batch_ms"] == [0.5, 0.08, 1.6]
    assert timing["ms"] == pytest.approx((0.56 * 0.05 * 1.7) ** (1 / 3), rel=1e-4)
    log = (tmp_path / "tuning_state" / f"log__{configs.device_slug(FAKE_GPU)}.txt").read_text()
    assert "batch 9: 0.5600 / 0.5000 ms, batch 1: 0.0500 / 0.0800 ms, batch 32: 1.7000 / 1.6000 ms" in log


def test_search_times_the_finalists_again_and_keeps_their_lower_times(tmp_path):
    """The heuristic and the fastest candidates are timed a second time, after every other candidate; each
    keeps its lower time, so a heuristic timed slow once (first, on a cold clock) is not beaten by noise."""
    from tuning import search

    clock, calls = FakeClock(), []
    seen: dict = {}

    def timer(problem, c):
        calls.append(c)
        seen[c] = seen.get(c, 0) + 1
        if c == D:
            raise RuntimeError("out of resource")
        return {A: [1.3, 0.9], B: [0.95, 0.96], C: [1.2, 1.1]}[c][seen[c] - 1]

    summary = search.run(_tasks()[:1], out=tmp_path, device="cpu", candidates=lambda t: [A, B, C, D],
                         make_problem=lambda t, dev: t, timer=timer, check=lambda t, c, dev: None, deadline=1e9,
                         clock=clock, bar=False, meta={**META, "gpu": FAKE_GPU})
    assert summary.tuned == 1
    assert calls == [A, B, C, D, A, B, C]  # finalists: the heuristic, then the fastest (at most FINALISTS)
    loaded = configs.load_configs(configs.config_path("decode", FAKE_GPU, tmp_path))
    assert set(loaded.configs.values()) == {A}  # 0.9 on its second timing: B (0.95) no longer wins
    assert loaded.timings["d128_g4_p16_bf16_q1_kv1k"]["ms"] == 0.9
    assert search._lower(measure_times([1.0, 3.0]), measure_times([2.0, 2.0])).per_batch == (1.0, 2.0)


def measure_times(values):
    from tuning import measure

    return measure.BatchTimes(values)


def test_search_stops_on_its_budget_and_resumes(tmp_path):
    clock, calls = FakeClock(), []
    # 4 candidates per task, then the 2 that ran timed again, at one fake second each: the deadline falls
    # inside the second task
    summary = _fake_search(tmp_path, _tasks(), {A: 1.0, B: 0.5}, bad=set(), clock=clock, deadline=8, calls=calls)
    assert summary.stopped_by_budget and summary.tuned == 1
    path = configs.config_path("decode", FAKE_GPU, tmp_path)
    assert list(configs.load_configs(path).timings) == ["d128_g4_p16_bf16_q1_kv1k"]
    calls.clear()
    summary = _fake_search(tmp_path, _tasks(), {A: 1.0, B: 0.5}, bad=set(), clock=FakeClock(), resume=True,
                           calls=calls)
    assert summary.tuned == 2 and summary.skipped == 1 and not summary.stopped_by_budget
    assert {t.kv_len for t, _ in calls} == {8192, 65536}  # the finished bucket is not timed again
    assert len(configs.load_configs(path).configs) == 3
    progress = json.loads((tmp_path / "tuning_state" / f"progress__{configs.device_slug(FAKE_GPU)}.json").read_text())
    assert progress["results"]["decode"]["d128_g4_p16_bf16_q1_kv8k"]["errors"] == {
        "m16_n128_w8_s2": "RuntimeError: out of resource: shared memory, Required: 262144",
        "m16_n32_w4_s6": "RuntimeError: out of resource: shared memory, Required: 262144"}


def test_search_without_a_runnable_candidate_writes_no_config(tmp_path):
    from tuning import search

    summary = _fake_search(tmp_path, _tasks()[:1], {}, bad=set(), clock=FakeClock())
    assert summary.no_config == 1 and summary.tuned == 0
    assert not configs.config_path("decode", FAKE_GPU, tmp_path).exists()
    progress = json.loads((tmp_path / "tuning_state" / f"progress__{configs.device_slug(FAKE_GPU)}.json").read_text())
    reason = progress["results"]["decode"]["d128_g4_p16_bf16_q1_kv1k"]["reason"]
    assert reason.startswith("every candidate failed; first error: RuntimeError: out of resource")
    # a device that does not survive an error ends the run at once
    with pytest.raises(search.DeviceLost, match="device unusable after m16_n32_w4_s2"):
        _fake_search(tmp_path, _tasks(), {}, bad=set(), clock=FakeClock(), healthy=lambda: False)


def test_resume_refuses_a_progress_file_from_another_setup(tmp_path):
    _fake_search(tmp_path, _tasks()[:1], {A: 1.0}, bad=set(), clock=FakeClock())
    from tuning import search

    with pytest.raises(ValueError, match="made with triton '3.6.0', this run has '9.9'"):
        search.run(_tasks(), out=tmp_path, device="cpu", candidates=None, make_problem=None, timer=None, check=None,
                   deadline=1e9, resume=True, bar=False, meta={**META, "gpu": FAKE_GPU, "triton": "9.9"})


@pytest.mark.parametrize("capturable", [True, False])
def test_gpu_timer_picks_one_method_per_batch(monkeypatch, capturable):
    """The GPU timer's logic, with triton.testing's timers replaced: graphs for a fast batch if it captures."""
    import triton.testing

    from tuning import measure

    def graph(fn, rep, return_mode):
        if not capturable:
            raise RuntimeError("operation not permitted when stream is capturing")
        fn()
        return 0.004

    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup, rep, return_mode: (fn(), 0.01)[1])
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", graph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    p = _small_problem([1, 1], [9, 30])
    p.task = measure.Task("decode", 32, 2, 5, "bf16", 1, 20, 2, num_kv_heads=2)
    first = measure.gpu_timer(p, TileConfig(16, 16, 4, 2))
    assert p.use_graph is capturable and first == (0.004 if capturable else 0.01)
    assert measure.gpu_timer(p, TileConfig(16, 32, 4, 2)) == first


def test_cli_help_and_list(capsys):
    from tuning.__main__ import main, parse_args

    with pytest.raises(SystemExit) as info:
        parse_args(["--help"])
    assert info.value.code == 0 and "--time-budget" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parse_args(["--families", "merge"])
    assert main(["--list", "--families", "decode"]) == 0
    assert "d128_g4_p16_bf16_q1_kv8k" in capsys.readouterr().out


def test_dry_run_end_to_end(tmp_path, monkeypatch):
    """The whole script on the tiny space under the interpreter; the files it writes drive the kernels."""
    if interpreter_problem():
        pytest.skip(interpreter_problem())
    args = ["--dry-run", "--out", str(tmp_path), "--no-bar", "--jobs", "2"]  # compiled ahead by two workers
    if DEVICE == "cpu":
        from tuning.__main__ import main

        assert main(args) == 0
    else:  # compiled kernels are defined already in this process: the interpreter needs its own
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # the dry run is the CPU path CI takes
        proc = subprocess.run([sys.executable, "-m", "tuning", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    prefill = configs.load_configs(tmp_path / "prefill__cpu.json")
    decode = configs.load_configs(tmp_path / "decode__cpu.json")
    assert sorted(b.key for b in prefill.configs) == ["d32_g2_p5_bf16_q3_kv40", "d32_g2_p5_bf16_q9_kv20"]
    assert [b.key for b in decode.configs] == ["d32_g2_p5_bf16_q1_kv37"]
    assert prefill.meta["gpu"] == "cpu" and prefill.meta["commit"]
    assert all(t["ms"] > 0 for t in prefill.timings.values())
    log = (tmp_path / "tuning_state" / "log__cpu.txt").read_text()
    assert "3 buckets" in log and "precompiled 9 (bucket, candidate) pairs" in log
    # resuming a finished run times nothing and keeps the files
    if DEVICE == "cpu":
        assert main(args + ["--resume"]) == 0
        assert configs.load_configs(tmp_path / "prefill__cpu.json").configs == prefill.configs
    monkeypatch.setenv(configs.ENV_VAR, str(tmp_path))
    chosen = configs.config_for("prefill", "cpu", head_dim=32, group=2, page_size=5, dtype=BF16, q_len=9, kv_len=20)
    assert chosen == prefill.configs[configs.parse_bucket("d32_g2_p5_bf16_q9_kv20")]


def test_precompile_phases_put_each_shape_class_first_task_first():
    from tuning import precompile, space

    t = [space.Task("decode", 128, 4, 16, "bf16", 1, kv, 9) for kv in (1024, 8192)]
    u = space.Task("prefill", 128, 4, 16, "bf16", 64, 8192, 3)
    assert precompile.phases([(t[0], [A, B]), (u, [C]), (t[1], [A, B])]) == [
        [(t[0], A), (t[0], B), (u, C)], [(t[1], A), (t[1], B)]]


def test_precompile_workers_run_every_pair_and_report_errors(tmp_path):
    """Two spawned workers run the tiny tasks' candidates (compiling them on a GPU); a config the kernel
    rejects comes back as an error of its pair, the others run."""
    if interpreter_problem():
        pytest.skip(interpreter_problem())
    from tuning import precompile, space

    tasks = space.tasks("tiny", ("prefill", "decode"))
    bad = TileConfig(16, 8, 4, 2)  # BLOCK_N under 16: a static assertion of the kernel
    work = [(t, space.tiny_candidates(t)[:2] + [bad]) for t in tasks]
    seconds, errors = precompile.Precompiler(2, DEVICE)(work, deadline=float("inf"))
    assert seconds > 0 and set(errors) == {(t, bad) for t in tasks}, errors
    assert all("16" in text for text in errors.values())


# ------------------------------------------------------------------------------------------------------------
# Shipped configs, on the GPU they were tuned for


@pytest.mark.skipif(DEVICE != "cuda", reason="needs the GPU the configs were tuned on")
def test_every_shipped_config_passes_the_correctness_check():
    from tuning import measure, space

    gpu = configs.device_name(DEVICE)
    files = [configs.config_path(f, gpu, configs.PACKAGE_DIR) for f in configs.FAMILIES]
    files = [f for f in files if f.is_file()]
    if not files:
        pytest.skip(f"needs the GPU the configs were tuned on: none shipped for {gpu!r}")
    for path in files:
        table = configs.load_configs(path)
        for bucket, config in table.configs.items():
            task = space.Task(table.family, bucket.head_dim, bucket.group, bucket.page_size, bucket.dtype,
                              bucket.q_len, bucket.kv_len, 1)
            p = measure.check_problem(task, DEVICE)
            o, lse = p.run(config)
            kv = ck.PagedKV(*(t.cpu() for t in (p.kv.indptr, p.kv.indices, p.kv.lens, p.kv.start_pos)))
            ref_o, ref_lse = reference.paged_prefill(p.q.cpu(), p.q_pos.cpu(), p.qo_indptr.cpu(), p.k_cache.cpu(),
                                                     p.v_cache.cpu(), kv)
            msg = f"{path.name} {bucket.key} {config}"
            assert_close(o, ref_o, task.torch_dtype, "o", msg=msg)
            assert_close(lse, ref_lse, task.torch_dtype, "lse", msg=msg)


def test_a_bucket_timed_on_several_batches_takes_the_geometric_mean():
    """A decode bucket has no batch dimension: it is timed on several batch sizes, and a candidate's time
    is the geometric mean, so no one batch (and the rounds of programs it happens to fill) decides."""
    from tuning import measure, space

    task = space.Task("decode", 32, 2, 5, "bf16", 1, 37, 3, 2, (2, 5))
    p = measure.timed_problem(task, DEVICE)
    assert isinstance(p, measure.Batches) and [q.kv.num_segments for q in p.problems] == [3, 2, 5]
    times = iter([1.0, 4.0, 2.0])
    mean = measure._geomean(lambda problem, config: next(times), p, None)
    assert mean == pytest.approx(2.0) and mean.per_batch == (1.0, 4.0, 2.0)
    single = measure.timed_problem(space.Task("decode", 32, 2, 5, "bf16", 1, 37, 3, 2), DEVICE)
    assert isinstance(single, measure.Problem) and single.kv.num_segments == 3
    assert all(len(t.batches) == 3 for t in space.tasks("default", ("decode",)))


def test_lookahead_candidates():
    """Page ids one tile ahead: at 3-4 stages for decode (as many tiles in flight as 5-8 without), 3-5 for
    prefill, never with register prefetch; without it, no 3 or 4 stages (nothing would pipeline)."""
    from tuning import space

    for task in space.tasks("default", ("decode", "prefill")):
        for c in space.candidates(task)[1:]:
            if c.lookahead:
                assert not c.prefetch and 3 <= c.num_stages <= (4 if task.family == "decode" else 5), (task, c)
            else:
                assert c.num_stages not in (3, 4), (task, c)
        assert any(c.lookahead for c in space.candidates(task)), task


def test_lookahead_with_prefetch_is_rejected_where_the_config_is_made():
    with pytest.raises(ValueError, match="lookahead and prefetch exclude each other"):
        TileConfig(16, 32, 4, 2, prefetch=True, lookahead=True)
