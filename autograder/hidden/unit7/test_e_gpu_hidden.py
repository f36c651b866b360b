"""Hidden tests, Unit 7 Part E (on a CUDA GPU): the model at about 12M parameters, trained by your
``train`` for a fixed number of steps in bf16 autocast, against a reference timed in the same run:
Hugging Face's LlamaForCausalLM with the same initial weights, fused torch.optim.AdamW and
F.cross_entropy, on the same batches.  Graded: tokens per second at least 0.35 of the reference's, a
validation loss within 0.05 nats of the reference's, and the peak memory of a forward and backward
pass at most 2.5 times the reference's.  Model FLOPs utilisation against the measured bf16 matmul
peak of this GPU is reported.  The wall times are taken here around each whole run (a synchronised
call); the learner's peak memory is read in the worker (in-process, by the course's harness)."""

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from autograder.checks import check
from autograder.hidden.unit7._common import oracles, source
from autograder.testing import bf16_matmul_flops

MODEL = dict(vocab_size=42, d_model=384, n_layer=7, n_head=6, d_mlp=1024, max_seq_len=256)  # ~12.4M parameters
RUN = dict(batch_size=32, block_size=256, accum_steps=1, total_steps=60, warmup_steps=10, max_lr=1e-3, min_lr=1e-4,
           weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, max_grad_norm=1.0, seed=0)




def reference_train_cuda(hf, data: np.ndarray, tc: dict) -> list[float]:
    o = oracles()
    optimizer = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]}
                                   for g in o.reference_optimizer(hf, tc).param_groups],
                                  lr=tc["max_lr"], betas=tuple(tc["betas"]), eps=tc["eps"], fused=True)
    generator = torch.Generator().manual_seed(tc["seed"])
    lrs = o.schedule(tc, tc["total_steps"])
    losses = []
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
        losses.append(loss.detach())
    torch.cuda.synchronize()
    return [float(x) for x in losses]


@pytest.mark.gpu
@pytest.mark.group("gpu")
def test_gpu_bf16_training_against_a_reference(learner, seed, record_property):
    o, src = oracles(), source()
    cfg = o.gpt_config(**MODEL)
    data = src.sample_ids(400_000, seed % 1_000_003).astype(np.uint16)
    train, model = learner.module("train"), learner.module("model")
    loaded = learner.harness("call_stored", train.load_tokens, [learner.put_file(data.astype("<u2").tobytes(), ".bin")])
    learner.lib("torch").manual_seed(seed % 2**31)
    gpt = model.GPT(model.GPTConfig(**cfg))
    start_state = gpt.state_dict()
    gpt.to("cuda")
    tc = dict(RUN, seed=seed % 1000)
    run_cfg = train.TrainConfig(**tc, device="cuda", autocast_dtype=torch.bfloat16)
    tokens = tc["total_steps"] * tc["batch_size"] * tc["block_size"]

    hf = o.to_llama(start_state, cfg, torch.float32, exact=False).cuda().train()
    ref_start = time.perf_counter()
    reference_train_cuda(hf, data, tc)
    ref_seconds = time.perf_counter() - ref_start
    with learner.time_limit(300):
        mine_start = time.perf_counter()
        out = learner.harness("call_synchronized", train.train, [gpt, loaded, run_cfg])
        mine_seconds = time.perf_counter() - mine_start
    check(isinstance(out, list) and len(out) == tc["total_steps"], f"train on cuda returned {out!r:.100}")

    params = sum(p.numel() for p in hf.parameters())
    flops_per_token = 6 * params + 12 * MODEL["n_layer"] * MODEL["d_model"] * tc["block_size"]
    peak = bf16_matmul_flops()
    mine_tps, ref_tps = tokens / mine_seconds, tokens / ref_seconds
    windows = src.random_windows(src.sample_ids(60_000, (seed + 7) % 1_000_003), 256, tc["block_size"] + 1, seed % 997)
    mine_hf = o.to_llama({k: v.float().cpu() for k, v in gpt.state_dict().items()}, cfg, torch.float32, exact=False).cuda()
    ref_val = o.windows_loss(hf.eval(), windows)
    mine_val = o.windows_loss(mine_hf, windows)

    ids = torch.randint(0, MODEL["vocab_size"], (16, tc["block_size"]), generator=torch.Generator().manual_seed(seed))
    mine_peak, _ = learner.harness("cuda_peak_memory", gpt, [ids.cuda()], True)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    hf.zero_grad(set_to_none=True)
    hf(input_ids=ids.cuda(), use_cache=False).logits.sum().backward()
    torch.cuda.synchronize()
    ref_peak = torch.cuda.max_memory_allocated() - base

    record_property("figures", f"{params / 1e6:.1f}M parameters: yours {mine_tps:,.0f} tokens/s (MFU {mine_tps * flops_per_token / peak:.1%}), "
                               f"reference {ref_tps:,.0f} tokens/s (MFU {ref_tps * flops_per_token / peak:.1%}) against a "
                               f"measured bf16 peak of {peak / 1e12:.0f} TFLOP/s; validation {mine_val:.4f} vs {ref_val:.4f}; "
                               f"forward+backward peak {mine_peak / 2**20:.0f} MiB vs {ref_peak / 2**20:.0f} MiB")
    check(mine_tps >= 0.35 * ref_tps,
          f"train on the GPU (bf16 autocast, {params / 1e6:.1f}M parameters, {tc['total_steps']} steps of "
          f"{tc['batch_size']}x{tc['block_size']} tokens): {mine_tps:,.0f} tokens/s, {mine_tps / ref_tps:.2f} of the reference's "
          f"{ref_tps:,.0f}; expected at least 0.35.\nHint: no .item() or float() per parameter in the optimizer or the "
          "clipping (each one waits for the GPU); scaled_dot_product_attention with is_causal=True uses the fused kernels")
    check(mine_val <= ref_val + 0.05, f"after training on the GPU your model's validation loss is {mine_val:.4f}; the "
                                     f"reference reaches {ref_val:.4f} with the same data and steps; expected within 0.05")
    check(mine_peak <= 2.5 * ref_peak, f"a forward and backward pass of your model (16x256 tokens, float32 weights) peaks "
                                       f"at {mine_peak / 2**20:.0f} MiB (measured in your process); the reference at "
                                       f"{ref_peak / 2**20:.0f} MiB; expected at most 2.5x")
