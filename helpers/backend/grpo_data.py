"""GRPO's data path for the embedded model, as one object: from the tokens the engine sampled to the rows the loss sees (06).

dspy's ``GRPO`` hands the training job groups of ``{messages, completion, reward}``: text it rebuilds from
the program's trace *after* the rollout. Trained as text, that is not what the model produced: the reply
is re-tokenised, the adapter's prefilled ``[[ ## field ## ]]`` markers and ``[[ ## completed ## ]]`` look
like model output, and any input the program changed after the call (a list it appended to) shows up in
the prompt. So the job trains on what the engine recorded instead:

1. During rollouts the engine appends every sampled row to ``engine.recorder`` (``decoding.Sampled``: the
   prompt token ids, the sampled ids and their log-probabilities at the sampling temperature).
2. ``OnPolicyData.rows(groups)`` finds the records behind each item: for every output field of the reply, the
   prompt the adapter sent (the messages plus the reply up to that field's marker, chat-templated) and the
   value it parsed. A record serves once. An item whose records are missing -- its prompt is not the one the
   model saw, or its group was already trained on -- is left out and counted.
3. Each ``TrainRow`` carries the record's exact ids and log-probs and the rollout's group-relative advantage,
   so every trained token is a sampled token, under the prompt ids it was sampled with.
"""

import math
import re
from array import array
from collections import defaultdict
from dataclasses import dataclass, field

from helpers.backend import grpo_loss
from helpers.engine import local_lm

MARKER = re.compile(r"\[\[ ## (\w+) ## \]\]\n")


@dataclass
class TrainRow:
    """One sampled span and the advantage of the rollout it belongs to."""

    prompt_ids: list[int]
    completion_ids: list[int]
    old_logprobs: list[float]  # at sampling time, at ``temperature``
    temperature: float
    advantage: float
    nonblank: bool = False  # the first token was sampled with blank tokens masked (the loss applies the same mask)


@dataclass
class DataCheck:
    """What one step's data path found (06 prints it; it must read 100 %)."""

    groups: int = 0  # groups dspy's GRPO handed over
    fresh_groups: int = 0  # groups with at least one item matched to this step's records
    stale_groups: int = 0  # groups with none: repeated, or left from an earlier step
    groups_with_variance: int = 0  # fresh groups whose rewards differ (the others teach nothing)
    items: int = 0  # items of the fresh groups
    matched_items: int = 0  # items whose every field is found among the records
    trained_tokens: int = 0  # completion tokens the loss consumed (rows with a non-zero advantage)
    sampled_tokens: int = 0  # of those, tokens of rows the engine recorded: same prompt ids, ids and log-probs
    unused_records: int = 0  # sampled rows no item claimed (e.g. rollouts that failed)
    nonfinite_groups: int = 0  # groups with an inf/nan reward: left out (their advantages are meaningless)

    @property
    def matched_share(self) -> float:
        return self.matched_items / self.items if self.items else 1.0

    @property
    def sampled_share(self) -> float:
        return self.sampled_tokens / self.trained_tokens if self.trained_tokens else 1.0


@dataclass
class OnPolicyData:
    """Collects the engine's sampled rows during a step and turns dspy's GRPO groups into ``TrainRow``s."""

    engine: object
    scale_rewards: bool = True
    records: list = field(default_factory=list)
    ledger: dict = field(default_factory=dict)  # prompt ids -> [(ids, float32 log-probs)]: copies of this step's records

    def start(self):
        """Record every sampled row from now on."""
        self.records = []
        self.engine.recorder = self.records

    def stop(self):
        self.engine.recorder = None

    def rows(self, groups) -> tuple[list[TrainRow], DataCheck]:
        """Rows for the groups of one step; the records are used up (the next step starts from new rollouts)."""
        pool, self.ledger = defaultdict(list), defaultdict(list)
        for record in self.records:
            pool[(tuple(record.prompt_ids), record.text.strip())].append(record)
            self.ledger[tuple(record.prompt_ids)].append((tuple(record.ids), _float32(record.logprobs)))
        self.records.clear()
        check, rows = DataCheck(groups=len(groups)), []
        for group in groups:
            rewards = [float(item["reward"]) for item in group]
            if not all(math.isfinite(r) for r in rewards):
                check.nonfinite_groups += 1
                continue
            advantages = grpo_loss.group_advantages(rewards, self.scale_rewards)
            found = [self._records_of(item, pool) for item in group]
            if not any(found):
                check.stale_groups += 1
                continue
            check.fresh_groups += 1
            check.groups_with_variance += max(abs(a) for a in advantages) > 1e-8
            check.items += len(group)
            for records, advantage in zip(found, advantages):
                if not records:
                    continue
                check.matched_items += 1
                for r in records:
                    rows.append(TrainRow(r.prompt_ids, r.ids, r.logprobs, r.temperature, advantage, r.nonblank))
        check.unused_records = sum(len(v) for v in pool.values())
        return rows, check

    def count_sampled(self, consumed, check: DataCheck) -> None:
        """Fill ``check.trained_tokens`` / ``sampled_tokens`` from what the loss consumed (``LoraPolicy.consumed``:
        prompt ids, completion ids, old log-probs per row) against this step's records (``ledger``).

        A row counts as sampled when a record has its very prompt ids, and its ids and log-probs start the record's
        (a completion cut at ``max_completion_length`` is still sampled). Anything else -- re-tokenised text, tokens
        past the record, log-probs from another temperature -- lowers the share below 1.
        """
        for prompt, ids, logprobs in consumed:
            n, ids, logprobs = len(ids), tuple(ids), _float32(logprobs)
            check.trained_tokens += n
            if any(r_ids[:n] == ids and r_lps[:n] == logprobs
                   for r_ids, r_lps in self.ledger.get(tuple(prompt), ())):
                check.sampled_tokens += n

    def _records_of(self, item, pool) -> list | None:
        """The records of every field of one item's reply, taken out of ``pool``; None if any is missing."""
        content = item["completion"]["content"]
        marks = [m for m in MARKER.finditer(content) if m.group(1) != "completed"]
        keys = []
        for i, mark in enumerate(marks):
            end = marks[i + 1].start() if i + 1 < len(marks) else content.find("[[ ## completed ## ]]", mark.end())
            value = content[mark.end(): end if end >= 0 else None].strip()
            conversation = [*item["messages"], {"role": "assistant", "content": content[: mark.end()]}]
            keys.append((tuple(local_lm.prompt_ids(self.engine.tokenizer, conversation)), value))
        if not keys or any(not pool.get(k) for k in keys) or len(set(keys)) < len(keys):
            return None
        return [pool[k].pop() for k in keys]


def _float32(values) -> tuple:
    """Log-probs as the loss holds them (float32), for an exact comparison."""
    return tuple(array("f", values).tolist())
