"""cProfile of bench.py's timed generate call (host hot spots), top functions by own time.

python3 scripts/profile_host.py [--num-seqs 256] [--top 35] [--logprobs K]
"""

import argparse
import cProfile
import os
import pstats
import tempfile
import time

from nanovllm import LLM, SamplingParams
from nanovllm.utils.benchmark import standard_workload
from nanovllm.utils.dummy import write_model_folder

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--top", type=int, default=35)
    parser.add_argument("--logprobs", type=int, default=None, help="ask for K logprobs")
    args = parser.parse_args()
    folder = os.path.join(tempfile.gettempdir(), "nanovllm-dummy-qwen3-0.6b")
    llm = LLM(write_model_folder(folder, "qwen3-0.6b", tokenizer=False), load_format="dummy")
    work = standard_workload(args.num_seqs)
    warm = SamplingParams(temperature=0.6, max_tokens=4, ignore_eos=True)
    llm.generate([p[:16] for p in work.prompts[:4]], warm, use_tqdm=False)
    if args.logprobs is not None:  # compile the logprob kernels before the profile
        warm = SamplingParams(
            temperature=0.6, max_tokens=4, ignore_eos=True, logprobs=args.logprobs
        )
        llm.generate([p[:16] for p in work.prompts[:4]], warm, use_tqdm=False)
    params = [
        SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n, logprobs=args.logprobs)
        for n in work.output_lens
    ]
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    llm.generate(work.prompts, params, use_tqdm=False)
    prof.disable()
    print(f"generate under cProfile: {time.perf_counter() - start:.2f} s")
    s = llm.engine.stats
    print(
        f"prefill {s.prefill_tokens} tok {s.prefill_seconds:.2f} s; decode {s.decode_tokens} tok {s.decode_seconds:.2f} s; {s.steps} steps"
    )
    pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
    llm.shutdown()
