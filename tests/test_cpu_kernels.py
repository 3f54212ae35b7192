"""The CPU kernels (nanovllm/kernels/cpu.c) against the torch path they replace, and their build.

Each fused kernel must give the torch path's float32 numbers up to summation order (a few ulps),
for shapes that take the single-threaded and the OpenMP branch, and strided inputs as the model
passes them. The decode attention kernel is tested in test_torch_attention.py.
"""

import pytest
import torch
import torch.nn.functional as F

from nanovllm.kernels import cpu, fused_ops
from nanovllm.layers.layernorm import RMSNorm
from nanovllm.layers.rotary_embedding import RotaryEmbedding

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C compiler for the CPU kernels")


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 2e-6) -> None:
    assert a.shape == b.shape
    if a.numel() == 0:
        return
    assert (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("rows", [0, 1, 24, 700])  # 700 x 200 takes the OpenMP branch
@pytest.mark.parametrize("hidden", [64, 200])
def test_rms_norm(rows: int, hidden: int) -> None:
    gen = torch.Generator().manual_seed(rows + hidden)
    norm = RMSNorm(hidden, eps=1e-6)
    norm.weight.data = torch.randn(hidden, generator=gen)
    # rows of a wider tensor: strided like a slice of the model's activations
    x = torch.randn(rows, hidden + 8, generator=gen)[:, :hidden]
    res = torch.randn(rows, hidden, generator=gen)
    res_before = res.clone()
    close(cpu.rms_norm(x, norm.weight, 1e-6), norm._norm(x))
    y, r = cpu.rms_norm(x, norm.weight, 1e-6, res)
    assert torch.equal(r, x + res)  # one float32 addition, as torch does it
    assert torch.equal(res, res_before)  # the residual passed in is not touched
    close(y, norm._norm(x + res))


@pytest.mark.parametrize("heads", [(4, 2, 16), (8, 1, 64), (2, 2, 24), (16, 8, 128)])
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_qk_norm_rope(heads: tuple[int, int, int], tokens: int) -> None:
    num_heads, num_kv_heads, head_dim = heads
    gen = torch.Generator().manual_seed(head_dim + tokens)
    rope = RotaryEmbedding(head_dim, 4096, {"rope_theta": 1e6, "rope_type": "default"})
    q_norm, k_norm = RMSNorm(head_dim), RMSNorm(head_dim)
    q_norm.weight.data = torch.randn(head_dim, generator=gen)
    k_norm.weight.data = torch.randn(head_dim, generator=gen)
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen)
    positions = torch.randint(0, 4096, (tokens,), generator=gen)
    q, k = cpu.qk_norm_rope(
        qkv,
        positions,
        q_norm.weight,
        k_norm.weight,
        rope.cos,
        rope.sin,
        num_heads,
        num_kv_heads,
        head_dim,
        1e-6,
    )
    q0, k0, _ = qkv.split([num_heads * head_dim] + [num_kv_heads * head_dim] * 2, -1)
    # the torch path: 3-D norms and the rotation of transformers
    ref_q, ref_k = rope(
        positions,
        q_norm(q0.reshape(-1, num_heads, head_dim)),
        k_norm(k0.reshape(-1, num_kv_heads, head_dim)),
    )
    assert q.is_contiguous() and k.is_contiguous()
    close(q, ref_q)
    close(k, ref_k)


def test_qk_norm_rope_refuses_an_odd_head_dim() -> None:
    with pytest.raises(ValueError, match="even head_dim, got 5"):
        t = torch.zeros(1, 20)
        cpu.qk_norm_rope(t, torch.zeros(1, dtype=torch.int64), t, t, t, t, 2, 1, 5, 1e-6)


@pytest.mark.parametrize("rows", [1, 5, 100])  # 100 x 1500 takes the OpenMP branch
def test_silu_and_mul(rows: int) -> None:
    # large gates too: e^-g overflows for g < -88, where silu is -0
    x = torch.randn(rows, 2 * 1500, generator=torch.Generator().manual_seed(rows)) * 30
    gate, up = x.chunk(2, dim=-1)
    close(cpu.silu_and_mul(x), F.silu(gate) * up)


def test_kernels_refuse_other_dtypes_and_layouts() -> None:
    with pytest.raises(
        ValueError, match="x must be a 2-D float32 CPU tensor .* got torch.bfloat16"
    ):
        cpu.silu_and_mul(torch.zeros(2, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="unit-stride rows"):
        cpu.rms_norm(torch.zeros(8, 4).t(), torch.ones(8), 1e-6)


def test_fused_ops_by_device_and_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    assert fused_ops(torch.zeros(2, 2)) is cpu
    assert fused_ops(torch.zeros(2, 2, dtype=torch.bfloat16)) is None
    monkeypatch.setenv("NANOVLLM_CPU_KERNELS", "0")
    assert fused_ops(torch.zeros(2, 2)) is None and not cpu.available()


@pytest.mark.parametrize("rows", [1, 7, 8, 9, 256, 257, 300])
def test_packed_linear_matches_f_linear(rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    w, b = torch.randn(96, 40, generator=gen), torch.randn(96, generator=gen)
    x = torch.randn(rows, 40, generator=gen)
    packed = torch.ops.mkldnn._reorder_linear_weight(w)
    out = cpu.packed_linear(x, packed, b)
    assert out.shape == (rows, 96) and out.is_contiguous()
    close(out, F.linear(x, w, b), tol=1e-5)


def test_pack_linear_weights_packs_every_linear_of_the_model() -> None:
    from nanovllm.layers.embed_head import ParallelLMHead
    from nanovllm.layers.linear import MergedColumnParallelLinear, RowParallelLinear

    model = torch.nn.ModuleList(
        [
            MergedColumnParallelLinear(16, [24, 24], bias=False),
            RowParallelLinear(24, 16, bias=True),
            ParallelLMHead(50, 16),
        ]
    )
    for p in model.parameters():
        p.data.normal_()
    x = torch.randn(5, 16)
    before = [model[0](x), model[1](x.repeat(1, 3)[:, :24]), model[2](x)]
    assert cpu.pack_linear_weights(model) == 3
    assert all(m.packed is not None for m in model)
    after = [model[0](x), model[1](x.repeat(1, 3)[:, :24]), model[2](x)]
    for a, b in zip(after, before, strict=True):
        close(a, b, tol=1e-5)
    # bfloat16 weights are left to F.linear
    assert (
        cpu.pack_linear_weights(torch.nn.ModuleList([RowParallelLinear(8, 8, False).bfloat16()]))
        == 0
    )
