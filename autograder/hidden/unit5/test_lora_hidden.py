"""Hidden tests, Part A: LoRALinear on nn.Linear and GPT-2's Conv1D (scaling, initialisation,
forward, dropout on the LoRA branch only), and merge()/unmerge() in float64, float32 and bf16."""

import math

import pytest
import torch

from autograder.checks import assert_close, check

KINDS = ["linear", "conv1d"]


def _base(learner, kind, d_in, d_out, gen, dtype=torch.float32):
    """A base layer built on the learner's side with weights chosen here; (layer, W, b) in ``dtype``."""
    if kind == "linear":
        layer = learner.lib("torch.nn").Linear(d_in, d_out)
        w = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) / math.sqrt(d_in)
    else:
        layer = learner.lib("transformers.pytorch_utils").Conv1D(d_out, d_in)  # weight [d_in, d_out]
        w = torch.randn(d_in, d_out, generator=gen, dtype=torch.float64) / math.sqrt(d_in)
    b = torch.randn(d_out, generator=gen, dtype=torch.float64) * 0.1
    w, b = w.to(dtype), b.to(dtype)
    layer = layer.to(dtype)
    layer.load_state_dict({"weight": w, "bias": b})
    return layer, w, b


def _apply_base(kind, x, w, b):
    return (x @ w.T if kind == "linear" else x @ w) + b


def _set_adapter(layer, a, b):
    result = layer.load_state_dict({"lora_A": a, "lora_B": b}, strict=False)
    check(not list(result.unexpected_keys),
          "LoRALinear must hold its adapters as parameters named lora_A [r, d_in] and lora_B [d_out, r]")


def _dims(rng):
    d_in, d_out = int(rng.integers(5, 40)), int(rng.integers(5, 40))
    if d_in == d_out:
        d_out += 3  # non-square, so a missing transpose cannot hide
    return d_in, d_out, int(rng.integers(1, 9))


@pytest.mark.group("lora_layer")
def test_scaling(learner, rng):
    lora = learner.module("lora")
    for _ in range(4):
        r, alpha = int(rng.integers(1, 65)), float(rng.integers(1, 64))
        got, got_rs = lora.lora_scaling(r, alpha, False), lora.lora_scaling(r, alpha, True)
        check(isinstance(got, float) and math.isclose(got, alpha / r, rel_tol=1e-12),
              f"lora_scaling(r={r}, alpha={alpha:g}) returned {got!r}; LoRA scales by alpha / r = {alpha / r:g}")
        check(isinstance(got_rs, float) and math.isclose(got_rs, alpha / math.sqrt(r), rel_tol=1e-12),
              f"lora_scaling(r={r}, alpha={alpha:g}, use_rslora=True) returned {got_rs!r}; rsLoRA scales by "
              f"alpha / sqrt(r) = {alpha / math.sqrt(r):g}")


