"""FP8 KV-cache quality gate: does a float8 cache change what the model says?

What it runs (one CUDA GPU, about a minute): the Qwen3-0.6B shape with dummy weights
(load_format="dummy", bfloat16, seed 0: every engine below gets the same weights), the first
`--num-prompts` (64) prompts of bench.py's standard workload (100..1024 random token ids).
1. A bfloat16 cache generates `--steps` (32) greedy tokens per prompt (ignore_eos).
2. The same tokens are teacher-forced, through the engine's own prefill and decode steps
   (decode in CUDA graphs, as in generate), through a bfloat16 cache (the reference) and through
   float8 caches with calculate_kv_scales off (scales 1.0) and on (set by the first prefill).
   Teacher forcing is what makes the comparison fair: every engine predicts from the same
   tokens at every step, so one early disagreement does not make all later steps differ.
   (prompt_logprobs over prompt + bf16's tokens would teacher-force too, but as one prefill:
   the decode kernel and its CUDA graphs, where an FP8 cache pays, would never run.)
3. Per cache: the logprob each engine gives the bf16 run's token at each step, and its
   top-1 token. Printed: max and mean |logprob_fp8 - logprob_bf16| over prompts x steps, the
   top-1 agreement with the bf16 run's tokens, and for the bf16 reference how often its
   teacher-forced top-1 equals its own generated token (it should be ~100%: the same engine).

What it means with dummy weights. Random weights give near-uniform next-token distributions over
151,936 tokens: logprobs sit near -log(151936) = -11.9 and the top two logits are often nearly
tied, so (a) the logprob differences measure how far FP8 moves the logits, in nats, which is the
useful number, and (b) top-1 agreement is a harsh yardstick: a near-tie flips on a rounding that
a trained model, with a confident top token, would never notice. The table therefore also prints
the reference's median top-1 probability and its median top-1/top-2 logprob margin, so a low
agreement can be read against how tied the choices were. A real checkpoint (--model) gives the
meaningful agreement number.

Usage: PYTHONPATH=. python3 scripts/fp8_quality.py [--num-prompts 64] [--steps 32] [--json PATH]
       [--model FOLDER]  (a real checkpoint instead of dummy weights)
A float8 cache needs CUDA (the Triton backend), so the script refuses to run without a GPU.
"""

import argparse
import json
import math
import sys
import tempfile
import time

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.step_plan import plan_step
from nanovllm.utils.benchmark import standard_workload
from nanovllm.utils.dummy import write_model_folder


