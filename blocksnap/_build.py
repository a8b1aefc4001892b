"""cffi builder for blocksnap's C core (out-of-line API mode).

The cdef is read from csrc/blocksnap.h between the CDEF markers, so the
header stays the one description of the C interface.
"""
import os
import re
import sys

from cffi import FFI

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
SOURCES = ["hash.c", "io.c", "scan.c", "punch.c", "write.c", "entropy.c", "codec.c", "restore.c", "packw.c", "guard.c", "extent.c"]
HEADER_DIRS = ["/usr/include", "/usr/local/include"]
SYSTEM_HEADERS = [("xxhash.h", "libxxhash-dev"), ("zstd.h", "libzstd-dev"), ("zlib.h", "zlib1g-dev")]


def _cdef():
    with open(os.path.join(CSRC, "blocksnap.h"), encoding="utf-8") as f:
        text = f.read()
    body = text.split("/* CDEF-BEGIN */", 1)[1].split("/* CDEF-END */", 1)[0]
    # cffi accepts integer #defines only as "#define NAME ..."; give it that.
    return re.sub(r"^#define (\w+) (-?\d+).*$", r"#define \1 ...", body, flags=re.M)


def check_headers(dirs=None):
    """Stop the build with an install hint for every system header that is nowhere to be found."""
    if dirs is None:
        extra = os.environ.get("CPATH", "").split(":") + os.environ.get("C_INCLUDE_PATH", "").split(":")
        dirs = [p for p in extra if p] + HEADER_DIRS
    missing = [(h, pkg) for h, pkg in SYSTEM_HEADERS
               if not any(os.path.exists(os.path.join(d, h)) for d in dirs)]
    if missing:
        names = ", ".join(h for h, _ in missing)
        pkgs = " ".join(pkg for _, pkg in missing)
        sys.exit(f"blocksnap: {names} not found. The C core links the system libraries: install them with "
                 f"'apt-get install -y {pkgs}' (Debian/Ubuntu) and build again.")


check_headers()
ffibuilder = FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source(
    "blocksnap._blocksnap_c",
    '#include "blocksnap.h"',
    sources=[os.path.relpath(os.path.join(CSRC, s), ROOT) for s in SOURCES],
    include_dirs=[os.path.relpath(CSRC, ROOT)],
    depends=[os.path.relpath(os.path.join(CSRC, "blocksnap.h"), ROOT)],
    libraries=["xxhash", "zstd", "z", "m", "pthread"],
    extra_compile_args=["-O3", "-std=c99", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
