"""Small matplotlib charts for the notebooks (introduced in 03_hover_loading)."""

from collections import Counter

import matplotlib.pyplot as plt


def hover_overview(raw, filtered):
    """Two bar charts: claims per hop count (all rows) and gold titles per claim (after the seed's filter)."""
    hops = Counter(int(x["num_hops"]) for x in raw)
    golds = Counter(len(x.titles) for x in filtered)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3))
    left.bar([str(h) for h in sorted(hops)], [hops[h] for h in sorted(hops)], color="#4c72b0")
    left.set(title="HoVer claims by num_hops", xlabel="num_hops", ylabel="claims")
    right.bar([str(g) for g in sorted(golds)], [golds[g] for g in sorted(golds)], color="#55a868")
    right.set(title="3-hop claims (filtered): gold titles", xlabel="distinct gold titles", ylabel="claims")
    fig.tight_layout()
    return fig
