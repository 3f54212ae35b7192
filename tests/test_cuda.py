"""The whole engine on CUDA: the Triton backend against the torch reference backend, with CUDA
graphs on and off, and against transformers. Skipped without a GPU.

In bfloat16, random weights make near-ties between the top two logits common, so exact token
equality between two correct implementations is the wrong yardstick there: the engines are
teacher-forced on the same tokens and their logits compared (relative error under BF16_LOGIT_TOL:
bfloat16 keeps 8 bits of mantissa, a relative rounding of 2^-8 = 3.9e-3 per value, and a logit sums
thousands of rounded products through 28 layers, so about 1e-2 is where two correct bf16
implementations land); greedy tokens must then agree wherever the reference's top-2 margin is
larger than that error. The plain free-running agreement rate is reported, not gated.
"""

import json
import os
import random

import pytest
import torch
from conftest import hf_greedy

from nanovllm import LLM, SamplingParams
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.step_plan import plan_step
from nanovllm.utils.dummy import write_model_folder

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
BF16_LOGIT_TOL = 2e-2


def prompts_of(lengths: list[int], seed: int = 0, vocab: int = 400) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def report(name: str, value: object) -> None:
    """Write a measured value where the GPU script collects them (and print it)."""
    print(f"{name}: {value}")
    folder = os.environ.get("NANOVLLM_REPORT_DIR")
    if folder:
        with open(os.path.join(folder, "cuda_test_report.jsonl"), "a") as f:
            f.write(json.dumps({name: value}) + "\n")


def test_fp32_greedy_matches_transformers(tiny_model_dir: str, hf_model: torch.nn.Module) -> None:
    prompts = prompts_of([1, 17, 64, 300])
    expected = [hf_greedy(hf_model, p, 16) for p in prompts]
    with LLM(tiny_model_dir, device="cuda", dtype="float32", kvcache_block_size=16) as llm:
        assert llm.engine.runner.attn_backend.name == "triton"
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected


GREEDY_LENGTHS = [1, 3, 16, 17, 40, 100, 255, 256, 257, 600]


def greedy_tokens(
    path: str, num_kvcache_blocks: int = 400, check_ahead: bool = True, **kwargs: object
) -> list[list[int]]:
    prompts = prompts_of(GREEDY_LENGTHS, seed=2)
    with LLM(path, device="cuda", num_kvcache_blocks=num_kvcache_blocks, **kwargs) as llm:
        # twice: the second pass hits the prefix cache; requests end at different steps
        params = [SamplingParams(temperature=0, max_tokens=1 + (7 * i) % 24) for i in range(10)]
        first = llm.generate(prompts, params, use_tqdm=False)
        second = llm.generate(prompts, params, use_tqdm=False)
        ahead = llm.engine.stats.steps_ahead
        prefill_ahead = llm.engine.stats.prefill_steps_ahead
    a = [o.outputs[0].token_ids for o in first]
    assert a == [o.outputs[0].token_ids for o in second]
    graphs = kwargs.get("attention_backend") != "torch" and not kwargs.get("enforce_eager")
    if check_ahead:  # decode steps run ahead exactly when CUDA graphs are on
        assert (ahead > 0) == graphs, ahead
        # several prefill steps a pass: they overlap (launched behind the one before)
        assert prefill_ahead > 0
    return a


@pytest.mark.parametrize("block_size", [16, 256])
def test_fp32_triton_equals_torch_backend(tiny_model_dir: str, block_size: int) -> None:
    """Greedy tokens of the Triton backend, with and without CUDA graphs, equal the torch
    backend's, with chunked prefill and prefix hits."""
    common = dict(dtype="float32", kvcache_block_size=block_size, max_num_batched_tokens=300)
    reference = greedy_tokens(tiny_model_dir, attention_backend="torch", **common)
    graphs = greedy_tokens(tiny_model_dir, attention_backend="triton", **common)
    eager = greedy_tokens(tiny_model_dir, attention_backend="triton", enforce_eager=True, **common)
    assert graphs == reference
    assert eager == reference


