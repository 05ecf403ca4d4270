"""Stopping cleanly on a signal: SIGTERM and SIGUSR1 (what schedulers send before a kill) and SIGINT (Ctrl-C).

The handler only notes the signal; at every step boundary the training loop all-reduces `requested` over the ranks
(distributed.any_rank), so that every rank stops after the same step, even when only one rank was signalled (srun
signals every task; torchrun forwards to its workers). Rank 0 then saves and all exit 0. A second Ctrl-C exits at
once, without saving.
"""

import os
import signal
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# torchrun forwards the Ctrl-C it receives to workers that the terminal already sent it to: a repeat this soon
# after the first is that echo, not the user pressing Ctrl-C again.
ECHO_SECONDS = 1.0


def _write_stderr(text: str) -> None:
    os.write(2, text.encode())  # unbuffered: print() inside a handler can collide with the loop's own print


class StopSignals:
    """Context manager: while inside, the stop signals are noted instead of ending the process."""

    def __init__(self):
        self.received: str | None = None  # the name of the first signal
        self._first_sigint: float | None = None
        self._previous = {}
        self._echo_seconds = ECHO_SECONDS if "TORCHELASTIC_RUN_ID" in os.environ else 0.0

    def __enter__(self) -> "StopSignals":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_sigint is not None and now - self._first_sigint > self._echo_seconds:
                _write_stderr("second Ctrl-C: exiting now, without saving\n")
                os._exit(130)
            if self._first_sigint is None:
                self._first_sigint = now
        if self.received is None:
            self.received = signal.Signals(signum).name
            _write_stderr(f"{self.received} received: stopping after this step to save a checkpoint "
                          "(Ctrl-C again to quit at once without saving)\n")

    @property
    def requested(self) -> bool:
        return self.received is not None
