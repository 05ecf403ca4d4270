"""Throughput, model FLOPs utilisation and the metrics log (one JSON object per line, fanned out to the sinks)."""

from collections.abc import Sequence
from pathlib import Path

import torch

from model import GPT
from pretrain.fileio import JsonlWriter
from pretrain.progress import Progress
from pretrain.runtime import measure_matmul_tflops

# Dense bf16 peaks, TFLOP/s (vendor datasheets; the 2:4-sparse figures are twice these), by the exact name
# torch.cuda.get_device_name reports: the variants of one GPU differ (an H100 PCIe has 756, not the SXM's 989),
# so a name not listed here gets no MFU rather than a neighbour's peak; set train.peak_tflops for it.
GPU_PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.0,  # H100 SXM5
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.0,  # H200 SXM
    "NVIDIA H200 NVL": 835.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A10": 125.0,
    "NVIDIA L4": 121.0,
    "NVIDIA GeForce RTX 4090": 165.2,  # with fp32 accumulation, as autocast does
    "NVIDIA GeForce RTX 3090": 71.0,
}


def flops_per_token(model: GPT, seq_len: int) -> float:
    """Training FLOPs per token (PaLM appendix B): 6N for the matmuls of forward+backward, plus attention's
    12 * n_layer * n_head * head_dim * T. N counts every parameter, the tied embedding once; an untied token
    embedding is looked up, not multiplied, and is left out."""
    cfg = model.config
    n = model.num_params() - (0 if cfg.tie_head else model.transformer.wte.weight.numel())
    return 6 * n + 12 * cfg.n_layer * cfg.n_embd * seq_len


def peak_tflops(device: torch.device, dtype: torch.dtype, configured: float = 0.0) -> float | None:
    """The per-device peak that MFU is measured against: the configured value, else a known GPU's datasheet
    bf16 figure, else (CPU) the best of ten matmuls in the training dtype. None when unknown (MFU then is not
    reported)."""
    if configured > 0:
        return configured
    if device.type == "cuda":
        return gpu_peak_tflops(torch.cuda.get_device_name(device))
    if device.type == "cpu":
        return measure_matmul_tflops(dtype, size=1024, repeats=10)
    return None


class Mfu:
    """Model FLOPs utilisation of a training step: the model FLOPs each device did per second against its peak.
    A step can only beat the peak if the peak is wrong (a CPU's matmul measured while the machine was busy, a
    datasheet figure of another model): from then on no MFU is reported, and `log` is told once why, rather than
    a utilisation above 100%."""

    def __init__(self, flops_per_token: float, peak_tflops: float | None, world_size: int, log=print):
        self.flops_per_token, self.peak, self.world_size, self.log = flops_per_token, peak_tflops, world_size, log

    def __call__(self, tokens_per_s: float, step: int) -> float | None:
        if self.peak is None:
            return None
        mfu = self.flops_per_token * tokens_per_s / self.world_size / (self.peak * 1e12)
        if mfu > 1:
            self.log(f"MFU no longer reported from step {step}: that step did {mfu * self.peak:.4g} TFLOP/s per "
                     f"device, above the peak of {self.peak:.4g} TFLOP/s, so that peak is wrong (measured under "
                     "load?); set train.peak_tflops to this device's peak")
            self.peak = None
            return None
        return mfu


def gpu_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU known by its exact product name, else None."""
    return GPU_PEAK_TFLOPS.get(device_name.strip())


class MetricsLogger:
    """Appends every record as one JSON line to out_dir/metrics.jsonl and hands it to the sinks (experiment
    trackers, the run summary); lines to show go through the progress display (above its bar, if it draws one).
    Disabled (other ranks), it does nothing."""

    def __init__(self, path: str | Path | None, enabled: bool = True, progress: Progress | None = None,
                 sinks: Sequence = ()):
        self.enabled = enabled
        self.progress = progress
        self.sinks = list(sinks) if enabled else []
        self.file = JsonlWriter(path) if enabled and path is not None else None

    def log(self, record: dict, line: str | None = None) -> None:
        if not self.enabled:
            return
        if line is not None:
            self.write(line)
        if self.file is not None:
            self.file.write(record)
        for sink in self.sinks:
            sink.log(record)

    def log_step(self, record: dict) -> None:
        """A training step's record: logged in full, shown as the progress display decides (bar or every Nth)."""
        self.log(record)
        if self.enabled and self.progress is not None:
            self.progress.update(record)

    def write(self, line: str) -> None:
        """Show a line (sample, checkpoint, ...) without logging a record."""
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        for sink in self.sinks:
            sink.close()
        if self.file is not None:
            self.file.close()
