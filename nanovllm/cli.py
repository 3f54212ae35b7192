"""The `nanovllm` command: `nanovllm run-batch -i requests.jsonl -o results.jsonl --model PATH`.

Engine options are LLM's keyword arguments as flags (`--max-model-len 2048`,
`--no-enable-prefix-caching`, ...), generated from Config so they never drift apart.
"""

import argparse
import dataclasses
import logging
import os
import sys
from typing import Any

from nanovllm.config import DERIVED_FIELDS, Config

# Config fields that are not options: the model is its own flag, the rest are derived.
_NOT_FLAGS = {"model", *DERIVED_FIELDS}


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine options (LLM keyword arguments)")
    for f in dataclasses.fields(Config):
        if f.name in _NOT_FLAGS:
            continue
        flag = "--" + f.name.replace("_", "-")
        # Config's annotations are strings ("int", "str | None", ...): plain ones map to types
        kind = {"bool": bool, "int": int, "float": float}.get(str(f.type), str)
        if kind is bool:
            group.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS
            )
        else:
            group.add_argument(flag, dest=f.name, type=kind, default=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `nanovllm` command."""
    parser = argparse.ArgumentParser(prog="nanovllm", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    batch = commands.add_parser(
        "run-batch",
        help="run an OpenAI Batch API file (resumable)",
        description="Run an OpenAI Batch API file: /v1/chat/completions and /v1/completions "
        "lines in, one result line per request out, written as each finishes. Running the "
        "same command again resumes: requests already in the output are skipped.",
    )
    batch.add_argument("-i", "--input-file", required=True, help="JSONL input, or - for stdin")
    batch.add_argument("-o", "--output-file", required=True, help="JSONL output, or - for stdout")
    batch.add_argument("--model", required=True, help="a Hugging Face model folder")
    batch.add_argument(
        "--served-model-name", default=None, help="the 'model' of the results (default: folder)"
    )
    batch.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_engine_flags(batch)
    return parser


def _engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(Config)} - _NOT_FLAGS
    return {k: v for k, v in vars(args).items() if k in names}


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from nanovllm.entrypoints.run_batch import Summary, run_batch
    from nanovllm.llm import LLM

    kwargs = _engine_kwargs(args)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    summary = Summary()
    try:
        summary = run_batch(
            args.input_file,
            args.output_file,
            lambda: LLM(args.model, **kwargs),
            name,
            progress=not args.no_progress,
        )
    except (ValueError, OSError) as e:  # duplicate custom_ids (BatchInputError), options, paths
        print(f"nanovllm run-batch: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "nanovllm run-batch: interrupted; the results written so far are kept, run the "
            "same command again to finish the rest",
            file=sys.stderr,
        )
        return 130
    print(summary, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
