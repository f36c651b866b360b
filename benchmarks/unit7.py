"""Unit 7 figures: tokens/s of the training step against the same model built from transformers'
classes, the validation loss reached against the limit the course's source allows, and on a GPU,
model FLOPs utilisation.

    python -m benchmarks.unit7                      # the course's solutions
    python -m benchmarks.unit7 --root exercises     # your own code

CPU (one torch thread, as in the graded run; CPU time, so a busy machine changes little): one optimizer step of unit7's GPT with unit7's AdamW,
clipping and loss (train_step), beside LlamaForCausalLM built from the same config with the same
weights, stepped by torch.optim.AdamW, F.cross_entropy and clip_grad_norm_; the two are called in
turn on the same batches and the median of each is kept.  Then Part C's graded run (250 steps on
text of the grammar, read through datasets and a memory map), and the same run replayed on the
Llama model with torch's and transformers' pieces: the validation loss of each against the best
possible loss on the same windows, the source's entropy rate and the loss of a model that sees only
the previous word.  GPU (when present): Part E's model (about 12M parameters) trained in bf16
autocast by unit7's train, beside the Llama reference with fused AdamW, in tokens/s and MFU against
the bf16 matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from autograder.testing import bf16_matmul_flops

REPO = Path(__file__).resolve().parents[1]

# Part C's graded run (autograder/hidden/unit7/test_d_learns_hidden.py) and Part E's model.
LEARNS_MODEL = dict(vocab_size=42, d_model=64, n_layer=2, n_head=4, d_mlp=172, max_seq_len=256)
LEARNS_RUN = dict(batch_size=16, block_size=64, accum_steps=1, total_steps=250, warmup_steps=25, max_lr=3e-3,
                  min_lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, max_grad_norm=1.0, seed=0)
GPU_MODEL = dict(vocab_size=42, d_model=384, n_layer=7, n_head=6, d_mlp=1024, max_seq_len=256)
GPU_RUN = dict(LEARNS_RUN, batch_size=32, block_size=256, total_steps=60, warmup_steps=10, max_lr=1e-3, min_lr=1e-4)


def load(root: str) -> SimpleNamespace:
    sys.path.insert(0, str(REPO / root))
    return SimpleNamespace(**{n: importlib.import_module(f"unit7.{n}") for n in ("model", "train", "source", "oracles")})


def flops_per_token(params: int, n_layer: int, d_model: int, block: int) -> float:
    """Training FLOPs per token: 6 per parameter (forward and backward) plus attention's scores and
    weighted sum (12 * layers * width * context)."""
    return 6 * params + 12 * n_layer * d_model * block


# --- CPU: one training step, unit7's against transformers' ------------------------------------------


def step_pair(u, sizes: dict, batch: int, block: int, seed: int = 0):
    """(unit7's step, the Llama step), each a function of one (x, y) batch, from the same weights."""
    o = u.oracles
    cfg = o.gpt_config(**sizes)
    torch.manual_seed(seed)
    gpt = u.model.GPT(u.model.GPTConfig(**cfg))
    hf = o.to_llama(gpt.state_dict(), cfg, torch.float32, exact=False).train()
    tc = dict(LEARNS_RUN, batch_size=batch, block_size=block)
    opt = u.train.make_optimizer(gpt, u.train.TrainConfig(**tc))
    ref = o.reference_optimizer(hf, tc)

    def ours(x, y):
        u.train.train_step(gpt, opt, [(x, y)], 1e-3, 1.0)

    def theirs(x, y):
        ref.zero_grad(set_to_none=True)
        out = hf(input_ids=x, use_cache=False).logits
        F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        for group in ref.param_groups:
            group["lr"] = 1e-3
        ref.step()

    return ours, theirs, u.model.num_parameters(gpt), cfg


def cpu_steps(u, rounds: int) -> None:
    print(f"## One training step on the CPU ({torch.get_num_threads()} torch thread; tokens per CPU second, the median "
          f"of {rounds} interleaved steps: other load on the machine changes it little)")
    print("unit7: GPT + train_step (its AdamW, clipping, cross_entropy); Llama: LlamaForCausalLM from the same config "
          "and weights + torch.optim.AdamW, clip_grad_norm_, F.cross_entropy\n")
    print(f"{'model':<34} {'params':>9} {'batch':>7} {'unit7':>9} {'Llama':>9} {'unit7/Llama':>12} {'unit7 GFLOP/s':>14}")
    cases = [("graded run (Part C)", LEARNS_MODEL, 16, 64),
             ("wider: 4 x 256, vocab 512", dict(vocab_size=512, d_model=256, n_layer=4, n_head=8, d_mlp=688,
                                                max_seq_len=256), 8, 128)]
    for name, sizes, batch, block in cases:
        ours, theirs, params, cfg = step_pair(u, sizes, batch, block)
        gen = torch.Generator().manual_seed(1)
        times = {"ours": [], "theirs": []}
        for r in range(rounds + 2):  # the first two rounds warm up
            x = torch.randint(0, cfg["vocab_size"], (batch, block), generator=gen)
            y = torch.randint(0, cfg["vocab_size"], (batch, block), generator=gen)
            for key, fn in (("ours", ours), ("theirs", theirs)):
                start = time.process_time()
                fn(x, y)
                if r >= 2:
                    times[key].append(time.process_time() - start)
        mine, ref = (statistics.median(times[k]) for k in ("ours", "theirs"))
        tokens = batch * block
        achieved = tokens / mine * flops_per_token(params, cfg["n_layer"], cfg["d_model"], block)
        print(f"{name:<34} {params:>9,} {batch:>3}x{block:<3} {tokens / mine:>9,.0f} {tokens / ref:>9,.0f} "
              f"{ref / mine:>11.2f}x {achieved / 1e9:>14.1f}")


# --- CPU: Part C's graded run, and the same run on Llama ----------------------------------------------


def learns(u, seed: int, replay: bool) -> None:
    src, o, train = u.source, u.oracles, u.train
    cfg = o.gpt_config(**LEARNS_MODEL)
    tc = dict(LEARNS_RUN, seed=seed % 1000)
    folder = Path(tempfile.mkdtemp(prefix="bench-unit7-"))
    (folder / "train.txt").write_text(src.generate(150_000, seed), encoding="utf-8")
    ids = train.encode_dataset(str(folder / "train.txt"), src.vocab())
    train.write_tokens(ids, str(folder / "train.bin"))
    data = train.load_tokens(str(folder / "train.bin"))
    torch.manual_seed(seed)
    gpt = u.model.GPT(u.model.GPTConfig(**cfg))
    start_state = {k: v.clone() for k, v in gpt.state_dict().items()}
    cpu, wall = time.process_time(), time.perf_counter()
    losses = train.train(gpt, data, train.TrainConfig(**tc))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    windows = src.random_windows(src.sample_ids(80_000, seed + 12345), 512, tc["block_size"] + 1, seed)
    val = o.windows_loss(o.to_llama(gpt.state_dict(), cfg, torch.float32, exact=False), windows)
    best, bigram, rate = src.optimal_loss(windows), src.bigram_loss(windows), src.entropy_rate()
    print(f"\n## Part C's graded run, seed {seed}: {len(ids):,} tokens of the grammar (datasets, then a memory map); "
          f"{tc['total_steps']} steps of {tc['batch_size']} x {tc['block_size']}")
    print(f"unit7    training loss {np.mean(losses[:10]):.3f} -> {np.mean(losses[-10:]):.3f}; validation {val:.4f} nats "
          f"per token, {val - best:+.4f} from the best possible; {cpu:.1f} CPU s ({wall:.1f} s)")
    if replay:
        hf = o.to_llama(start_state, cfg, torch.float32, exact=False).train()
        cpu, wall = time.process_time(), time.perf_counter()
        ref_losses = o.reference_train(hf, np.asarray(data), tc, tc["total_steps"])
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        ref_val = o.windows_loss(hf.eval(), windows)
        print(f"Llama    training loss {np.mean(ref_losses[:10]):.3f} -> {np.mean(ref_losses[-10:]):.3f}; validation "
              f"{ref_val:.4f} nats per token, {ref_val - best:+.4f} from the best possible; {cpu:.1f} CPU s ({wall:.1f} s)")
    print(f"limits   best possible on these 512 windows of 64 {best:.4f}; the source's entropy rate {rate:.4f}; "
          f"previous word only {bigram:.4f} (the graded margin: 0.05 above the best possible)")


# --- GPU: Part E's model, tokens/s and MFU ----------------------------------------------------------




def llama_train_cuda(o, hf, data, tc) -> None:
    groups = o.reference_optimizer(hf, tc).param_groups
    optimizer = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups],
                                  lr=tc["max_lr"], betas=tuple(tc["betas"]), eps=tc["eps"], fused=True)
    generator = torch.Generator().manual_seed(tc["seed"])
    lrs = o.schedule(tc, tc["total_steps"])
    for step in range(tc["total_steps"]):
        x, y = (t.cuda(non_blocking=True) for t in o.reference_batch(data, tc["batch_size"], tc["block_size"], generator))
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = hf(input_ids=x, use_cache=False).logits
            loss = F.cross_entropy(out.float().reshape(-1, out.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), tc["max_grad_norm"])
        for group in optimizer.param_groups:
            group["lr"] = lrs[step]
        optimizer.step()
    torch.cuda.synchronize()


