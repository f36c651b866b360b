"""Helpers the tests run on the learner's side, for work that cannot cross the boundary as data.

Everything here only computes; every check happens in the trusted process, against its own
oracles.  A learner who tampers with these helpers can only make their own results wrong.
"""

from __future__ import annotations

from typing import Any

import torch


class AutogradRecord:
    """A forward pass kept alive on the learner's side until its backward is asked for."""

    def __init__(self, output: torch.Tensor, inputs: list[torch.Tensor]):
        self.output, self.inputs = output, inputs


def _leaf(value: Any, wants_grad: bool) -> Any:
    if isinstance(value, torch.Tensor) and wants_grad and value.is_floating_point():
        return value.detach().clone().requires_grad_(True)
    return value


def autograd_forward(fn, args: list, grad_mask: list[bool]):
    """Run ``fn(*args)`` with gradients on the masked inputs.

    Returns (output, record, saved): ``saved`` lists the shapes of the tensors the learner's
    autograd.Function saved for backward, when the output's grad_fn exposes them.
    """
    inputs = [_leaf(a, m) for a, m in zip(args, grad_mask)]
    with torch.enable_grad():  # the caller may be inside a no-grad region (a trusted autograd.Function)
        output = fn(*inputs)
    saved = []
    grad_fn = getattr(output, "grad_fn", None)
    for tensor in getattr(grad_fn, "saved_tensors", ()) or ():
        saved.append(tuple(tensor.shape))
    return output.detach(), AutogradRecord(output, inputs), saved


