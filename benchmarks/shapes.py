"""Parameter shapes of the models the benchmarks use, built from their configs (no download)."""


def gpt2_shapes(n_layer=12, d_model=768, vocab=50257, n_ctx=1024):
    """GPT-2's parameters (124M for the defaults; 148 tensors): embeddings, 12 per block, ln_f."""
    shapes = [(vocab, d_model), (n_ctx, d_model)]
    for _ in range(n_layer):
        shapes += [(d_model,), (d_model,),                      # ln_1
                   (d_model, 3 * d_model), (3 * d_model,),      # attn.c_attn
                   (d_model, d_model), (d_model,),              # attn.c_proj
                   (d_model,), (d_model,),                      # ln_2
                   (d_model, 4 * d_model), (4 * d_model,),      # mlp.c_fc
                   (4 * d_model, d_model), (d_model,)]          # mlp.c_proj
    return shapes + [(d_model,), (d_model,)]                    # ln_f


def llama_shapes(n_layer=16, d_model=2048, d_ff=5632, vocab=32000):
    """A LLaMA-1B-like parameter list (about 0.95B): untied embedding and output, per block
    q, k, v, o, gate, up, down and two RMSNorm weights, a final norm."""
    shapes = [(vocab, d_model)]
    for _ in range(n_layer):
        shapes += [(d_model, d_model)] * 4 + [(d_ff, d_model), (d_ff, d_model), (d_model, d_ff)]
        shapes += [(d_model,), (d_model,)]
    return shapes + [(d_model,), (vocab, d_model)]
