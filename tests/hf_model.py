"""Tiny random Hugging Face models and their attention half in float64, shared by
the parity tests (test_hf_parity.py, and test_block.py's whole-block case)."""
import copy

import torch


class NoMLP(torch.nn.Module):
    """Removes the MLP half, so that the decoder layer computes its attention half only."""

    def forward(self, x):
        return torch.zeros_like(x)


def randomize(model, gen):
    """Weights of meaningful scale: projections ~ 1/sqrt(fan_in) (unit-size activations,
    attention far from uniform), biases ~ 0.1, norm weights in [0.5, 1.5]."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                fan_in = module.weight.shape[1]
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) / fan_in ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
            elif isinstance(module, torch.nn.Embedding):
                continue
            else:
                for name, p in module.named_parameters(recurse=False):
                    if name == "weight":
                        p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
                    else:
                        p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def attention_half(model, x):
    """HF's attention half of layer 0 for x [batch, tokens, H], in float64: the model
    without layer 0's MLP, read at hidden_states[1] (the last one is normed)."""
    ref = copy.deepcopy(model).double()
    ref.layers[0].mlp = NoMLP()
    with torch.no_grad():
        out = ref(inputs_embeds=x.double(), output_hidden_states=True, use_cache=False)
    return out.hidden_states[1]