def teacher_forced(
    llm: LLM, prompts: list[list[int]], tokens: list[list[int]], max_prefill_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Feed each prompt, then its `tokens` one decode step at a time, through the engine.

    Prompts are prefilled in groups of at most max_prefill_tokens tokens (as the scheduler's
    budget would cut them); every decode step runs all sequences together. Step j predicts
    tokens[i][j] from the prompt and tokens[i][:j]. Returns, each [num_prompts, steps] on the
    CPU: the logprob of tokens[i][j], the top-1 token, the top-1 logprob and the top-2 logprob.
    """
    engine = llm.engine
    block_size = llm.config.kvcache_block_size
    seqs = [Sequence(p, SamplingParams(temperature=0), block_size) for p in prompts]
    steps = len(tokens[0])
    # [num_prompts, steps] each
    chosen = torch.empty(len(prompts), steps)
    top1 = torch.empty(len(prompts), steps, dtype=torch.int64)
    best = torch.empty(len(prompts), steps)
    second = torch.empty(len(prompts), steps)

    def record(logits: torch.Tensor, rows: list[int], step: int) -> None:
        # [len(rows), vocab] in float32
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        targets = torch.tensor([tokens[i][step] for i in rows], device=logits.device)
        top = logprobs.topk(2, dim=-1)
        chosen[rows, step] = logprobs.gather(1, targets[:, None])[:, 0].cpu()
        top1[rows, step] = top.indices[:, 0].cpu()
        best[rows, step] = top.values[:, 0].cpu()
        second[rows, step] = top.values[:, 1].cpu()

    groups: list[list[int]] = [[]]
    size = 0
    for i, prompt in enumerate(prompts):
        if groups[-1] and size + len(prompt) > max_prefill_tokens:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += len(prompt)
    for group in groups:
        for j in group:
            engine.block_manager.allocate(seqs[j])  # the prompt may hit the prefix cache
            seqs[j].num_scheduled_tokens = len(seqs[j]) - seqs[j].num_cached_tokens
        record(engine.runner.execute(plan_step([seqs[j] for j in group], True)), group, 0)
    rows = list(range(len(seqs)))
    for step in range(1, steps):
        for seq, forced in zip(seqs, tokens, strict=True):
            seq.num_cached_tokens = len(seq)
            seq.append_token(forced[step - 1])
            engine.block_manager.may_append(seq)
            seq.num_scheduled_tokens = 1
        record(engine.runner.execute(plan_step(seqs, False)), rows, step)
    for seq in seqs:
        engine.block_manager.deallocate(seq)
    return chosen, top1, best, second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--model", default=None, help="a model folder (default: dummy weights)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit(
            "fp8_quality.py needs a CUDA GPU: kv_cache_dtype='fp8' is CUDA-only (Triton "
            "backend), and torch.cuda.is_available() is False here"
        )
    if args.num_prompts < 1 or args.steps < 1:
        sys.exit(f"--num-prompts and --steps must be >= 1, got {args.num_prompts}, {args.steps}")
    start = time.perf_counter()
    folder = args.model
    if folder is None:
        folder = write_model_folder(tempfile.mkdtemp(), "qwen3-0.6b", tokenizer=False)
    prompts = standard_workload().prompts[: args.num_prompts]
    longest = max(len(p) for p in prompts) + args.steps
    common = dict(
        load_format="auto" if args.model else "dummy",
        device="cuda",
        dtype="bfloat16",
        max_model_len=longest,
        max_num_seqs=max(16, args.num_prompts),
        gpu_memory_utilization=0.5,
        seed=0,
        skip_tokenizer_init=True,
    )
    with LLM(folder, **common) as llm:
        params = SamplingParams(temperature=0, max_tokens=args.steps, ignore_eos=True)
        outs = llm.generate(prompts, params, use_tqdm=False)
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        budget = llm.config.max_num_batched_tokens
        ref = teacher_forced(llm, prompts, tokens, budget)
    torch.cuda.empty_cache()
    # [num_prompts, steps]
    expected = torch.tensor(tokens)
    ref_chosen, ref_top1, ref_best, ref_second = ref
    results = {
        "workload": f"first {len(prompts)} prompts of the standard workload, {args.steps} steps",
        "model": args.model or "qwen3-0.6b shape, dummy weights (seed 0)",
        "bf16_self_agreement": (ref_top1 == expected).float().mean().item(),
        "bf16_median_top1_prob": ref_best.exp().median().item(),
        "bf16_median_top1_top2_margin": (ref_best - ref_second).median().item(),
        "uniform_logprob": -math.log(llm.config.hf_config.vocab_size),
        "bf16_mean_logprob": ref_chosen.mean().item(),
        "caches": {},
    }
    for calculate in (False, True):
        fp8 = dict(kv_cache_dtype="fp8", calculate_kv_scales=calculate)
        with LLM(folder, **fp8, **common) as llm:
            chosen, top1, _, _ = teacher_forced(llm, prompts, tokens, budget)
            layers = llm.engine.runner.attention_layers
            scales = torch.cat([torch.cat([a.k_scale, a.v_scale]) for a in layers]).cpu()
        torch.cuda.empty_cache()
        diff = (chosen - ref_chosen).abs()
        name = f"fp8, calculate_kv_scales={calculate}"
        results["caches"][name] = {
            "max_abs_logprob_diff": diff.max().item(),
            "mean_abs_logprob_diff": diff.mean().item(),
            "top1_agreement": (top1 == expected).float().mean().item(),
            "top1_agreement_step0": (top1[:, 0] == expected[:, 0]).float().mean().item(),
            "scales_min_max": [scales.min().item(), scales.max().item()],
        }
    results["seconds"] = round(time.perf_counter() - start, 1)
    print(f"{results['model']}; {results['workload']}")
    print(
        f"bf16 reference: teacher-forced top-1 = its own greedy token "
        f"{results['bf16_self_agreement']:.2%}; mean logprob of its tokens "
        f"{results['bf16_mean_logprob']:.3f} (uniform {results['uniform_logprob']:.3f}); median "
        f"top-1 prob {results['bf16_median_top1_prob']:.2e}, median top-1/top-2 margin "
        f"{results['bf16_median_top1_top2_margin']:.4f} nats"
    )
    header = f"{'cache':<34} {'max|dlp|':>9} {'mean|dlp|':>10} {'top-1 agree':>12} {'step 0':>8}"
    print(header)
    print("-" * len(header))
    for name, r in results["caches"].items():
        print(
            f"{name:<34} {r['max_abs_logprob_diff']:>9.4f} {r['mean_abs_logprob_diff']:>10.4f} "
            f"{r['top1_agreement']:>12.2%} {r['top1_agreement_step0']:>8.2%}"
            f"   scales in [{r['scales_min_max'][0]:.3g}, {r['scales_min_max'][1]:.3g}]"
        )
    print(f"({results['seconds']} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