@pytest.mark.group("lora_layer")
@pytest.mark.parametrize("kind", KINDS)
def test_initialisation(learner, rng, torch_gen, kind):
    lora = learner.module("lora")
    learner.lib("torch").manual_seed(int(rng.integers(1 << 30)))
    d_in, d_out = int(rng.integers(96, 160)), int(rng.integers(20, 60))
    r = 16
    base, w, b = _base(learner, kind, d_in, d_out, torch_gen)
    layer = lora.LoRALinear(base, r, 32.0)
    A, B = layer.lora_A, layer.lora_B
    check(tuple(A.shape) == (r, d_in) and tuple(B.shape) == (d_out, r),
          f"LoRALinear({kind} {d_in}->{d_out}, r={r}): lora_A should be [r, d_in] = [{r}, {d_in}] and lora_B "
          f"[d_out, r] = [{d_out}, {r}]; got {list(A.shape)} and {list(B.shape)}")
    check(bool((B == 0).all()), "lora_B must start at zero: then B @ A = 0 and the adapted model is exactly the base model")
    bound = 1 / math.sqrt(d_in)
    check(bool((A.abs() <= bound + 1e-7).all()), f"lora_A has values beyond 1/sqrt(d_in) = {bound:.4f}: "
                                                 "kaiming_uniform_(a=sqrt(5)) draws from U(-1/sqrt(d_in), 1/sqrt(d_in))")
    # The bound is reached: of n >= 1536 uniform draws on [-bound, bound], all stay below 0.98 bound with
    # probability 0.98**1536 = 3e-14; kaiming_uniform_ with another a (sqrt(6): bound 0.926/sqrt(d_in))
    # or another fan stops short of it.
    top = float(A.abs().max())
    check(top >= 0.98 * bound,
          f"lora_A's largest |value| is {top:.5f}, short of 1/sqrt(d_in) = {bound:.5f} (d_in={d_in}, {A.numel()} draws): "
          "kaiming_uniform_(lora_A, a=math.sqrt(5)) draws from U(-1/sqrt(d_in), 1/sqrt(d_in)); check a and the fan")
    # A uniform on [-bound, bound] has std bound/sqrt(3); the sample std of n >= 1536 draws has a
    # relative std of sqrt(0.2 / n) <= 1.2%, so 5% is > 4 of those.
    std = float(A.std())
    check(abs(std - bound / math.sqrt(3)) < 0.05 * bound / math.sqrt(3),
          f"lora_A's std is {std:.4f}; kaiming_uniform_(a=sqrt(5)) over d_in={d_in} inputs gives {bound / math.sqrt(3):.4f}")
    x = torch.randn(3, d_in, generator=torch_gen)
    assert_close(layer(x), _apply_base(kind, x, w, b), rtol=1e-5, atol=1e-5,
                 call=f"LoRALinear({kind} {d_in}->{d_out}, r={r})(x[3,{d_in}]) right after construction",
                 hint="at initialisation the LoRA layer must equal its base layer (B = 0)")


@pytest.mark.group("lora_layer")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rslora", [False, True])
def test_forward(learner, rng, torch_gen, kind, rslora):
    lora = learner.module("lora")
    d_in, d_out, r = _dims(rng)
    alpha = float(rng.integers(1, 32))
    base, w, b = _base(learner, kind, d_in, d_out, torch_gen, torch.float64)
    layer = lora.LoRALinear(base, r, alpha, 0.0, rslora)
    A = torch.randn(r, d_in, generator=torch_gen, dtype=torch.float64)
    B = torch.randn(d_out, r, generator=torch_gen, dtype=torch.float64)
    _set_adapter(layer, A, B)
    x = torch.randn(2, 3, d_in, generator=torch_gen, dtype=torch.float64)
    scaling = alpha / math.sqrt(r) if rslora else alpha / r
    base_out, update = _apply_base(kind, x, w, b), x @ A.T @ B.T
    assert_close(layer(x), base_out + update * scaling, rtol=1e-10, atol=1e-10,
                 call=f"LoRALinear({kind} {d_in}->{d_out}, r={r}, alpha={alpha:g}, use_rslora={rslora})(x[2,3,{d_in}] float64)",
                 mistakes={"scale the update by alpha / r (alpha / sqrt(r) with rsLoRA), not by alpha": base_out + update * alpha,
                           "the update is multiplied by the scaling": base_out + update,
                           "with rsLoRA the scaling is alpha / sqrt(r)": base_out + update * alpha / r,
                           "without rsLoRA the scaling is alpha / r": base_out + update * alpha / math.sqrt(r)})


