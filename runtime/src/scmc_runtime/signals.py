"""Stop training cleanly on SIGTERM/SIGINT: finish the step, save, exit on every rank.

>>> with GracefulStop() as stop:
...     for batch in loader:
...         train_step(batch)
...         if stop.should_stop():      # one tiny all-reduce: every rank gets the same answer
...             save_checkpoint(...)
...             break

The first signal only sets a flag. A second one restores the previous handler and delivers
the signal again, so an impatient Ctrl-C still interrupts (KeyboardInterrupt) and a second
SIGTERM still terminates.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from types import FrameType
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as torch_dist

from scmc_runtime.distributed import is_distributed

__all__ = ["GracefulStop", "deferred_signals"]


class GracefulStop:
    """Context manager that turns SIGTERM/SIGINT into a flag checked once per step.

    ``check_every`` > 1 makes ``should_stop`` do its collective only on every n-th call (all
    ranks count calls identically, so they still agree); the other calls return False.
    """

    def __init__(
        self,
        signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT),
        *,
        check_every: int = 1,
        device: Optional[torch.device] = None,
    ) -> None:
        if check_every < 1:
            raise ValueError("check_every must be at least 1")
        self.signals = tuple(signals)
        self.check_every = check_every
        self.device = device
        self.received: Optional[int] = None  # signal number received by this process
        self._stopping = False
        self._calls = 0
        self._previous: Dict[int, Any] = {}
        self._flag: Optional[torch.Tensor] = None

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():  # python only allows handlers there
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.received is None:
            self.received = signum
            return
        self._restore()  # second signal: behave as if we had never been installed
        signal.raise_signal(signum)

    @property
    def requested(self) -> bool:
        """True once this process received a signal (no communication)."""
        return self.received is not None

    def should_stop(self) -> bool:
        """Whether any rank received a signal. Call it at the same point of every step on every rank."""
        if self._stopping:
            return True
        self._calls += 1
        if self._calls % self.check_every != 0:
            return False
        if not is_distributed():
            self._stopping = self.requested
            return self._stopping
        if self._flag is None:
            device = self.device
            if device is None:
                nccl = torch_dist.get_backend() == "nccl"
                device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
            self._flag = torch.zeros(1, dtype=torch.int32, device=device)
        self._flag.fill_(1 if self.requested else 0)
        torch_dist.all_reduce(self._flag, op=torch_dist.ReduceOp.MAX)
        self._stopping = bool(self._flag.item())
        return self._stopping


@contextlib.contextmanager
def deferred_signals(signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """Hold ``signals`` until the block is done, then deliver them to the handlers from before.

    For short writes that must not be cut in half by a launcher's SIGTERM: a failing rank ending
    its MLflow run while torchrun is stopping the job. A no-op outside the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: List[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: held.append(signum)) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        for signum in dict.fromkeys(held):
            signal.raise_signal(signum)
