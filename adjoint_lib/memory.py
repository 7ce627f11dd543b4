"""Memory meters: autograd's saved tensors, peak resident set size, peak CUDA memory.

* :class:`SavedTensorMeter` - deterministic: every tensor autograd keeps for a backward pass
  (activations of a graph, a Function's ``save_for_backward``) goes through
  ``torch.autograd.graph.saved_tensors_hooks``. The meter wraps each in a holder that counts
  its bytes while it is alive, so ``peak_bytes`` is the largest amount of saved-for-backward
  memory alive at any moment - independent of the allocator, other processes and timing.
* :class:`PeakRSS` - the process's peak resident set size above its value at entry (CPU), with
  :func:`pin_malloc` so that freed tensors go back to the OS.
* :func:`cuda_peak` - ``torch.cuda.max_memory_allocated`` above the allocation at entry.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import re
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import torch

Tensor = torch.Tensor


class _Held:
    __slots__ = ("tensor", "meter", "nbytes")

    def __init__(self, tensor: Tensor, meter: "SavedTensorMeter") -> None:
        self.tensor, self.meter = tensor, meter
        self.nbytes = tensor.numel() * tensor.element_size()
        meter._alive += self.nbytes
        meter.peak_bytes = max(meter.peak_bytes, meter._alive)
        meter.count += 1

    def __del__(self) -> None:
        self.meter._alive -= self.nbytes


class SavedTensorMeter(torch.autograd.graph.saved_tensors_hooks):
    """Context manager: ``with SavedTensorMeter() as m: loss = f(); loss.backward()``;
    then ``m.peak_bytes`` is the peak of saved-tensor bytes alive, ``m.count`` how many
    tensors were saved in all. Wrap both the forward and the backward call.

    Tensors saved more than once (e.g. a weight used at every step) are counted each time,
    as autograd may hold them separately.

    Holders keep ``tensor.detach()`` (same storage, same bytes): holding the tensor itself
    makes a reference cycle when an op saves its own output (softmax, exp: output -> grad_fn
    -> holder -> output) that keeps whole graphs alive under ``retain_graph=True`` (as in
    torchdiffeq's ``odeint_adjoint``). Unpacked tensors lose only their ``grad_fn``, which
    first-order backward passes never use.
    """

    def __init__(self) -> None:
        self.peak_bytes = 0
        self.count = 0
        self._alive = 0
        super().__init__(lambda t: _Held(t.detach(), self), lambda h: h.tensor)

    def __enter__(self) -> "SavedTensorMeter":
        super().__enter__()
        return self

    @property
    def alive_bytes(self) -> int:
        """Bytes of the saved tensors alive now."""
        return self._alive


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def pin_malloc(threshold: int = 65536) -> bool:
    """Pin glibc's mmap threshold (and trim threshold) so that large blocks are mmapped and
    returned to the OS when freed: RSS then follows the live tensors. Returns success."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def _status_kb(field_name: str) -> int | None:
    try:
        m = re.search(field_name + r":\s+(\d+) kB", Path("/proc/self/status").read_text())
        return int(m.group(1)) if m else None
    except OSError:
        return None


class PeakRSS:
    """``with PeakRSS() as p: ...`` then ``p.peak_bytes`` is the peak resident set size above
    the RSS at entry. Exact via the kernel's high-water mark (``VmHWM`` reset by writing 5 to
    ``/proc/self/clear_refs``); otherwise a polling thread (psutil, every ``interval`` s)."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval, self.peak_bytes, self.baseline_bytes, self.method = interval, 0, 0, ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._max = 0

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def _poll(self) -> None:
        import psutil
        proc = psutil.Process()
        while not self._stop.is_set():
            self._max = max(self._max, proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        rss = _status_kb("VmRSS")
        if rss is not None and self._reset_hwm() and _status_kb("VmHWM") is not None:
            self.method = "VmHWM (reset via /proc/self/clear_refs)"
            self.baseline_bytes = _status_kb("VmRSS") * 1024
        else:
            import psutil
            self.method = f"psutil RSS polling every {self.interval * 1000:g} ms"
            self.baseline_bytes = self._max = psutil.Process().memory_info().rss
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            peak = self._max
        else:
            peak = _status_kb("VmHWM") * 1024
        self.peak_bytes = max(0, peak - self.baseline_bytes)


@contextlib.contextmanager
def cuda_peak(device: torch.device) -> Iterator[dict[str, Any]]:
    """``with cuda_peak(dev) as box: ...`` then ``box["peak_bytes"]`` is
    ``torch.cuda.max_memory_allocated`` above ``box["baseline_bytes"]``, the allocation at entry."""
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    box = {"baseline_bytes": torch.cuda.memory_allocated(device), "method": "torch.cuda.max_memory_allocated"}
    yield box
    torch.cuda.synchronize(device)
    box["peak_bytes"] = torch.cuda.max_memory_allocated(device) - box["baseline_bytes"]
