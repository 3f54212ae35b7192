"""The standard throughput benchmark: upstream nano-vllm's bench.py workload exactly
(random.seed(0); 256 prompts of randint(100, 1024) token ids in 0..10000, then 256 max_tokens of
randint(100, 1024): 142,827 prompt + 133,966 output tokens), temperature 0.6, ignore_eos, the
Qwen3-0.6B shape with dummy weights.

    uv run bench.py                      # on the best device present
    uv run bench.py --compare-hf         # plus transformers (padded batches) and the ratio
"""

import argparse

from nanovllm.utils.benchmark import add_common_args, main, standard_workload

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser, shape="qwen3-0.6b")
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--max-input-len", type=int, default=1024)
    parser.add_argument("--max-output-len", type=int, default=1024)
    args = parser.parse_args()
    work = standard_workload(args.num_seqs, args.max_input_len, args.max_output_len, args.seed)
    main(args, work, dict(max_model_len=4096))
