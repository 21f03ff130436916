"""Build glue: the cffi extension (agent._native) and the sandbox init executable.

`pip install .` builds both; nothing is compiled at run time.  The init binary is
compiled with the system C compiler into agent/_bin/nrx-init (inside the wheel, or in
the source tree for editable installs), and the seccomp profiles are copied beside the
package so an installed agent finds them without the source tree.
"""

import os
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
INIT_SOURCES = sorted(
    os.path.join("native", "init", f)
    for f in os.listdir(os.path.join(HERE, "native", "init"))
    if f.endswith(".c")
)
CFLAGS = ["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration",
          "-D_GNU_SOURCE", "-fstack-protector-strong", "-D_FORTIFY_SOURCE=2", "-fPIE"]


class BuildWithInit(build_ext):
    """build_ext that also compiles the native init and ships the seccomp profiles."""

    def run(self):
        super().run()
        pkg_dir = os.path.join(HERE, "agent") if self.inplace else os.path.join(self.build_lib, "agent")
        bin_dir = os.path.join(pkg_dir, "_bin")
        os.makedirs(bin_dir, exist_ok=True)
        out = os.path.join(bin_dir, "nrx-init")
        cc = os.environ.get("CC", "cc")
        srcs = [os.path.join(HERE, s) for s in INIT_SOURCES]
        # static: exec'd once per cold create, and ld.so's loading and relocating of libc
        # was ~0.15 ms of it (issue 18); each sandbox's PID 1 also dirties fewer pages.
        # Without a static libc (libc.a) it is built dynamic, as before.
        for link in ("-static-pie", "-pie"):
            cmd = [cc, *CFLAGS, link, "-o", out, *srcs]
            self.announce("building nrx-init: " + " ".join(cmd), level=2)
            if subprocess.call(cmd) == 0:
                break
        else:
            raise RuntimeError("nrx-init did not build (see the compiler's errors above)")
        prof_dir = os.path.join(pkg_dir, "seccomp")
        os.makedirs(prof_dir, exist_ok=True)
        for name in os.listdir(os.path.join(HERE, "seccomp")):
            if name.endswith(".toml"):
                shutil.copy2(os.path.join(HERE, "seccomp", name), os.path.join(prof_dir, name))


setup(
    cffi_modules=["native/build_ext.py:ffibuilder"],
    cmdclass={"build_ext": BuildWithInit},
)
