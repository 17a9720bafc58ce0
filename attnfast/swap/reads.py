"""Which attributes of ``self`` a layer's forward reads, from its bytecode (nothing is executed).

The probe checks a layer's maths at the current values of its attributes; the fused module then reads its own
configuration. A forward that also reads state the fused module does not use (``self.temperature`` in a user's
subclass) would pass the probe at today's value and silently ignore tomorrow's. So before a swap the layer's
forward is read, conservatively:

- the class's ``forward`` and, transitively, the methods and properties of the class it reaches through
  ``self.name`` or ``super().name`` (nested functions and comprehensions included) are disassembled; every
  ``self.name`` that is loaded (``LOAD_ATTR``/``LOAD_METHOD`` on ``self``, ``getattr(self, "name")`` with a
  constant name) is a read;
- code of torch's and attnfast's own classes is trusted (their forwards are what the fused modules reproduce);
- any other use of ``self`` (passed to a function, ``getattr`` with a computed name, a C-implemented method)
  makes the reads unknown, and the layer is left alone.

A read is allowed when it names one of the fused module's children, Parameters or buffers, a method that was
itself read this way, ``training``, or one of the family's ``reads`` (attributes the fused module reads itself,
or fixed ones its ``spec`` checks against the tensors' shapes). The forwards of the layer's children are not
read: the children a fused module calls run their own forward; the ones it reads weights from are checked by
the family's ``spec`` and the probe at their current settings.
"""
from __future__ import annotations

import dis
import types

_SELF_LOADS = {"LOAD_FAST", "LOAD_DEREF", "LOAD_FAST_CHECK", "LOAD_FAST_BORROW", "LOAD_CLOSURE"}
_ATTR_LOADS = {"LOAD_ATTR", "LOAD_METHOD"}
_ATTR_WRITES = {"STORE_ATTR", "DELETE_ATTR"}  # writes are the probe's concern (side effects it can see)
_TRUSTED = ("torch", "attnfast")


def _trusted(klass: type) -> bool:
    return klass.__module__.split(".")[0] in _TRUSTED or klass is object


class Reads:
    """``attrs``: names read on ``self``; ``methods``: methods/properties followed; ``unknown``: why the reads
    cannot be told (empty when they can)."""

    def __init__(self):
        self.attrs: set = set()
        self.methods: set = set()
        self.unknown: list = []


def _loads_self(ins, self_name) -> bool:
    if ins.opname not in _SELF_LOADS or self_name is None:
        return False
    val = ins.argval
    return val == self_name or (isinstance(val, tuple) and val and val[-1] == self_name)


def forward_reads(cls: type, method: str = "forward") -> Reads:
    """What ``cls.<method>`` (and what it reaches on ``self``) reads on ``self``; see the module doc."""
    out = Reads()
    mro = cls.__mro__
    seen = set()

    def resolve(name: str, start: int):
        for i in range(start, len(mro)):
            if name in vars(mro[i]):
                return i, vars(mro[i])[name]
        return None, None

    def follow(name: str, start: int = 0) -> bool:
        """Analyse the method/property ``name`` found from ``mro[start]`` on; False if it is not one."""
        i, fn = resolve(name, start)
        if fn is None:
            return False
        if isinstance(fn, property):
            fn = fn.fget
        elif isinstance(fn, (staticmethod, classmethod)):
            fn = fn.__func__
        if not callable(fn):
            return False
        if (i, name) in seen:
            return True
        seen.add((i, name))
        out.methods.add(name)
        if _trusted(mro[i]):
            return True
        code = getattr(fn, "__code__", None)
        if not isinstance(code, types.CodeType):
            out.unknown.append(f"{mro[i].__name__}.{name} is not Python code")
            return True
        scan(code, code.co_varnames[0] if code.co_argcount else None, i, f"{mro[i].__name__}.{name}")
        return True

    def scan(code, self_name, index: int, where: str):
        ins = [i for i in dis.get_instructions(code) if i.opname not in ("CACHE", "EXTENDED_ARG", "NOP")]
        uses_super = "super" in code.co_names
        after_super = False
        for k, a in enumerate(ins):
            if a.opname == "LOAD_GLOBAL" and a.argval == "super":
                after_super = True
            elif after_super and a.opname in _ATTR_LOADS:  # super().name / super(C, self).name
                follow(a.argval, index + 1)
                after_super = False
            if not _loads_self(a, self_name):
                continue
            j = k + 1
            while j < len(ins) and ins[j].opname in ("COPY", "DUP_TOP"):
                j += 1
            b = ins[j] if j < len(ins) else None
            if b is not None and b.opname in _ATTR_LOADS:
                if not follow(b.argval):
                    out.attrs.add(b.argval)
            elif b is not None and b.opname in _ATTR_WRITES:
                continue
            elif (b is not None and b.opname == "LOAD_CONST" and isinstance(b.argval, str) and k > 0
                  and ins[k - 1].opname == "LOAD_GLOBAL" and ins[k - 1].argval in ("getattr", "hasattr")):
                if not follow(b.argval):
                    out.attrs.add(b.argval)
            elif uses_super and b is not None and b.opname in ("PRECALL", "CALL") and k > 0 and (
                    ins[k - 1].opname in ("LOAD_GLOBAL", "LOAD_DEREF") or ins[k - 1].argval == "super"):
                continue  # super(Class, self)
            elif a.opname == "LOAD_CLOSURE":
                continue  # handed to a nested function or comprehension: scanned below
            else:
                out.unknown.append(f"{where} uses self in a way whose reads cannot be told "
                                   f"({b.opname if b is not None else 'end of code'} after loading it)")
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                inner = self_name if self_name in const.co_freevars else None
                scan(const, inner, index, where)

    if not follow(method):
        out.unknown.append(f"{cls.__name__} has no {method}")
    return out


def forward_names(cls: type) -> set:
    """Every global and attribute name the class's own ``forward`` code (nested code included) mentions."""
    fn = getattr(cls, "forward", None)
    code = getattr(fn, "__code__", None)
    names: set = set()
    stack = [code] if isinstance(code, types.CodeType) else []
    while stack:
        c = stack.pop()
        names.update(c.co_names)
        stack += [k for k in c.co_consts if isinstance(k, types.CodeType)]
    return names


__all__ = ["forward_reads", "forward_names", "Reads"]