@pytest.mark.group("lora_layer")
@pytest.mark.parametrize("kind", KINDS)
def test_dropout_only_on_the_lora_branch(learner, rng, torch_gen, kind):
    lora = learner.module("lora")
    learner.lib("torch").manual_seed(int(rng.integers(1 << 30)))
    d_in, d_out, r = _dims(rng)
    base, w, b = _base(learner, kind, d_in, d_out, torch_gen)
    layer = lora.LoRALinear(base, r, float(r), 0.5)
    layer.train()
    x = torch.randn(8, d_in, generator=torch_gen)
    # B is still zero: whatever dropout does to the LoRA branch, the output is the base layer's.
    assert_close(layer(x), _apply_base(kind, x, w, b), rtol=1e-5, atol=1e-5,
                 call=f"LoRALinear({kind}, dropout=0.5) in train mode, B = 0",
                 hint="dropout applies to the LoRA branch's input only: base(x) + B(A(dropout(x))) * scaling")
    A = torch.randn(r, d_in, generator=torch_gen)
    B = torch.randn(d_out, r, generator=torch_gen)
    _set_adapter(layer, A, B)
    train_out = layer(x)
    layer.eval()
    want = _apply_base(kind, x, w, b) + x @ A.T @ B.T
    # float32 matmuls over at most 40 numbers: ~1e-6 relative.
    assert_close(layer(x), want, rtol=1e-4, atol=1e-4, call=f"LoRALinear({kind}, dropout=0.5) in eval mode",
                 hint="in eval mode dropout does nothing")
    check(not torch.allclose(train_out, want, rtol=1e-4, atol=1e-4),
          "in train mode with dropout=0.5 the LoRA branch gave exactly the eval-mode output: is dropout applied to it?")


def _merge_case(learner, rng, torch_gen, kind, dtype, scalings=None):
    lora = learner.module("lora")
    d_in, d_out, r = _dims(rng)
    alpha = float(rng.integers(1, 32)) if scalings is None else r * float(rng.choice(scalings))
    base, w, b = _base(learner, kind, d_in, d_out, torch_gen, dtype)
    layer = lora.LoRALinear(base, r, alpha)
    A = (torch.randn(r, d_in, generator=torch_gen, dtype=torch.float64) / math.sqrt(d_in)).to(dtype)
    B = (torch.randn(d_out, r, generator=torch_gen, dtype=torch.float64) / math.sqrt(r)).to(dtype)
    _set_adapter(layer, A, B)
    delta = (B.double() @ A.double()) * (alpha / r)
    bound = float((B.double().abs() @ A.double().abs()).max()) * alpha / r
    label = f"{kind} {d_in}->{d_out}, r={r}, alpha={alpha:g}"
    return layer, w, b, delta if kind == "linear" else delta.T, label, alpha / r, (bound, r)


def _merge_tolerance(bound, r, dtype, x=None):
    """Rounding bounds for merge/unmerge in `dtype` (unit roundoff u): B @ A sums r products, off by
    at most r·u·bound with bound = max (|B| @ |A|)·scaling, then W ± delta rounds once more
    (u|W ± delta|).  Doubled for slack; a wrong merge is off by a whole |delta|.  With x, the
    weight error is carried through x @ W.T (at most sum|x| times it)."""
    u = torch.finfo(dtype).eps / 2
    atol = 2 * (r + 2) * u * bound
    if x is not None:
        atol *= float(x.double().abs().sum(-1).max())
    return dict(rtol=4 * u, atol=atol)


