"""Compose the README's overview picture from pictures already in docs/.

    python docs/make_overview.py                 # writes docs/overview.png
    python docs/make_overview.py --out /tmp/overview.png

Top row: four attention patterns (from `python -m transformer.patterns --out docs/patterns`).
Middle: what they cost, the train_speed experiment's plot (docs/experiments/train_speed.png). Bottom: what
they buy, the pattern_reach experiment's plot (docs/experiments/pattern_reach.png). Re-run this script after
replacing either plot; docs/experiments.md says which run each plot came from.
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

DOCS = Path(__file__).resolve().parent
PATTERNS = ("full", "causal", "sliding_window", "bigbird")
ROWS = (
    ("What each pattern lets a query see (blue: may attend)", None),
    (
        "What it costs: training tokens/s and memory of a step against length "
        "(train_speed experiment)",
        "experiments/train_speed.png",
    ),
    (
        "What it buys: recall accuracy at 128 tokens against distance (pattern_reach experiment)",
        "experiments/pattern_reach.png",
    ),
)


def compose(out):
    patterns = [mpimg.imread(DOCS / "patterns" / f"{name}.png") for name in PATTERNS]
    plots = [mpimg.imread(DOCS / name) for _, name in ROWS[1:]]
    width = 13.2
    # Row heights in inches, from each picture's aspect ratio at the figure's width.
    pattern_height = width / len(PATTERNS) * max(p.shape[0] / p.shape[1] for p in patterns)
    heights = [pattern_height] + [width * p.shape[0] / p.shape[1] for p in plots]
    title_space = 0.45
    fig = plt.figure(figsize=(width, sum(heights) + title_space * len(heights)))
    grid = fig.add_gridspec(len(heights), 1, height_ratios=heights, hspace=0.12)

    top = grid[0].subgridspec(1, len(PATTERNS), wspace=0.02)
    for i, image in enumerate(patterns):
        ax = fig.add_subplot(top[i])
        ax.imshow(image)
        ax.axis("off")
    for row, image in enumerate(plots, start=1):
        ax = fig.add_subplot(grid[row])
        ax.imshow(image)
        ax.axis("off")
    for row, (title, _) in enumerate(ROWS):
        y = grid[row].get_position(fig).y1
        fig.text(0.5, y + 0.004, title, ha="center", va="bottom", fontsize=13, weight="bold")
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    print(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DOCS / "overview.png"), help="the PNG to write")
    compose(parser.parse_args(argv).out)


if __name__ == "__main__":
    main()
