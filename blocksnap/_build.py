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
SOURCES = ["hash.c", "scan.c", "punch.c", "write.c"]
XXHASH_HEADER_DIRS = ["/usr/include", "/usr/local/include"]


def _cdef():
    with open(os.path.join(CSRC, "blocksnap.h"), encoding="utf-8") as f:
        text = f.read()
    body = text.split("/* CDEF-BEGIN */", 1)[1].split("/* CDEF-END */", 1)[0]
    # cffi accepts integer #defines only as "#define NAME ..."; give it that.
    return re.sub(r"^#define (\w+) (-?\d+).*$", r"#define \1 ...", body, flags=re.M)


def check_xxhash(dirs=None):
    """Stop the build with an install hint when xxhash.h is nowhere to be found."""
    if dirs is None:
        extra = os.environ.get("CPATH", "").split(":") + os.environ.get("C_INCLUDE_PATH", "").split(":")
        dirs = [p for p in extra if p] + XXHASH_HEADER_DIRS
    for d in dirs:
        if os.path.exists(os.path.join(d, "xxhash.h")):
            return
    sys.exit(
        "blocksnap: xxhash.h not found. The C core links the system xxhash library: "
        "install it with 'apt-get install -y libxxhash-dev' (Debian/Ubuntu) and build again."
    )


check_xxhash()
ffibuilder = FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source(
    "blocksnap._blocksnap_c",
    '#include "blocksnap.h"',
    sources=[os.path.relpath(os.path.join(CSRC, s), ROOT) for s in SOURCES],
    include_dirs=[os.path.relpath(CSRC, ROOT)],
    libraries=["xxhash"],
    extra_compile_args=["-O3", "-std=c99", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
