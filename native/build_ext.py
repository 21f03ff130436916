"""cffi builder for agent._native.

Every `native/ext/*.c` file is one concern (seccomp compilation, fd-relative file
operations and wipe passes, locked secret memory); each has a matching `*.cdef` with
the declarations Python may call.  Adding a concern means adding a pair of files, not
editing this one.
"""

import glob
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
EXT = os.path.join(HERE, "ext")

ffibuilder = FFI()
for cdef in sorted(glob.glob(os.path.join(EXT, "*.cdef"))):
    with open(cdef) as f:
        ffibuilder.cdef(f.read())

sources = sorted(os.path.relpath(p, os.path.dirname(HERE)) for p in glob.glob(os.path.join(EXT, "*.c")))
headers = "".join(
    f'#include "{os.path.basename(h)}"\n' for h in sorted(glob.glob(os.path.join(EXT, "*.h")))
)
ffibuilder.set_source(
    "agent._native",
    headers,
    sources=sources,
    include_dirs=[EXT],
    libraries=["seccomp", "sodium"],
    extra_compile_args=["-O2", "-Wall", "-D_GNU_SOURCE", "-fstack-protector-strong"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
