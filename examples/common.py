"""What the examples share: `--model PATH`, or dummy weights of the tiny Qwen3 shape."""

import argparse
import os
import tempfile
from typing import Any

from nanovllm import LLM
from nanovllm.utils.dummy import write_model_folder


def make_llm(description: str, **kwargs: Any) -> LLM:
    """Parse --model and build an LLM (random weights and a small tokenizer without it)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default=None, help="a Hugging Face model folder")
    args = parser.parse_args()
    if args.model:
        return LLM(args.model, **kwargs)
    folder = write_model_folder(os.path.join(tempfile.gettempdir(), "nanovllm-example"), "tiny")
    return LLM(folder, load_format="dummy", **{"max_model_len": 1024, **kwargs})
