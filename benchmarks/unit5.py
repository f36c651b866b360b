"""Unit 5 figures: merged / unmerged LoRA inference against the base model, trainable parameters,
and the reference LoRA fine-tune (loss start and end, seconds).

Run: .venv/bin/python -m benchmarks.unit5   (uses CUDA too when available)
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "solutions"))

from common.gpt import GPT, GPTConfig  # noqa: E402
from unit5 import finetune as ft  # noqa: E402
from unit5 import lora  # noqa: E402


def _stack(width: int, depth: int, device: str, dtype) -> torch.nn.Sequential:
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers).to(device=device, dtype=dtype).eval()


def _time_interleaved(models: dict, x, rounds: int) -> dict:
    """Median and min seconds per forward of each model, the models called in turn each round so
    that all of them see the same machine state."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times = {name: [] for name in models}
    with torch.no_grad():
        for k in range(rounds):
            for name, model in models.items():
                sync()
                start = time.perf_counter()
                model(x)
                sync()
                if k >= 2:
                    times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def inference(device: str, width: int, depth: int, tokens: int, dtype) -> None:
    base = _stack(width, depth, device, dtype)
    adapted = _stack(width, depth, device, dtype)
    lora.inject_lora(adapted, [str(2 * i) for i in range(depth)], 8, 16.0)
    for m in lora.lora_modules(adapted).values():
        torch.nn.init.normal_(m.lora_B, std=0.01)
    merged = _stack(width, depth, device, dtype)
    lora.inject_lora(merged, [str(2 * i) for i in range(depth)], 8, 16.0)
    lora.load_lora_state_dict(merged, lora.lora_state_dict(adapted))
    lora.merge_lora(merged)
    x = torch.randn(tokens, width, device=device, dtype=dtype)
    t = _time_interleaved({"base": base, "unmerged": adapted, "merged": merged}, x, 40)
    t_base, t_unmerged, t_merged = t["base"][0], t["unmerged"][0], t["merged"][0]
    print(f"  (fastest calls: base {t['base'][1] * 1e3:.3f} ms, unmerged {t['unmerged'][1] * 1e3:.3f} ms, "
          f"merged {t['merged'][1] * 1e3:.3f} ms; ratios {t['unmerged'][1] / t['base'][1]:.2f}x, {t['merged'][1] / t['base'][1]:.2f}x)")
    trainable, total = lora.count_parameters(adapted)
    print(f"{device} {str(dtype)[6:]} {depth}x Linear({width}) on x[{tokens},{width}]: base {t_base * 1e3:.3f} ms, "
          f"unmerged {t_unmerged * 1e3:.3f} ms ({t_unmerged / t_base:.2f}x), merged {t_merged * 1e3:.3f} ms "
          f"({t_merged / t_base:.2f}x) [medians]; trainable {trainable} of {total} "
          f"(= depth * r * (d_in + d_out) = {depth * 8 * 2 * width})")


def finetune_figures(seed: int = 0) -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = ft.write_jsonl(ft.make_instruction_data(256, seed), f"{tmp}/train.jsonl")
        start = time.perf_counter()
        dataset = ft.load_instruction_dataset(path)
        load_s = time.perf_counter() - start
    torch.manual_seed(seed)
    model = GPT(GPTConfig())
    with torch.no_grad():
        model.transformer.ln_f.weight.fill_(8.0)  # as the graded test: a confident "pretrained" head
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lora.inject_lora(model, ["c_attn", "c_proj", "c_fc"], 8, 16.0)
    trainable, total = lora.count_parameters(model)
    start = time.perf_counter()
    losses = ft.finetune(model, dataset, 100, 12, 5e-3, seed)  # the graded test's settings
    seconds = time.perf_counter() - start
    state = model.state_dict()
    unchanged = all(torch.equal(state.get(k, state.get(k.rsplit(".", 1)[0] + ".base." + k.rsplit(".", 1)[1])), v)
                    for k, v in base.items())
    print(f"fine-tune (course GPT, LoRA r=8 on c_attn/c_proj/c_fc, 100 steps x 12, lr 5e-3, 1 thread): "
          f"dataset load {load_s:.2f} s, training {seconds:.2f} s; loss {losses[0]:.3f} -> "
          f"{statistics.mean(losses[-10:]):.3f} (mean of last 10); trainable {trainable} of {total}; "
          f"base weights bitwise unchanged: {unchanged}")
    print("  loss every 10 steps:", " ".join(f"{l:.2f}" for l in losses[::10]))


def main() -> None:
    torch.set_num_threads(1)  # the course machines share their cores; one thread times steadily
    inference("cpu", 768, 6, 16, torch.float32)
    if torch.cuda.is_available():
        inference("cuda", 4096, 8, 2048, torch.bfloat16)
        inference("cuda", 4096, 8, 16, torch.bfloat16)
    finetune_figures()


if __name__ == "__main__":
    main()
