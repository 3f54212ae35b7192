"""The skinny decode product (kernels/skinny_gemm.py) against F.linear in float64.

On CUDA natively (bfloat16 / float16, the engine's shapes too); on a CPU under
TRITON_INTERPRET=1 (CI) at small shapes in float16 / float32. Cases cover ragged rows, columns
and K (not multiples of the tiles), every split count including uneven ones, the folded SiLU-mul,
a bias, and the split reduction's invariants: the same bits every call, counters back at zero.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from nanovllm.kernels import HAS_TRITON

CUDA = torch.cuda.is_available() and HAS_TRITON
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and HAS_TRITON
pytestmark = pytest.mark.skipif(
    not (CUDA or INTERPRET), reason="needs CUDA, or TRITON_INTERPRET=1 for the interpreter"
)
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.bfloat16, torch.float16] if CUDA else [torch.float16, torch.float32]
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}

# (rows, columns, K, launch (BLOCK_N, BLOCK_K, splits, warps, stages) or None = default)
CASES = [
    (1, 64, 128, (64, 32, 1, 4, 2)),
    (3, 96, 160, None),
    (5, 40, 100, (16, 32, 3, 4, 2)),  # ragged N and K, 3 splits, the last one short
    (16, 128, 256, (64, 64, 4, 4, 2)),
    (17, 200, 96, (32, 32, 2, 4, 2)),
    (33, 64, 520, (64, 64, 8, 4, 3)),  # 8 splits of 128 of K: the last one 8 long
]
if CUDA:  # the engine's products at decode sizes, and the most rows one call takes
    CASES += [
        (1, 4096, 1024, None),
        (48, 1024, 2048, None),
        (256, 1024, 3072, None),
        (256, 6144, 1024, (128, 64, 2, 8, 3)),
        (100, 1024, 2048, (64, 128, 16, 4, 2)),
    ]


def reference(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, gated: bool
) -> torch.Tensor:
    """F.linear in float64, rounded to x's dtype; gated: silu(gate) * up rounded as the
    engine's F.linear + silu_and_mul (gate, up, then silu rounded to the dtype)."""
    y = F.linear(x.double(), w.double(), None if b is None else b.double())
    if not gated:
        return y.to(x.dtype)
    n = y.shape[1] // 2
    gate, up = y[:, :n].to(x.dtype).double(), y[:, n:].to(x.dtype).double()
    return (F.silu(gate).to(x.dtype).double() * up).to(x.dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (NaN anywhere gives NaN, which fails every comparison)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-{c[3]}")
def test_skinny_linear_matches_f_linear(case: tuple, gated: bool, dtype: torch.dtype) -> None:
    from nanovllm.kernels.skinny_gemm import _COUNTERS, skinny_linear

    m, n, k, config = case
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(2 * n if gated else n, k, generator=gen) / k**0.5).to(DEVICE, dtype)
    bias = torch.randn(w.shape[0], generator=gen).to(DEVICE, dtype) if n % 2 == 0 else None
    got = skinny_linear(x, w, bias, gated=gated, config=config)
    assert got.shape == (m, n) and got.dtype == dtype
    ref = reference(x, w, bias, gated)
    assert rel_err(got, ref) < TOL[dtype], (rel_err(got, ref), case)
    # the split reduction sums in split order: the same bits again; counters left at zero
    assert torch.equal(skinny_linear(x, w, bias, gated=gated, config=config), got)
    if DEVICE in _COUNTERS:
        assert int(_COUNTERS[DEVICE].abs().sum()) == 0


def test_skinny_linear_refuses_bad_shapes() -> None:
    from nanovllm.kernels.skinny_gemm import MAX_ROWS, skinny_linear

    w = torch.randn(64, 32, device=DEVICE, dtype=DTYPES[0])
    with pytest.raises(ValueError, match=f"{MAX_ROWS + 1} rows, at most {MAX_ROWS}"):
        skinny_linear(torch.randn(MAX_ROWS + 1, 32, device=DEVICE, dtype=DTYPES[0]), w)
    with pytest.raises(ValueError, match="x has 48 columns, the weight 32"):
        skinny_linear(torch.randn(4, 48, device=DEVICE, dtype=DTYPES[0]), w)
    with pytest.raises(ValueError, match="even row count, got 63"):
        skinny_linear(torch.randn(4, 32, device=DEVICE, dtype=DTYPES[0]), w[:63], gated=True)
    assert skinny_linear(torch.randn(0, 32, device=DEVICE, dtype=DTYPES[0]), w).shape == (0, 64)


def test_the_layers_take_the_skinny_kernel_only_for_16_bit_rows_on_cuda() -> None:
    from nanovllm.kernels.skinny_gemm import MAX_ROWS
    from nanovllm.layers.linear import SKINNY_MAX_ROWS, use_skinny

    assert 0 < SKINNY_MAX_ROWS <= MAX_ROWS
    w16 = torch.randn(64, 32, dtype=torch.float16)
    # never on a CPU (the interpreter runs only when a test calls the kernel itself)
    assert not use_skinny(torch.randn(4, 32, dtype=torch.float16), w16)
    if CUDA:
        w = w16.cuda()
        assert use_skinny(torch.randn(4, 32, device="cuda", dtype=torch.float16), w)
        assert not use_skinny(torch.randn(4, 32, device="cuda"), w.float())  # TF32, not float32
        assert use_skinny(torch.randn(SKINNY_MAX_ROWS, 32, device="cuda", dtype=torch.float16), w)
        big = torch.randn(SKINNY_MAX_ROWS + 1, 32, device="cuda", dtype=torch.float16)
        assert not use_skinny(big, w)
        assert not use_skinny(torch.randn(0, 32, device="cuda", dtype=torch.float16), w)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs")
def test_skinny_linear_in_a_cuda_graph_replays_the_eager_result() -> None:
    from nanovllm.kernels.skinny_gemm import skinny_linear

    x = torch.randn(64, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1024, 2048, device="cuda", dtype=torch.bfloat16) / 45
    eager = skinny_linear(x, w, config=(64, 128, 8, 4, 4))
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = skinny_linear(x, w, config=(64, 128, 8, 4, 4))
    for _ in range(3):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
    x.copy_(torch.randn_like(x))  # new inputs through the same graph
    graph.replay()
    assert torch.equal(out, skinny_linear(x, w, config=(64, 128, 8, 4, 4)))