def test_preemption_with_graphs_equals_torch_backend(tiny_model_dir: str) -> None:
    """A pool too small for every sequence at once: preemption (and no room to run ahead)."""
    common = dict(
        dtype="float32",
        kvcache_block_size=16,
        num_kvcache_blocks=60,
        max_model_len=700,
        check_ahead=False,
    )
    reference = greedy_tokens(tiny_model_dir, attention_backend="torch", **common)
    assert greedy_tokens(tiny_model_dir, attention_backend="triton", **common) == reference


def test_every_sampling_setting_runs_ahead(tiny_model_dir: str) -> None:
    """Penalties, top-k/top-p/min-p, seeds, min_tokens and logprobs all sample on the device
    and run ahead; a seeded request gives the same tokens alone and in the batch; logprobs
    agree with a run on the torch path."""
    prompts = prompts_of([5, 40, 17, 90, 33, 64], seed=4)
    heavy = SamplingParams(
        temperature=0.7,
        top_k=50,
        top_p=0.9,
        min_p=0.05,
        repetition_penalty=1.1,
        presence_penalty=0.3,
        frequency_penalty=0.2,
        seed=123,
        max_tokens=24,
        min_tokens=4,
        logprobs=3,
    )
    params = [
        heavy,
        SamplingParams(temperature=0.6, top_k=20, top_p=0.95, max_tokens=24),
        SamplingParams(temperature=0.6, top_p=0.8, max_tokens=24, seed=9),
        SamplingParams(temperature=0, max_tokens=24, logprobs=2, repetition_penalty=1.2),
        SamplingParams(temperature=1.0, min_p=0.1, max_tokens=24),
        SamplingParams(temperature=0.6, max_tokens=24, logprobs=5),
    ]
    common = dict(dtype="float32", kvcache_block_size=16, num_kvcache_blocks=64, max_model_len=512)
    with LLM(tiny_model_dir, device="cuda", **common) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert llm.engine.stats.steps_ahead > 0
        alone = llm.generate(prompts[:1], params[:1], use_tqdm=False)
    assert alone[0].outputs[0].token_ids == outs[0].outputs[0].token_ids
    assert len(outs[0].outputs[0].logprobs) == 24
    for o, p in zip(outs, params, strict=True):
        # all 24 tokens, unless the row drew its end-of-sequence token (as any token, by chance)
        done = o.outputs[0]
        assert len(done.token_ids) == 24 or (done.finish_reason == "stop" and done.token_ids)
        if p.logprobs is not None:
            for token, entry in zip(o.outputs[0].token_ids, o.outputs[0].logprobs, strict=True):
                assert token in entry and len(entry) <= p.logprobs + 1
    # the greedy row with a penalty, and its logprobs, equal the CPU engine's
    with LLM(tiny_model_dir, device="cpu", **common) as cpu:
        ref = cpu.generate(prompts[3:4], params[3:4], use_tqdm=False)[0].outputs[0]
    got = outs[3].outputs[0]
    assert got.token_ids == ref.token_ids
    for a, b in zip(got.logprobs, ref.logprobs, strict=True):
        assert a.keys() == b.keys()
        for t in a:
            assert abs(a[t].logprob - b[t].logprob) < 1e-3 and a[t].rank == b[t].rank


def test_no_step_runs_ahead_past_the_length_limit(tiny_model_dir: str) -> None:
    """A batch that ends all at once by max_tokens launches no decode step past its last
    token (max_tokens = M: one prefill step, M - 1 decode steps of which the first is launched
    as usual and the other M - 2 ahead); rows that the pending token ends leave the launched
    step, and the tokens equal those of a run without running ahead."""
    prompts = prompts_of([5, 40, 17, 90], seed=6)
    common = dict(dtype="float32", kvcache_block_size=16, num_kvcache_blocks=64, max_model_len=512)
    same = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
    mixed = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (2, 9, 5, 9)]
    with LLM(tiny_model_dir, device="cuda", **common) as llm:
        llm.engine.stats.steps_ahead = 0
        outs = llm.generate(prompts, same, use_tqdm=False)
        assert llm.engine.stats.steps_ahead == 9 - 2
        assert [len(o.outputs[0].token_ids) for o in outs] == [9] * 4
        llm.engine.stats.steps_ahead = 0
        got = llm.generate(prompts, mixed, use_tqdm=False)
        assert llm.engine.stats.steps_ahead == 9 - 2
    os.environ["NANOVLLM_RUN_AHEAD"] = "0"
    try:
        with LLM(tiny_model_dir, device="cuda", **common) as llm:
            ref = llm.generate(prompts, mixed, use_tqdm=False)
            assert llm.engine.stats.steps_ahead == 0
    finally:
        del os.environ["NANOVLLM_RUN_AHEAD"]
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]
    assert [len(o.outputs[0].token_ids) for o in got] == [2, 9, 5, 9]


