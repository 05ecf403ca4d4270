"""What a run shows while it trains: a progress bar on a terminal, plain lines in a log file.

On a terminal, rank 0 draws one tqdm bar (step of total, loss, tokens/s, MFU, ETA) and prints validation, sample
and checkpoint lines above it. When stdout is not a terminal (CI, a Slurm log, `> log`), redrawing a bar would
fill the file with carriage returns, so it prints one plain line every `log_interval` steps instead. Other ranks
print nothing. metrics.jsonl gets every step whatever is shown here.
"""

import sys

from tqdm import tqdm


def step_line(record: dict) -> str:
    """One training step as a log line: step, loss, lr, gradient norm, time, throughput and MFU."""
    line = (f"step {record['step']:6d} | loss {record['loss']:.4f} | lr {record['lr']:.3e} | "
            f"norm {record['grad_norm']:.3f} | {record['ms']:.0f} ms | {record['tokens_per_s']:,.0f} tok/s")
    if record.get("mfu") is not None:
        line += f" | MFU {record['mfu'] * 100:.1f}%"
    return line


def bar_postfix(record: dict) -> str:
    """The short part of a step the bar shows beside its own step count, rate and ETA."""
    text = f"loss {record['loss']:.4f} | {record['tokens_per_s']:,.0f} tok/s"
    if record.get("mfu") is not None:
        text += f" | MFU {record['mfu'] * 100:.1f}%"
    return text


class Progress:
    """The training display. `update` once per step with the step's record; `write` for any other line."""

    def __init__(self, total_steps: int, log_interval: int = 1, start_step: int = 0, enabled: bool = True,
                 stream=None, bar: bool | None = None):
        self.stream = stream if stream is not None else sys.stdout
        self.enabled = enabled
        self.total_steps = total_steps
        self.log_interval = log_interval
        use_bar = self.stream.isatty() if bar is None else bar
        self.bar = None
        if enabled and use_bar:
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", desc="train", file=self.stream,
                            dynamic_ncols=True, smoothing=0.1)

    def update(self, record: dict) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(bar_postfix(record), refresh=False)
            self.bar.update(1)
            return
        step = record["step"]
        is_last_step = step == self.total_steps - 1
        if step % self.log_interval == 0 or is_last_step:
            self.write(step_line(record))

    def write(self, line: str) -> None:
        """Print a line above the bar (or just print it when there is none)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
