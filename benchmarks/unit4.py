"""Unit 4 benchmark: decode tokens/s with and without the KV-cache, beside Hugging Face's generate.

    python -m benchmarks.unit4                      # the course's solutions
    python -m benchmarks.unit4 --root exercises     # your own code

CPU: one thread, medians of interleaved runs, several lengths.  GPU (when present): batched decode
tokens/s at batch 1-32 and the achieved memory bandwidth (bytes read per step: weights plus the
cache's filled part) as a fraction of a device-to-device copy measured in the same run.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_table(gpt, gen, repeats: int) -> None:
    cfg = gpt.GPTConfig(vocab_size=256, n_positions=512, n_embd=128, n_layer=2, n_head=4)
    torch.manual_seed(0)
    model = gpt.GPT(cfg).eval()
    hf = model.to_hf()
    prompt = torch.randint(0, 256, (1, 16))
    gen.generate(model, prompt, 8)  # warm-up
    print(f"CPU, 1 thread, model {cfg.n_layer} layers x {cfg.n_embd} wide, prompt 16, batch 1 (tokens/s, median of {repeats})")
    print(f"{'new tokens':>10} {'cached':>10} {'uncached':>10} {'ratio':>7} {'HF cache':>10} {'ms/token cached':>16}")
    for new in (64, 128, 256, 448):
        cached = median_time(lambda: gen.generate(model, prompt, new, use_cache=True), repeats)
        plain = median_time(lambda: gen.generate(model, prompt, new, use_cache=False), max(1, repeats // 2))
        with torch.no_grad():
            theirs = median_time(lambda: hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                                                     min_new_tokens=new, do_sample=False, use_cache=True,
                                                     pad_token_id=0), repeats)
        print(f"{new:>10} {new / cached:>10.0f} {new / plain:>10.0f} {plain / cached:>6.1f}x {new / theirs:>10.0f} "
              f"{cached / new * 1e3:>16.2f}")


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write), the device's practical ceiling."""
    src = torch.empty(2**28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = median_time(lambda: dst.copy_(src), 5)
    return 2 * src.numel() * 4 / seconds


def gpu_table(gpt, gen, kv) -> None:
    cfg = gpt.GPTConfig(vocab_size=512, n_positions=1024, n_embd=256, n_layer=4, n_head=4)
    torch.manual_seed(0)
    model = gpt.GPT(cfg).cuda().eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ceiling = copy_bandwidth()
    prompt, new = 16, 256
    print(f"\nGPU {torch.cuda.get_device_name()}: copy bandwidth {ceiling / 1e9:.0f} GB/s; model {weight_bytes / 2**20:.1f} MiB")
    print(f"{'batch':>6} {'tokens/s':>12} {'ms/step':>9} {'GB/s read':>10} {'of copy bw':>11}")
    for batch in (1, 8, 16, 32):
        idx = torch.randint(0, 512, (batch, prompt), device="cuda")
        gen.generate(model, idx, 8)
        seconds = median_time(lambda: gen.generate(model, idx, new), 3)
        step = seconds / new
        # Per decode step: every weight once, plus the filled part of the cache (mean length).
        cache_bytes = kv.KVCache(cfg.n_layer, batch, cfg.n_head, prompt + new // 2, cfg.head_dim).nbytes()
        achieved = (weight_bytes + cache_bytes) / step
        print(f"{batch:>6} {batch * new / seconds:>12,.0f} {step * 1e3:>9.3f} {achieved / 1e9:>10.1f} {achieved / ceiling:>10.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="solutions", help="folder holding unit4/ and common/")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / args.root))
    gpt = importlib.import_module("common.gpt")
    gen = importlib.import_module("unit4.generate")
    kv = importlib.import_module("unit4.kvcache")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cpu_table(gpt, gen, args.repeats)
    torch.set_num_threads(threads)
    if torch.cuda.is_available():
        gpu_table(gpt, gen, kv)
    else:
        print("\n(no CUDA GPU: the GPU table is skipped)")


if __name__ == "__main__":
    main()
