"""The probe: does a fused configuration compute what the original layer computes? Judged against float64.

Runs (each on a fresh small random input from the family's ``Spec.inputs``, batch 2, in the layer's dtype and
on its device):

1. the layer's own parameters in its current train/eval mode (every submodule keeps its own flag);
2. randomly perturbed parameters (SAGAN's ``gamma = 0`` would hide the attention) in the other mode;
3. with ``autocast=dtype`` (or several): perturbed parameters in the current mode, inside
   ``torch.autocast(device, dtype)``, once per dtype.

In each run the original, then each remaining fused configuration, runs forward, then backward with the same
random output gradients. The truth is **a float64 run of the original** (its parameters, buffers, inputs and
output gradients upcast; outside autocast): the original in its own dtype is only another approximation of it
(a ReLU pre-activation at 1e-7 may flip sign in fp32 and move a weight gradient by 4e-2, and the fused module
may well be the accurate one). For every output and gradient tensor:

- the structure must equal the original's (tensor, tuple or list, the same length, shapes, dtypes, non-finite
  positions, non-floating values);
- ``err_c = max|candidate - truth|`` must be within ``max(rtol * s, 2 * err_o)`` where ``err_o = max|original -
  truth|`` (the original's own error), ``s = max(max|truth|, 0.01 * M)`` and ``M`` is the largest ``max|truth|``
  among the outputs (or among the gradients); rtol is 1e-5 for float64, 2e-3 for float32 (TF32 on CUDA), 1e-2
  for float16 and 5e-2 for bfloat16 (the autocast dtype under autocast).

When the float64 run is impossible (a forward or backward tied to its dtype), the original in its own dtype is
the truth, and the refusal says so. The closest passing configuration is used. If none passes, the refusal names the
closest one (the smallest worst ratio ``err_c / allowed``) with its measured numbers.

The probe leaves the layer as it was: it calls ``forward`` directly (the layer's own hooks do not run; its
children's do), on copies of the buffers (BatchNorm statistics, ``num_batches_tracked``, spectral norm's power
iteration vectors unchanged), takes gradients with ``torch.autograd.grad`` (no ``.grad`` is touched), restores
every train/eval flag, every public attribute the forwards assigned, and the CPU and CUDA random states. On CPU
it runs single-threaded (its tensors are tiny). Attributes the original's forward assigns that the fused
module's run does not assign (e.g. a layer keeping its last attention map) are a side effect the fused module
would drop: that configuration fails.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import torch
import torch.nn as nn

from .family import Candidate, NotSwappable, Spec, randn

PROBE_SEED = 20240917
RTOL = {torch.float64: 1e-5, torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}
OWN_ERROR_MULTIPLE = 2.0  # a candidate may be off the float64 truth by this multiple of the original's own error
_RELATIVE_FLOOR = 1e-2  # a tensor's scale is at least this share of the largest in its group
_TINY = 1e-30


class _Direct(nn.Module):
    """Calls ``m.forward`` itself: the module's own hooks stay out of the probe."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, *args):
        return self.m.forward(*args)


@dataclasses.dataclass
class _Fail(Exception):
    """A configuration's mismatch: ``ratio`` (worst err_c / allowed; inf for a structural difference), text, and
    (set where it is caught) the run it failed in and whether the fused module raised."""

    ratio: float
    text: str
    run: int = 0
    raised: bool = False


def _leaves(out, where="output"):
    """(path, value) for every leaf of a nested tuple/list output, with structure markers."""
    if isinstance(out, (tuple, list)):
        yield where, (type(out).__name__, len(out))
        for i, o in enumerate(out):
            yield from _leaves(o, f"{where}[{i}]")
    else:
        yield where, out


def _describe(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"a {tuple(v.shape)} {str(v.dtype).replace('torch.', '')} tensor"
    if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str):
        return f"a {v[0]} of {v[1]}"
    return type(v).__name__ if v is not None else "None"


