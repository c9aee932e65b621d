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


def baseline_figure(report, claim_only):
    """Three panels for 05: recall per claim, where gold pages were found, and parse failures per module."""
    rows = report.per_claim
    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(12, 3.2))
    bins = [0, 0.17, 0.5, 0.83, 1.0]
    left.hist([rows["recall"], claim_only.per_claim["recall"]], bins=bins, label=[report.name, claim_only.name],
              color=["#4c72b0", "#c0c0c0"])
    left.set(title="recall per claim", xlabel="recall", ylabel="claims", xticks=[0, 1 / 3, 2 / 3, 1],
             xticklabels=["0", "1/3", "2/3", "1"])
    left.legend(fontsize=7)
    mid.bar(["hop 0 (claim)", "hop 1 (LM query)"], [rows["found_hop0"].sum(), rows["found_later"].sum()],
            color=["#55a868", "#dd8452"])
    mid.set(title="gold pages found, by hop", ylabel="pages")
    failures = rows["failed_module"].value_counts()
    modules = ["append_notes", "generate_query"]
    right.bar(modules, [int(failures.get(m, 0)) for m in modules], color="#c44e52")
    right.set(title="parse failures per module", ylabel="claims", ylim=(0, max(1, len(rows))))
    fig.tight_layout()
    return fig


def training_curve(curve, baseline_recall=None):
    """06: mean rollout reward and format-failure share per GRPO step, and dev recall where it was measured."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2))
    left.plot(curve.index, curve["mean_reward"], marker="o", label="mean rollout reward")
    left.plot(curve.index, curve["format_failures"], marker="x", label="format-failure share")
    left.set(title="rollouts per GRPO step", xlabel="step")
    left.legend(fontsize=7)
    measured = curve["dev_recall"].dropna() if "dev_recall" in curve else curve.index[:0]
    if len(measured):
        right.plot(measured.index, measured.values, marker="o", color="#55a868", label="dev recall (subset)")
    if baseline_recall is not None:
        right.axhline(baseline_recall, color="#999999", linestyle="--", label="before training")
    right.set(title="dev recall during training", xlabel="step", ylabel="recall %")
    right.legend(fontsize=7)
    fig.tight_layout()
    return fig
