"""Activation memory autograd keeps for backward: eager reference vs attnfast, per attention module.

    python benchmarks/saved_memory.py [--out benchmarks/results/saved_memory_cpu]

Counts, with ``torch.autograd.graph.saved_tensors_hooks`` (``harness.SavedBytes``), the bytes of every
tensor the forward saves for backward (each storage once), at the real shapes of AttnVGG (pool-3 and
pool-4 at 224 and 512 input), SAGAN self-attention, the RAN gate, Learn to Pay Attention's
LinearAttentionBlock, timm's GlobalContext and the Attention U-Net gates (MONAI, Attention-Gated-Networks;
training mode). The module's own weights are
saved by both sides and are excluded; the input feature maps are reported both ways (counted, and not).

What an attnfast op saves is decided by its ``register_autograd`` setup_context from the op's inputs
and outputs, the same tensors whichever backend (Triton or PyTorch) computed them, so this CPU run
measures what the GPU path saves too. Peak memory during the forward is a different figure (see the
benchmark suites).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attnfast.config  # noqa: E402
import harness  # noqa: E402
from attnfast.nn import attention_gate as fused_gates  # noqa: E402
from attnfast.nn.grid_attention import GridAttention  # noqa: E402
from attnfast.nn.residual_attention import ResidualAttentionModule  # noqa: E402
from attnfast.nn.self_attention import SelfAttention2d  # noqa: E402
from attnfast.ops import residual_gate  # noqa: E402
from attnfast.reference import GridAttention as RefGrid  # noqa: E402
from attnfast.reference import attention_gate as ref_gates  # noqa: E402
from attnfast.reference import ResidualAttentionModule as RefRAM  # noqa: E402
from attnfast.reference import SelfAttention as RefSelf  # noqa: E402
from attnfast.reference import residual_gate_reference  # noqa: E402
from attnfast.train.checkpoint import atomic_write  # noqa: E402

MIB = 1024 * 1024


def _saved_once(fn, inputs, exclude):
    with harness.SavedBytes() as sb:
        sb._seen.update((t.untyped_storage().data_ptr(), t.device) for t in exclude)
        out = fn(*inputs)
    del out
    return sb.total


def _saved(fn, inputs, weights=()):
    """(bytes saved, bytes saved beyond the module's inputs); weights are never counted."""
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    return _saved_once(fn, inputs, list(weights)), _saved_once(fn, inputs, list(weights) + tensors)


def grid_cases():
    # (name, B, C_l, H, W, up_factor): AttnVGG attn1 on pool-3, attn2 on pool-4; g is pool-5 (512 ch)
    for name, b, c, hw, up in [("pool-3 @224", 8, 256, 28, 4), ("pool-3 @512", 8, 256, 64, 4),
                               ("pool-4 @224", 8, 512, 14, 2), ("pool-4 @512", 8, 512, 32, 2)]:
        ref = RefGrid(c, 512, 256, up, normalize_attn=True)
        fused = GridAttention(c, 512, 256, up, normalize_attn=True)
        fused.load_state_dict(ref.state_dict())
        l = torch.randn(b, c, hw, hw, requires_grad=True)
        g = torch.randn(b, 512, hw // up, hw // up, requires_grad=True)
        weights = list(ref.parameters()) + list(fused.parameters())
        yield ("grid_attention", f"{name}: B={b}, l {c}x{hw}x{hw}, A=256",
               _saved(ref, (l, g), weights), _saved(fused, (l, g), weights))


def self_attention_cases():
    for b, c, hw in [(8, 128, 32), (8, 128, 64)]:
        ref = RefSelf(c)
        fused = SelfAttention2d(c)
        fused.load_state_dict(ref.state_dict())
        x = torch.randn(b, c, hw, hw, requires_grad=True)
        weights = list(ref.parameters()) + list(fused.parameters())
        yield ("self_attention", f"B={b}, C={c}, {hw}x{hw} (N={hw * hw})",
               _saved(ref, (x,), weights), _saved(fused, (x,), weights))


def residual_cases():
    m = torch.randn(32, 256, 56, 56, requires_grad=True)
    t = torch.randn(32, 256, 56, 56, requires_grad=True)
    yield ("residual_gate", "(1+sigmoid(m))*t, 32x256x56x56",
           _saved(residual_gate_reference, (m, t)), _saved(residual_gate, (m, t)))
    ref = RefRAM(64, encoder_depth=2)
    fused = ResidualAttentionModule(64, encoder_depth=2)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(8, 64, 56, 56, requires_grad=True)
    weights = list(ref.parameters()) + list(fused.parameters())
    yield ("residual_attention_module", "whole module (depth 2), 8x64x56x56",
           _saved(ref, (x,), weights), _saved(fused, (x,), weights))


def attention_pool_cases():
    """Learn to Pay Attention's AttnVGG_before blocks at 224 (l: 512 x 56/28/14, g: the (B, 512, 1, 1) global
    feature), and timm's GlobalContext (gcresnet33ts's widths at 224; the whole layer, its MLP included)."""
    from attnfast.nn.attention_pool import LinearAttentionBlock
    from attnfast.reference.attention_pool import LinearAttentionBlock as RefLinear

    for name, b, c, hw in [("attn1 @224", 8, 512, 56), ("attn2 @224", 8, 512, 28), ("attn3 @224", 8, 512, 14)]:
        ref, fused = RefLinear(c), LinearAttentionBlock(c)
        fused.load_state_dict(ref.state_dict())
        l = torch.randn(b, c, hw, hw, requires_grad=True)
        g = torch.randn(b, c, 1, 1, requires_grad=True)
        weights = list(ref.parameters()) + list(fused.parameters())
        yield ("attention_pool_ltpa", f"LTPA {name}: B={b}, l {c}x{hw}x{hw}, g {c}x1x1",
               _saved(ref, (l, g), weights), _saved(fused, (l, g), weights))
    try:
        from timm.layers.global_context import GlobalContext as TimmGC
    except ImportError:
        return
    from attnfast.nn.attention_pool import GlobalContext

    for b, c, hw in [(32, 256, 56), (32, 512, 28), (32, 1536, 14)]:
        ref, fused = TimmGC(c), GlobalContext(c)
        fused.load_state_dict(ref.state_dict())
        x = torch.randn(b, c, hw, hw, requires_grad=True)
        weights = list(ref.parameters()) + list(fused.parameters())
        yield ("global_context", f"timm GlobalContext (gcresnet33ts): B={b}, {c}x{hw}x{hw}",
               _saved(ref, (x,), weights), _saved(fused, (x,), weights))


def attention_gate_cases():
    """Attention U-Net gates in training mode: MONAI's AttentionBlock (g and x at one size) and AGN's
    GridAttentionBlock2D (theta 2x2 stride 2, g at half size)."""
    for kind, b, c, cg, fi, hw in [("monai", 4, 64, 64, 32, 256), ("monai", 4, 128, 128, 64, 128),
                                   ("agn", 4, 64, 128, 64, 256)]:
        if kind == "monai":
            ref, fused = ref_gates.AttentionBlock(2, fi, cg, c), fused_gates.AttentionBlock(2, fi, cg, c)
            inputs = (torch.randn(b, cg, hw, hw, requires_grad=True), torch.randn(b, c, hw, hw, requires_grad=True))
            case = f"MONAI AttentionBlock: B={b}, g, x {c}x{hw}x{hw}, f_int={fi}"
        else:
            ref, fused = ref_gates.GridAttentionBlock2D(c, cg, fi), fused_gates.GridAttentionBlock2D(c, cg, fi)
            inputs = (torch.randn(b, c, hw, hw, requires_grad=True),
                      torch.randn(b, cg, hw // 2, hw // 2, requires_grad=True))
            case = f"AGN GridAttentionBlock2D: B={b}, x {c}x{hw}x{hw}, g {cg}x{hw // 2}x{hw // 2}, F_int={fi}"
        fused.load_state_dict(ref.state_dict())
        weights = list(ref.parameters()) + list(fused.parameters())
        yield "attention_gate", case, _saved(ref, inputs, weights), _saved(fused, inputs, weights)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "saved_memory_cpu"))
    args = p.parse_args(argv)
    if not os.environ.get("ATTNFAST_BACKEND"):  # the caller's choice (read by attnfast at import) wins
        attnfast.config.set_backend("torch")
    torch.manual_seed(0)
    rows = []
    for gen in (grid_cases, self_attention_cases, residual_cases, attention_pool_cases, attention_gate_cases):
        for op, case, eager, fused in gen():
            rows.append({"op": op, "case": case, "eager_saved_bytes": eager[0], "attnfast_saved_bytes": fused[0],
                         "ratio": fused[0] / eager[0], "eager_beyond_inputs_bytes": eager[1],
                         "attnfast_beyond_inputs_bytes": fused[1],
                         "ratio_beyond_inputs": fused[1] / eager[1] if eager[1] else None})
            r = rows[-1]
            print(f"{op:26s} {case:45s} eager {eager[0] / MIB:8.1f} MiB attnfast {fused[0] / MIB:8.1f} MiB "
                  f"({r['ratio']:.3f}); beyond inputs {eager[1] / MIB:8.1f} vs {fused[1] / MIB:7.2f} MiB "
                  f"({r['ratio_beyond_inputs'] or 0:.4f})", flush=True)
    info = harness.device_info()
    doc = {"info": info, "command": "python benchmarks/saved_memory.py", "rows": rows}
    atomic_write(args.out + ".json", lambda f: json.dump(doc, f, indent=1), mode="w")
    lines = [f"# Activation memory saved for backward ({info['device']})", "",
             f"torch {info['torch']}, triton {info['triton']}, {info['date']}. Command: `{doc['command']}`. "
             "Bytes autograd keeps between forward and backward (saved_tensors_hooks), module weights excluded. "
             "'all' includes the module's input feature maps (both sides keep them, and the layer before "
             "usually holds them anyway); 'beyond inputs' is what the attention module adds. The op's saved "
             "set is the same on the Triton (GPU) path.", "",
             "| op | case | eager MiB (all) | attnfast MiB (all) | ratio | eager MiB beyond inputs | "
             "attnfast MiB beyond inputs | ratio |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rb = r["ratio_beyond_inputs"]
        lines.append(f"| {r['op']} | {r['case']} | {r['eager_saved_bytes'] / MIB:.1f} | "
                     f"{r['attnfast_saved_bytes'] / MIB:.1f} | {r['ratio']:.3f} | "
                     f"{r['eager_beyond_inputs_bytes'] / MIB:.1f} | {r['attnfast_beyond_inputs_bytes'] / MIB:.2f} | "
                     f"{'—' if rb is None else f'{rb:.4f}'} |")
    atomic_write(args.out + ".md", lambda f: f.write("\n".join(lines) + "\n"), mode="w")
    print(f"wrote {args.out}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