@pytest.mark.group("merge")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_merge_and_unmerge(learner, rng, torch_gen, kind, dtype):
    layer, w, b, delta, label, scaling, (bound, r) = _merge_case(learner, rng, torch_gen, kind, dtype)
    name = str(dtype).replace("torch.", "")
    x = torch.randn(5, w.shape[1] if kind == "linear" else w.shape[0], generator=torch_gen, dtype=torch.float64).to(dtype)
    tol = _merge_tolerance(bound, r, dtype)
    # Outputs: the weight's rounding carried through x @ W.T, plus the matmul's own (d_in terms).
    out_tol = _merge_tolerance(bound + float(w.double().abs().max()) * x.shape[-1], r, dtype, x)
    unmerged = layer(x)
    check(layer.merged is False, "a new LoRALinear has merged = False")
    try:
        layer.merge()
    except RuntimeError as exc:
        if getattr(exc, "is_todo", False):  # a TODO not written yet says so itself
            raise
        check(False, f"merge() of LoRALinear({label}, {name}) raised {getattr(exc, 'type_name', type(exc).__name__)}: {exc}"
              + ("\nHint: Conv1D stores its weight as [d_in, d_out]: transpose B @ A before adding it" if kind == "conv1d" else
                 "\nHint: the update (B @ A) * scaling must have base.weight's shape [d_out, d_in]"))
    check(layer.merged is True, "merge() sets self.merged = True")
    mistakes = {"merge adds (B @ A) * scaling: multiply by the scaling": w.double() + delta / scaling}
    if kind == "conv1d" and delta.shape[0] == delta.shape[1]:
        mistakes["Conv1D stores its weight as [d_in, d_out]: transpose B @ A before adding it"] = w.double() + delta.T
    assert_close(layer.base.weight, w.double() + delta, call=f"base.weight after merge() ({label}, {name})",
                 mistakes=mistakes, hint="W += (B @ A) * scaling, laid out like W" if kind == "linear" else
                 "W += ((B @ A) * scaling).T for Conv1D, whose weight is [d_in, d_out]", **tol)
    # The merged layer must compute the same function; in float32 the two roundings differ by ~1e-6.
    assert_close(layer(x), unmerged, call=f"output of the merged layer ({label}, {name})",
                 hint="once merged, forward must not add the LoRA branch a second time", **out_tol)
    layer.merge()
    assert_close(layer.base.weight, w.double() + delta, call=f"base.weight after merging twice ({label}, {name})",
                 hint="a second merge() does nothing (check self.merged)", **tol)
    layer.unmerge()
    check(layer.merged is False, "unmerge() sets self.merged = False")
    assert_close(layer.base.weight, w, call=f"base.weight after merge() then unmerge() ({label}, {name})",
                 hint="unmerge is the inverse of merge: W -= (B @ A) * scaling, in the same layout", **tol)
    assert_close(layer(x), unmerged, call=f"output after merge() then unmerge() ({label}, {name})", **out_tol)
    layer.unmerge()
    assert_close(layer.base.weight, w, call=f"base.weight after a second unmerge() ({label}, {name})",
                 hint="unmerge() of an unmerged layer does nothing (check self.merged)", **tol)


@pytest.mark.group("merge")
@pytest.mark.parametrize("kind", KINDS)
def test_merge_in_bfloat16(learner, rng, torch_gen, kind):
    layer, w, b, delta, label, _, _ = _merge_case(learner, rng, torch_gen, kind, torch.bfloat16)
    layer.merge()
    merged = layer.base.weight
    check(merged.dtype == torch.bfloat16, f"merge() turned a bfloat16 weight into {merged.dtype}; keep the base weight's dtype")
    # bf16 keeps 8 significant bits, so each rounding costs at most u = 2**-8 of the value rounded.
    # merge rounds delta (u|delta|) and then W + delta (u|W + delta|); unmerge subtracts the same
    # rounded delta and rounds once more, leaving |W' - W| <= 2u|W| + u|delta| to first order.
    # atol 2**-7 * max|delta| is twice the delta term's bound at its largest entry, rtol 2**-6 twice
    # the |W| term's; a wrong merge or unmerge is off by a whole |delta|.
    delta_scale = float(delta.abs().max())
    tol = dict(rtol=2 ** -6, atol=2 ** -7 * delta_scale)
    assert_close(merged, w.double() + delta, **tol, call=f"bf16 base.weight after merge() ({label})",
                 hint="compute B @ A in float32, then add it to W and round once")
    layer.unmerge()
    assert_close(layer.base.weight, w, **tol,
                 call=f"bf16 base.weight after merge() then unmerge() ({label})")


