"""The CPU fast path, float32: kernels of our own (cpu.c) and oneDNN's pre-packed matmuls.

At decode sizes a CPU step is mostly dispatch: the torch path of a decoder layer is about 150
aten calls on tensors of a few kilobytes. The C functions here each replace a chain of them with
one call and the same arithmetic (see cpu.c): `rms_norm`, `qk_norm_rope` and `silu_and_mul` have
the signatures of the Triton kernels in norm_rope.py, and `decode_attention` is the "cpu"
attention backend's decode. Results equal the torch path's up to float32 rounding (sums in
another order, an exp within 2 ulp).

Linear layers: `F.linear` on a CPU is MKL's sgemm, which at decode sizes (tens of rows) spends
as long re-packing the weight matrix on every call as multiplying (and on AMD CPUs runs its
AVX2 code). `pack_linear_weights` gives every linear layer a copy of its weight in oneDNN's
blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, once at start-up), and
`packed_linear` multiplies with it (`torch.ops.mkldnn._linear_pointwise`): 2.3-2.6x faster than
`F.linear` from 1 to 1082 rows on the 2-core AMD EPYC of BENCHMARKS.md, float32 throughout,
results equal up to summation order. The copy doubles the memory of those weights, so it is
made only while they take under a quarter of the machine's memory. oneDNN compiles a kernel
for each new number of rows, so `packed_linear` pads rows to a few bucket sizes.

Building: cpu.c is compiled once per machine with the system's C compiler (`$CC`, else `cc`;
`-O3 -march=native -fopenmp`, about a second) into a cache folder (`$NANOVLLM_CACHE_DIR`, else
`~/.cache/nanovllm`), under a name hashed from the source, the flags and the CPU
(utils/cbuild.py). The library
links the libgomp that torch has already loaded, so both share one thread pool. Without a
compiler (or if the build fails) `available()` is False and every caller takes the torch path;
`NANOVLLM_CPU_KERNELS=0` chooses the torch path too, for the linear layers as well.
"""

import ctypes
import functools
import logging
import os
from pathlib import Path

import torch

from nanovllm.utils import cbuild

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu.c")
FLAG_SETS = (  # tried in order; the first that builds is used
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-march=native"],  # a compiler without OpenMP (Apple clang): one thread
    ["-O3", "-fopenmp"],  # a compiler without -march=native
    ["-O3"],
)
_P, _I64, _F32, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
SIGNATURES = {
    "decode_attention": [_P, _I64, _P, _I64, _P, _I64, _P, _P, _P, _P, _I64, _P, _P]
    + [_I64] * 5
    + [_F32, _INT],
    "rms_norm": [_P, _I64, _P, _I64, _P, _P, _P, _I64, _I64, _F32, _INT],
    "qk_norm_rope": [_P, _I64, _P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _F32, _INT],
    "silu_and_mul": [_P, _I64, _P, _I64, _I64, _INT],
    "penalize": [_P, _I64, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _INT],
}


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = cbuild.load(SOURCE, FLAG_SETS, libs=["-lm"])
    if lib is None:
        return None
    for name, argtypes in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None
    return lib


def enabled() -> bool:
    """False when NANOVLLM_CPU_KERNELS=0 asks for the torch path everywhere."""
    return os.environ.get("NANOVLLM_CPU_KERNELS", "1") != "0"


def available() -> bool:
    """True when the C kernels are built (or were already) and loaded, and not switched off."""
    return enabled() and _library() is not None


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 0


def pack_linear_weights(model: torch.nn.Module) -> int:
    """Give every module with a `packed` attribute (the linear layers, the LM head) a oneDNN
    copy of its float32 CPU weight; returns how many were packed (0: left on F.linear)."""
    layers = [m for m in model.modules() if hasattr(m, "packed")]
    weights = [m.weight for m in layers]
    if not weights or any(w.dtype != torch.float32 or w.device.type != "cpu" for w in weights):
        return 0
    nbytes = sum(w.numel() * 4 for w in weights)
    if not torch.backends.mkldnn.is_available() or nbytes * 4 > _physical_memory():
        return 0
    try:
        packed = [torch.ops.mkldnn._reorder_linear_weight(w.detach()) for w in weights]
    except (RuntimeError, AttributeError) as e:  # a torch build without these oneDNN ops
        logger.info("oneDNN weight packing unavailable: %s", e)
        return 0
    for layer, p in zip(layers, packed, strict=True):
        layer.packed = p
    return len(layers)


