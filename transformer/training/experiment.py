"""What the experiment files (experiments/*.py) share: presets, variants and their errors, and
the sequence-to-sequence models the two bottleneck experiments compare.

An experiment file is an ml_collections config file whose `get_config(arg)` takes "<preset>" or
"<preset>,<variant>" (launch.py: `--config=experiments/listops.py:cpu,bigbird`; the sweep asks
for "<preset>,<variant>" for each variant in `config.sweep.variants`). Every experiment has the
presets "smoke" (tests), "cpu" (this machine) and "full" (GPU/TPU).

A preset is a dict of dotted config fields, the words a command-line override uses:

    PRESETS = {"cpu": {"num_train_steps": 800, "model.d_model": 64, "sweep.seeds": (0, 1)}, ...}

    def get_config(arg="cpu"):
        preset, variant = experiment.split(arg, PRESETS)
        experiment.check("listops variant", variant or "full", VARIANTS)
        config = ...  # the experiment's config, None where every preset sets the field
        experiment.set_fields(config, PRESETS[preset])
"""

import ml_collections


def unknown(what, value, allowed):
    """The ValueError for a preset or variant that is not allowed: it names the value and lists
    `allowed` (the names, or a description of their form)."""
    return ValueError(f"unknown {what} {value!r}; allowed: {allowed}.")


def check(what, value, allowed):
    """Raises `unknown(...)` unless `value` is one of `allowed`."""
    if value not in allowed:
        raise unknown(what, value, list(allowed))


def split(arg, presets):
    """(preset, variant) of "<preset>" or "<preset>,<variant>"; variant "" when there is none.
    Raises ValueError for a preset that is not a key of `presets`."""
    preset, _, variant = arg.partition(",")
    check("preset", preset, presets)
    return preset, variant


def set_fields(config, fields):
    """config.<dotted field> = value for each item of `fields`, e.g. {"model.d_model": 64}.

    Each field must be in the config already (a None placeholder will do): a misspelt field
    fails here rather than being added unnoticed."""
    for dotted, value in fields.items():
        *parents, name = dotted.split(".")
        parent = config
        for part in parents:
            parent = parent.get(part)
            if parent is None:
                break
        if parent is None or not hasattr(parent, "keys") or name not in parent:
            raise ValueError(f"a preset sets {dotted!r}, which the experiment's config lacks.")
        parent[name] = value


# The bottleneck experiments' models: recurrent encoder-decoders without and with attention, and
# the transformer.
SEQ2SEQ_VARIANTS = ("no_attention", "bahdanau", "luong", "transformer")
RNN_ATTENTION = {"no_attention": "none", "bahdanau": "bahdanau", "luong": "luong"}


def seq2seq_model(variant, *, dropout_rate=None, norm_position=None):
    """The model config of a variant of SEQ2SEQ_VARIANTS. None where the experiment's presets set
    the field (sizes; and dropout_rate and the transformer's norm_position unless given)."""
    if variant in RNN_ATTENTION:
        fields = dict(
            name="rnn_seq2seq",
            cell="gru",
            bidirectional=True,
            embed_dim=None,
            hidden_dim=None,
            attention=RNN_ATTENTION[variant],
            dropout_rate=dropout_rate,
        )
        if variant != "no_attention":
            fields["attention_dim"] = None
        return ml_collections.ConfigDict(fields)
    return ml_collections.ConfigDict(
        dict(
            name="encoder_decoder",
            d_model=None,
            num_heads=None,
            d_ff=None,
            num_layers=None,
            num_decoder_layers=None,
            dropout_rate=dropout_rate,
            positional="sinusoidal",
            norm_position=norm_position,
            share_embeddings=True,
            tie_output_embedding=True,
            dtype="float32",
        )
    )
