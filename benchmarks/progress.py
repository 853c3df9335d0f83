"""A progress bar over the benchmark's work, on stderr (no dependency)."""
import sys
import time


class Progress:
    def __init__(self, total, width=30):
        self.total, self.done, self.width = max(total, 1), 0, width
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def advance(self, label):
        self.done += 1
        filled = self.width * self.done // self.total
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                f"{time.perf_counter() - self.start:5.0f}s {label}")
        if self.tty:
            sys.stderr.write("\r" + line[:120].ljust(120))
            if self.done == self.total:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
