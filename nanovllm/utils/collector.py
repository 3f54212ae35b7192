"""Python's cyclic garbage collector around the engine's host work.

Every collection walks the containers of the generations it collects, element by element. A
long prompt is a list of thousands of ints (and the engine keeps a copy per sequence), so a
young pass that finds 512 prompts of 2,048 tokens walks a million elements (2-7 ms), and a
middle pass over all of them took about 20 ms: measured with gc.callbacks, 512 x 2,048-token
prompts, on a CPU and in the H200 run of scripts/bench_cascade.py (15 collections, 37-45 ms;
a 15 ms gap of the device between two decode steps). So:
- `paused` switches the collector off while prompts are read and queued (nothing there makes
  cyclic garbage worth collecting);
- a batch run (LLM.generate), still paused, then freezes what is alive (`freeze_for_run`:
  gc.freeze moves it to the permanent generation, which no pass walks; again once its
  sequences are queued) and unfreezes it when the run ends, so the run's passes walk only what
  the run itself allocates. (Pausing alone only defers the walk: the first allocation after
  the collector is back on collects everything allocated meanwhile.) Objects are still freed
  by reference counting as usual; only cycles among the frozen ones wait for the end of the
  run, as they already did for full passes (driver.FULL_COLLECTION_EVERY). Where objects
  were frozen before (the H200 machine's Python 3.12 starts with 375), nothing is frozen:
  unfreezing at the end would release those too;
- the engine's own lists of token ids (a request's, each sequence's) are not tracked at all
  (inputs.untrack_ids, through token_ids.c: a list of ints cannot be part of a cycle), which
  works whatever else froze what;
- the collector stays off until the run's first step is launched (driver.drive): then one
  explicit pass over the young generations runs while the device works on the step launched
  behind it, and what survives goes to the oldest generation, which no pass walks during the
  run. Where nothing could be frozen, this is what keeps the caller's prompt lists out of the
  run: before it, the first young pass walked them before the first step (5-7 ms) and a middle
  pass in the decode (6-9 ms, a gap of the device; session 12's H200 runs).
With all of these, the collections of that H200 run took 6-13 ms (BENCHMARKS.md, session 11).
"""

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def paused() -> Iterator[None]:
    """The cyclic garbage collector off inside (back to its former state after)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def freeze_for_run() -> bool:
    """gc.freeze() everything alive now; returns whether it did (the caller unfreezes at the
    end of the run). Not when objects are frozen already (the application's, say): unfreezing
    would release those too."""
    if gc.get_freeze_count() > 0:
        return False
    gc.freeze()
    return True