def test_cuda_graphs_are_used(tiny_model_dir: str) -> None:
    with LLM(tiny_model_dir, device="cuda", dtype="float32", num_kvcache_blocks=64) as llm:
        graphs = llm.engine.runner.graphs
        assert graphs is not None and graphs.batch_sizes[-1] == 256
        assert len(graphs.graphs) == len(graphs.batch_sizes)
    with LLM(
        tiny_model_dir, device="cuda", dtype="float32", num_kvcache_blocks=64, enforce_eager=True
    ) as llm:
        assert llm.engine.runner.graphs is None


def teacher_forced_logits(llm: LLM, prompts: list[list[int]], forced: list[list[int]]) -> list:
    """Logits of the prefill and of each decode step, every sequence fed `forced` tokens.

    Returns [num_steps] tensors of [num_seqs, vocab] (float32, on the CPU).
    """
    engine = llm.engine
    seqs = [
        Sequence(p, SamplingParams(temperature=0), llm.config.kvcache_block_size) for p in prompts
    ]
    for seq in seqs:
        engine.block_manager.allocate(seq)  # the prompt may hit the prefix cache
        seq.num_scheduled_tokens = len(seq) - seq.num_cached_tokens
    steps = [engine.runner.execute(plan_step(seqs, True)).float().cpu()]
    for step in range(len(forced[0])):
        for seq, tokens in zip(seqs, forced, strict=True):
            seq.num_cached_tokens = len(seq)
            seq.append_token(tokens[step])
            engine.block_manager.may_append(seq)
            seq.num_scheduled_tokens = 1
        steps.append(engine.runner.execute(plan_step(seqs, False)).float().cpu())
    for seq in seqs:
        engine.block_manager.deallocate(seq)
    return steps


