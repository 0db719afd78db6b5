r"""What each fix fixes: a character language model on Shakespeare with one fix taken out at a time.

The lectures add fixes to bare self-attention and say what each does. Each variant removes one
from the full model (a pre-LN decoder-only LM, transformer/data/shakespeare.py's bytes):
  full                 the full model
  no_feed_forward      no feed-forward block: the non-linearity attention lacks
  no_residual          no residual connections: the sublayer's output replaces its input
  no_layer_norm        no LayerNorm anywhere (norm_position "none")
  no_scale             scores q.k, not q.k / sqrt(d_k), at head_dim 64 (softmax saturates)
  one_head             one head of width num_heads x head_dim instead of num_heads heads
  no_causal_mask       trained without the causal mask (it can read the byte it predicts),
                       evaluated with it: train/bits_per_target against eval/bits_per_target
and, at depth (DEEP: a deeper, narrower model), pre-LN against post-LN:
  deep_pre_ln          pre-LN, no learning-rate warmup
  deep_post_ln         post-LN, no warmup
  deep_post_ln_warmup  post-LN with warmup (a tenth of the steps)
Reported: validation bits per character with the causal mask (`eval/bits_per_target`), and the
training bits of the last logging interval (`train/bits_per_target`).

    python launch.py --config=experiments/ablations.py:cpu --sweep --workdir=/tmp/ablations
    python experiments/ablations.py --preset=cpu --sweep_dir=/tmp/ablations --out=docs/experiments

The second command draws the sweep's bars (ablations.png) and measures the gradient norm of
each layer at initialisation and after GRAD_STEPS steps, for the deep model pre-LN, without
residuals, without LayerNorm and post-LN (ablations_grad_norms.png; transformer/training/
grad_norms.py).

Presets: "smoke" (tests); "cpu" (2 cores: 128-byte contexts, a 3-layer d_model-128 model with 2
heads of 64, 200 steps of 16 x 128 bytes; DEEP: 12 layers of d_model 64, 150 steps of 8 x 128);
"full" (GPU/TPU: 1,024-byte contexts, 8 layers of d_model 512, DEEP 24 layers; not run here).
"""

import functools
import os
import re

import ml_collections

from transformer.training import experiment
from transformer.training.config_schema import base_config

# variant -> the config fields it changes from the full model.
VARIANTS = {
    "full": {},
    "no_feed_forward": {"model.feed_forward": False},
    "no_residual": {"model.residual": False},
    "no_layer_norm": {"model.norm_position": "none"},
    "no_scale": {"model.scale_scores": False},
    "one_head": {"model.num_heads": 1},  # head_dim set in get_config: the same width
    "no_causal_mask": {"model.causal_mask_in_training": False},
    "deep_pre_ln": {"optimizer.warmup_steps": 0},
    "deep_post_ln": {"model.norm_position": "post", "optimizer.warmup_steps": 0},
    "deep_post_ln_warmup": {"model.norm_position": "post"},
}

