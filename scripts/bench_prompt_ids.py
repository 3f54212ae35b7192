"""What converting prompts of token ids costs the host, per token (the time before the first
step of a run of long token-id prompts): 512 prompts of 2,000 shared + 48 own ids, as
bench_cascade.py e2e builds them. Each line: the best of 5, ms for all prompts and ns a token.

    python3 scripts/bench_prompt_ids.py
"""

import random
import time
from array import array

import numpy as np

from nanovllm.inputs import as_token_ids, token_bytes_in_range


def main() -> None:
    rng = random.Random(0)
    shared = [rng.randrange(0, 150000) for _ in range(2000)]
    prompts = [shared + [rng.randrange(0, 150000) for _ in range(48)] for _ in range(512)]
    count = sum(map(len, prompts))

    def timed(label: str, fn: "object") -> None:
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        print(f"{label:<44} {best * 1e3:7.1f} ms {best / count * 1e9:6.1f} ns/token")

    timed("set(map(type, p)) == {int}", lambda: [set(map(type, p)) == {int} for p in prompts])
    timed("p[:]", lambda: [p[:] for p in prompts])
    timed("array('q', p)", lambda: [array("q", p) for p in prompts])
    timed("np.array(p, dtype=int64)", lambda: [np.array(p, dtype=np.int64) for p in prompts])
    timed("as_token_ids(p)", lambda: [as_token_ids(p) for p in prompts])
    timed(
        "token_bytes_in_range(p, ints=True)",
        lambda: [token_bytes_in_range(p, 151936, True) for p in prompts],
    )
    timed("token_bytes_in_range(p)", lambda: [token_bytes_in_range(p, 151936) for p in prompts])


if __name__ == "__main__":
    main()
