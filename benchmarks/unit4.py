"""Unit 4 benchmark: decode tokens/s with and without the KV-cache, beside Hugging Face's generate.

    python -m benchmarks.unit4                      # the course's solutions
    python -m benchmarks.unit4 --root exercises     # your own code

CPU: one thread, medians of interleaved runs, several lengths; then the static decode step (Part C)
against forward_with_cache, per token.  GPU (when present): batched decode tokens/s at batch 1-32 and
the achieved memory bandwidth (bytes read per step: weights plus the cache's filled part) as a
fraction of a device-to-device copy measured in the same run; then one decode step three ways:
forward_with_cache, decode_step eagerly, and decode_step captured once as a CUDA graph and replayed.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path

import torch

from autograder.worker.harness import GraphedDecodeStep, copy_bandwidth

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


def decode_seconds(kv, model, idx: torch.Tensor, prompt: int, static: bool, graphed: bool = False) -> float:
    """Seconds for the decode steps after a prefill of ``prompt`` tokens (the prefill is not timed):
    forward_with_cache per token, or the static decode_step, eagerly or replayed from a CUDA graph."""
    batch, total = idx.shape
    cache = kv.KVCache.for_model(model, batch, total)
    slots = torch.arange(total, device=idx.device)  # made once: no host-to-device copy per step
    with torch.no_grad():
        kv.forward_with_cache(model, idx[:, :prompt], cache)
        step = GraphedDecodeStep(kv.decode_step, model, cache, idx[:, prompt:prompt + 1], prompt) if graphed else None

        def decode():
            for i in range(prompt, total):
                token = idx[:, i:i + 1]
                if graphed:
                    step(token, i)
                elif static:
                    kv.decode_step(model, token, cache, slots[i:i + 1])
                else:
                    kv.forward_with_cache(model, token, cache)
            if not static:
                cache.length = prompt  # the next timed run decodes the same slots again

        decode()  # warm-up
        return median_time(decode, 3)


def cpu_static_table(gpt, kv) -> None:
    cfg = gpt.GPTConfig(vocab_size=256, n_positions=512, n_embd=128, n_layer=2, n_head=4)
    torch.manual_seed(0)
    model = gpt.GPT(cfg).eval()
    print("\nCPU, 1 thread, batch 1, prompt 16: ms per decode token, dynamic (filled prefix) vs static (all max_len slots)")
    print(f"{'max_len':>8} {'forward_with_cache':>19} {'decode_step':>12} {'ratio':>7}")
    for total in (80, 272, 512):
        idx = torch.randint(0, 256, (1, total))
        dynamic = decode_seconds(kv, model, idx, 16, static=False) / (total - 16)
        static = decode_seconds(kv, model, idx, 16, static=True) / (total - 16)
        print(f"{total:>8} {dynamic * 1e3:>19.3f} {static * 1e3:>12.3f} {static / dynamic:>6.2f}x")


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

    print(f"\nOne decode step, prompt {prompt} then {new} steps (ms/step; the static step reads all max_len slots)")
    print(f"{'batch':>6} {'forward_with_cache':>19} {'decode_step':>12} {'CUDA graph':>11} {'graph tokens/s':>15} {'of copy bw':>11}")
    for batch in (1, 8, 32):
        idx = torch.randint(0, 512, (batch, prompt + new), device="cuda")
        dynamic = decode_seconds(kv, model, idx, prompt, static=False) / new
        eager = decode_seconds(kv, model, idx, prompt, static=True) / new
        replayed = decode_seconds(kv, model, idx, prompt, static=True, graphed=True) / new
        static_cache = kv.KVCache(cfg.n_layer, batch, cfg.n_head, prompt + new, cfg.head_dim).nbytes()
        achieved = (weight_bytes + static_cache) / replayed
        print(f"{batch:>6} {dynamic * 1e3:>19.3f} {eager * 1e3:>12.3f} {replayed * 1e3:>11.3f} {batch / replayed:>15,.0f} "
              f"{achieved / ceiling:>10.1%}")


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
    cpu_static_table(gpt, kv)
    torch.set_num_threads(threads)
    if torch.cuda.is_available():
        gpu_table(gpt, gen, kv)
    else:
        print("\n(no CUDA GPU: the GPU table is skipped)")


if __name__ == "__main__":
    main()
