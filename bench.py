"""The standard throughput benchmark: 256 requests, prompts and outputs uniform in 100..1024
tokens, seed 0, the Qwen3-0.6B shape with dummy weights, ignore_eos.

    uv run bench.py                      # on the best device present
    uv run bench.py --compare-hf         # plus transformers (padded batches) and the ratio
"""

import argparse

from nanovllm.utils.benchmark import add_common_args, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser, shape="qwen3-0.6b")
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--max-input-len", type=int, default=1024)
    parser.add_argument("--max-output-len", type=int, default=1024)
    args = parser.parse_args()
    main(
        args,
        dict(
            num_seqs=args.num_seqs,
            input_range=(100, args.max_input_len),
            output_range=(100, args.max_output_len),
        ),
        dict(max_model_len=4096),
    )