def gpu(u) -> None:
    o, src, train = u.oracles, u.source, u.train
    cfg = o.gpt_config(**GPU_MODEL)
    data = src.sample_ids(400_000, 0).astype(np.uint16)
    run_cfg = train.TrainConfig(**GPU_RUN, device="cuda", autocast_dtype=torch.bfloat16)
    tokens = GPU_RUN["total_steps"] * GPU_RUN["batch_size"] * GPU_RUN["block_size"]

    def fresh():
        torch.manual_seed(0)
        gpt = u.model.GPT(u.model.GPTConfig(**cfg))
        return gpt, {k: v.clone() for k, v in gpt.state_dict().items()}

    warm, _ = fresh()
    train.train(warm.cuda(), data, run_cfg, steps=5)  # kernels, cuBLAS handles, the allocator's pools
    llama_train_cuda(o, o.to_llama(warm.state_dict(), cfg, torch.float32, exact=False).cuda().train(), data,
                     dict(GPU_RUN, total_steps=5))
    gpt, state = fresh()
    gpt.cuda()
    torch.cuda.synchronize()
    start = time.perf_counter()
    train.train(gpt, data, run_cfg)
    torch.cuda.synchronize()
    mine = time.perf_counter() - start
    hf = o.to_llama(state, cfg, torch.float32, exact=False).cuda().train()
    start = time.perf_counter()
    llama_train_cuda(o, hf, data, GPU_RUN)
    ref = time.perf_counter() - start
    params = u.model.num_parameters(gpt)
    per_token = flops_per_token(params, GPU_MODEL["n_layer"], GPU_MODEL["d_model"], GPU_RUN["block_size"])
    peak = bf16_matmul_flops()
    windows = src.random_windows(src.sample_ids(60_000, 7), 256, GPU_RUN["block_size"] + 1, 0)
    mine_val = o.windows_loss(o.to_llama({k: v.float().cpu() for k, v in gpt.state_dict().items()}, cfg,
                                         torch.float32, exact=False).cuda(), windows)
    ref_val = o.windows_loss(hf.eval(), windows)
    print(f"\n## GPU {torch.cuda.get_device_name()}: {params / 1e6:.1f}M parameters, bf16 autocast, "
          f"{GPU_RUN['total_steps']} steps of {GPU_RUN['batch_size']} x {GPU_RUN['block_size']}; measured bf16 matmul "
          f"peak {peak / 1e12:.0f} TFLOP/s")
    print(f"{'':<28} {'tokens/s':>10} {'MFU':>7} {'validation':>11}")
    for name, seconds, val in (("unit7 train", mine, mine_val), ("Llama + fused AdamW", ref, ref_val)):
        print(f"{name:<28} {tokens / seconds:>10,.0f} {tokens / seconds * per_token / peak:>7.1%} {val:>11.4f}")
    print(f"unit7 / Llama: {ref / mine:.2f}x the tokens/s (graded: at least 0.35); best possible loss on these windows "
          f"{src.optimal_loss(windows):.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="solutions", help="folder holding unit7/ (solutions or exercises)")
    parser.add_argument("--rounds", type=int, default=15, help="timed steps per model on the CPU")
    parser.add_argument("--seed", type=int, default=1, help="seed of Part C's run")
    parser.add_argument("--no-replay", action="store_true", help="skip the Llama replay of Part C's run")
    args = parser.parse_args()
    u = load(args.root)
    print(f"# Unit 7 benchmark ({args.root}/unit7, torch {torch.__version__})\n")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread is fastest, and the same on every machine
    try:
        cpu_steps(u, args.rounds)
        learns(u, args.seed, not args.no_replay)
    except NotImplementedError as exc:
        raise SystemExit(f"{exc} (the benchmark runs every part of {args.root}/unit7: pytest {args.root}/unit7)") from None
    finally:
        torch.set_num_threads(threads)
    if torch.cuda.is_available():
        gpu(u)
    else:
        print("\n(no CUDA GPU: the GPU figures are skipped)")


if __name__ == "__main__":
    main()