def autograd_backward(record: AutogradRecord, grad_output: torch.Tensor):
    """Gradients of the recorded output (times grad_output) with respect to each input."""
    wanted = [t for t in record.inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    with torch.enable_grad():
        grads = torch.autograd.grad(record.output, wanted, grad_output.to(record.output.device),
                                    allow_unused=True, retain_graph=True)
    grads = iter(grads)
    return [next(grads) if isinstance(t, torch.Tensor) and t.requires_grad else None for t in record.inputs]


def cuda_peak_memory(fn, args: list, backward: bool = False):
    """Peak CUDA memory (bytes above the inputs) of one call, and its output."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    inputs = [_leaf(a, backward) for a in args]
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    output = fn(*inputs)
    if backward:
        output.backward(torch.ones_like(output))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return peak, output.detach()


def call_synchronized(fn, args: list, kwargs: dict | None = None):
    """Call and wait for the device, so the caller's wall clock covers all of the work."""
    output = fn(*args, **(kwargs or {}))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return output


class Stored:
    """A value kept on the learner's side (large GPU tensors stay on the device between calls)."""

    def __init__(self, value: Any):
        self.value = value


def _unwrap(value: Any) -> Any:
    return value.value if isinstance(value, Stored) else value


def random_stored(shape: list[int], dtype: torch.dtype, device: str, seed: int, scale: float = 1.0) -> Stored:
    """A normal tensor made from a seed the trusted side chose (it can rebuild the same values on CPU)."""
    gen = torch.Generator().manual_seed(seed)
    return Stored((torch.randn(*shape, generator=gen, dtype=torch.float32) * scale).to(dtype).to(device))


def call_stored(fn, args: list, kwargs: dict | None = None) -> Stored:
    """Call with stored arguments and wait for the device; the output stays here."""
    output = fn(*[_unwrap(a) for a in args], **{k: _unwrap(v) for k, v in (kwargs or {}).items()})
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return Stored(output)


def fetch(stored: Stored, index: Any = None) -> Any:
    """The stored value, or part of it, as plain data for the trusted side to check."""
    return stored.value if index is None else stored.value[index]


def largest_allocation(fn, args: list, backward: bool = False):
    """Bytes of the largest tensor storage any operator created during one call (and its backward
    with a gradient of ones, if asked), and the output.  A device-independent stand-in for peak
    memory: it shows whether an [n_q, n_k] score matrix was ever materialised, even on a CPU."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class LargestOutput(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.untyped_storage().nbytes())
            return out

    inputs = [_leaf(a, backward) for a in args]
    with LargestOutput() as mode:
        output = fn(*inputs)
        if backward:
            output.backward(torch.ones_like(output))
    return mode.largest, output.detach()


def sdpa_math_stored(q, k, v, is_causal: bool = False) -> Stored:
    """torch's scaled_dot_product_attention pinned to the MATH backend, on stored inputs, output
    kept here: the baseline that a learner's attention is timed against in the same run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        output = torch.nn.functional.scaled_dot_product_attention(_unwrap(q), _unwrap(k), _unwrap(v), is_causal=is_causal)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return Stored(output)
def data_ptrs(obj, names: list[str]) -> dict:
    """Storage addresses of tensor attributes of a learner object (is a buffer preallocated and
    reused, or reallocated?).  Read here, on the learner's side: a tensor sent back is a copy."""
    return {name: int(getattr(obj, name).data_ptr()) for name in names}
def parameter_summary(module) -> dict:
    """{parameter name: [numel, requires_grad]} of a module, each shared tensor once
    (``requires_grad`` does not survive the trip across as a tensor copy)."""
    return {name: [p.numel(), bool(p.requires_grad)] for name, p in module.named_parameters()}


def cuda_training_peak_memory(model, input_ids: torch.Tensor, steps: int = 2, lr: float = 1e-4):
    """Peak CUDA memory (bytes above what was allocated before) of ``steps`` AdamW steps on the
    model's trainable parameters: gradients, optimizer state and activations; and the last loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    optimizer = torch.optim.AdamW(params, lr=lr)
    loss = None
    for _ in range(steps):
        out = model(input_ids)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        loss = logits.float().logsumexp(-1).mean()  # any scalar that depends on every logit
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del optimizer
    return peak, float(loss)
def value_and_grad(fn, args: list, wrt: list[int], kwargs: dict | None = None, pick: int | None = None):
    """Call ``fn(*args, **kwargs)`` with gradients on the floating-point ``args[i]`` for i in
    ``wrt``; differentiate the sum of the output (or of ``output[pick]`` when fn returns a tuple).

    Returns (output with every tensor detached, [gradient or None for each index in wrt]).
    """
    inputs = [_leaf(a, i in wrt) for i, a in enumerate(args)]
    with torch.enable_grad():
        output = fn(*inputs, **(kwargs or {}))
        target = output[pick] if pick is not None else output
        wanted = [inputs[i] for i in wrt]
        grads = list(torch.autograd.grad(target.sum(), wanted, allow_unused=True)) if target.requires_grad else [None] * len(wanted)
    if isinstance(output, (tuple, list)):
        output = type(output)(o.detach() if isinstance(o, torch.Tensor) else o for o in output)
    elif isinstance(output, torch.Tensor):
        output = output.detach()
    return output, grads


def copy_bandwidth(repeats: int = 5) -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write), median of ``repeats`` after a warm-up:
    the device's practical ceiling for a decode step that only streams weights and cache."""
    import statistics
    import time

    src = torch.empty(2**28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * 2**28 * 4 / statistics.median(times)


def fill_normal(obj, names: list[str], seed: int, scale: float = 1.0) -> None:
    """Overwrite tensor attributes of a learner object in place with seeded noise: stale contents
    (a cache's unfilled slots) that a correct solution never reads."""
    gen = torch.Generator().manual_seed(seed)
    for name in names:
        tensor = getattr(obj, name)
        tensor.copy_(torch.randn(tensor.shape, generator=gen, dtype=torch.float32) * scale)


# Graph nodes through which a tensor's value becomes a Python number while tracing: shapes and slice
# bounds may then depend on data, which one captured CUDA graph cannot replay for another value.
_SCALAR_READS = ("item", "tolist", "_local_scalar_dense")


def compiled_decode(step, model, cache, tokens: torch.Tensor, start: int):
    """Run ``torch.compile(step, fullgraph=True)`` as ``step(model, tokens[:, i:i+1], cache, slot)``
    for every i, with slot = tensor([start + i]), through a backend that only records what dynamo
    traced.  Returns (logits [b, n, vocab], number of graphs compiled, the scalar reads found in them).
    A graph break raises (fullgraph=True): the step cannot be traced whole."""
    graphs, scalar_reads = [], []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        for node in graph_module.graph.nodes:
            name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
            if node.op in ("call_method", "call_function") and set(name.split(".")) & set(_SCALAR_READS):
                scalar_reads.append(f"{name}() in {node.format_node()}")
        return graph_module.forward

    torch._dynamo.reset()  # nothing compiled for an earlier test may be reused
    compiled = torch.compile(step, fullgraph=True, backend=recording_backend)
    outputs = []
    try:
        with torch.no_grad():
            for i in range(tokens.shape[1]):
                slot = torch.tensor([start + i], device=tokens.device)
                outputs.append(compiled(model, tokens[:, i:i + 1], cache, slot))
    finally:
        torch._dynamo.reset()
    return torch.cat(outputs, dim=1), len(graphs), scalar_reads


class GraphedDecodeStep:
    """One call of ``step(model, token, cache, slot)`` captured in a CUDA graph; each call of this
    object refills the static token and slot tensors and replays it.  The returned logits are the
    graph's own output tensor, overwritten by the next replay (clone to keep them)."""

    def __init__(self, step, model, cache, first_token: torch.Tensor, first_slot: int, warmup: int = 2):
        self.token = first_token.clone()
        self.slot = torch.tensor([first_slot], device=first_token.device)
        with torch.no_grad():
            # Warm-up on a side stream, as the CUDA graphs documentation asks: lazy initialisation
            # (cuBLAS handles and workspaces, allocator pools) must not happen during capture; the
            # capture then uses that same stream, whose handles the warm-up created.  The warm-up
            # writes the first token's keys and values at first_slot: what the first replay writes.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    step(model, self.token, cache, self.slot)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=side):
                self.logits = step(model, self.token, cache, self.slot)

    def __call__(self, token: torch.Tensor, slot: int) -> torch.Tensor:
        self.token.copy_(token)
        self.slot.fill_(slot)
        self.graph.replay()
        return self.logits


def cuda_graph_decode(step, model, cache, tokens: torch.Tensor, start: int):
    """Capture ``step`` once, then replay it for tokens[:, i] at slots start + i.  Returns the logits
    of every replay, [b, n, vocab]."""
    graphed = GraphedDecodeStep(step, model, cache, tokens[:, :1], start)
    outputs = [graphed(tokens[:, i:i + 1], start + i).clone() for i in range(tokens.shape[1])]
    torch.cuda.synchronize()
    return torch.cat(outputs, dim=1)


def drain(iterable, every: int = 1) -> tuple[int, int]:
    """Consume an iterable of ints here (its items never cross the boundary): (how many, a digest
    of them all in order) for the trusted side to compare with the digest of its own oracle's ids."""
    count, digest = 0, 0
    for item in iterable:
        digest = (digest * 1_000_003 + int(item) + 1) % (1 << 61)
        count += 1
    return count, digest


def helpers() -> dict:
    """The helpers a test may call, by name: taken once, before any learner code runs."""
    return {name: value for name, value in globals().items()
            if callable(value) and not isinstance(value, type) and not name.startswith("_")
            and name != "helpers" and getattr(value, "__module__", None) == __name__}
