"""Watch a GPU run of `nanovllm run-batch` (issue 18 item 7): when the first result lines reach
the output file, and what the progress bar's ETA said against the time the run really took.

    PYTHONPATH=. python3 scripts/run_batch_watch.py --requests 3000 --out gpu_out

Writes a dummy Qwen3-0.6B folder and a batch file of completion requests (token-id prompts of
100-600 tokens, max_tokens 50-800, ignore_eos so lengths are known), runs the CLI with
`--load-format dummy` in a subprocess (its stderr is a file: the bar redraws every 30 s),
polls the output file every 0.1 s, and prints one summary.
"""

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time

from nanovllm.utils.dummy import qwen3_config, write_model_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--out", default="gpu_out")
    parser.add_argument("--timeout", type=float, default=170.0)
    parser.add_argument("--shape", default="qwen3-0.6b", help="dummy model shape (tiny: CPU)")
    parser.add_argument("--max-tokens", type=int, default=800)
    parser.add_argument("extra", nargs="*", help="more run-batch flags (after --)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    model = write_model_folder(os.path.join(args.out, args.shape), args.shape)
    vocab = qwen3_config(args.shape)["vocab_size"]
    rng = random.Random(0)
    src = os.path.join(args.out, "watch_in.jsonl")
    dst = os.path.join(args.out, "watch_out.jsonl")
    with open(src, "w") as f:
        for i in range(args.requests):
            prompt = [rng.randint(3, vocab - 1) for _ in range(rng.randint(10, 60) * 10)]
            body = {
                "prompt": prompt,
                "max_tokens": rng.randint(50, args.max_tokens),
                "ignore_eos": True,
            }
            line = {"custom_id": f"r{i}", "url": "/v1/completions", "body": body}
            f.write(json.dumps(line) + "\n")
    if os.path.exists(dst):
        os.unlink(dst)
    err_path = os.path.join(args.out, "watch_stderr.log")
    cmd = [sys.executable, "-m", "nanovllm.cli", "run-batch", "-i", src, "-o", dst]
    cmd += ["--model", model, "--load-format", "dummy", *args.extra]
    start = time.perf_counter()
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        marks: dict[int, float] = {}  # lines -> seconds since start, for 1, 10, 100, ...
        while proc.poll() is None and time.perf_counter() - start < args.timeout:
            if os.path.exists(dst):
                with open(dst, "rb") as f:
                    n = f.read().count(b"\n")
                for k in (1, 10, 100, 1000):
                    if n >= k and k not in marks:
                        marks[k] = time.perf_counter() - start
            time.sleep(0.1)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    total = time.perf_counter() - start
    with open(err_path) as f:
        text = f.read()
    with open(dst, "rb") as f:
        written = f.read().count(b"\n")
    print(f"run-batch watch: {written}/{args.requests} lines, exit {proc.returncode}, {total:.1f}s")
    print("  first lines at: " + ", ".join(f"{k} after {t:.1f}s" for k, t in marks.items()))
    # Each redraw: "... 123/3000 req [00:30, ETA 1:02, 9999.0 out tok/s]"; the last is the end.
    pattern = r"(\d+)/(\d+) req \[([\d:]+), ETA ([\d:?]+), ([\d.]+) out"
    bars = re.findall(pattern, text)

    def seconds(clock: str) -> int:
        return sum(int(x) * 60**i for i, x in enumerate(reversed(clock.split(":"))))

    end = seconds(bars[-1][2]) if bars and proc.returncode == 0 else None
    for done, _, elapsed, eta, rate in bars:
        real = "" if end is None else f"; it really took {end - seconds(elapsed)}s more"
        print(f"  bar at {elapsed} ({done} done): ETA {eta}, {rate} out tok/s{real}")
    print("  " + (text.strip().splitlines() or [""])[-1][-200:])


if __name__ == "__main__":
    main()