PRESETS = {
    "smoke": {
        "data.max_length": 32,
        "model.num_layers": 2,
        "model.d_model": 16,
        "model.num_heads": 2,
        "model.head_dim": 8,
        "model.d_ff": 32,
        "global_batch_size": 8,
        "num_train_steps": 6,
        "eval_steps": 2,
        "optimizer.learning_rate": 3e-3,
        "sweep.seeds": (0,),
    },
    "cpu": {
        "data.max_length": 128,
        "model.num_layers": 3,
        "model.d_model": 128,
        "model.num_heads": 2,
        "model.head_dim": 64,
        "model.d_ff": 256,
        "global_batch_size": 16,
        "num_train_steps": 200,
        "eval_steps": 20,
        "optimizer.learning_rate": 3e-3,
        "sweep.seeds": (0, 1, 2),
    },
    # Sized for a GPU/TPU; not run on this machine.
    "full": {
        "data.max_length": 1024,
        "model.num_layers": 8,
        "model.d_model": 512,
        "model.num_heads": 8,
        "model.head_dim": 64,
        "model.d_ff": 2048,
        "global_batch_size": 64,
        "num_train_steps": 20_000,
        "eval_steps": 0,
        "optimizer.learning_rate": 1e-3,
        "sweep.seeds": (0, 1, 2),
    },
}
# Not config fields: the model and batches of the deep_* variants, deeper and narrower than the
# preset's (on CPU also smaller batches, for time).
DEEP = {
    "smoke": {"model.num_layers": 4, "model.d_model": 16, "model.head_dim": 8, "model.d_ff": 32},
    "cpu": {
        "model.num_layers": 12,
        "model.d_model": 64,
        "model.head_dim": 32,
        "model.d_ff": 128,
        "global_batch_size": 8,
        "num_train_steps": 150,
    },
    "full": {
        "model.num_layers": 24,
        "model.d_model": 512,
        "model.head_dim": 64,
        "model.d_ff": 2048,
    },
}
# Not a config field: the steps after which the gradient norms are measured again.
GRAD_STEPS = {"smoke": 2, "cpu": 50, "full": 500}


