"""accumopt's benchmarks. ``kernel_bandwidth`` measures the Triton micro-step kernels against a
device-to-device copy and torch.optim.AdamW(fused=True); the full suite has its own issue."""
