"""Small Hugging Face models built on both sides of the boundary with the same weights, and
peft, the oracle, on the trusted side."""

import warnings

import torch

from autograder.checks import check

GPT2_TARGETS = ("c_attn", "c_proj", "c_fc")


def gpt2_config(tf, n_embd=32, n_layer=2, vocab=97, n_positions=32):
    return tf.GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=4, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)


def llama_config(tf, vocab=64):
    return tf.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          bos_token_id=0, eos_token_id=0, pad_token_id=0)


def build_pair(learner, arch: str, seed: int):
    """(trusted model, learner model proxy, vocab size): the same random weights on both sides."""
    import transformers as tf

    torch.manual_seed(seed)
    make = {"gpt2": (gpt2_config, "GPT2LMHeadModel"), "llama": (llama_config, "LlamaForCausalLM")}[arch]
    trusted = getattr(tf, make[1])(make[0](tf)).eval()
    ltf = learner.lib("transformers")
    theirs = getattr(ltf, make[1])(make[0](ltf))
    theirs.load_state_dict(trusted.state_dict())
    theirs.eval()
    return trusted, theirs, trusted.config.vocab_size


def peft_model(model, targets, r, alpha, fan_in_fan_out, use_rslora=False):
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                            fan_in_fan_out=fan_in_fan_out, use_rslora=use_rslora)
        return get_peft_model(model, config).eval()


def random_adapters(peft_model, gen) -> dict:
    """Random A and B for every adapter peft made, set into peft; returned under the course's
    names ("<module name>.lora_A" / ".lora_B")."""
    prefix, chosen = "base_model.model.", {}
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            for part in ("lora_A", "lora_B"):
                suffix = f".{part}.default.weight"
                if name.endswith(suffix):
                    value = torch.randn(param.shape, generator=gen) * 0.2
                    param.copy_(value)
                    chosen[name[len(prefix):-len(suffix)] + "." + part] = value
    return chosen


def their_name(name: str, keys) -> str:
    """A base model's parameter name as the learner's model calls it: unchanged, or with ``.base``
    before the last part where a LoRALinear wraps the layer ("h.0.attn.c_attn.base.weight")."""
    prefix, _, leaf = name.rpartition(".")
    return name if name in keys or not prefix else f"{prefix}.base.{leaf}"


def received_gradient(learner, model, base_names, ids, grad_output, logits_attr: str | None = "logits") -> dict:
    """{name: gradient} of every parameter of the learner's model that one backward pass gives a
    gradient: the model's logits on ``ids`` times ``grad_output`` (chosen here), run on the
    learner's side (requires_grad is state of that process; the gradients come back as tensors).
    Asked for: every name of the model's state_dict() and every parameter of the base model (names
    made here, ``base_names``), so nothing can be left out of the answer."""
    keys = list(model.state_dict())
    names = list(dict.fromkeys([*keys, *(their_name(n, keys) for n in base_names)]))
    ltorch = learner.lib("torch")
    out = learner.harness("call_stored", model, [ids])
    logits = learner.harness("call_stored", learner.lib("builtins").getattr, [out, logits_attr]) if logits_attr else out
    learner.harness("call_stored", ltorch.Tensor.backward, [logits, grad_output])
    attrgetter = learner.lib("operator").attrgetter
    try:
        grads = attrgetter(*[f"{n}.grad" for n in names])(model)
    except AttributeError:
        missing = []
        for n in names:
            try:
                attrgetter(n)(model)
            except AttributeError:
                missing.append(n)
        check(False, f"the adapted model has no parameters {missing[:3]}: a LoRALinear keeps the layer it wraps as "
                     "self.base (so 'h.0.attn.c_attn.weight' becomes 'h.0.attn.c_attn.base.weight') and its adapters as "
                     "lora_A and lora_B")
    grads = (grads,) if len(names) == 1 else grads
    return {n: g for n, g in zip(names, grads) if g is not None}


def oracle_gradients(oracle, ids, grad_output) -> dict:
    """The gradients peft's model gives its adapters for the same output gradient, computed here,
    under the course's names ("<module name>.lora_A" / ".lora_B")."""
    prefix = "base_model.model."
    oracle.zero_grad(set_to_none=True)
    oracle(input_ids=ids).logits.backward(grad_output)
    grads = {}
    for name, param in oracle.named_parameters():
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.default.weight"
            if name.endswith(suffix) and param.grad is not None:
                grads[name[len(prefix):-len(suffix)] + "." + part] = param.grad.clone()
    oracle.zero_grad(set_to_none=True)
    return grads
