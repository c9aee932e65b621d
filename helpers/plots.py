"""Small matplotlib charts for the notebooks (introduced in 03_hover_loading)."""

from collections import Counter

import matplotlib.pyplot as plt


def hover_overview(raw, filtered):
    """Two bar charts: claims per hop count (all rows), and how many gold pages each kept claim does not name."""
    from helpers.program.metrics import hidden_titles

    hops = Counter(int(x["num_hops"]) for x in raw)
    hidden = Counter(len(hidden_titles(x)) for x in filtered)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3))
    left.bar([str(h) for h in sorted(hops)], [hops[h] for h in sorted(hops)], color="#4c72b0")
    left.set(title="HoVer claims by num_hops", xlabel="num_hops", ylabel="claims")
    counts = range(0, max(hidden) + 1)
    right.bar([str(n) for n in counts], [hidden[n] for n in counts], color="#dd8452")
    right.set(title="kept claims: gold pages the claim does not name", xlabel="gold pages not named in the claim",
              ylabel="claims")
    fig.tight_layout()
    return fig


def baseline_figure(report, claim_only):
    """Three panels for 05: recall per claim, where gold pages were found, and recall of the pages claims do not name."""
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
    right.bar([claim_only.name.replace(", ", "\n"), report.name.replace(" (", "\n(")],
              [claim_only.hidden_score, report.hidden_score], color=["#c0c0c0", "#4c72b0"])
    right.set(title="gold pages the claim does not name", ylabel="found %", ylim=(0, 100))
    fig.tight_layout()
    return fig


def training_curve(curve):
    """06: per GRPO step, the rollout reward and the groups with a reward spread (left), and the share of claims where a
    rollout found a gold page the claim does not name (right: the multi-hop skill the reward can reinforce)."""
    from matplotlib.ticker import MaxNLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2))
    steps = curve.dropna(subset=["mean_reward"]) if "mean_reward" in curve else curve.iloc[:0]
    left.plot(steps.index, steps["mean_reward"], marker="o", label="mean rollout reward")
    if "fresh_groups" in steps:
        left.plot(steps.index, steps["trained_groups"] / steps["fresh_groups"], marker="x",
                  label="share of groups with a reward spread")
    left.set(title="rollouts per GRPO step", xlabel="step")
    left.legend(fontsize=7)
    found = steps["hidden_found"].dropna() if "hidden_found" in steps else steps["mean_reward"].iloc[:0]
    right.plot(found.index, 100 * found.astype(float), marker="o", color="#55a868")
    right.set(title="claims where a rollout found an unnamed gold page", xlabel="step", ylabel="%", ylim=(0, 100))
    for axis in (left, right):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig
