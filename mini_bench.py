"""Small throughput benchmark that runs anywhere (CPU default) in about a minute.

uv run mini_bench.py                          # dummy "small" Qwen3, 16 requests, temperature 0.6
uv run mini_bench.py --compare-hf             # plus transformers on the same workload, the ratio
uv run mini_bench.py --preset small-short     # a smaller model and short prompts, greedy
uv run mini_bench.py --compare-hf --repeat 5  # five runs; prints the median ratio and the spread

Presets (workload, model shape and engine arguments):
  default      16 requests, prompts 32..256, outputs 32..128 tokens, temperature 0.6, the "small"
               shape (8 layers, hidden 512, vocab 16384), max_model_len 512, block size 16
  small-short  24 requests, prompts 16..96, 48 output tokens each, greedy, the "mini" shape
               (6 layers, hidden 256, vocab 8192), every engine argument at its default
"""

import argparse
import statistics
from dataclasses import dataclass, field
from typing import Any

from nanovllm.utils.benchmark import add_common_args, main


@dataclass(frozen=True)
class Preset:
    """One benchmark setting: model shape, workload, sampling temperature, engine arguments."""

    shape: str
    num_seqs: int
    input_range: tuple[int, int]
    output_range: tuple[int, int]
    temperature: float
    engine_args: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "default": Preset(
        "small", 16, (32, 256), (32, 128), 0.6, dict(max_model_len=512, kvcache_block_size=16)
    ),
    "small-short": Preset("mini", 24, (16, 96), (48, 48), 0.0),
}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser, shape="small")
    parser.set_defaults(shape=None)  # None: the preset's shape
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--num-seqs", type=int, default=None, help="default: the preset's")
    parser.add_argument("--repeat", type=int, default=1, help="runs of the whole benchmark")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    preset = PRESETS[args.preset]
    args.shape = args.shape or preset.shape
    work = dict(
        num_seqs=args.num_seqs or preset.num_seqs,
        input_range=preset.input_range,
        output_range=preset.output_range,
    )
    runs = [main(args, work, preset.engine_args, preset.temperature) for _ in range(args.repeat)]
    if args.compare_hf and args.repeat > 1:
        # The median of the runs' ratios, and the best time of each engine: on a machine shared
        # with other work the second is the steadier of the two.
        ratios = sorted(hf / nano for nano, hf in runs)
        best = min(hf for _, hf in runs) / min(nano for nano, _ in runs)
        print(
            f"{args.preset}: nano-vllm / transformers over {args.repeat} runs: median "
            f"{statistics.median(ratios):.2f}x (min {ratios[0]:.2f}x, max {ratios[-1]:.2f}x); "
            f"best time of each: {best:.2f}x"
        )
