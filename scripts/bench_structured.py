"""Structured output at batch speed: constrained vs unconstrained throughput in one run.

A Qwen3-0.6B-shaped model with dummy weights and a tokenizer laid out like Qwen3's (151,643
byte-level BPE entries plus 22 special tokens, EOS <|im_end|> = 151645, inside a model vocabulary
of 151,936: the ids past the tokenizer are never allowed), built programmatically (no download).
N requests (default 256, all concurrent) of random prompts with one JSON schema (a request ends
when its JSON is complete, or at max_tokens), then the same prompts without a constraint, each
request generating exactly as many tokens as its constrained run did (ignore_eos), so both runs
have the same batch at every step and their ratio is the cost of the grammars alone. Reports
output tokens/s of both and their ratio, the schema's compile time, the vocabulary setup time,
the host time filling masks per step; then the constrained run again with run-ahead off (what
overlapping the masks with the forward brings) and an unconstrained run of max_tokens each.

    python3 scripts/bench_structured.py                  # GPU: the measurement
    python3 scripts/bench_structured.py --shape tiny --num-requests 16 --max-tokens 32  # CPU
"""

import argparse
import json
import os
import random
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanovllm import LLM, SamplingParams, StructuredOutputsParams  # noqa: E402
from nanovllm.utils.dummy import write_model_folder  # noqa: E402

MODEL_VOCAB = 151_936
NUM_REGULAR = 151_643  # Qwen3's byte-level BPE entries; the special tokens follow
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [
    f"<|reserved_{i}|>" for i in range(19)
]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "summary": {"type": "string"},
    },
    "required": ["name", "age", "email", "tags", "summary"],
}


def qwen_like_tokenizer(seed: int = 0) -> Any:
    """A byte-level BPE tokenizer of NUM_REGULAR + len(SPECIALS) entries: the 256 byte symbols,
    then generated words (with and without a leading space, capitalised, digits, JSON-ish
    punctuation runs), so masks are computed over a vocabulary of the real size and mix."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab: dict[str, int] = {}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    letters = "abcdefghijklmnopqrstuvwxyz"
    punct = ['"', ":", ",", "{", "}", "[", "]", ".", "-", "_", "@", "(", ")", "'", "/", "\\n"]
    space = "\u0120"  # byte-level form of " "
    while len(vocab) < NUM_REGULAR:
        r = rng.random()
        if r < 0.75:
            word = "".join(rng.choice(letters) for _ in range(rng.randint(2, 9)))
            if rng.random() < 0.2:
                word = word.capitalize()
        elif r < 0.85:
            word = str(rng.randint(0, 999))
        else:
            word = "".join(rng.choice(punct) for _ in range(rng.randint(1, 3)))
            word = word.replace("\\n", "\u010a")  # byte-level form of "\n"
        if rng.random() < 0.5:
            word = space + word
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok)
    hf.add_special_tokens({"additional_special_tokens": SPECIALS})
    hf.eos_token = "<|im_end|>"
    hf.pad_token = "<|endoftext|>"
    return hf


def model_folder(path: str, shape: str) -> str:
    """A dummy-weight folder of `shape` with the Qwen-like tokenizer."""
    write_model_folder(path, shape, tokenizer=False, vocab_size=MODEL_VOCAB)
    tok = qwen_like_tokenizer()
    tok.save_pretrained(path)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["eos_token_id"] = tok.eos_token_id
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return path


def run(
    llm: LLM, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
) -> tuple[dict[str, float], list[int]]:
    """Generate; (output tokens, seconds, tok/s, requests ended by "stop"), output lengths."""
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    stopped = sum(o.outputs[0].finish_reason == "stop" for o in outs)
    summary = {
        "output_tokens": sum(lengths),
        "seconds": round(seconds, 3),
        "tok_per_s": round(sum(lengths) / seconds, 1),
        "finished_by_stop": stopped,
    }
    return summary, lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--shape", default="qwen3-0.6b")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--folder", default="/tmp/nanovllm-structured-bench")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    start = time.perf_counter()
    path = model_folder(args.folder, args.shape)
    print(f"model folder + tokenizer: {time.perf_counter() - start:.1f} s", flush=True)
    llm = LLM(
        path,
        load_format="dummy",
        max_num_seqs=args.num_requests,
        max_model_len=args.prompt_len + args.max_tokens + 16,
    )
    rng = random.Random(0)
    prompts = [
        [rng.randrange(300, NUM_REGULAR) for _ in range(args.prompt_len)]
        for _ in range(args.num_requests)
    ]
    spec = StructuredOutputsParams(json=SCHEMA)
    common = dict(temperature=args.temperature, max_tokens=args.max_tokens, ignore_eos=True)
    free = SamplingParams(**common)
    constrained = SamplingParams(**common, structured_outputs=spec)

    # warm-up: kernels, graphs, the vocabulary for xgrammar; the schema compiles here once
    llm.generate(prompts[:8], SamplingParams(**{**common, "max_tokens": 8}), use_tqdm=False)
    start = time.perf_counter()
    first = SamplingParams(**{**common, "max_tokens": 4}, structured_outputs=spec)
    llm.generate(prompts[:1], first, use_tqdm=False)
    first_constrained = time.perf_counter() - start
    grammars = llm.engine.grammars
    masks = llm.engine.runner.grammar_masks
    results: dict[str, Any] = {
        "shape": args.shape,
        "num_requests": args.num_requests,
        "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens,
        "vocab_setup_s": round(grammars.setup_seconds, 3),
        "schema_compile_s": round(grammars.stats.compile_seconds, 4),
        "first_constrained_request_s": round(first_constrained, 3),
    }
    before = (masks.stats.steps, masks.stats.rows, masks.stats.fill_seconds)
    results["constrained"], lengths = run(llm, prompts, constrained)
    steps = masks.stats.steps - before[0]
    results["mask_steps"] = steps
    results["mask_rows_per_step"] = round((masks.stats.rows - before[1]) / max(steps, 1), 1)
    results["mask_fill_ms_per_step"] = round(
        1000 * (masks.stats.fill_seconds - before[2]) / max(steps, 1), 3
    )
    results["grammars_compiled"] = grammars.stats.grammars_compiled
    matched = [SamplingParams(**{**common, "max_tokens": n}) for n in lengths]
    results["unconstrained_same_lengths"], _ = run(llm, prompts, matched)
    results["ratio"] = round(
        results["constrained"]["tok_per_s"] / results["unconstrained_same_lengths"]["tok_per_s"],
        3,
    )
    llm.engine._run_ahead = False  # the same constrained run without overlap, for comparison
    results["constrained_no_run_ahead"], _ = run(llm, prompts, constrained)
    llm.engine._run_ahead = True
    results["unconstrained_max_tokens"], _ = run(llm, prompts, free)
    llm.shutdown()
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
