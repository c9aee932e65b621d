"""The seeds' two-module multi-hop program, written in 04_research_hop (``#@save``) and kept identical here.

Same instructions, signatures and control flow as the seed. Three changes, none of which changes what the
program does: the search function is passed in instead of being a notebook global; the prediction also lists
the queries searched (the training reward of 06 ranks gold pages under them); and each predictor gets a *copy*
of the notes so far. DSPy's trace keeps a reference to the inputs, so with the seed's list itself the trace (and
the GRPO training prompt built from it) would show each call the notes it had just written -- the answer inside
its own prompt. ``SeedPatternResearchHop`` keeps the seed's pattern to show that (06, tests).
"""

import dspy
import pandas as pd

from helpers.util.errors import TutorialError

#@save
instr1 = """
Given a claim and some key facts, generate a follow-up search query to find the next most essential clue towards verifying or refuting the claim. The goal ultimately is to find all documents implicated by the claim.
""".strip()

#@save
instr2 = """
Given a claim, some key facts, and new search results, identify any new learnings from the new search results, which will extend the key facts known so far about the whether the claim is true or false. The goal is to ultimately collect all facts that would help us find all documents implicated by the claim.
"""


class ResearchHop(dspy.Module):  #@save
    def __init__(self, num_docs, num_hops, search):
        check_sizes(num_docs=num_docs, num_hops=num_hops)  # whole numbers of 1 or more, else one line
        self.num_docs, self.num_hops, self.search = num_docs, num_hops, search
        self.generate_query = dspy.ChainOfThought(dspy.Signature("claim, key_facts -> followup_search_query", instr1))
        self.append_notes = dspy.ChainOfThought(dspy.Signature("claim, key_facts, new_search_results -> new_key_facts", instr2))

    def forward(self, claim: str) -> dspy.Prediction:
        check_claim(claim)  # an empty claim would search for nothing and find arbitrary pages
        key_facts, retrieved_docs, queries = [], [], []
        for hop_idx in range(self.num_hops):
            query = self.generate_query(claim=claim, key_facts=list(key_facts)).followup_search_query if hop_idx else claim
            search_results = self.search(query, k=self.num_docs)
            queries.append(query)
            retrieved_docs.extend(search_results)
            if hop_idx == self.num_hops - 1:
                break
            prediction = self.append_notes(claim=claim, key_facts=list(key_facts), new_search_results=search_results)
            key_facts.append(prediction.new_key_facts)
        return dspy.Prediction(key_facts=key_facts, retrieved_docs=retrieved_docs, queries=queries)


def check_sizes(**sizes) -> None:
    """ResearchHop's ``num_docs`` and ``num_hops``: whole numbers of 1 or more, or a one-line TutorialError."""
    for name, value in sizes.items():
        if type(value) is not int or value < 1:
            raise TutorialError(f"ResearchHop: {name}={value!r} must be a whole number of 1 or more, e.g. {name}=2")


def check_claim(claim) -> None:
    """A claim with words in it, or a one-line TutorialError (an empty one would be searched as nothing)."""
    if not isinstance(claim, str) or not claim.strip():
        raise TutorialError(f"ResearchHop: the claim {claim!r} is empty: give it the sentence to verify")


class SeedPatternResearchHop(ResearchHop):
    """The seeds' forward pass, kept to show the pitfall (06, tests): the notes list itself goes into each call."""

    def forward(self, claim: str) -> list[str]:
        key_facts, retrieved_docs, queries = [], [], []
        for hop_idx in range(self.num_hops):
            query = self.generate_query(claim=claim, key_facts=key_facts).followup_search_query if hop_idx else claim
            search_results = self.search(query, k=self.num_docs)
            queries.append(query)
            retrieved_docs.extend(search_results)
            if hop_idx == self.num_hops - 1:
                break
            prediction = self.append_notes(claim=claim, key_facts=key_facts, new_search_results=search_results)
            key_facts.append(prediction.new_key_facts)  # the traced call's input list now holds its own answer
        return dspy.Prediction(key_facts=key_facts, retrieved_docs=retrieved_docs, queries=queries)


def traced_notes(program, claim: str) -> list:
    """The ``key_facts`` each predictor call shows in DSPy's trace after the program ran (what GRPO trains on)."""
    with dspy.context(trace=[]):
        program(claim=claim)
        return [(_module_of(outputs), inputs["key_facts"]) for _, inputs, outputs in dspy.settings.trace]


def walkthrough(program: ResearchHop, example) -> pd.DataFrame:
    """Run the program on one claim and list every step: searches, pages found (✓ = gold), LM outputs (04)."""
    with dspy.context(trace=[]):
        prediction = program(claim=example.claim)
        trace = list(dspy.settings.trace)
    written = iter((_module_of(outputs), outputs) for _, _, outputs in trace)
    gold, n, rows = set(example.titles), program.num_docs, []
    query = example.claim
    for hop in range(program.num_hops):
        if hop:
            module, outputs = next(written)
            rows.append((hop, f"{module}: reasoning", outputs.reasoning))
            query = outputs.followup_search_query
            rows.append((hop, f"{module}: followup_search_query", query))
        titles = [d.split(" | ")[0] for d in prediction.retrieved_docs[hop * n:(hop + 1) * n]]
        rows.append((hop, f"search(query, k={n})", ", ".join(t + (" ✓" if t in gold else "") for t in titles)))
        if hop < program.num_hops - 1:
            module, outputs = next(written)
            rows.append((hop, f"{module}: reasoning", outputs.reasoning))
            rows.append((hop, f"{module}: new_key_facts", outputs.new_key_facts))
    return pd.DataFrame(rows, columns=["hop", "step", "text"]).set_index(["hop", "step"])


def _module_of(outputs):
    return "generate_query" if "followup_search_query" in outputs else "append_notes"
