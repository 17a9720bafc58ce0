"""swap's attention-pool families on the models that use them: Learn to Pay Attention's AttnVGG_before (its
LinearAttentionBlocks, softmax and sigmoid; public_layers) and timm's GCNet models (GlobalContext; a small ByobNet
with ``attn_layer='gc'`` and ``gcresnet33ts``). A swapped model trains like an unswapped copy (outputs, input and
parameter gradients, state after two SGD steps); unswap gives the original objects back; dry_run changes nothing;
strict raises on a layer left alone; the Triton kernels (interpreted on a CPU) give the same model outputs and
gradients."""
import copy

import pytest
import torch

import public_layers as P
from attnfast.nn.attention_pool import GlobalContext, LinearAttentionBlock
from attnfast.swap import SwapWarning, swap, unswap
from swap_checks import check_swap_trains_like_oracle

timm = pytest.importorskip("timm")


def _ltpa(normalize_attn=True):
    torch.manual_seed(0)
    return P.AttnVGG_before(32, 3, normalize_attn=normalize_attn)


def _small_gcnet():
    from timm.models.byobnet import ByobNet, ByoBlockCfg, ByoModelCfg

    torch.manual_seed(0)
    cfg = ByoModelCfg(blocks=(ByoBlockCfg(type="bottle", d=1, c=32, s=1, gs=0, br=0.25),
                              ByoBlockCfg(type="bottle", d=1, c=64, s=2, gs=0, br=0.25)),
                      stem_chs=16, stem_type="tiered", stem_pool="", attn_layer="gc")
    model = ByobNet(cfg, num_classes=3)
    with torch.no_grad():  # timm zero-inits nothing in gc here, but make the MLP and the score non-trivial
        for n, p in model.named_parameters():
            if ".attn." in n:
                p.copy_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("normalize_attn", [True, False])
def test_ltpa_attnvgg_trains_like_the_original(normalize_attn):
    model = _ltpa(normalize_attn).train()
    originals = [model.attn1, model.attn2, model.attn3]
    # one SGD step: BatchNorm in train mode over conv_block6's 1x1 maps at batch 2 gives gradients of order 1e3,
    # and a second step at lr 0.05 turns any fp32 rounding difference into a different network
    check_swap_trains_like_oracle(model, (torch.randn(2, 3, 32, 32),),
                                  [(f"attn{i}", "LinearAttentionBlock") for i in (1, 2, 3)], steps=1)
    assert all(type(getattr(model, f"attn{i}")) is LinearAttentionBlock for i in (1, 2, 3))
    assert model.attn1.op is originals[0].op  # the user's own conv, adopted
    back = unswap(model)
    assert [r.name for r in back] == ["attn1", "attn2", "attn3"]
    assert [model.attn1, model.attn2, model.attn3] == originals


def test_timm_gcnet_trains_like_the_original():
    model = _small_gcnet().train()
    attn = model.stages[0][0].attn
    result = check_swap_trains_like_oracle(model, (torch.randn(2, 3, 16, 16),),
                                           [("stages.0.0.attn", "GlobalContext"), ("stages.1.0.attn", "GlobalContext")])
    assert {r.family for r in result} == {"timm_global_context"}
    assert type(model.stages[0][0].attn) is GlobalContext and model.stages[0][0].attn.mlp_scale is attn.mlp_scale
    unswap(model)
    assert model.stages[0][0].attn is attn


def test_gcresnet33ts_outputs_and_gradients_unchanged():
    model = timm.create_model("gcresnet33ts", pretrained=False, num_classes=3).eval()
    oracle = copy.deepcopy(model)
    assert len(swap(model)) == 10
    x = torch.randn(2, 3, 32, 32)
    out, ref = model(x), oracle(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    out.square().sum().backward()
    ref.square().sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), oracle.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-3, msg=n)


def test_dry_run_and_strict():
    model = _ltpa()
    model.attn2.normalize_attn = 1  # truthy, but not the bool the family checks: left alone
    ids = [id(m) for m in model.modules()]
    with pytest.warns(SwapWarning, match="normalize_attn must be a bool"):
        planned = swap(model, dry_run=True)
    assert [r.name for r in planned] == ["attn1", "attn3"]
    assert [(s.name, s.family) for s in planned.skipped] == [("attn2", "ltpa_linear")]
    assert "normalize_attn must be a bool" in planned.skipped[0].reason
    assert [id(m) for m in model.modules()] == ids
    with pytest.raises(ValueError, match=r"(?s)strict=True.*attn2"):
        swap(model, strict=True)
    assert [id(m) for m in model.modules()] == ids


def test_on_the_triton_path(triton_backend):
    """The fused op's Triton kernels (the interpreter on CPU), tiny sizes, forward and backward (the LTPA layout's
    kernels are covered op by op in tests/ops/test_attention_pool.py: its smallest model is slow interpreted)."""
    model = _small_gcnet().eval()
    oracle = copy.deepcopy(model)
    assert len(swap(model)) == 2
    x = torch.randn(2, 3, 16, 16)
    out, ref = model(x), oracle(x)
    out, ref = (out[0], ref[0]) if isinstance(out, list) else (out, ref)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-3)
    out.square().sum().backward()
    ref.square().sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), oracle.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-3, msg=n)


def test_directly_built_fused_modules_unswap_to_the_references_and_back():
    """attention="fused"-style models: unswap gives attnfast's references (same Parameters, same outputs), swap
    the fused modules again."""
    from attnfast.reference.attention_pool import GlobalContext as RefGC
    from attnfast.reference.attention_pool import LinearAttentionBlock as RefLinear

    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"gc": GlobalContext(16, fuse_add=True), "ltpa": LinearAttentionBlock(8, False)})
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    params = [id(p) for p in model.parameters()]
    x, l, g = torch.randn(2, 16, 5, 6), torch.randn(2, 8, 4, 5), torch.randn(2, 8, 1, 1)
    want = [model["gc"](x), *model["ltpa"](l, g)]
    assert [r.name for r in unswap(model)] == ["gc", "ltpa"]
    assert type(model["gc"]) is RefGC and type(model["ltpa"]) is RefLinear
    assert [id(p) for p in model.parameters()] == params
    for a, b in zip(want, [model["gc"](x), *model["ltpa"](l, g)]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert [r.family for r in swap(model)] == ["timm_global_context", "ltpa_linear"]
    assert type(model["gc"]) is GlobalContext and type(model["ltpa"]) is LinearAttentionBlock
