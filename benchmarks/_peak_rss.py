"""Run a Python program in this process and write its own peak RSS (bytes) at exit.

    python benchmarks/_peak_rss.py OUT_FILE -m syncer --config x.toml sync
    python benchmarks/_peak_rss.py OUT_FILE path/to/script.py ARGS...

Linux's VmHWM (/proc/self/status) is the high-water mark of this process's own
address space since exec. ``getrusage`` (and ``wait4``) ru_maxrss is not: it also
keeps the parent's resident size at fork time, so a child of a large benchmark
process would report the parent's size.
"""

import atexit
import resource
import runpy
import sys


def peak_rss() -> int:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def main() -> None:
    out, target, *rest = sys.argv[1:]

    def report() -> None:
        with open(out, "w") as f:
            f.write(str(peak_rss()))

    atexit.register(report)
    if target == "-m":
        module, *args = rest
        sys.argv = [module, *args]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = [target, *rest]
        runpy.run_path(target, run_name="__main__")


if __name__ == "__main__":
    main()
