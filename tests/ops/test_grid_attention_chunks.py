"""The A-chunked variant of the grid-attention kernels (A_CHUNKS > 1).

The shipped tile tables use it (16-bit: A chunks of 64 from A=128; fp32 backward: chunks of 32 from A=64),
so that nothing spills on sm_80/sm_90 under triton 3.6 or 3.9. This forces chunking at a small A through the tables, so the chunk loop (and the
backward's per-chunk dl partials) is exercised in the interpreter at test sizes."""
import pytest
import torch

from attnfast.reference import GridAttention as Ref
from attnfast.testing import assert_close_3way


@pytest.mark.parametrize("normalize", [True, False])
def test_a_chunked_kernels_match_reference(triton_backend, monkeypatch, normalize, device):
    from attnfast.kernels import grid_attention as K
    from attnfast.nn.grid_attention import GridAttention

    # bucket 32 -> BLOCK_A 16: two A chunks in the forward and in the backward (fp32 tables)
    fwd = K._FWD_TILES_FP32[32]
    bwd = K._BWD_TILES_FP32[32]
    monkeypatch.setitem(K._FWD_TILES_FP32, 32, (fwd[0], fwd[1], 16, fwd[3]))
    monkeypatch.setitem(K._BWD_TILES_FP32, 32, (bwd[0], bwd[1], 16, bwd[3]))
    assert K.main_blocks(32, torch.float32)["A_CHUNKS"] == 2
    assert K.main_blocks(32, torch.float32, backward=True)["A_CHUNKS"] == 2

    ref64 = Ref(24, 40, 32, 2, normalize_attn=normalize).double().to(device)
    l, g, da, dp = (torch.randn(*shape, dtype=torch.float64).to(device)
                    for shape in ((2, 24, 10, 6), (2, 40, 5, 3), (2, 1, 10, 6), (2, 24)))

    def run(module, dtype):
        module = module.to(dtype)
        li = l.detach().to(dtype).clone().requires_grad_()
        gi = g.detach().to(dtype).clone().requires_grad_()
        a, pooled = module(li, gi)
        torch.autograd.backward((a, pooled), (da.to(dtype), dp.to(dtype)))
        grads = [li.grad, gi.grad] + [p.grad for p in module.parameters()]
        return [a.detach(), pooled.detach()] + grads

    fused = GridAttention(24, 40, 32, 2, normalize_attn=normalize).to(device)
    fused.load_state_dict(ref64.state_dict())
    eager = Ref(24, 40, 32, 2, normalize_attn=normalize).to(device)
    eager.load_state_dict(ref64.state_dict())
    assert_close_3way(run(fused, torch.float32), run(ref64, torch.float64), run(eager, torch.float32),
                      name="a_chunked")
