"""The three-way comparison rule itself: it must pass good results and fail bad ones."""
import pytest
import torch

from attnfast.testing import assert_close_3way, three_way_check


def test_passes_when_as_good_as_eager():
    ref = torch.randn(100, dtype=torch.float64)
    eager = ref.half()
    out = ref.half()
    assert_close_3way(out, ref, eager)


def test_fails_when_much_worse_than_eager():
    ref = torch.randn(100, dtype=torch.float64)
    eager = ref.float()
    out = (ref + 1e-3).float()  # 1e-3 error where eager has ~1e-7
    ok, msg = three_way_check(out, ref, eager)
    assert not ok and "max|err|" in msg
    with pytest.raises(AssertionError):
        assert_close_3way(out, ref, eager)


def test_nan_and_shape_mismatch_fail():
    ref = torch.zeros(4, dtype=torch.float64)
    out = torch.tensor([0.0, float("nan"), 0.0, 0.0])
    assert not three_way_check(out, ref, ref.float())[0]
    assert not three_way_check(torch.zeros(3), ref, ref.float())[0]


def test_nested_sequences():
    ref = (torch.ones(2, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    assert_close_3way([r.float() for r in ref], ref, [r.float() for r in ref])
    with pytest.raises(AssertionError, match=r"\[1\]"):
        assert_close_3way([ref[0].float(), ref[1].float() + 1], ref, [r.float() for r in ref])