def test_bf16_teacher_forced_logits_agree(tmp_path: object) -> None:
    """Qwen3-0.6B shape in bfloat16, 32 prompts: Triton + graphs against the torch backend."""
    path = write_model_folder(str(tmp_path), "qwen3-0.6b", tokenizer=False)
    prompts = prompts_of(
        [random.Random(i).randint(20, 300) for i in range(32)], seed=5, vocab=10000
    )
    common = dict(load_format="dummy", device="cuda", dtype="bfloat16", num_kvcache_blocks=600)
    with LLM(path, attention_backend="torch", enforce_eager=True, **common) as llm:
        ref_out = llm.generate(
            prompts, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False
        )
        ref_tokens = [o.outputs[0].token_ids for o in ref_out]
        forced = [t[:16] for t in ref_tokens]
        ref_logits = teacher_forced_logits(llm, prompts, forced)
    torch.cuda.empty_cache()
    with LLM(path, attention_backend="triton", **common) as llm:
        out = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)
        tokens = [o.outputs[0].token_ids for o in out]
        logits = teacher_forced_logits(llm, prompts, forced)
    torch.cuda.empty_cache()
    # the same weights in float32 (same seed, dummy init): the ground truth for both
    fp32 = {**common, "dtype": "float32"}
    with LLM(path, attention_backend="torch", enforce_eager=True, **fp32) as llm:
        truth = teacher_forced_logits(llm, prompts, forced)

    def rel(xs: list, ys: list) -> list[float]:
        return [round(((a - b).norm() / b.norm()).item(), 5) for a, b in zip(xs, ys, strict=True)]

    errors = rel(logits, ref_logits)
    triton_vs_fp32, torch_vs_fp32 = rel(logits, truth), rel(ref_logits, truth)
    report("bf16 triton vs bf16 torch logit rel err (prefill, 16 decode steps)", errors)
    report("bf16 triton vs fp32 logit rel err", triton_vs_fp32)
    report("bf16 torch vs fp32 logit rel err", torch_vs_fp32)
    assert max(errors) < BF16_LOGIT_TOL
    # the Triton path is as close to the float32 truth as the reference bf16 path is
    assert max(triton_vs_fp32) < 1.25 * max(torch_vs_fp32)
    # Greedy choices agree wherever the reference's top-2 margin is clear of the error: a logit
    # errs by about BF16_LOGIT_TOL x the row's rms logit, so a margin of 4x that is clear.
    checked = disagreed = 0
    for a, b in zip(logits, ref_logits, strict=True):
        top2 = b.topk(2, dim=-1).values
        rms = b.norm(dim=-1) / b.shape[-1] ** 0.5
        clear = (top2[:, 0] - top2[:, 1]) > 4 * BF16_LOGIT_TOL * rms
        checked += int(clear.sum())
        disagreed += int((a.argmax(-1) != b.argmax(-1))[clear].sum())
    report("bf16 clear-margin greedy positions checked", checked)
    assert checked > 0 and disagreed == 0
    same = sum(
        x == y for t, r in zip(tokens, ref_tokens, strict=True) for x, y in zip(t, r, strict=False)
    )
    total = sum(len(r) for r in ref_tokens)
    # free-running agreement until the first divergence of each sequence
    prefix = 0
    for t, r in zip(tokens, ref_tokens, strict=True):
        for x, y in zip(t, r, strict=False):
            if x != y:
                break
            prefix += 1
    report("bf16 greedy token agreement (32 prompts x 64 tokens)", f"{same}/{total}")
    report("bf16 greedy tokens before first divergence", f"{prefix}/{total}")


@pytest.mark.parametrize("calculate_kv_scales", [False, True])
def test_fp8_kv_cache_logits_stay_close(tmp_path: object, calculate_kv_scales: bool) -> None:
    """kv_cache_dtype="fp8": twice the cache blocks, and teacher-forced logits close to a
    bfloat16 cache's (float8 e4m3 keeps 3 mantissa bits; attention averages the rounding).
    With calculate_kv_scales the scales are set by the first prefill, after the decode CUDA
    graphs were captured: graphs that kept the old scales (1.0) would read the cache wrongly."""
    path = write_model_folder(str(tmp_path), "qwen3-0.6b", tokenizer=False)
    prompts = prompts_of(
        [random.Random(i).randint(20, 300) for i in range(16)], seed=7, vocab=10000
    )
    common = dict(load_format="dummy", device="cuda", dtype="bfloat16")
    params = SamplingParams(temperature=0, max_tokens=32)
    with LLM(path, gpu_memory_utilization=0.3, **common) as llm:
        blocks = llm.engine.runner.num_kvcache_blocks
        ref_tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        forced = [t[:8] for t in ref_tokens]
        ref_logits = teacher_forced_logits(llm, prompts, forced)
    torch.cuda.empty_cache()
    fp8 = dict(kv_cache_dtype="fp8", calculate_kv_scales=calculate_kv_scales)
    with LLM(path, gpu_memory_utilization=0.3, **fp8, **common) as llm:
        assert llm.engine.runner.num_kvcache_blocks >= 1.5 * blocks  # 438 -> 804 seen
        layers = llm.engine.runner.attention_layers
        assert layers[0].k_cache.dtype == torch.float8_e4m3fn
        out = llm.generate(prompts, params, use_tqdm=False)
        logits = teacher_forced_logits(llm, prompts, forced)
        scales = torch.cat([torch.cat([a.k_scale, a.v_scale]) for a in layers]).cpu()
    if calculate_kv_scales:  # computed: far from 1 somewhere, else the test shows nothing
        report("fp8 calculated k/v scales (min, max)", [scales.min().item(), scales.max().item()])
        assert (scales - 1).abs().max() > 0.2
    else:
        assert torch.equal(scales, torch.ones_like(scales))
    errors = [
        round(((a - b).norm() / b.norm()).item(), 4)
        for a, b in zip(logits, ref_logits, strict=True)
    ]
    tag = ", calculated scales" if calculate_kv_scales else ""
    report(f"fp8 KV{tag} vs bf16 KV logit rel err (prefill, 8 decode steps)", errors)
    same = sum(
        x == y
        for o, r in zip(out, ref_tokens, strict=True)
        for x, y in zip(o.outputs[0].token_ids, r, strict=False)
    )
    report(f"fp8 KV{tag} greedy token agreement (16 prompts x 32 tokens)", f"{same}/{16 * 32}")
    assert max(errors) < 0.15