def _abs_max(t: torch.Tensor) -> float:
    t = t.detach()
    t = t[torch.isfinite(t)] if t.is_floating_point() else t
    return t.abs().max().double().item() if t.numel() else 0.0


def _dist(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    d = (a.detach().double() - b.detach().double()).abs()[mask]
    return d.max().item() if d.numel() else 0.0


@dataclasses.dataclass
class _Measure:
    ratio: float = 0.0
    where: str = ""
    err_c: float = 0.0
    err_o: float = 0.0
    allowed: float = 0.0
    rtol: float = 0.0
    scale: float = 0.0

    def worse(self, other: "_Measure") -> "_Measure":
        return other if other.ratio > self.ratio else self


def _judge(label: str, o: torch.Tensor, c: torch.Tensor, t: torch.Tensor | None, rtol: float,
           scale: float) -> _Measure:
    """How far the candidate ``c`` is from the truth ``t`` against what is allowed (see the module doc)."""
    fo, fc = torch.isfinite(o), torch.isfinite(c)
    if not torch.equal(fo, fc):
        raise _Fail(math.inf, f"{label} is non-finite at other positions than the original's")
    mask = fo if t is None or t.shape != o.shape else fo & torch.isfinite(t)
    ref = o if t is None or t.shape != o.shape else t
    err_c, err_o = _dist(c, ref, mask), (_dist(o, ref, mask) if ref is not o else 0.0)
    allowed = max(rtol * max(scale, _TINY), OWN_ERROR_MULTIPLE * err_o)
    return _Measure(err_c / allowed, label, err_c, err_o, allowed, rtol, scale)


def _compare_outputs(ref, new, truth, dropped: tuple, rtol: float) -> tuple:
    """(measure of the worst output, dropped tensor positions); raise _Fail for a structure difference."""
    ref_leaves, new_leaves = list(_leaves(ref)), list(_leaves(new))
    if [p for p, _ in ref_leaves] != [p for p, _ in new_leaves]:
        raise _Fail(math.inf, f"the original returns {_describe(ref_leaves[0][1])}, the fused module "
                              f"{_describe(new_leaves[0][1])}")
    truth = dict(_leaves(truth)) if truth is not None else {}
    top = max((_abs_max(truth.get(p, r)) for p, r in ref_leaves
               if isinstance(r, torch.Tensor) and r.is_floating_point()), default=0.0)
    worst, drops = _Measure(), []
    for (path, r), (_, n) in zip(ref_leaves, new_leaves):
        pos = path[len("output["):].split("]")[0] if path.startswith("output[") else None
        if pos is not None and pos.isdigit() and int(pos) in dropped and path == f"output[{pos}]":
            if r is None and n is None:
                continue
            if (r is None and isinstance(n, torch.Tensor)) or (n is None and isinstance(r, torch.Tensor)):
                drops.append(path)
                continue
        if isinstance(r, torch.Tensor) != isinstance(n, torch.Tensor):
            raise _Fail(math.inf, f"{path} is {_describe(r)} in the original, {_describe(n)} from the fused module")
        if isinstance(r, torch.Tensor):
            if r.shape != n.shape or r.dtype != n.dtype:
                raise _Fail(math.inf, f"{path} is {_describe(r)} in the original, {_describe(n)} from the fused "
                                      "module")
            if not r.is_floating_point():
                if not torch.equal(r, n):
                    raise _Fail(math.inf, f"{path} differs")
                continue
            t = truth.get(path)
            t = t if isinstance(t, torch.Tensor) else None
            scale = max(_abs_max(t if t is not None else r), _RELATIVE_FLOOR * top)
            worst = worst.worse(_judge(path, r, n, t, rtol, scale))
        elif r != n:
            raise _Fail(math.inf, f"{path} is {r!r} in the original, {n!r} from the fused module")
    return worst, drops


def _differentiable(out, dropped: tuple) -> list:
    """Paths of outputs to send gradients into (floating tensors that require grad, dropped ones excluded)."""
    paths = []
    for path, v in _leaves(out):
        pos = path[len("output["):].split("]")[0] if path.startswith("output[") else None
        if pos is not None and pos.isdigit() and int(pos) in dropped:
            continue
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.requires_grad:
            paths.append(path)
    return paths


def _grads(out, paths: list, wrt: list, cotangents: list) -> list:
    leaves = dict(_leaves(out))
    if not paths or not wrt:
        return [None] * len(wrt)
    return list(torch.autograd.grad([leaves[p] for p in paths], wrt, cotangents, allow_unused=True,
                                    retain_graph=True))


def _compare_grads(labels, ref, new, truth, rtol: float) -> _Measure:
    truth = truth or [None] * len(ref)
    top = max((_abs_max(t if t is not None else r) for r, t in zip(ref, truth) if r is not None), default=0.0)
    worst = _Measure()
    for label, a, b, t in zip(labels, ref, new, truth):
        if a is None and b is None:
            continue
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        scale = max(_abs_max(t if t is not None else a), _RELATIVE_FLOOR * top)
        worst = worst.worse(_judge(label, a, b, t, rtol, scale))
    return worst


def _seed_rng(device: torch.device, seed: int) -> None:
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _amp(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else _null()


def _run(module: nn.Module, tensors: dict, inputs: tuple, device, seed: int, amp=None):
    """Forward through ``module.forward`` with ``tensors`` (name -> tensor) in place of its own."""
    _seed_rng(device, seed)
    xs = tuple(t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs)
    with _amp(device, amp):
        out = torch.func.functional_call(_Direct(module), {f"m.{k}": v for k, v in tensors.items()}, xs,
                                         strict=False, tie_weights=True)
    return out, xs


def _public(sub: nn.Module) -> dict:
    return {k: v for k, v in vars(sub).items() if not k.startswith("_") and k != "training"}


def _snapshot(m: nn.Module) -> dict:
    """The public attributes of every module in ``m`` (module -> {name: value})."""
    return {sub: _public(sub) for sub in m.modules()}


def _changes(before: dict) -> set:
    """(module, attribute) pairs assigned, added or deleted since ``before``."""
    out = set()
    for sub, attrs in before.items():
        now = _public(sub)
        out.update((id(sub), k) for k in set(now) ^ set(attrs))
        out.update((id(sub), k) for k in set(now) & set(attrs) if now[k] is not attrs[k])
    return out


def _restore_attributes(before: dict) -> None:
    for sub, attrs in before.items():
        for k in set(_public(sub)) - set(attrs):
            del sub.__dict__[k]
        sub.__dict__.update(attrs)


def _perturbed(params: list, gen: torch.Generator) -> dict:
    """The parameters plus noise of their own spread (1 for constant ones, e.g. SAGAN's gamma = 0)."""
    out = {}
    for n, p in params:
        p = p.detach()
        spread = p.float().std().item() if p.numel() > 1 else 0.0
        noise = randn(gen, p.dtype, p.device, *p.shape) * (spread if spread > 0 else 1.0)
        out[n] = (p + noise).requires_grad_(p.requires_grad)
    return out


def _up(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point() else t.clone()


def _set_mode(m: nn.Module, training: bool) -> None:
    for sub in m.modules():
        sub.training = training


def options_text(c: Candidate) -> str:
    return ", ".join(f"{k}={_short(v)}" for k, v in c.kwargs.items() if k != "activation")


def _short(v):
    return f"{v:.4g}" if isinstance(v, float) else repr(v)


def _amp_name(device, dtype) -> str:
    return f"under torch.autocast({device.type!r}, {str(dtype).replace('torch.', '')})"


def _numbers(m: _Measure, mode: str, exact: bool) -> str:
    vs = "the original" if exact else "float64"
    own = "" if exact else f", max|original - float64| = {m.err_o:.2g}"
    return (f"{m.where} differs ({mode}): max|fused - {vs}| = {m.err_c:.2g}{own}, allowed {m.allowed:.2g} "
            f"(rtol {m.rtol:g} of {m.scale:.2g}" + ("" if exact else f", or {OWN_ERROR_MULTIPLE:g}x the "
                                                   "original's own error") + ")")


def probe(old: nn.Module, candidates: list, spec: Spec, autocast: tuple = ()) -> tuple:
    """(index of the best candidate, notes) or raise NotSwappable saying why none matches (module doc)."""
    first = next(itertools.chain(old.parameters(), old.buffers()), None)
    if first is None:
        raise NotSwappable("has no parameters to tell its dtype and device")
    device, dtype = first.device, first.dtype
    if device.type == "meta":
        raise NotSwappable("its parameters are on the meta device: it cannot be probed")
    if not first.is_floating_point():
        dtype = torch.get_default_dtype()
    alive = dict(enumerate(candidates))
    worst = {i: 0.0 for i in alive}
    failures: dict = {}  # index -> _Fail
    drops = {i: set() for i in alive}
    flags = {sub: sub.training for _, m in candidates for sub in m.modules()}
    flags.update({sub: sub.training for sub in old.modules()})
    before = _snapshot(old)
    gen = torch.Generator(device=device)
    gen.manual_seed(PROBE_SEED)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    params = list(old.named_parameters())
    no_autocast = torch.autocast(device.type, enabled=False) if device.type in ("cuda", "cpu") else _null()
    runs = [(old.training, False, None), (not old.training, True, None)]
    runs += [(old.training, True, amp) for amp in autocast if device.type in ("cuda", "cpu")]
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny tensors: intra-op threads only add overhead (and contention)
    try:
        with torch.random.fork_rng(devices=cuda), torch.inference_mode(False), torch.enable_grad(), no_autocast:
            for run, (training, perturbed, amp) in enumerate(runs):
                mode = f"{'train' if training else 'eval'} mode, {'perturbed' if perturbed else 'own'} parameters"
                if amp is not None:
                    mode += ", " + _amp_name(device, amp)
                rtol = RTOL.get(amp if amp is not None else dtype, 2e-3)
                inputs = spec.inputs(gen, dtype, device)
                values = _perturbed(params, gen) if perturbed else dict(params)
                wrt_names = [n for n, _ in params if values[n].requires_grad]
                buffers = dict(old.named_buffers())
                if run:  # the first run keeps every submodule's own flag (e.g. a frozen BatchNorm in a
                    # training model: candidates mirror the original's flags), the later ones force a mode
                    for m in [old] + [m for _, m in candidates]:
                        _set_mode(m, training)
                seed = PROBE_SEED + run
                try:
                    ref, ref_x = _run(old, {**values, **{n: b.clone() for n, b in buffers.items()}},
                                      inputs, device, seed, amp)
                except Exception as e:  # noqa: BLE001 - the user's forward may raise anything
                    if amp is not None:  # the original itself does not run under autocast: nothing to match
                        _restore_attributes(before)
                        continue
                    shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
                    raise NotSwappable(f"its forward raised on the probe input {shapes}: {type(e).__name__}: {e}")
                ref_changes = _changes(before)
                _restore_attributes(before)
                truth, exact = None, dtype == torch.float64
                if not exact:
                    try:
                        values64 = {n: _up(v) for n, v in values.items()}
                        t_out, t_x = _run(old, {**values64, **{n: _up(b) for n, b in buffers.items()}},
                                          tuple(_up(t) for t in inputs), device, seed)
                        truth = (t_out, t_x, values64)
                    except Exception:  # noqa: BLE001 - a forward tied to its dtype: the original is the truth
                        exact = True
                    _restore_attributes(before)
                ref_grads = {}  # differentiated output paths -> (labels, gradients, cotangents, truth gradients)
                for i, (cand, m) in list(alive.items()):
                    try:
                        try:
                            new, new_x = _run(m, {**values, **{n: b.clone() for n, b in buffers.items()}},
                                              inputs, device, seed, amp)
                        finally:
                            new_changes = _changes(before)
                            _restore_attributes(before)
                        dropped_attrs = ref_changes - new_changes
                        if dropped_attrs:
                            names = sorted({k for _, k in dropped_attrs})
                            raise _Fail(math.inf, f"its forward assigns attributes ({', '.join(names)}) that the "
                                                  "fused module's would not (a side effect it would drop)")
                        try:
                            out_m, dropped = _compare_outputs(ref, new, truth[0] if truth else None, cand.dropped,
                                                              rtol)
                        except _Fail as e:
                            e.text += f" ({mode})"
                            raise
                        if out_m.ratio > 1.0:
                            raise _Fail(out_m.ratio, _numbers(out_m, mode, exact))
                        drops[i].update(dropped)
                        paths = _differentiable(ref, cand.dropped)
                        if paths != _differentiable(new, cand.dropped):
                            raise _Fail(math.inf, f"other outputs carry gradients ({mode})")
                        key = tuple(paths)
                        if key not in ref_grads:
                            ref_map = dict(_leaves(ref))
                            cot = [randn(gen, ref_map[p].dtype, ref_map[p].device, *ref_map[p].shape) for p in paths]
                            wrt = [t for t in ref_x if t.requires_grad] + [values[n] for n in wrt_names]
                            labels = [f"input {j} gradient" for j, t in enumerate(ref_x) if t.requires_grad] + [
                                f"{n} gradient" for n in wrt_names]
                            try:
                                g_ref = _grads(ref, paths, wrt, cot)
                            except Exception as e:  # noqa: BLE001 - the user's backward may raise anything
                                raise NotSwappable(f"its backward raised ({mode}): {type(e).__name__}: {e}") from None
                            g_truth = None
                            if truth:
                                t_out, t_x, t_values = truth
                                t_wrt = [t for t in t_x if t.requires_grad] + [t_values[n] for n in wrt_names]
                                try:
                                    g_truth = _grads(t_out, paths, t_wrt, [c.double() for c in cot])
                                except Exception:  # noqa: BLE001 - a backward tied to its dtype: judged by itself
                                    g_truth = None
                            ref_grads[key] = (labels, g_ref, cot, g_truth)
                        labels, g_ref, cot, g_truth = ref_grads[key]
                        wrt_new = [t for t in new_x if t.requires_grad] + [values[n] for n in wrt_names]
                        g_m = _compare_grads(labels, g_ref, _grads(new, paths, wrt_new, cot), g_truth, rtol)
                        if g_m.ratio > 1.0:
                            raise _Fail(g_m.ratio, _numbers(g_m, mode, g_truth is None))
                        worst[i] = max(worst[i], out_m.ratio, g_m.ratio)
                    except NotSwappable:
                        raise
                    except _Fail as e:
                        e.run = run
                        failures[i] = e
                        del alive[i]
                    except Exception as e:  # noqa: BLE001 - a fused configuration that cannot run this input
                        failures[i] = _Fail(math.inf, f"the fused module raised {type(e).__name__} ({mode}): {e}",
                                            run, raised=True)
                        del alive[i]
                if not alive:
                    break
    finally:
        torch.set_num_threads(threads)
        for sub, flag in flags.items():
            sub.training = flag
        _restore_attributes(before)
    if not alive:  # the closest: the one that passed the most runs, then the smallest error ratio
        closest = min(failures, key=lambda i: (-failures[i].run, failures[i].ratio, i))
        fail = failures[closest]
        text = fail.text if fail.raised else f"the probe found different maths: {fail.text}"
        if len(candidates) == 1:
            raise NotSwappable(text)
        raise NotSwappable(f"no fused configuration computes the same; the closest "
                           f"[{options_text(candidates[closest][0])}]: {text}")
    best = min(alive, key=lambda i: worst[i])
    note = candidates[best][0].note
    return best, [note] if note and (drops[best] or not candidates[best][0].dropped) else []


__all__ = ["probe", "options_text", "PROBE_SEED", "RTOL", "OWN_ERROR_MULTIPLE"]
