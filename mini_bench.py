"""Small throughput benchmark that runs anywhere (CPU default) in about a minute.

uv run mini_bench.py                 # dummy "small" Qwen3, 16 requests
uv run mini_bench.py --compare-hf    # plus transformers on the same workload, and the ratio
"""

import argparse

from nanovllm.utils.benchmark import add_common_args, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser, shape="small")
    parser.add_argument("--num-seqs", type=int, default=16)
    args = parser.parse_args()
    main(
        args,
        dict(num_seqs=args.num_seqs, input_range=(32, 256), output_range=(32, 128)),
        dict(max_model_len=512, kvcache_block_size=16),
    )
