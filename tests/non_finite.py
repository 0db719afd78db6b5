"""The suite's comparison of results computed from NaN and inf inputs with the dense reference's."""

import numpy as np

NAN, INF = float("nan"), float("inf")


def assert_like_reference(got, want, names, label, atol, rtol):
    """Each array of `got` has NaN, +inf and -inf exactly where its partner in `want` has them,
    and its finite values within (atol, rtol); `names` label the arrays in the message."""
    for name, g, w in zip(names, got, want, strict=True):
        g, w = np.asarray(g), np.asarray(w)
        for kind, test in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
            differs = np.argwhere(test(g) != test(w))
            assert not len(differs), f"{label} {name}: {kind} differs at {differs[:5].tolist()}"
        finite = np.isfinite(w)
        np.testing.assert_allclose(
            g[finite], w[finite], atol=atol, rtol=rtol, err_msg=f"{label} {name}"
        )
