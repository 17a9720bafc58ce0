"""``attnfast.swap`` / ``attnfast.unswap``: put the fused attention modules into a model you already have, without
changing its maths; report every attention layer left as it is.

``attnfast.swap(model)`` (this package is callable: ``attnfast.swap`` is both the function's home and the
function) returns a :class:`SwapResult`. Layout of the package:

- ``walk.py``: the walk over the model, ``swap``/``unswap``;
- ``adopt.py``: a fused module holding the original's children, Parameters, buffers and hooks; unswap's way back;
- ``probe.py``: the probe (the module doc there says exactly what is compared, against a float64 run);
- ``reads.py``: which attributes a layer's forward reads (a layer whose forward reads state the fused module
  does not use is left alone);
- ``scan.py``: attention-like layers no family recognises (reported as unknown);
- ``report.py``: :class:`SwapResult`, :class:`Replacement`, :class:`Skipped`, :class:`SwapWarning`;
- ``family.py``: the :class:`Family` base class and helpers;
- ``families/``: one file per family (source layout of an attention layer), listed in ``families.FAMILIES``.

**The families** (``families.FAMILIES``, tried in that order):

=================== ======================================================================== ===========================
family              layout                                                                   fused module
=================== ======================================================================== ===========================
grid                attnfast GridAttention, AttnMel AttentionBlock, LTPA GridAttentionBlock  nn.GridAttention
sagan               SAGAN (forum SelfAttention, SAGAN Self_Attn), plain query/key/value      nn.SelfAttention2d
sagan_projected     SAGAN with spectral norm / parametrizations / bias-free projections      ProjectedSelfAttention2d
biggan              BigGAN-PyTorch Attention (theta/phi/g/o, pooled keys, scalar gamma)      ProjectedSelfAttention2d
timm_nonlocal       timm NonLocalAttn (t/p/g, z + norm, scale)                               ProjectedSelfAttention2d
residual_attention  attnfast ResidualAttentionModule                                         nn.ResidualAttentionModule
cbam, light_cbam    attnfast CBAM/LightCBAM, timm CbamModule/LightCbamModule                 nn.CBAM, nn.LightCBAM
cbam_authors        the CBAM authors' code (ChannelGate + SpatialGate)                       AuthorsCBAM
ltpa_linear         LTPA LinearAttentionBlock                                                nn.LinearAttentionBlock
timm_global_context timm GlobalContext (GCNet: conv_attn, mlp_scale/mlp_add, gate)           nn.GlobalContext
agn_grid            Attention-Gated-Networks GridAttentionBlock2D (concatenation[_softmax])  nn.GridAttentionBlock2D
monai_attention     MONAI AttentionBlock (Attention U-Net gate)                              nn.AttentionBlock
ran_port            ResidualAttentionNetwork-pytorch AttentionModule_stage*                  only its gate (reported)
channel_gate        SE / ECA channel-only gates                                              out of scope (reported)
=================== ======================================================================== ===========================

**A family file** (``families/<name>.py``) defines one :class:`~attnfast.swap.family.Family` subclass
(importing the classes it needs; nothing is named by strings) and is listed, as an instance, in
``families/__init__.py``'s ``FAMILIES`` (more specific layouts first). It sets:

- ``name`` (registry name, in the report), ``title`` (what users call the layer, where it comes from);
- ``matches(m) -> bool``: cheap structural recognition (children names and types, attributes; for other
  libraries' classes, ``family.is_instance_of_loaded``, which never imports them). A matched layer is replaced
  or reported, never passed over;
- ``status``: ``FUSED`` (default) or, for a layer recognised but not replaced, ``report.NO_OP`` (no fused op
  yet), ``report.PARTIAL`` or ``report.OUT_OF_SCOPE``, with ``explain(m) -> str`` saying why/what it needs;

and for a ``FUSED`` family:

- ``fused``: the fused class; ``reference``: attnfast's plain class that ``unswap`` turns a directly built fused
  module into (or None);
- ``spec(m) -> Spec``: every check that the fused module can hold this layer (raise ``NotSwappable(reason)``
  saying what differs; ``status=OUT_OF_SCOPE`` when so), the candidate configurations (``Candidate(kwargs,
  dropped, note)``: the probe picks the closest that passes), the probe input (``inputs(gen, dtype, device)``,
  tiny, batch 2) and notes for the report;
- ``build(m, spec, candidate)`` (optional): the default constructs ``fused(*spec.args, **candidate.kwargs)`` on
  the meta device and adopts the layer's children (or, for another library's class, their tensors),
  Parameters and buffers; a family whose fused module calls the user's own modules passes them in instead
  (``families/_projected.py``). Afterwards swap checks that the fused module holds exactly the layer's
  Parameter and buffer objects under the same names (``state_dict`` keys unchanged);
- ``fused_runs``: the layer's children whose forward the fused module calls (hooks on the others would stop
  running: refused); ``reads``: attributes, besides children/Parameters/buffers, the layer's forward may read
  (the fused module reads them too, or ``spec`` checks they are fixed); ``tolerated_methods``: public methods
  of the user's class that may be dropped (noted in the report).

**What is left alone, and reported** (``result.skipped``, each a :class:`Skipped` with ``name``, ``type``,
``reason``, ``family`` and ``status``; all in one :class:`SwapWarning`):

- ``refused``: a layer of a fused family that cannot be replaced: a check failed (another activation, gate,
  BatchNorm setting, extra Parameters, hooks on children the fused module never calls), its class defines
  public methods besides ``forward``, its forward reads state the fused module does not use (``reads.py``:
  e.g. ``self.temperature`` in a subclass, which the probe could only check at today's value), or the probe
  found different maths: the reason names the closest configuration and the measured numbers;
- ``no fused op``, ``partly fusable``, ``out of scope``: recognised families swap does not replace (see the
  table), with what they would need;
- ``unknown``: a layer that looks like attention (``scan.py``: its class name, a gate child, a forward calling
  softmax/sigmoid) but that no family recognises.

Modules under a replaced or reported layer are not reported again.

**The probe** (``probe.py``): the layer and each fused configuration run forward and backward on tiny random
inputs (own and perturbed parameters, train and eval mode), all judged against a float64 run of the original:
a configuration passes when each output and gradient is within ``max(rtol * scale, 2 * the original's own
error)`` of it. ``swap(model, autocast=torch.bfloat16)`` (or ``torch.float16``, or a tuple) adds a run under
``torch.autocast`` with that dtype, outputs (dtypes included) and gradients judged the same way: a model you
train or evaluate under autocast should be swapped so, and a layer whose fused module does not give the
original's result there is left alone. The default (``autocast=None``) probes without autocast only.

**The swap.** The fused module adopts the original's children, Parameter objects and buffers (nothing is copied
or moved; ``state_dict()`` keys are unchanged; an optimizer built before ``swap`` trains the swapped model), its
own hooks and the public attributes the fused class lacks. The original module is kept on the fused one;
``unswap`` puts it back, exactly as it was, with the same Parameters (re-adopting any the fused module was given
meanwhile). A fused module built directly (``attention="fused"``) is unswapped into the reference class by the
same adoption and probe. Where a SAGAN layer returned ``(out, attention)``, the fused one returns ``(out,
None)`` (attnfast never builds the N x N matrix; ``attnfast.nn.self_attention.attention_maps`` computes chosen
rows); that and other deliberate differences are in each :class:`Replacement`'s ``notes``.

``dry_run=True`` returns the same report and changes nothing; ``strict=True`` raises ``ValueError`` listing
every layer that would be left alone (of any status), changing nothing; ``inplace=False`` works on a deep copy
(``result.model``). The probe runs the original forward a few times on tiny inputs, so forwards with outside
side effects (logging, counters in globals) see those calls.

``torch.compile``: swap before or after compiling. Given an ``OptimizedModule``, swap changes the module it
wraps (``_orig_mod``); dynamo's guards see the replaced modules and the next call recompiles (one extra
compilation: swapping first avoids it). ``DistributedDataParallel``: swap before or after wrapping; the
Parameters DDP registered are the ones the fused modules use.
"""
from __future__ import annotations

import sys
import types

from .families import FAMILIES
from .family import Candidate, Family, NotSwappable, Spec
from .report import Replacement, Skipped, SwapResult, SwapWarning
from .walk import _walk, swap, unswap


class _CallableModule(types.ModuleType):
    """``attnfast.swap(model)`` calls :func:`swap`; ``attnfast.swap.SwapResult`` etc. are this package's names."""

    def __call__(self, model, *, inplace: bool = True, dry_run: bool = False, strict: bool = False, autocast=None):
        return _walk(model, inplace=inplace, to_fused=True, dry_run=dry_run, strict=strict, autocast=autocast)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["swap", "unswap", "Replacement", "Skipped", "SwapResult", "SwapWarning", "Family", "Candidate", "Spec",
           "NotSwappable", "FAMILIES"]
