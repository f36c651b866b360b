"""Unit 2 benchmark: the course's reference attention against torch's SDPA (MATH backend) on the
same shapes, and the blockwise version's memory at 4k tokens.

    python -m benchmarks.unit2            # CPU figures (and GPU ones where CUDA is available)

Goals (from the unit's issue): the reference within 1.5x of the MATH backend's time; the blockwise
version's largest tensor a small fraction of the materialised score matrix.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from autograder.worker.harness import largest_allocation
from solutions.unit2.attention import scaled_dot_product_attention
from solutions.unit2.blockwise import blockwise_attention, memory_efficient_attention


def math_sdpa(q, k, v, is_causal=False):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_interleaved(fns: dict, make_inputs, repeats: int, device: str) -> dict[str, float]:
    """Median seconds of each function, calls interleaved so all see the same machine state."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats + 1):  # the first round warms up
        inputs = make_inputs(r)
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn(*inputs)
            sync(device)
            if r:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def speed(device: str, dtype: torch.dtype, b: int, h: int, s: int, d: int, causal: bool, repeats: int) -> None:
    def make(r):
        g = torch.Generator().manual_seed(r)
        return [torch.randn(b, h, s, d, generator=g).to(dtype).to(device) for _ in range(3)]

    fns = {
        "MATH backend": lambda q, k, v: math_sdpa(q, k, v, causal),
        "course reference": lambda q, k, v: scaled_dot_product_attention(q, k, v, None, causal),
        "blockwise (128)": lambda q, k, v: blockwise_attention(q, k, v, causal, 128),
    }
    med = median_interleaved(fns, make, repeats, device)
    flops = 4 * b * h * s * s * d / (2 if causal else 1)
    base = med["MATH backend"]
    name = str(dtype).replace("torch.", "")
    print(f"\n{device} {name} [b={b}, h={h}, s={s}, d={d}] causal={causal}: median of {repeats}")
    print(f"  {'':18s} {'ms':>9s} {'TFLOP/s':>9s} {'x MATH':>8s}")
    for fn_name, t in med.items():
        print(f"  {fn_name:18s} {t * 1e3:9.2f} {flops / t / 1e12:9.3f} {t / base:8.2f}")


def memory_cpu(s: int = 4096, h: int = 4, d: int = 64, block: int = 128) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, s, d, generator=g) for _ in range(3))
    full, _ = largest_allocation(scaled_dot_product_attention, [q, k, v, None, True])
    blocked, _ = largest_allocation(blockwise_attention, [q, k, v, True, block])
    both, _ = largest_allocation(memory_efficient_attention, [q, k, v, True, block], True)
    print(f"\ncpu float32 [b=1, h={h}, s={s}, d={d}] causal, block_size={block}: largest tensor created")
    print(f"  materialised (course reference)       {full / 2**20:9.1f} MiB")
    print(f"  blockwise forward                     {blocked / 2**20:9.1f} MiB  ({blocked / full:.3f} of materialised)")
    print(f"  memory_efficient forward + backward   {both / 2**20:9.1f} MiB  ({both / full:.3f} of materialised)")


def memory_cuda(s: int, h: int = 8, d: int = 64, dtype: torch.dtype = torch.bfloat16) -> None:
    from autograder.worker.harness import cuda_peak_memory

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, s, d, generator=g).to(dtype).cuda() for _ in range(3))
    rows = [("blockwise forward", blockwise_attention, [q, k, v, True, 128], False),
            ("memory_efficient fwd + bwd", memory_efficient_attention, [q, k, v, True, 128], True)]
    if s <= 8192:
        rows.insert(0, ("materialised (course reference)", scaled_dot_product_attention, [q, k, v, None, True], False))
    print(f"\ncuda {str(dtype)[6:]} [b=1, h={h}, s={s}, d={d}] causal: peak memory above the inputs")
    for name, fn, args, backward in rows:
        peak, _ = cuda_peak_memory(fn, args, backward)
        print(f"  {name:32s} {peak / 2**20:9.1f} MiB")


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    speed("cpu", torch.float32, 4, 8, 512, 64, causal=False, repeats=7)
    speed("cpu", torch.float32, 4, 8, 512, 64, causal=True, repeats=7)
    memory_cpu()
    if torch.cuda.is_available():
        print(f"\n{torch.cuda.get_device_name()}")
        speed("cuda", torch.bfloat16, 64, 16, 512, 64, causal=True, repeats=20)
        speed("cuda", torch.bfloat16, 4, 16, 4096, 128, causal=False, repeats=20)
        for s in (8192, 16384):
            memory_cuda(s)


if __name__ == "__main__":
    main()
