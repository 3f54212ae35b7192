"""Shared by bench.py and mini_bench.py: a seeded random workload, timed runs, a summary line.

Throughput is output tokens per second of wall time for the whole workload (prefill included),
after a warm-up. The transformers reference runs the same prompts as padded batches with
`generate` (no paging, no continuous batching): every row of a batch runs to the batch's
largest max_tokens, but only the tokens each request asked for are counted.
"""

import argparse
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.utils.dummy import write_model_folder


@dataclass
class Workload:
    """Prompts (token ids) and how many tokens each request generates."""

    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


def make_workload(
    num_seqs: int,
    input_range: tuple[int, int],
    output_range: tuple[int, int],
    vocab: int,
    seed: int,
) -> Workload:
    """Prompts and output lengths drawn uniformly (inclusive ranges) with a fixed seed."""
    rng = random.Random(seed)
    prompts = [
        [rng.randrange(0, vocab) for _ in range(rng.randint(*input_range))] for _ in range(num_seqs)
    ]
    return Workload(prompts, [rng.randint(*output_range) for _ in range(num_seqs)])


def standard_workload(
    num_seqs: int = 256, max_input_len: int = 1024, max_output_len: int = 1024, seed: int = 0
) -> Workload:
    """The standard throughput workload, upstream nano-vllm's bench.py draw exactly.

    `random.seed(seed)`; num_seqs prompts of randint(100, max_input_len) token ids, each
    randint(0, 10000); then num_seqs max_tokens of randint(100, max_output_len). With the
    defaults: 142,827 prompt + 133,966 output tokens.
    """
    rng = random.Random(seed)
    prompts = [
        [rng.randint(0, 10000) for _ in range(rng.randint(100, max_input_len))]
        for _ in range(num_seqs)
    ]
    return Workload(prompts, [rng.randint(100, max_output_len) for _ in range(num_seqs)])