def test_calculate_kv_scales_from_first_prefill(tmp_path: object) -> None:
    """calculate_kv_scales=True: still 1.0 after start-up (the memory profile and the graph
    capture run forwards too), then each layer's max|k| / 200 and max|v| / 100 over the first
    prefill step's K and V (seen here by a hook on every attention layer); fixed afterwards."""
    from nanovllm.layers.attention import K_SCALE_RANGE, V_SCALE_RANGE
    from nanovllm.utils.context import get_context

    path = write_model_folder(str(tmp_path), "qwen3-0.6b", tokenizer=False)
    common = dict(load_format="dummy", device="cuda", dtype="bfloat16", max_model_len=1024)
    with LLM(
        path, kv_cache_dtype="fp8", calculate_kv_scales=True, num_kvcache_blocks=40, **common
    ) as llm:
        layers = llm.engine.runner.attention_layers
        for layer in layers:
            assert layer.k_scale.item() == 1.0 and layer.v_scale.item() == 1.0
            assert layer.calculate_kv_scales
        seen: dict[int, tuple[float, float]] = {}

        def hook(layer: torch.nn.Module, args: tuple) -> None:
            _, k, v = args
            if get_context().is_prefill and id(layer) not in seen:
                seen[id(layer)] = (k.abs().max().float().item(), v.abs().max().float().item())

        handles = [layer.register_forward_pre_hook(hook) for layer in layers]
        params = SamplingParams(temperature=0, max_tokens=4)
        llm.generate(prompts_of([50, 300, 7], seed=3, vocab=10000), params, use_tqdm=False)
        for handle in handles:
            handle.remove()
        first = [(a.k_scale.item(), a.v_scale.item()) for a in layers]
        for layer, (k_scale, v_scale) in zip(layers, first, strict=True):
            k_max, v_max = seen[id(layer)]
            assert k_scale == pytest.approx(k_max / K_SCALE_RANGE, rel=1e-6)
            assert v_scale == pytest.approx(v_max / V_SCALE_RANGE, rel=1e-6)
            assert not layer.calculate_kv_scales
        assert len(set(first)) > 1  # per layer, not one value for all
        # a later prefill (another, longer prompt) leaves them as they are
        llm.generate(prompts_of([500], seed=4, vocab=10000), params, use_tqdm=False)
        assert [(a.k_scale.item(), a.v_scale.item()) for a in layers] == first


def test_gpu_memory_utilization_sizes_cache(tmp_path: object) -> None:
    # The real Qwen3-0.6B shape: blocks are large, so the fraction of memory (not the cap of
    # max_num_seqs full-length sequences) decides the pool size.
    path = write_model_folder(str(tmp_path), "qwen3-0.6b", tokenizer=False)
    sizes = []
    for util in (0.2, 0.4):
        with LLM(path, load_format="dummy", device="cuda", gpu_memory_utilization=util) as llm:
            sizes.append(llm.engine.runner.num_kvcache_blocks)
            block_bytes = llm.engine.runner._block_bytes()
        torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    assert 0 < sizes[0] < sizes[1]
    # Doubling the fraction adds about 0.2 of the memory in blocks.
    added = (sizes[1] - sizes[0]) * block_bytes
    assert 0.15 * total < added < 0.25 * total
