"""Unit 6 figures: learning curves of PPO on the gridworld and the toy RLHF task, seconds per
PPO update, and per-token log-probs (one batched gather against a per-position loop).

    python -m benchmarks.unit6                       # the course's solution
    python -m benchmarks.unit6 --root exercises      # your code
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def median_seconds(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="solutions", help="folder holding unit6/ (solutions or exercises)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--updates", type=int, default=30, help="toy RLHF updates")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / args.root))
    from unit6 import envs, ppo, rlhf

    print(f"# Unit 6 benchmark ({args.root}/unit6, torch {torch.__version__}, {torch.get_num_threads()} threads)\n")
    print("## Gridworld 5x5, 16 envs x 32 steps per update (best return 0.86)")
    print("seed  return@1  return@5  return@10  greedy@10  seconds")
    for seed in range(args.seeds):
        start = time.perf_counter()
        h = envs.train_gridworld(seed, 10)
        print(f"{seed:4d}  {h[0]['return']:8.2f}  {h[4]['return']:8.2f}  {h[9]['return']:9.2f}  "
              f"{h[9]['greedy_return']:9.2f}  {time.perf_counter() - start:7.2f}")

    print(f"\n## Toy RLHF: course GPT (1 layer, 32 wide, vocab 16), 64 prompts x 8 tokens, beta 0.05, {args.updates} updates")
    print("seed  score@1  score@15  score@end  KL@15  KL@end  s/update (rollout)  total s")
    per_update = []
    for seed in range(args.seeds):
        h = rlhf.train_toy_rlhf(seed, args.updates)
        secs = [x["seconds"] for x in h]
        per_update.extend(secs)
        end = statistics.mean(x["score"] for x in h[-3:])
        kl_end = statistics.mean(x["kl"] for x in h[-3:])
        print(f"{seed:4d}  {h[0]['score']:7.2f}  {h[14]['score']:8.2f}  {end:9.2f}  {h[14]['kl']:5.2f}  {kl_end:6.2f}  "
              f"{statistics.median(secs):8.3f} ({statistics.median(x['rollout_seconds'] for x in h):.3f})  {sum(secs):7.2f}")
    print(f"median seconds per PPO update (rollout + 4 epochs x 2 minibatches): {statistics.median(per_update):.3f}")

    print("\n## Per-token log-probs, CPU (1 thread), bf16 logits [8, 128, 1024]")
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(8, 128, 1024, generator=g) * 20).to(torch.bfloat16)
    labels = torch.randint(0, 1024, (8, 128), generator=g)
    with envs.one_thread():
        batched = median_seconds(lambda: ppo.logprobs_from_logits(logits, labels))
        loop = median_seconds(lambda: rlhf.logprobs_per_token_loop(logits, labels), repeats=3)
    want = torch.log_softmax(logits.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    err = (ppo.logprobs_from_logits(logits, labels).double() - want).abs().max().item()
    print(f"batched {batched * 1e3:.2f} ms, per-position loop {loop * 1e3:.1f} ms: {loop / batched:.1f}x; "
          f"max error vs float64 {err:.2e}")


if __name__ == "__main__":
    main()