def add_common_args(parser: argparse.ArgumentParser, shape: str) -> None:
    """Arguments both benchmark scripts take."""
    parser.add_argument("--model", default=None, help="a model folder (default: dummy weights)")
    parser.add_argument(
        "--shape", default=shape, help="dummy model shape (see utils/dummy.py SHAPES)"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto, or fp8 (CUDA)")
    parser.add_argument(
        "--block-size", type=int, default=None, help="kvcache_block_size (default: the engine's)"
    )
    parser.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    parser.add_argument("--dp", type=int, default=1, help="data_parallel_size (replicas)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--compare-hf", action="store_true", help="also time transformers")
    parser.add_argument("--hf-batch-size", type=int, default=0, help="0: all requests at once")
    parser.add_argument(
        "--sampling",
        default="plain",
        help=f"sampling settings, comma-separated, or 'all' ({', '.join(SAMPLING)}); each "
        "runs the workload on the same engine and is compared with the first",
    )


def model_path(args: argparse.Namespace) -> tuple[str, str]:
    """The model folder and load format: the given one, or a dummy folder of args.shape."""
    if args.model:
        return args.model, "auto"
    folder = os.path.join(tempfile.gettempdir(), f"nanovllm-dummy-{args.shape}")
    return write_model_folder(folder, args.shape, tokenizer=False), "dummy"


# Sampling settings of `--sampling`: request i's SamplingParams for a temperature and max_tokens.
# "qwen3" is Qwen3's generation_config.json; "heavy" mixes every setting, with a seed per request.
SAMPLING: dict[str, Callable[[int, float, int], SamplingParams]] = {
    "plain": lambda i, t, n: SamplingParams(temperature=t, max_tokens=n, ignore_eos=True),
    "qwen3": lambda i, t, n: SamplingParams(
        temperature=t, top_k=20, top_p=0.95, max_tokens=n, ignore_eos=True
    ),
    "top-p": lambda i, t, n: SamplingParams(
        temperature=t, top_p=0.95, max_tokens=n, ignore_eos=True
    ),
    "heavy": lambda i, t, n: SamplingParams(
        temperature=t,
        top_k=50,
        top_p=0.9,
        min_p=0.05,
        repetition_penalty=1.1,
        presence_penalty=0.3,
        frequency_penalty=0.2,
        seed=i,
        max_tokens=n,
        ignore_eos=True,
    ),
    "logprobs": lambda i, t, n: SamplingParams(
        temperature=t, logprobs=5, max_tokens=n, ignore_eos=True
    ),
}


def run_nanovllm(
    llm: LLM, work: Workload, temperature: float = 0.6, sampling: str = "plain"
) -> float:
    """Seconds to generate the workload (after a short warm-up; temperature 0 is greedy) with
    the SAMPLING setting named; llm.engine.stats then holds the timed call's prefill and decode
    tokens and seconds."""
    make = SAMPLING[sampling]
    # Reversed prompt tails share no prefix with the workload, so no prefix-cache hit helps it.
    warm = [p[::-1][:16] for p in work.prompts[:4]]
    llm.generate(warm, [make(i, temperature, 4) for i in range(len(warm))], use_tqdm=False)
    llm.engine.stats = type(llm.engine.stats)()
    params = [make(i, temperature, n) for i, n in enumerate(work.output_lens)]
    _sync(llm.config.device)
    t = time.perf_counter()
    outs = llm.generate(work.prompts, params, use_tqdm=False)
    _sync(llm.config.device)
    elapsed = time.perf_counter() - t
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    if produced != work.num_output_tokens:
        raise RuntimeError(f"generated {produced} tokens, expected {work.num_output_tokens}")
    return elapsed


def run_transformers(
    path: str,
    load_format: str,
    work: Workload,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int,
    temperature: float = 0.6,
) -> float:
    """Seconds for transformers' padded batched generate on the same workload."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if load_format == "dummy":  # random weights of the same shape
        config = AutoConfig.from_pretrained(path)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    model.eval()
    model.generation_config.eos_token_id = None  # like ignore_eos
    model.generation_config.pad_token_id = 0
    batch_size = batch_size or len(work.prompts)
    # Greedy (temperature 0) or pure sampling at the temperature, as nano-vllm runs it.
    sampling = dict(do_sample=False)
    if temperature > 0:
        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)

    def generate(prompts: list[list[int]], max_new: int) -> None:
        width = max(len(p) for p in prompts)
        # left padding: [batch, width]
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=max_new,
                min_new_tokens=max_new,
                **sampling,
            )

    generate([p[:16] for p in work.prompts[:4]], 4)
    _sync(device)
    t = time.perf_counter()
    for i in range(0, len(work.prompts), batch_size):
        generate(work.prompts[i : i + batch_size], max(work.output_lens[i : i + batch_size]))
    _sync(device)
    elapsed = time.perf_counter() - t
    return elapsed


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main(
    args: argparse.Namespace,
    work_args: dict | Workload,
    engine_args: dict,
    temperature: float = 0.6,
) -> tuple[float, float | None]:
    """Run the benchmark described by args and print its summary lines (temperature 0: greedy).

    work_args is a ready Workload, or make_workload's arguments (the vocabulary and seed added).
    Returns the seconds nano-vllm took, and transformers' with --compare-hf (else None).
    """
    path, load_format = model_path(args)
    block = getattr(args, "block_size", None)  # --block-size wins over a preset's
    start = time.perf_counter()
    llm = LLM(
        path,
        load_format=load_format,
        device=args.device,
        dtype=args.dtype,
        kv_cache_dtype=args.kv_cache_dtype,
        tensor_parallel_size=args.tp,
        data_parallel_size=args.dp,
        seed=args.seed,
        enforce_eager=args.enforce_eager,
        skip_tokenizer_init=True,  # token-id workload: no tokenizer, no warning about one
        **(engine_args | ({} if block is None else {"kvcache_block_size": block})),
    )
    # data-parallel replicas keep their runners (and start-up seconds) to themselves
    startup = getattr(getattr(llm.engine, "runner", None), "startup_seconds", {})
    parts = ", ".join(f"{k} {v:.2f} s" for k, v in startup.items())
    print(f"Start-up: {time.perf_counter() - start:.2f} s ({parts or f'{args.dp} replicas'})")
    if isinstance(work_args, Workload):
        work = work_args
    else:
        work = make_workload(vocab=llm.config.hf_config.vocab_size, seed=args.seed, **work_args)
    settings = list(SAMPLING) if args.sampling == "all" else args.sampling.split(",")
    unknown = [name for name in settings if name not in SAMPLING]
    if unknown:
        raise SystemExit(f"unknown --sampling {unknown[0]!r}; known: {', '.join(SAMPLING)}")
    # The reference setting runs first and again last (the drift between the two shows the
    # machine's noise); each other setting is compared with the mean of the two. With several
    # settings a whole untimed run goes first (the first run pays one-time costs: kernel
    # compiles, the CPU's per-shape GEMM kernels).
    if len(settings) > 1:
        run_nanovllm(llm, work, temperature, settings[0])
    elapsed = run_nanovllm(llm, work, temperature, settings[0])
    if len(settings) > 1:
        others = [(name, run_nanovllm(llm, work, temperature, name)) for name in settings[1:]]
        first, elapsed = elapsed, run_nanovllm(llm, work, temperature, settings[0])
        reference = (first + elapsed) / 2
        print(f"sampling {settings[0]}: {first:.2f} s first, {elapsed:.2f} s last (the reference)")
        for name, seconds in others:
            print(
                f"sampling {name}: {seconds:.2f} s, {work.num_output_tokens / seconds:.1f} "
                f"output tok/s, {reference / seconds:.2f}x of {settings[0]}"
            )
    stats = llm.engine.stats
    device, dtype = llm.config.device, llm.config.dtype
    desc = (
        f"{len(work.prompts)} requests, {work.num_prompt_tokens} prompt + "
        f"{work.num_output_tokens} output tokens, {args.model or args.shape}, {device}, "
        f"{str(dtype).removeprefix('torch.')}, tp={args.tp}, dp={args.dp}"
    )
    if llm.config.kv_cache_dtype != dtype:
        desc += f", KV cache {str(llm.config.kv_cache_dtype).removeprefix('torch.')}"
    if block is not None:
        desc += f", block size {llm.config.kvcache_block_size}"
    tps = work.num_output_tokens / elapsed
    total = work.num_output_tokens + work.num_prompt_tokens
    print(f"Total: {total} tok, Time: {elapsed:.2f} s, Throughput: {tps:.2f} tok/s (output)")
    print(
        f"Prefill: {stats.prefill_tokens} tok in {stats.prefill_seconds:.2f} s "
        f"({stats.prefill_tokens / max(stats.prefill_seconds, 1e-9):.0f} tok/s); "
        f"Decode: {stats.decode_tokens} tok in {stats.decode_seconds:.2f} s "
        f"({stats.decode_tokens / max(stats.decode_seconds, 1e-9):.0f} tok/s), "
        f"{stats.steps} steps"
        + (f" (step seconds and steps summed over {args.dp} replicas)" if args.dp > 1 else "")
    )
    print(
        f"nano-vllm: {desc}: {elapsed:.2f}s, {tps:.1f} output tok/s, "
        f"{(work.num_output_tokens + work.num_prompt_tokens) / elapsed:.1f} total tok/s"
    )
    llm.shutdown()
    del llm
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # the engine's KV cache goes back before transformers loads
    if args.compare_hf:
        hf_elapsed = run_transformers(
            path, load_format, work, device, dtype, args.hf_batch_size, temperature
        )
        hf_tps = work.num_output_tokens / hf_elapsed
        print(
            f"transformers: same workload: {hf_elapsed:.2f}s, {hf_tps:.1f} output tok/s; "
            f"nano-vllm / transformers = {tps / hf_tps:.2f}x"
        )
        return elapsed, hf_elapsed
    return elapsed, None