def get_config(arg="cpu"):
    """arg: "<preset>" or "<preset>,<variant>"; preset in PRESETS (default cpu)."""
    preset, variant = experiment.split(arg, PRESETS)
    variant = variant or "full"
    experiment.check("ablations variant", variant, VARIANTS)

    config = base_config()
    config.task = "language_modelling"
    config.data = ml_collections.ConfigDict(dict(name="shakespeare", max_length=None))
    config.model = ml_collections.ConfigDict(
        dict(
            name="decoder_lm",
            d_model=None,
            num_heads=None,
            head_dim=None,
            d_ff=None,
            num_layers=None,
            positional="rotary",
            norm_position="pre",
            residual=True,
            feed_forward=True,
            scale_scores=True,
            causal_mask_in_training=True,
            dropout_rate=0.0,
            pattern="full",
            implementation="auto",
            dtype="float32",
        )
    )
    experiment.set_fields(config, PRESETS[preset])  # None above: set by every preset
    if variant.startswith("deep_"):
        experiment.set_fields(config, DEEP[preset])
    steps = config.num_train_steps
    config.optimizer.warmup_steps = max(steps // 10, 1)
    width = config.model.num_heads * config.model.head_dim
    experiment.set_fields(config, VARIANTS[variant])
    config.model.head_dim = width // config.model.num_heads  # one_head: one head as wide

    config.eval_every_steps = steps
    config.checkpoint_every_steps = steps
    config.log_every_steps = max(steps // 10, 1)
    config.sweep.variants = tuple(VARIANTS)
    config.sweep.metrics = ("eval/bits_per_target", "train/bits_per_target", "eval/accuracy")
    return config


# The deep model's variants whose gradient norms per layer are compared: the claim that
# residuals and LayerNorm let gradients through depth, and post-LN's large gradients near the
# output at initialisation.
GRAD_NORM_VARIANTS = {
    "pre-LN (full)": {},
    "no residual": {"model.residual": False},
    "no LayerNorm": {"model.norm_position": "none"},
    "post-LN": {"model.norm_position": "post"},
}


def grad_norm_curves(preset, data_dir=""):
    """{label: {step: [num_layers] gradient norms}} of the deep model, at initialisation and
    after GRAD_STEPS[preset] steps of its optimizer (with warmup, as deep_post_ln_warmup)."""
    from transformer.training import grad_norms

    curves = {}
    for label, fields in GRAD_NORM_VARIANTS.items():
        config = get_config(f"{preset},deep_post_ln_warmup")
        experiment.set_fields(config, {"model.norm_position": "pre", **fields})
        config.data_dir = data_dir
        curves[label] = grad_norms.layer_grad_norms(config, at_steps=(0, GRAD_STEPS[preset]))
    return curves


# Generation from the sweep's models: a held-out prompt (Julius Caesar, a validation play) and
# what each model writes after it, up to the training context.
SAMPLE_VARIANTS = ("full", "no_causal_mask")
PROMPT = "BRUTUS:\nWhat means this shouting? I do fear, the people\n"


def training_words():
    """The set of lowercase words in the training plays: the vocabulary a sample's words are
    looked up in."""
    from transformer.data import shakespeare

    words = set()
    for play, path in shakespeare.list_plays().items():
        if shakespeare.split_of(play) == "train":
            with open(path, encoding="utf-8") as f:
                words.update(re.findall(r"[a-z]+", f.read().lower()))
    return words


def word_rate(text, words):
    """The fraction of `text`'s words (runs of letters) that are in `words`; NaN for no word."""
    found = re.findall(r"[a-z]+", text.lower())
    return sum(w in words for w in found) / len(found) if found else float("nan")


def sample_continuations(model, params, prompt, *, context, num_samples, temperature, seed):
    """`[num_samples, context - len(prompt) + 1]` token ids that a DecoderLM samples after
    `prompt` (int ids `[prompt_len]`), at `temperature`, decoding with its key/value cache."""
    import jax
    import numpy as np

    from transformer import decoding

    prompts = np.tile(prompt, (num_samples, 1))
    lengths = np.full(num_samples, len(prompt) - 1)  # the last prompt token is fed by decoding

    @jax.jit
    def sample(params):
        variables = {"params": params}
        state = model.apply(variables, prompts, context, lengths, method="prefill")
        step = functools.partial(model.apply, variables, method="decode_step")
        return decoding.sample(
            step,
            state,
            prompts[:, -1],
            jax.random.key(seed),
            max_len=context - len(prompt) + 1,
            temperature=temperature,
        )

    return np.asarray(sample(params))


def doubled_letter_rate(text):
    """The fraction of letters followed by the same letter ("ee" in "thee"). A model that learnt
    to copy the byte it should predict (no_causal_mask) reads, when generating, only the byte it
    has just written, and copies that instead."""
    pairs = [(a, b) for a, b in zip(text, text[1:]) if a.isalpha()]
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else float("nan")


def generate_samples(
    preset, sweep_dir, *, prompt=PROMPT, num_samples=8, temperature=0.8, data_dir=""
):
    """{(variant, seed): [num_samples] texts}: each SAMPLE_VARIANTS run of the sweep in
    `sweep_dir`, prompted with `prompt`, samples (at `temperature`) bytes until its context
    (config.data.max_length) is full. Decoding always applies the causal mask: a model can only
    read what it has written."""
    import numpy as np

    from transformer.data import tokenizers
    from transformer.training import trained

    prompt = tokenizers.encode_bytes(prompt.encode())
    samples = {}
    for variant in SAMPLE_VARIANTS:
        config = get_config(f"{preset},{variant}")
        config.data_dir = data_dir
        context = config.data.max_length
        if len(prompt) >= context:
            raise ValueError(f"the prompt ({len(prompt)} bytes) fills the context ({context}).")
        for seed in config.sweep.seeds:
            config.seed = seed
            run = trained.load(config, os.path.join(sweep_dir, "runs", variant, f"seed_{seed}"))
            tokens = sample_continuations(
                run.model,
                run.params,
                prompt,
                context=context,
                num_samples=num_samples,
                temperature=temperature,
                seed=seed,
            )
            samples[variant, seed] = [
                bytes(
                    (row[row >= tokenizers.NUM_RESERVED] - tokenizers.NUM_RESERVED).astype(np.uint8)
                ).decode("utf-8", errors="replace")
                for row in tokens
            ]
    return samples


def plot_sweep(runs_csv, path):
    """Bars of validation (causal) and training bits per character per variant, mean over the
    seeds of runs.csv, each seed a dot."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    with open(runs_csv) as f:
        rows = list(csv.DictReader(f))
    variants = list(dict.fromkeys(row["variant"] for row in rows))
    figure, ax = plt.subplots(figsize=(10, 4))
    for offset, (key, label) in enumerate(
        (("eval/bits_per_target", "validation, causal"), ("train/bits_per_target", "training"))
    ):
        for i, variant in enumerate(variants):
            values = [float(r[key]) for r in rows if r["variant"] == variant]
            x = i + (offset - 0.5) * 0.4
            ax.bar(x, np.mean(values), 0.4, color=f"C{offset}", label=label if i == 0 else None)
            ax.plot([x] * len(values), values, "k.", markersize=4)
    ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right")
    ax.set_ylabel("bits per character")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def print_samples(samples, words, reference):
    """Markdown: per variant, the sampled words found in the training plays and the doubled
    letters (each a mean over a seed's samples; then mean ± std over seeds), beside the same
    measures of `reference`, held-out text; then each seed's first sample."""
    import numpy as np

    print(
        "| text | training words among its words, per seed | mean ± std | doubled letters, per seed | mean ± std |"
    )
    print("|---|---|---|---|---|")
    print(
        f"| held-out text (Julius Caesar) | | {word_rate(reference, words):.2f} | | "
        f"{doubled_letter_rate(reference):.3f} |"
    )
    for variant in SAMPLE_VARIANTS:
        texts = [t for (v, _), t in samples.items() if v == variant]
        cells = []
        for measure, digits in ((lambda t: word_rate(t, words), 2), (doubled_letter_rate, 3)):
            rates = [np.nanmean([measure(t) for t in seed]) for seed in texts]
            cells.append(", ".join(f"{r:.{digits}f}" for r in rates))
            cells.append(f"{np.mean(rates):.{digits}f} ± {np.std(rates, ddof=1):.{digits}f}")
        print(f"| {variant} | " + " | ".join(cells) + " |")
    for (variant, seed), texts in samples.items():
        print(f"\n{variant}, seed {seed}:\n```\n{PROMPT}{texts[0]}\n```")


def held_out_text(num_bytes=20_000):
    """The first `num_bytes` characters of Julius Caesar, a validation play."""
    from transformer.data import shakespeare

    with open(shakespeare.list_plays()["julius-caesar"], encoding="utf-8") as f:
        return shakespeare.markdown_to_text(f.read())[:num_bytes]


def main():
    """The figures of the docs page, into --out: the sweep's bars (from --sweep_dir's runs.csv)
    and the gradient norms per layer; with --samples, instead, what the sweep's full and
    no_causal_mask models generate, printed as Markdown."""
    import argparse

    from absl import flags

    from transformer.training import grad_norms

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--sweep_dir", default="", help="a finished sweep's workdir, or ''")
    parser.add_argument("--out", default=".")
    parser.add_argument("--data_dir", default="")
    parser.add_argument("--samples", action="store_true", help="generate from --sweep_dir's runs")
    args = parser.parse_args()
    flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags
    if args.samples:
        if not args.sweep_dir:
            parser.error("--samples needs --sweep_dir, the workdir of a finished sweep.")
        samples = generate_samples(args.preset, args.sweep_dir, data_dir=args.data_dir)
        print_samples(samples, training_words(), held_out_text())
        return
    if args.sweep_dir:
        plot_sweep(
            os.path.join(args.sweep_dir, "runs.csv"), os.path.join(args.out, "ablations.png")
        )
    curves = grad_norm_curves(args.preset, args.data_dir)
    for label, by_step in curves.items():
        for step, norms in by_step.items():
            print(f"{label:>14} step {step:>4}: " + " ".join(f"{n:.3g}" for n in norms))
    grad_norms.plot(curves, os.path.join(args.out, "ablations_grad_norms.png"), title="12-layer LM")


if __name__ == "__main__":
    main()