def _bucket(rows: int) -> int:
    """Rows rounded up to a multiple of 8 (up to 256 rows) or of 64 (beyond)."""
    step = 8 if rows <= 256 else 64
    return -(-rows // step) * step


def packed_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [rows, in] @ W^T (+ bias) with W pre-packed by pack_linear_weights: [rows, out].

    oneDNN builds (JIT-compiles) a kernel for every new number of rows, about 0.3 ms at decode
    sizes and a few ms at prefill sizes, so rows are padded to a bucket (see _bucket): a run
    meets a few dozen sizes at most instead of one per batch size and prefill length.
    """
    rows = x.shape[0]
    bucket = _bucket(rows)
    if bucket != rows:
        # [bucket, in]: the padding rows are left unset and never read back (the rows of a
        # product are independent)
        padded = x.new_empty(bucket, x.shape[1])
        padded[:rows] = x
        x = padded
    out = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [None], "")
    return out[:rows] if bucket != rows else out


def _lib() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError("the CPU kernels could not be built (see the log)")
    return lib


def _check_rows(name: str, t: torch.Tensor) -> None:
    if t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() != 2 or t.stride(1) != 1:
        raise ValueError(
            f"{name} must be a 2-D float32 CPU tensor with unit-stride rows, got "
            f"{t.dtype} {tuple(t.shape)} on {t.device}"
        )


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """norm(x) of x [num_tokens, n], or with a residual: (norm(x + residual), x + residual)."""
    _check_rows("x", x)
    rows, n = x.shape
    # [num_tokens, n] each
    out = torch.empty(rows, n, dtype=torch.float32)
    res_out = None
    if residual is not None:
        _check_rows("residual", residual)
        res_out = torch.empty(rows, n, dtype=torch.float32)
    _lib().rms_norm(
        x.data_ptr(),
        x.stride(0),
        None if residual is None else residual.data_ptr(),
        0 if residual is None else residual.stride(0),
        None if res_out is None else res_out.data_ptr(),
        weight.data_ptr(),
        out.data_ptr(),
        rows,
        n,
        eps,
        torch.get_num_threads(),
    )
    return out if res_out is None else (out, res_out)


def qk_norm_rope(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3's per-head RMSNorm of q and k followed by the rotary embedding, in one pass.

    qkv: [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]; positions [num_tokens];
    cos/sin: [max_position, head_dim] float32 tables. Returns new contiguous q [num_tokens,
    num_heads, head_dim] and k [num_tokens, num_kv_heads, head_dim].
    """
    _check_rows("qkv", qkv)
    if head_dim % 2 != 0:
        raise ValueError(f"qk_norm_rope needs an even head_dim, got {head_dim}")
    tokens = qkv.shape[0]
    positions = positions.to(torch.int64).contiguous()
    q = torch.empty(tokens, num_heads, head_dim, dtype=torch.float32)
    k = torch.empty(tokens, num_kv_heads, head_dim, dtype=torch.float32)
    _lib().qk_norm_rope(
        qkv.data_ptr(),
        qkv.stride(0),
        positions.data_ptr(),
        q_weight.data_ptr(),
        k_weight.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        q.data_ptr(),
        k.data_ptr(),
        tokens,
        num_heads,
        num_kv_heads,
        head_dim,
        eps,
        torch.get_num_threads(),
    )
    return q, k


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = [gate | up] of shape [num_tokens, 2 * n]; returns [num_tokens, n]."""
    _check_rows("x", x)
    rows, n = x.shape[0], x.shape[1] // 2
    out = torch.empty(rows, n, dtype=torch.float32)
    _lib().silu_and_mul(x.data_ptr(), x.stride(0), out.data_ptr(), rows, n, torch.get_num_threads())
    return out


def penalize(
    x: torch.Tensor,
    slots: torch.Tensor,
    repetition: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
    counts: torch.Tensor,
    prompt_seen: torch.Tensor | None,
) -> torch.Tensor:
    """Repetition / presence / frequency penalties on float32 x [B, V], in place (returns x);
    the arguments as kernels/sampling.py's penalize (slots [B] int64 into counts [S, V] int32
    and prompt_seen [S, V] bool; the three parameters [B] with one stride)."""
    _check_rows("x", x)
    assert repetition.stride(0) == presence.stride(0) == frequency.stride(0)
    assert slots.dtype == torch.int64 and counts.dtype == torch.int32 and counts.is_contiguous()
    seen = 0
    if prompt_seen is not None:
        assert prompt_seen.is_contiguous() and prompt_seen.shape == counts.shape
        seen = prompt_seen.data_ptr()
    slots = slots.contiguous()
    _lib().penalize(
        x.data_ptr(),
        x.stride(0),
        slots.data_ptr(),
        counts.data_ptr(),
        seen,
        repetition.data_ptr(),
        presence.data_ptr(),
        frequency.data_ptr(),
        repetition.stride(0),
        x.shape[0],
        x.shape[1],
        torch.get_num_threads(),
    )
    return x


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Store k, v (one new row per sequence) in their slots, then attend; float32.

    q: [num_seqs, num_heads, head_dim]; k, v: [num_seqs, num_kv_heads, head_dim] (rows may be
    strided, heads and head_dim contiguous); caches [num_blocks, block_size, num_kv_heads,
    head_dim] contiguous; slot_mapping, seq_lens [num_seqs]; block_tables [num_seqs, width].
    Returns [num_seqs, num_heads, head_dim].
    """
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype != torch.float32 or t.stride(2) != 1 or t.stride(1) != head_dim:
            raise ValueError(f"{name} must be float32 with contiguous heads, got {t.dtype}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the K/V caches must be contiguous")
    if k_cache.dtype != torch.float32 or v_cache.dtype != torch.float32:
        raise ValueError(f"the K/V caches must be float32, got {k_cache.dtype}")
    slots, tables, lens = (
        t.to(torch.int64).contiguous() for t in (slot_mapping, block_tables, seq_lens)
    )
    # [num_seqs, num_heads, head_dim]
    out = torch.empty(num_seqs, num_heads, head_dim, dtype=torch.float32)
    _lib().decode_attention(
        q.data_ptr(),
        q.stride(0),
        k.data_ptr(),
        k.stride(0),
        v.data_ptr(),
        v.stride(0),
        slots.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        tables.data_ptr(),
        tables.stride(0),
        lens.data_ptr(),
        out.data_ptr(),
        num_seqs,
        num_heads,
        num_kv_heads,
        head_dim,
        block_size,
        scale,
        torch.get_num_threads(),
    )
    return out
