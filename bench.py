"""The standard throughput benchmark: upstream nano-vllm's bench.py workload exactly
(random.seed(0); 256 prompts of randint(100, 1024) token ids in 0..10000, then 256 max_tokens of
randint(100, 1024): 142,827 prompt + 133,966 output tokens), temperature 0.6, ignore_eos, the
Qwen3-0.6B shape with dummy weights.

    uv run bench.py                      # on the best device present
    uv run bench.py --compare-hf         # plus transformers (padded batches) and the ratio

It is a GPU workload: on a CPU it refuses to start unless given --force (mini_bench.py is the
CPU-sized run).
"""

import argparse
import sys

from nanovllm.utils.benchmark import add_common_args, main, standard_workload


def refuse_cpu_unless_forced(args: argparse.Namespace) -> None:
    """Exit with a pointer to mini_bench.py when this GPU-sized run would land on a CPU."""
    from nanovllm.config import resolve_device

    if resolve_device(args.device).type == "cpu" and not args.force:
        sys.exit(
            "bench.py is the standard GPU workload (256 requests, about 277k tokens, Qwen3-0.6B "
            "shape): on a CPU it runs for hours and needs about 6 GB. Run `uv run mini_bench.py` "
            "for a CPU-sized benchmark, or pass --force to run this one anyway."
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser, shape="qwen3-0.6b")
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--max-input-len", type=int, default=1024)
    parser.add_argument("--max-output-len", type=int, default=1024)
    parser.add_argument("--force", action="store_true", help="run even on a CPU (hours)")
    args = parser.parse_args()
    refuse_cpu_unless_forced(args)
    work = standard_workload(args.num_seqs, args.max_input_len, args.max_output_len, args.seed)
    main(args, work, dict(max_model_len=4096))
