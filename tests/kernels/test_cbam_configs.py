"""The CBAM launchers pick only registered tiles, and their grid covers every pixel exactly once."""
import pytest
import torch
import triton

from attnfast.kernels import cbam as K


def test_every_choice_is_registered():
    names = {c.name for c in K.aot_configs()}
    kernels = [k for k, _ in K._MAPS]
    missing = set()
    for dt in K.DTYPES.values():
        for C in range(1, 4097):
            block_c, block_p = K.blocks(C)
            assert block_c * block_p == K.TILE
            for k in kernels:
                name = f"cbam.{k.fn.__name__ if hasattr(k, 'fn') else k.__name__}[{dt},BLOCK_C={block_c}]"
                if name not in names:
                    missing.add(name)
    assert not missing, sorted(missing)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 20, 9, 9), (3, 5, 7, 1), (32, 256, 56, 56), (64, 2048, 7, 7)])
def test_plan_covers_the_map(shape):
    x = torch.empty(shape, device="meta")
    pl = K.plan(x)
    n_tiles = triton.cdiv(pl["P"], pl["BLOCK_P"])
    assert pl["S"] * pl["TILES"] >= n_tiles > (pl["S"] - 1) * pl["TILES"]  # no empty split, none missing
    assert pl["NCB"] * pl["BLOCK_C"] >= shape[1] > (pl["NCB"] - 1) * pl["BLOCK_C"]


def test_map_strides():
    x = torch.empty(2, 3, 4, 5)
    assert K.map_strides(x) == (60, 20, 1)
    assert K.map_strides(x.contiguous(memory_format=torch.channels_last)) == (60, 1, 3)
    assert K.map_strides(x[:, :, :, ::2]) is None
    assert K.map_strides(torch.zeros(()).expand(2, 3, 4, 5)) == (0, 0, 0)
    assert K.map_strides(torch.empty(2, 3, 4, 1)) == (12, 4, 1)