@pytest.mark.group("merge")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_delta_weight(learner, rng, torch_gen, kind, dtype):
    """delta_weight() itself: (B @ A) * scaling, laid out like base.weight, in its dtype, computed in
    float32.  In bfloat16 (on the CPU: CPU torch does bf16 matmuls) the result must be the exact
    product rounded once: B @ A rounded to bf16 and then scaled (or scaled in bf16) rounds twice."""
    layer, w, _, delta, label, scaling, (bound, r) = _merge_case(learner, rng, torch_gen, kind, dtype, scalings=(0.75, 1.25, 1.5, 3.0))
    name = str(dtype).replace("torch.", "")
    got = layer.delta_weight()
    # float32: r products summed (r * u32 * bound) and one rounding of the result.  bfloat16: the
    # exact value rounded once to 8 significant bits (at most 2**-8 of it: rtol), plus the float32
    # part (atol, 2**-24 per product, doubled); scalings like 1.5 make a second rounding show: in
    # ~10% of the entries the error then exceeds 2**-8 of the value.
    u32 = 2.0 ** -24
    tol = dict(rtol=2.0 ** -8 if dtype == torch.bfloat16 else 4 * u32, atol=2 * (r + 2) * u32 * bound)
    a, b = layer.lora_A, layer.lora_B
    mistakes = {"the update is (B @ A) * scaling": delta / scaling}
    if dtype == torch.bfloat16:
        once = (b.float() @ a.float()).to(dtype)
        mistakes["compute B @ A and the scaling in float32 (or wider), and cast to the weight's dtype once at the end"] = (
            (once * scaling).double().T if kind == "conv1d" else (once * scaling).double())
    layout = "[d_out, d_in] like nn.Linear's weight" if kind == "linear" else "[d_in, d_out] like Conv1D's weight: transpose B @ A"
    assert_close(got, delta, dtype=dtype, call=f"delta_weight() ({label}, {name} weights)", mistakes=mistakes,
                 hint=f"delta_weight() is (B @ A) * scaling computed in float32, laid out {layout}, cast to base.weight's dtype",
                 **tol)


@pytest.mark.group("merge")
@pytest.mark.parametrize("kind", KINDS)
def test_merge_changes_the_base_weight_in_place(learner, rng, torch_gen, kind):
    """merge() and unmerge() work on base.weight itself: a reference to that tensor taken (on your
    side) before merge() sees the merged values, and the adapters stay what they were."""
    layer, w, _, delta, label, _, (bound, r) = _merge_case(learner, rng, torch_gen, kind, torch.float64)
    a, b = layer.lora_A, layer.lora_B
    kept = learner.harness("call_stored", learner.lib("builtins").getattr, [layer.base, "weight"])
    tol = _merge_tolerance(bound, r, torch.float64)
    layer.merge()
    assert_close(learner.harness("fetch", kept), w.double() + delta, **tol,
                 call=f"the base layer's weight tensor (a reference kept from before merge()) after merge() ({label})",
                 hint="merge() changes base.weight in place (self.base.weight.add_(...) under torch.no_grad()); "
                      "assigning a new tensor or Parameter leaves everything that holds the old one (an optimizer, a tied "
                      "weight) unmerged")
    layer.unmerge()
    assert_close(learner.harness("fetch", kept), w, **tol,
                 call=f"the base layer's weight tensor (a reference kept from before merge()) after unmerge() ({label})",
                 hint="unmerge() changes base.weight in place too (self.base.weight.sub_(...))")
    for attr, want in (("lora_A", a), ("lora_B", b)):
        assert_close(getattr(layer, attr), want, rtol=0, atol=0, call=f"{attr} after merge() and unmerge() ({label})",
                     hint="merge and unmerge change base.weight only: compute the update into a new tensor, never into "
                          "lora_A or lora_B")


