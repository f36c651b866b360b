"""Small Hugging Face models built on both sides of the boundary with the same weights, and
peft, the oracle, on the trusted side."""

import warnings

import torch

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


def trainable_names(learner, model) -> dict:
    summary = learner.harness("parameter_summary", model)
    return {name: n for name, (n, grad) in summary.items() if grad}
