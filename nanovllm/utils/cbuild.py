"""Building and loading the project's small C libraries (kernels/cpu.c, token_ids.c) with the
system's C compiler (`$CC`, else `cc`), once per machine, into a cache folder
(`$NANOVLLM_CACHE_DIR`, else `~/.cache/nanovllm`; a temp folder if that cannot be written),
under a name hashed from the source, the compiler, the flags and the CPU. Without a compiler,
or if every flag set fails, `load` returns None and the caller takes its Python path. No torch
here (prompt reading uses it before torch is imported)."""

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)


def cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(
                line for line in f if line.startswith(("model name", "flags", "Features"))
            )
    except OSError:
        return platform.processor() + platform.machine()


def cache_dirs() -> list[Path]:
    """Where built libraries go: $NANOVLLM_CACHE_DIR or ~/.cache/nanovllm, else a temp folder."""
    first = os.environ.get("NANOVLLM_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "nanovllm"
    )
    user = getattr(os, "getuid", lambda: 0)()
    return [Path(first), Path(tempfile.gettempdir()) / f"nanovllm-{user}"]


def build(
    source: Path, compiler: str, flags: Sequence[str], folder: Path, libs: Sequence[str] = ()
) -> Path | None:
    """The shared library built from source with these flags in folder (or found there), or
    None if the compiler fails. Raises OSError if the folder cannot be written."""
    parts = [source.read_bytes(), compiler.encode(), " ".join([*flags, *libs]).encode()]
    key = hashlib.sha256(b"\0".join([*parts, cpu_signature().encode()])).hexdigest()[:16]
    target = folder / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: processes building at once never load half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    cmd = [compiler, *flags, "-shared", "-fPIC", "-std=c11", str(source), "-o", tmp, *libs]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            logger.info("building %s failed: %s", source.name, result.stderr.strip()[-500:])
            return None
        os.replace(tmp, target)
        return target
    except subprocess.SubprocessError as e:
        logger.info("building %s failed: %s", source.name, e)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(
    source: Path,
    flag_sets: Sequence[Sequence[str]],
    libs: Sequence[str] = (),
    loader: type[ctypes.CDLL] = ctypes.CDLL,
) -> ctypes.CDLL | None:
    """Build (or find) and load source's library with `loader` (ctypes.PyDLL for functions of
    the Python C API): each flag set in turn, in the first cache folder that can be written and
    loaded from; None without a compiler or if every flag set fails."""
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        logger.info("no C compiler (%s): %s is unavailable", compiler, source.name)
        return None
    for folder in cache_dirs():
        try:
            for flags in flag_sets:
                path = build(source, compiler, flags, folder, libs)
                if path is not None:
                    return loader(str(path))
            return None  # the compiler failed with every flag set
        except OSError as e:  # an unwritable folder, or one whose files cannot be loaded
            logger.info("%s in %s: %s", source.name, folder, e)
    return None
