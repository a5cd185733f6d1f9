"""`popcount(x)` for numba kernels: LLVM's ctpop on any integer type (numba has no popcount of its own).

One POPCNT instruction on x86-64, or a vector popcount once LLVM vectorises the loop around it. Shared
by the metric kernels (`ghindex.metric_kernels`) and the exact scan (`ghindex.flatscan`).
"""
from __future__ import annotations

from numba import types
from numba.extending import intrinsic


@intrinsic
def popcount(typingctx, x):
    if not isinstance(x, types.Integer):
        return None
    sig = x(x)

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return sig, codegen
