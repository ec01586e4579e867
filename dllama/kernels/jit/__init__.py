"""The numba backend: a JIT kernel for every operation of the forward pass, each held to the
NumPy reference (``kernels.reference``, ``kernels.quants``) by property tests.

Modules by job: ``float16`` (conversions), ``quantize`` (Q40/Q80 blocks and the activations of
the int8 products), ``matmul`` (products with packed weights), ``elementwise`` (norms,
activations, softmax, rope, embedding), ``attention``, ``wire`` (Q80 activations between nodes),
``sampling``, and ``blocks`` (one jitted call per block of the forward pass). ``simd`` (Q40 and
Q80 weights) and ``simd_float`` (F16 and F32 weights) hold the vector code of the products, built
from ``vector_ir``; ``packing`` the weight layouts they read.

Importing this package configures numba (cache folder, threading layer) before any kernel of
its modules is defined: numba picks a cached function's folder when it is decorated. Threads
come from ``prange`` (numba's thread count, set by ``--nthreads``). Every kernel releases the GIL
(``nogil``): the API's HTTP thread and a node's link threads run beside the forward instead of
waiting for each kernel to return (measured: strangers at the API slowed an answer by 5.8-7.1 %
with the GIL held, see bench/security.py).
"""
from __future__ import annotations

import warnings

from numba.core.errors import NumbaPerformanceWarning

from dllama.kernels.numba_config import configure_imported_numba

configure_imported_numba()

# Functions that only call parallel kernels are marked parallel too: a cached non-parallel
# caller of a cached parallel function can crash when loaded from the cache (numba issue 4807).
# numba warns that such functions have no loop of their own to parallelize; that is intended.
warnings.filterwarnings("ignore", message="(?s).*parallel=True", category=NumbaPerformanceWarning)

# Reassociation lets LLVM vectorize reductions; no 'nnan'/'ninf': -inf must stay -inf.
FAST = {"nsz", "arcp", "contract", "reassoc"}
