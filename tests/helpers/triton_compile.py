"""Compiling a Triton kernel for a Hopper GPU (sm_90) on a machine without one.

Triton's interpreter checks a kernel's arithmetic but runs its Python, so it accepts code that Triton's compiler
refuses (a global that is not a constexpr, a type that does not unify across a loop's branches, a tuple returned
by a helper the frontend cannot lower); such a kernel would fail its device check at start and leave the torch
path to serve on the GPU. Compiling (the frontend, then ptxas, both shipped with triton) needs no GPU."""
from __future__ import annotations

import importlib.util

import pytest

requires_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                     reason="triton is a test dependency; the interpreter tests fail without it")


def compile_for_sm90(kernel, types: dict, constants: dict, **options):
    """``kernel`` (a triton.jit function, not an autotuner) compiled for sm_90 with argument ``types`` (Triton's
    names: "*fp16", "i32", ...; i32 for an argument not named) and ``constants`` (its constexpr arguments), without
    FMA contraction unless ``options`` say otherwise. Returns the compiled kernel (its PTX is checked non-empty)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature = {n: "constexpr" if n in constants else types.get(n, "i32") for n in names}
    source = ASTSource(kernel, signature, constexprs={(names.index(k),): v for k, v in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"enable_fp_fusion": False, **options})
    assert compiled.asm["ptx"], kernel.__name__
    return compiled
