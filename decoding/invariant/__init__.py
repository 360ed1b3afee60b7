"""A batch-invariant target forward on CPU: a row's logits and hidden state do not depend on how
many other rows share the forward.

Strict speculative decoding promises output identical, token for token, to this engine's own
autoregressive decoding. A verification runs T tree nodes in one forward; an autoregressive step
runs one. With BLAS kernels the two round differently (MKL blocks a reduction differently for 1,
4 or 16 rows; SDPA reduces over n+1 keys in a step and n+T masked keys in a verification), so a
near-tied argmax can flip: measured in ``bench/results/invariance.md``, up to 4e-5 in float32 and
0.25 in bfloat16 on the same token's logits. This module designs that out:

- **Linears** (every ``nn.Linear`` of the decoder and the LM head) run through
  ``sense_linear_*`` in ``decoding/kernels/invariant.c``: each output element is one fixed chain
  of 8-lane FMAs over the input dimension and one fixed horizontal sum, whatever the row count.
- On a CPU with **AMX** the bfloat16 linears may run on tiles instead (``sense_linear_bf16amx``:
  ``tdpbf16ps``, the same pair-packed weights, a one-row step a one-row tile): each output is the
  tile instruction's fixed sequence over its own row, so rows stay independent, but the bits are
  not the vector kernel's; a process runs one of the two for every row count (:func:`bf16_kernel`,
  the faster on a decode step plus a 16-row verification, measured). On the Xeon with AMX where
  this was written, a 16-row pass over model-sized weights took 0.35x the vector kernel's time
  and a one-row pass about the same (memory-bound), so verifying a 16-token tree costs about 1.5
  decode steps instead of 3.
- **Attention** runs through ``sense_attention_*``: each query row attends over exactly its
  visible keys, listed in key order (a tree node's prefix and ancestors are the keys the same
  token sees in an autoregressive step, in the same order), with fixed-order dot products, a
  max, one vector exp routine and fixed-order sums.
- Everything else in a Llama-style block (embedding, RMSNorm, rotary, SiLU) is row-wise
  elementwise or a per-row reduction in torch already; ``tests/test_invariance.py`` checks the
  whole target bitwise. The lean forward (decoding/lean_forward.py) runs those steps on C code of
  its own too (:func:`rmsnorm`, :func:`rope_kv`, :func:`silu_mul`, and the linears' epilogues
  that round and add the residual as they store, :func:`linear_into`): one call each instead of a
  dozen torch ops, whose dispatch was a third of a one-row decode step.

Forwards of more than :data:`MAX_ROWS` rows (prompt prefill) need no invariance (both decoding
modes share the same prefill): their attention is a blocked causal kernel on AVX512-BF16 in
bfloat16 (:func:`prefill_attention`, in the lean forward) or torch's SDPA, and their linears run on
whichever kernel measured faster on this machine at about their row count (:func:`large_rows_kernel`,
remembered per machine). On the AVX2 machine ours won, narrowly in float32 (3.3 vs 3.6 ms at 256 rows; 3.1 vs
6.1 in a noisier run) and 7x in bfloat16, which MKL emulates there; a CPU with native bfloat16
matrix units may well choose torch.

Each call uses ``torch.get_num_threads()`` threads (passed explicitly: OpenMP's own default is
per calling thread, and serving calls from worker threads).

The modules, bottom up: ``build`` (compiling and loading the C file, once per machine: no
compiler means no invariant mode, :func:`unavailable_reason` says why, and the stock kernels),
``panels`` (the linear kernel's weight layout and call), ``tuning`` (its measured choices:
bfloat16 kernel, prefetch, many-row kernel), ``linear`` (linears as the forward calls them),
``attention_ops``, ``elementwise`` (norms, rotary, gates), ``routing`` (a transformers model's
linears and attention onto the kernels: ``install``). This package hands on the names the rest of the code uses.
"""

from decoding.invariant.attention_ops import (
                                          ATTENTION,
                                          Requests,
                                          attention,
                                          attention_forward,
                                          attention_multi,
                                          prefill_attention,
                                          prefill_attention_ok,
                                          visible_csr,
                                          visible_csr_batch,
)
from decoding.invariant.build import (
                                          MARCH_ENV,
                                          MAX_ROWS,
                                          PANEL,
                                          SOURCE,
                                          amx_available,
                                          bf16_pairs,
                                          library,
                                          march,
                                          turned_off,
                                          unavailable_reason,
)
from decoding.invariant.elementwise import (
                                          gelu_tanh_mul,
                                          offset_norm,
                                          rmsnorm,
                                          rmsnorm_heads,
                                          rope_kv,
                                          rope_kv_multi,
                                          silu_mul,
                                          soft_cap_rows,
)
from decoding.invariant.linear import PackedWeight, linear_into, module_packed
from decoding.invariant.panels import pack_panels
from decoding.invariant.routing import install, install_linears, supports, uninstall
from decoding.invariant.tuning import (
                                          BF16_KERNELS,
                                          PREFETCH_ENV,
                                          PREFETCH_MODES,
                                          PREFETCH_ROWS,
                                          bf16_kernel,
                                          decisive,
                                          kernel_id,
                                          kernel_isa,
                                          large_rows_kernel,
                                          tune_prefetch,
)

__all__ = ["ATTENTION", "BF16_KERNELS", "MARCH_ENV", "MAX_ROWS", "PANEL", "PREFETCH_ENV", "PREFETCH_MODES",
           "PREFETCH_ROWS", "SOURCE", "PackedWeight", "Requests", "amx_available", "attention", "attention_forward",
           "attention_multi", "bf16_kernel", "bf16_pairs", "decisive", "gelu_tanh_mul", "install", "install_linears",
           "kernel_id", "kernel_isa", "large_rows_kernel", "library", "linear_into", "march", "module_packed",
           "offset_norm", "pack_panels", "prefill_attention", "prefill_attention_ok", "rmsnorm", "rmsnorm_heads",
           "rope_kv", "rope_kv_multi", "silu_mul", "soft_cap_rows", "supports", "tune_prefetch", "turned_off",
           "uninstall", "unavailable_reason", "visible_csr", "visible_csr_batch"]
