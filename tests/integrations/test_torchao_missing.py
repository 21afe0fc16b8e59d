"""Without torchao (the optional ``torchao`` extra) mxep works, and every torchao path raises an
ImportError that names the extra. torchao is made unimportable here (``sys.modules`` entries set
to None), so these tests run whether or not it is installed."""
from __future__ import annotations

import sys

import pytest
import torch

import mxep
from mxep.format.mxfp8 import MXFP8Tensor
from mxep.integrations import torchao as mxao
from support.dist import single_rank_group

HINT = r"pip install 'mxep\[torchao\]'"


@pytest.fixture
def no_torchao(monkeypatch):
    for name in [m for m in sys.modules if m == "torchao" or m.startswith("torchao.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setattr(mxao, "_cache", None)   # forget an earlier successful import
    yield


def test_torchao_paths_name_the_extra(no_torchao):
    t = mxep.to_mxfp8(torch.randn(64, 64).bfloat16())
    offs = torch.tensor([32, 64], dtype=torch.int32)
    w = torch.randn(2, 32, 64).bfloat16()
    assert not mxao.torchao_available()
    with pytest.raises(ImportError, match=HINT):
        t.to_torchao()
    with pytest.raises(ImportError, match=HINT):
        MXFP8Tensor.from_torchao(object())
    with pytest.raises(ImportError, match=HINT):
        mxep.grouped_mm_mxfp8(t, w, offs, impl="torchao")
    with single_rank_group():
        with pytest.raises(ImportError, match=HINT):
            mxep.MoE(64, 32, 4, 2, 16, gemm_impl="torchao")


def test_everything_else_works_without_torchao(no_torchao):
    t = mxep.to_mxfp8(torch.randn(64, 64).bfloat16())
    offs = torch.tensor([32, 64], dtype=torch.int32)
    w = torch.randn(2, 32, 64).bfloat16()
    assert mxep.gemm.resolve_impl("auto", 64, 32, "cpu") == "dequant"
    y = mxep.grouped_mm_mxfp8(t, w, offs)    # the default path: unchanged, no torchao
    assert y.shape == (64, 32)
    with single_rank_group():
        moe = mxep.MoE(64, 32, 4, 2, 16)
        assert moe(torch.randn(5, 64).bfloat16()).shape == (5, 64)
    assert "torchao" not in sys.modules or sys.modules["torchao"] is None
