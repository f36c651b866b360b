"""Hidden tests, Part D: a merged model runs at the base model's cost.  The base model is built and
timed here, on the trusted side (CPU seconds on one torch thread); the learner's merged model is
timed by the CPU time of the learner's process, read from outside it (its cgroup).  Load elsewhere
on the machine changes neither figure in the learner's favour, and processes the learner's code
starts count against it."""

import pytest
import torch

from autograder.checks import assert_close, check
from autograder.testing import baseline_cpu_seconds

WIDTH, DEPTH, TOKENS, CALLS = 768, 6, 16, 30
# CPU seconds of one call of the learner's merged stack over one call of the same stack built and
# run here (the fastest of CALLS interleaved calls each).  Measured in 21 gradings on a 2-core
# machine (load average 1.5-7 from other gradings; 12 of them with 2 more CPU burners beside the
# grader): the reference solution (a merged LoRALinear is just its base layer) 1.13-1.39x (above
# 1 because the worker's side also decodes the request and encodes the reply); the "recompute
# W + B A at every call" mistake (tests/mutants/unit5.yml) 2.84-4.01x (3.27x or more in 19 of 21).
# 2.0 sits 1.44x above the worst solution figure and 1.42x below the mistake's best.
MAX_RATIO = 2.0


def _state(gen):
    state = {}
    for i in range(DEPTH):
        state[f"{2 * i}.weight"] = torch.randn(WIDTH, WIDTH, generator=gen) / WIDTH**0.5
        state[f"{2 * i}.bias"] = torch.randn(WIDTH, generator=gen) * 0.1
    return state


def _layers(nn):
    layers = []
    for _ in range(DEPTH):
        layers += [nn.Linear(WIDTH, WIDTH), nn.Tanh()]
    return nn.Sequential(*layers)


def _reference(state, x, adapters=None, scaling=1.0):
    for i in range(DEPTH):
        w = state[f"{2 * i}.weight"]
        if adapters:
            w = w + adapters[f"{2 * i}.lora_B"] @ adapters[f"{2 * i}.lora_A"] * scaling
        x = torch.tanh(x @ w.T + state[f"{2 * i}.bias"])
    return x


@pytest.mark.group("performance")
def test_merged_inference_at_base_speed(learner, torch_gen, record_property):
    """The learner's merged DEPTH x Linear(WIDTH, WIDTH) stack against the same base stack built
    here with the merged weights: a merged layer must cost what its base layer costs."""
    lora = learner.module("lora")
    state = _state(torch_gen)
    adapters = {}
    for i in range(DEPTH):
        adapters[f"{2 * i}.lora_A"] = torch.randn(8, WIDTH, generator=torch_gen) / WIDTH**0.5
        adapters[f"{2 * i}.lora_B"] = torch.randn(WIDTH, 8, generator=torch_gen) * 0.05
    # The learner's side: a plain stack to adapt (built there only so that inject_lora can wrap it).
    adapted = _layers(learner.lib("torch.nn"))
    adapted.load_state_dict(state)
    adapted.eval()
    lora.inject_lora(adapted, [str(2 * i) for i in range(DEPTH)], 8, 8.0)
    adapted.load_state_dict(adapters, strict=False)
    lora.merge_lora(adapted)
    # The baseline, here: the same stack with the merged weights W + B A (scaling 8 / 8 = 1).
    base = _layers(torch.nn)
    base.load_state_dict({k: v + adapters[k.replace("weight", "lora_B")] @ adapters[k.replace("weight", "lora_A")]
                          if k.endswith("weight") else v for k, v in state.items()})
    base.eval()
    ltorch = learner.lib("torch")
    ltorch.set_num_threads(1)  # as the baseline here: one torch thread
    ltorch.set_grad_enabled(False)  # inference; called as a function it switches grad mode off until switched back
    try:
        x = torch.randn(TOKENS, WIDTH, generator=torch_gen)
        # float32 through 6 layers of 768-wide matmuls: ~1e-5 relative.
        assert_close(adapted(x), _reference(state, x, adapters), rtol=1e-3, atol=1e-4,
                     call=f"the merged {DEPTH}-layer stack on x[{TOKENS},{WIDTH}]")
        ours, theirs, source = [], [], ""
        with torch.no_grad():
            for k in range(CALLS + 2):  # interleaved, so both see the same machine state; fresh inputs per call
                x = torch.randn(TOKENS, WIDTH, generator=torch_gen)
                _, cost = learner.measure(adapted, x)
                _, cpu = baseline_cpu_seconds(lambda: base(x))
                if k >= 2:  # the first calls warm caches and allocators up
                    ours.append(cost.cpu_seconds)
                    theirs.append(cpu)
                    source = cost.source
    finally:
        ltorch.set_grad_enabled(True)
    # The fastest of the calls: other load on a shared CPU only ever adds time (caches, frequency).
    mine, base_cpu = min(ours), min(theirs)
    ratio = mine / max(base_cpu, 1e-9)
    figures = (f"merged: {mine * 1e3:.2f} ms CPU per call (your process, measured from outside it: {source}); "
               f"the base model here: {base_cpu * 1e3:.2f} ms CPU; {ratio:.2f}x")
    record_property("figures", figures)
    check(ratio <= MAX_RATIO,
          f"{figures}: a merged LoRALinear is just its base layer (stay within {MAX_RATIO}x of the base model): "
          "do not add B @ A (or W + B A) at every call")
