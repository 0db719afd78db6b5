"""Peak resident memory of this process, as the benchmarks' memory workers report it."""


def peak_rss_bytes():
    """This process's peak resident set size (Linux: VmHWM in /proc/self/status).

    Not getrusage's ru_maxrss: Linux keeps that across exec, so a worker forked from a large
    parent reports the parent's peak as its own (attention_benchmark's parent plans the block
    layouts of the longest length, gigabytes at 64K tokens). VmHWM starts afresh at exec.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status: peak memory is measured on Linux only.")
