"""The CPU fast path: float32 decode attention in C, everything else as the torch backend.

The torch backend's decode copies every key and value a step needs into a padded batch
(index_select), then runs two batched products and a softmax: each K/V byte moves three times,
in five aten calls a layer. Here one C function (cpu_decode.c) stores the step's new K/V rows
and attends, reading each key row once through the block table, for all the query heads that
share it, one OpenMP task per (sequence, K/V head). Prefill (and anything but a float32 decode)
takes the torch backend's path, which stays the reference the kernels are tested against.

The C file is compiled once per machine with the system's C compiler (`$CC`, else `cc`;
`-O3 -march=native -fopenmp`, about a second) into a cache folder (`$NANOVLLM_CACHE_DIR`, else
`~/.cache/nanovllm`), named by a hash of the source, the flags and the CPU, and loaded with
ctypes. The library links the libgomp torch has already loaded, so both share one thread
pool. Without a compiler, or if the build fails, `available()` is False and "auto" picks the
torch backend.
"""

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from nanovllm.attention.torch_backend import TorchAttentionBackend
from nanovllm.utils.context import AttentionMetadata

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_decode.c")
FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-march=native"],  # a compiler without OpenMP (Apple clang): one thread
)


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(
                line for line in f if line.startswith(("model name", "flags", "Features"))
            )
    except OSError:
        return platform.processor() + platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("NANOVLLM_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "nanovllm"
    )
    return Path(root)


def _build(compiler: str, flags: list[str]) -> Path | None:
    """The shared library built from SOURCE with these flags (cached), or None on failure."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join([source, compiler.encode(), " ".join(flags).encode(), _cpu_signature().encode()])
    ).hexdigest()[:16]
    target = _cache_dir() / f"cpu_decode-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: processes building at once never load half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [compiler, *flags, "-shared", "-fPIC", "-std=c11", str(SOURCE), "-o", tmp, "-lm"]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            logger.info("building %s failed: %s", SOURCE.name, result.stderr.strip()[-500:])
            return None
        os.replace(tmp, target)
        return target
    except (OSError, subprocess.SubprocessError) as e:
        logger.info("building %s failed: %s", SOURCE.name, e)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def _library() -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        logger.info("no C compiler (%s): the cpu attention backend is unavailable", compiler)
        return None
    for flags in FLAG_SETS:
        path = _build(compiler, flags)
        if path is not None:
            break
    else:
        return None
    lib = ctypes.CDLL(str(path))
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.decode_attention_f32.argtypes = [p, i64, p, i64, p, i64, p, p, p, p, i64, p, p]
    lib.decode_attention_f32.argtypes += [i64] * 5 + [f32, ctypes.c_int]
    lib.decode_attention_f32.restype = None
    return lib


def available() -> bool:
    """True when the C kernel is built (or was already) and loaded."""
    return _library() is not None


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
    """Store k, v (one new row per sequence) in their slots, then attend; float32, CPU.

    q: [num_seqs, num_heads, head_dim]; k, v: [num_seqs, num_kv_heads, head_dim] (rows may be
    strided, heads and head_dim contiguous); caches [num_blocks, block_size, num_kv_heads,
    head_dim] contiguous; slot_mapping, seq_lens [num_seqs]; block_tables [num_seqs, width].
    Returns [num_seqs, num_heads, head_dim].
    """
    lib = _library()
    if lib is None:
        raise RuntimeError("the cpu attention kernel could not be built (see the log)")
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
    out = torch.empty(num_seqs, num_heads, head_dim)
    lib.decode_attention_f32(
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


class CpuAttentionBackend(TorchAttentionBackend):
    """Float32 decode steps in C (cpu_decode.c); prefill and other dtypes as the torch backend."""

    name = "cpu"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        if meta.is_prefill or k_cache.numel() == 0 or q.dtype != torch.float32:
            return super().forward(q, k, v, k_cache, v_cache, meta, scale)
        if q.shape[1] % k.shape[1] != 0:
            raise ValueError(
                f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads"
            )
        return decode_attention(
            q,
            k,
            v,
            k_cache,
            v_cache,
            meta.slot_mapping,
            meta.block_tables,
            meta.seq_lens,
            scale,
        )
