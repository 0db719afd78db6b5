"""Alignment heatmaps: which source positions each target token attended to (Bahdanau, Fig. 3).

    weights = alignment_weights(model, params, inputs, targets)  # [tgt, src], first sentence
    plot_alignment(weights, source_tokens, target_tokens, "alignment.png")

or, for a sentence the model translates itself, `translate_and_plot`.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from transformer import decoding  # noqa: E402
from transformer.modules.models import EncoderDecoder  # noqa: E402


def plot_alignment(weights, source_tokens, target_tokens, path, *, title=None, dpi=100):
    """Saves a PNG of `weights` `[tgt_len, src_len]`: source along x, target down y, white = 1.

    weights are cropped to `len(target_tokens)` rows and `len(source_tokens)` columns, so padded
    positions can be passed in and are left out of the picture. Returns `path`.
    """
    weights = np.asarray(weights, dtype=np.float32)
    if weights.ndim != 2:
        raise ValueError(f"weights must be [tgt_len, src_len]; got shape {weights.shape}.")
    rows, cols = len(target_tokens), len(source_tokens)
    if rows > weights.shape[0] or cols > weights.shape[1]:
        raise ValueError(
            f"{rows} target and {cols} source tokens do not fit weights of shape "
            f"{weights.shape} [tgt_len, src_len]."
        )
    weights = weights[:rows, :cols]
    # About 0.35 inch per token, so labels stay readable for sentences of a few dozen tokens.
    figure, axes = plt.subplots(figsize=(1.5 + 0.35 * cols, 1.2 + 0.35 * rows))
    axes.imshow(weights, cmap="gray", vmin=0.0, vmax=1.0, aspect="equal")
    axes.set_xticks(range(cols), labels=source_tokens, rotation=90)
    axes.set_yticks(range(rows), labels=target_tokens)
    axes.xaxis.tick_top()
    axes.xaxis.set_label_position("top")
    axes.set_xlabel("source")
    axes.set_ylabel("target")
    if title:
        axes.set_title(title, y=-0.05, va="top")  # below: the source labels are on top
    figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    return path


def alignment_weights(model, params, source, target):
    """`[tgt_len, src_len]`: how much each target token attends to each source token.

    source, target: int `[1, length]`. Recurrent models return their attention weights
    (`return_attention=True`). The transformer is run once more with dense attention, the only
    implementation that returns weights, and sows them; its last decoder layer's
    cross-attention, averaged over heads, is the alignment (row i predicts target[i]).
    """
    return np.asarray(_alignment_weights(model, params, source, target))


# One compiled program per model and sentence shape: run op by op, a model's forward pass would
# compile each of its hundreds of operations on its own.
@functools.partial(jax.jit, static_argnames="model")
def _alignment_weights(model, params, source, target):
    if not isinstance(model, EncoderDecoder):
        return model.apply({"params": params}, source, target, return_attention=True)[1][0]
    config = dataclasses.replace(model.config, sow_attention_weights=True, implementation="dense")
    _, state = model.clone(config=config).apply(
        {"params": params}, source, target, mutable=["intermediates"]
    )
    last_layer = state["intermediates"]["decoder"][f"layers_{config.num_decoder_layers - 1}"]
    weights = last_layer["cross_attention"]["attention_weights"][0]  # [1, heads, tgt, src]
    return weights[0].mean(0)


def translate_and_plot(
    model,
    variables,
    source,
    path,
    *,
    max_len,
    eos_id,
    names,
    strategy="greedy",
    title=None,
    **options,
):
    """Translates one sentence and saves the alignment of the translation to it as a PNG.

    source: int `[src_len]`, padding allowed at the end. The model decodes it with
    `decoding.generate` (strategy and options as there); the attention weights come from a
    teacher-forced pass over the decoded tokens, which equals the step-by-step decoding.
    names: maps a list of token ids to a list of strings (labels of the picture).
    Returns the decoded ids (up to and including EOS) and their weights `[tgt_len, src_len]`.
    """
    source = jnp.asarray(source, jnp.int32)[None]
    output = np.asarray(
        decoding.generate(
            model, variables, source, max_len=max_len, eos_id=eos_id, strategy=strategy, **options
        )[0]
    )
    ends = np.flatnonzero(output == eos_id)
    target = output[: ends[0] + 1] if ends.size else output
    weights = alignment_weights(model, variables["params"], source, jnp.asarray(target)[None])
    real_source = [int(t) for t in np.asarray(source[0]) if t != 0]
    plot_alignment(weights, names(real_source), names([int(t) for t in target]), path, title=title)
    return target, weights
