"""PagedKV and CascadeLevel: valid input is accepted, bad input is rejected with an error naming it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import cascade_kernels as ck
from cascade_kernels._validation import validation
from conftest import DEVICE


def i32(*values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def good_kv(**overrides):
    """Two segments: 20 tokens in pages 4, 0 (page size 16) and 5 tokens in page 7."""
    fields = dict(indptr=i32(0, 2, 3), indices=i32(4, 0, 7), lens=i32(20, 5), start_pos=i32(0, 100))
    fields.update(overrides)
    return ck.PagedKV(**fields)


@pytest.fixture(autouse=True)
def _validation_restored():
    """Every test starts with validation on and leaves it as it found it, even when it fails."""
    with validation(True):
        yield


def test_paged_kv_accepts_valid_input():
    kv = good_kv()
    assert kv.num_segments == 2 and kv.device.type == torch.device(DEVICE).type
    kv.check_pages(page_size=16, num_pages=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        kv.lens = i32(1, 1)


def test_paged_kv_accepts_edge_cases():
    """No segment at all, empty segments, segments with no page, more pages than the lens need."""
    assert ck.PagedKV(i32(0), i32(), i32(), i32()).num_segments == 0
    kv = ck.PagedKV(indptr=i32(0, 0, 2, 2), indices=i32(3, 1), lens=i32(0, 1, 0), start_pos=i32(5, 0, 2**31 - 1))
    kv.check_pages(page_size=1, num_pages=4)
    good_kv(indices=i32(4, 0, 7, 9)).check_pages(16, 10)  # indices may run past indptr[-1]


BAD_PAGED_KV = [
    # (overrides, exception, message pattern)
    (dict(indptr=[0, 2, 3]), TypeError, r"^PagedKV\.indptr must be a torch\.Tensor"),
    (dict(indptr=i32(0, 2, 3).long()), TypeError, r"^PagedKV\.indptr must have dtype int32"),
    (dict(indices=i32(4, 0, 7).float()), TypeError, r"^PagedKV\.indices must have dtype int32"),
    (dict(lens=i32(20, 5).long()), TypeError, r"^PagedKV\.lens must have dtype int32"),
    (dict(start_pos=i32(0, 100).long()), TypeError, r"^PagedKV\.start_pos must have dtype int32"),
    (dict(indptr=i32(0, 2, 3)[None]), ValueError, r"^PagedKV\.indptr must be 1-D"),
    (dict(indptr=i32()), ValueError, r"PagedKV\.indptr must have S \+ 1 >= 1 entries"),
    (dict(indices=i32(4, 0, 7)[None]), ValueError, r"^PagedKV\.indices must be 1-D"),
    (dict(lens=i32(20, 5, 1)), ValueError, r"^PagedKV\.lens must have shape \[2\]"),
    (dict(lens=i32(20, 5)[None]), ValueError, r"^PagedKV\.lens must have shape \[2\]"),
    (dict(start_pos=i32(0)), ValueError, r"^PagedKV\.start_pos must have shape \[2\]"),
    (dict(indices=i32(4, 9, 0, 9, 7)[::2]), ValueError, r"contiguous"),
    # value checks
    (dict(indptr=i32(1, 2, 3)), ValueError, r"^PagedKV\.indptr must start at 0"),
    (dict(indptr=i32(0, 2, 1)), ValueError, r"^PagedKV\.indptr must be non-decreasing"),
    (dict(indptr=i32(0, 2, 4)), ValueError, r"^PagedKV\.indptr ends at 4 but indices holds only 3"),
    (dict(indices=i32(4, -1, 7)), ValueError, r"^PagedKV\.indices must be >= 0"),
    (dict(lens=i32(20, -5)), ValueError, r"^PagedKV\.lens must be >= 0"),
    (dict(start_pos=i32(-1, 100)), ValueError, r"^PagedKV\.start_pos must be >= 0"),
    (dict(start_pos=i32(0, 2**31 - 3)), ValueError, r"^PagedKV\.start_pos \+ lens must fit in int32"),
]
VALUE_CHECKS = 7  # the last entries above: skipped with ck.set_validation(False)


def _ids(cases):
    return [pattern.lstrip("^").replace("\\", "") for _, _, pattern in cases]


@pytest.mark.parametrize("overrides, exc, pattern", BAD_PAGED_KV, ids=_ids(BAD_PAGED_KV))
def test_paged_kv_rejects_bad_input(overrides, exc, pattern):
    with pytest.raises(exc, match=pattern):
        good_kv(**overrides)


@pytest.mark.parametrize("overrides, exc, pattern", BAD_PAGED_KV[-VALUE_CHECKS:], ids=_ids(BAD_PAGED_KV[-VALUE_CHECKS:]))
def test_set_validation_false_skips_value_checks(overrides, exc, pattern):
    ck.set_validation(False)
    assert not ck.validation_enabled()
    good_kv(**overrides)  # no device-to-host copy, no check
    good_kv(lens=i32(100, 5)).check_pages(page_size=16, num_pages=1)
    with pytest.raises(TypeError, match=r"^PagedKV\.lens must have dtype int32"):  # metadata checks stay on
        good_kv(lens=i32(20, 5).long())
    ck.set_validation(True)
    with pytest.raises(exc, match=pattern):
        good_kv(**overrides)


def test_set_validation_takes_a_bool():
    with pytest.raises(TypeError, match="enabled must be a bool"):
        ck.set_validation(0)
    assert ck.validation_enabled()


def test_check_pages_catches_pages_out_of_range_and_overlong_lens():
    kv = good_kv()
    with pytest.raises(ValueError, match=r"^kv\.indices holds page 7, out of range for a cache of 7 pages"):
        kv.check_pages(page_size=16, num_pages=7)
    with pytest.raises(ValueError, match=r"^levels\[1\]\.kv\.indices holds page 7"):
        kv.check_pages(page_size=16, num_pages=7, name="levels[1].kv")
    with pytest.raises(ValueError, match=r"^kv\.lens\[0\] = 20 is longer than its 2 pages of 8 slots"):
        kv.check_pages(page_size=8, num_pages=8)
    with pytest.raises(ValueError, match=r"^kv\.lens\[1\] = 5 is longer than its 1 pages of 4 slots"):
        good_kv(lens=i32(8, 5)).check_pages(page_size=4, num_pages=8)
    with pytest.raises(ValueError, match=r"^kv\.lens\[0\] = 1 is longer than its 0 pages"):
        ck.PagedKV(i32(0, 0), i32(), i32(1), i32(0)).check_pages(page_size=16, num_pages=1)
    kv.check_pages(page_size=10, num_pages=8)  # exactly full pages are fine


def test_cascade_level_accepts_valid_input():
    level = ck.CascadeLevel(i32(0, 3, 3), good_kv())
    assert level.num_segments == 2 and level.kv.num_segments == 2
    ck.CascadeLevel(i32(0), ck.PagedKV(i32(0), i32(), i32(), i32()))


BAD_LEVELS = [
    (lambda: ck.CascadeLevel(i32(0, 3, 3), "kv"), TypeError, r"^CascadeLevel\.kv must be a PagedKV, got str"),
    (lambda: ck.CascadeLevel([0, 3, 3], good_kv()), TypeError, r"^CascadeLevel\.qo_indptr must be a torch\.Tensor"),
    (lambda: ck.CascadeLevel(i32(0, 3, 3).long(), good_kv()), TypeError,
     r"^CascadeLevel\.qo_indptr must have dtype int32"),
    (lambda: ck.CascadeLevel(i32(0, 3), good_kv()), ValueError, r"^CascadeLevel\.qo_indptr must have shape \[3\]"),
    (lambda: ck.CascadeLevel(i32(0, 3, 3, 4), good_kv()), ValueError, r"^CascadeLevel\.qo_indptr must have shape"),
    (lambda: ck.CascadeLevel(i32(1, 3, 3), good_kv()), ValueError, r"^CascadeLevel\.qo_indptr must start at 0"),
    (lambda: ck.CascadeLevel(i32(0, 3, 2), good_kv()), ValueError, r"^CascadeLevel\.qo_indptr must be non-decreasing"),
    (lambda: ck.CascadeLevel(i32(0, 9, 3, 9, 3)[::2], good_kv()), ValueError, r"contiguous"),
]


@pytest.mark.parametrize("case", range(len(BAD_LEVELS)))
def test_cascade_level_rejects_bad_input(case):
    call, exc, pattern = BAD_LEVELS[case]
    with pytest.raises(exc, match=pattern):
        call()


def test_cascade_level_value_checks_follow_set_validation():
    ck.set_validation(False)
    ck.CascadeLevel(i32(0, 3, 2), good_kv())
    with pytest.raises(ValueError, match=r"^CascadeLevel\.qo_indptr must have shape"):
        ck.CascadeLevel(i32(0, 3), good_kv())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a device mismatch needs a second device (CUDA)")
def test_tensors_on_two_devices_are_rejected():
    with pytest.raises(ValueError, match=r"^PagedKV\.lens must be on cuda"):
        ck.PagedKV(i32(0, 2, 3).cuda(), i32(4, 0, 7).cuda(), i32(20, 5).cpu(), i32(0, 100).cuda())
    with pytest.raises(ValueError, match=r"^CascadeLevel\.qo_indptr must be on"):
        ck.CascadeLevel(i32(0, 3, 3).cpu(), good_kv(**{f: getattr(good_kv(), f).cuda() for f in
                                                      ("indptr", "indices", "lens", "start_pos")}))