@pytest.mark.group("lora_layer")
@pytest.mark.parametrize("kind", KINDS)
def test_dropout_masks_the_lora_input(learner, rng, torch_gen, kind):
    """In train mode the LoRA branch sees dropout(x): with A = I (r = d_in) and a random B of full
    column rank, the branch's output B @ dropout(x) * scaling is solved for dropout(x) here, and each
    entry must be 0 or x / (1 - p), with about a fraction p of them 0; the x sent stays unchanged."""
    lora = learner.module("lora")
    ltorch = learner.lib("torch")
    ltorch.manual_seed(int(rng.integers(1 << 30)))
    d_in = int(rng.integers(6, 14))
    d_out, r, p, n = d_in + int(rng.integers(3, 12)), d_in, 0.25, 64
    base, w, b = _base(learner, kind, d_in, d_out, torch_gen, torch.float64)
    layer = lora.LoRALinear(base, r, float(r), p)  # scaling 1
    B = torch.randn(d_out, r, generator=torch_gen, dtype=torch.float64)
    _set_adapter(layer, torch.eye(r, dtype=torch.float64), B)
    layer.train()
    x = torch.randn(n, d_in, generator=torch_gen, dtype=torch.float64)
    stored_x = learner.harness("call_stored", ltorch.clone, [x])
    out = learner.harness("fetch", learner.harness("call_stored", layer, [stored_x]))
    call = f"LoRALinear({kind} {d_in}->{d_out}, r={r}, alpha={r}, dropout={p}) in train mode on x[{n},{d_in}] float64"
    assert_close(learner.harness("fetch", stored_x), x, rtol=0, atol=0, call=f"the input x after {call}",
                 hint="forward must not change its input: no in-place dropout on x (nn.Dropout(p) without inplace=True)")
    check(isinstance(out, torch.Tensor) and tuple(out.shape) == (n, d_out), f"{call} returned {_describe(out)}; expected [{n}, {d_out}]")
    branch = out - _apply_base(kind, x, w, b)
    seen = torch.linalg.lstsq(B, branch.T).solution.T  # what the branch was applied to: dropout(x), if it is
    residual = float((B @ seen.T - branch.T).abs().max())
    input_only = "\nHint: dropout applies to the LoRA branch's input only: base(x) + B(A(dropout(x))) * scaling"
    check(residual < 1e-6 * (1 + float(branch.abs().max())),
          f"{call}: the LoRA branch (output - base(x)) is not B @ (A @ something) * scaling: it is off B's columns by "
          f"{residual:.3g}" + input_only)
    clear = x.abs() > 0.1  # entries where 0 and a kept (scaled) x are far apart
    ratio = seen[clear] / x[clear]
    dropped = ratio.abs() < 1e-6
    kept = ratio[~dropped]
    scale = float(kept.median()) if kept.numel() else float("nan")
    odd = ~dropped & ((ratio - scale).abs() > 1e-6)
    if bool(odd.any()):
        i = int(torch.nonzero(odd)[0])
        xs, ss = x[clear][i], seen[clear][i]
        check(False, f"{call}: the LoRA branch saw {float(ss):.4f} where x = {float(xs):.4f}: not 0, nor x times the "
                     f"factor {scale:.4f} of the other kept entries; dropout zeroes entries of x and scales the rest "
                     "by 1 / (1 - p)" + input_only)
    fraction = float(dropped.double().mean())
    check(abs(scale - 1 / (1 - p)) < 1e-6,
          f"{call}: the LoRA branch saw x with {fraction:.0%} of its entries zeroed and the rest times {scale:.4f}; "
          f"nn.Dropout(p={p}) zeroes each entry with probability p and scales the rest by 1 / (1 - p) = {1 / (1 - p):.4f}")
    # >= 300 clear entries: the dropped fraction's std is <= 0.025; 0.12 is ~5 std either side.
    check(abs(fraction - p) < 0.12,
          f"{call}: the LoRA branch saw {fraction:.0%} of the entries of x zeroed; dropout={p} zeroes about {p:.0%} "
          "(nn.Dropout(p) zeroes each entry with probability p and scales the rest by 1 / (1 - p))")


def _describe(value):
    return f"a tensor {list(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
