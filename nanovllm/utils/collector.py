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
  works whatever else froze what.
With all three, the collections of that H200 run took 6-13 ms (BENCHMARKS.md, session 11).
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
