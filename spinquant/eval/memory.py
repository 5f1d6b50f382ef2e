"""Peak memory of a block of work: CUDA allocator peak on GPU, sampled process RSS on CPU.

On CPU the resident set size is polled every `interval` seconds from a background thread while the
block runs; `peak_bytes` is the highest RSS seen and `peak_delta_bytes` its excess over the RSS at entry.
"""
from __future__ import annotations

import threading

import psutil
import torch


class PeakMemory:
    def __init__(self, device: str = "cpu", interval: float = 0.01):
        self.device, self.interval = str(device), interval
        self.peak_bytes = self.peak_delta_bytes = 0

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        self._proc = psutil.Process()
        self._base = self._proc.memory_info().rss
        self.peak_bytes = self._base
        self._stop = threading.Event()

        def poll():
            while not self._stop.is_set():
                self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss)
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            self.peak_bytes = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss)
        self.peak_delta_bytes = self.peak_bytes - self._base
        return False
