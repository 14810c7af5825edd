"""The built-in prompt set of ``fastdecode demo`` and ``bench/decode_e2e.py``: chat prompts in
four categories, chosen because lookahead decoding gains differently on each.

* code: writing a function from a description, and changing code given in the prompt (the
  answer repeats much of the prompt);
* chat: general questions (little to copy from anywhere);
* retrieval: a passage and a question whose answer quotes it;
* rewrite: a paragraph to correct or restyle (the answer follows the paragraph closely).

:data:`PROMPTS` maps each category to its prompts, each a list of chat messages for the
tokenizer's chat template; :data:`MAX_NEW_TOKENS` is the decoding budget per category.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Message = dict[str, str]

_INVENTORY = '''\
class Inventory:
    def __init__(self):
        self.items = {}

    def add(self, name, count):
        if count <= 0:
            raise ValueError("count must be positive")
        self.items[name] = self.items.get(name, 0) + count

    def total(self):
        return sum(self.items.values())

    def report(self):
        lines = []
        for name, count in sorted(self.items.items()):
            lines.append(f"{name}: {count}")
        return "\\n".join(lines)
'''

_STATS = '''\
def mean(xs):
    total = 0
    for x in xs:
        total = total + x
    return total / len(xs)


def variance(xs):
    m = mean(xs)
    total = 0
    for x in xs:
        total = total + (x - m) ** 2
    return total / len(xs)
'''

_LIGHTHOUSE = """\
The Harwick lighthouse was built in 1871 on a granite ledge two miles off the coast. Its first \
keeper, Thomas Avery, lived in the tower with his wife and three children, and he kept a log of \
every ship that passed. The light was first fuelled with whale oil, then with kerosene from 1885, \
and it was finally electrified in 1934.

In the winter of 1898 a storm destroyed the supply boat, and the Avery family lived for six weeks \
on salted fish and rainwater. Thomas Avery wrote in his log that "the light never failed, though \
we nearly did." The tower was automated in 1962, and the last keeper left the ledge that autumn.

Today the lighthouse belongs to the Harwick Historical Society. Visitors can reach it by ferry \
from May to September, and the keeper's log is on display in the town museum."""

_SOLAR = """\
The Meadowbrook solar farm opened in March 2019 on 40 hectares of former farmland. It has 61,000 \
panels and produces about 48 gigawatt hours of electricity a year, enough for roughly 12,000 \
homes. Sheep graze between the rows of panels, which keeps the grass short without mowing.

The farm is owned by a cooperative of 2,300 local residents, each of whom bought at least one \
share of 250 euros. Profits are paid out once a year, and ten percent of them go to a fund that \
insulates the homes of low-income families in the district."""

PROMPTS: dict[str, list[list[Message]]] = {
    "code": [
        [{"role": "user", "content":
          "Write a Python function merge_intervals(intervals) that takes a list of (start, end) "
          "tuples, merges the intervals that overlap, and returns the merged list sorted by "
          "start. Include a docstring and a short example."}],
        [{"role": "user", "content":
          "Add a method remove(self, name, count) to this class. It should lower the count of "
          "the item, delete the item when its count reaches zero, and raise KeyError for an "
          "unknown name. Return the complete class.\n\n```python\n" + _INVENTORY + "```"}],
        [{"role": "user", "content":
          "Add type hints and a one-line docstring to each of these functions, and show the "
          "complete code.\n\n```python\n" + _STATS + "```"}],
    ],
    "chat": [
        [{"role": "user", "content": "Give me three practical tips for sleeping better."}],
        [{"role": "user", "content":
          "What is the difference between a list and a tuple in Python?"}],
        [{"role": "user", "content": "Why do leaves change colour in autumn?"}],
    ],
    "retrieval": [
        [{"role": "user", "content":
          _LIGHTHOUSE + "\n\nAccording to the passage above, what happened to the Avery family "
          "in the winter of 1898? Quote the sentences of the passage that say so."}],
        [{"role": "user", "content":
          _LIGHTHOUSE + "\n\nHow was the Harwick light fuelled over the years, and when was it "
          "automated? Answer using the words of the passage."}],
        [{"role": "user", "content":
          _SOLAR + "\n\nWho owns the Meadowbrook solar farm and what happens to its profits? "
          "Quote the passage."}],
    ],
    "rewrite": [
        [{"role": "user", "content":
          "Rewrite this paragraph, correcting the spelling and grammar mistakes:\n\n"
          "Yesterday we recieved the new shipment of chairs for the offise. Unfortunatly two of "
          "them was broken, and the the delivery driver said he could not take them back "
          "becuase he didnt have room in his truck. I have wrote to the supplier and asked "
          "them to send replacments before friday."}],
        [{"role": "user", "content":
          "Rewrite this message in a formal tone:\n\n"
          "hey team, the meeting is moved to thursday cause the projector in room 4 is broken. "
          "bring your laptops and last week's reports, we're going over the numbers and then "
          "deciding what to do about the budget. lunch is on me."}],
        [{"role": "user", "content":
          "Rewrite the following paragraph as a bulleted list, one bullet per sentence, keeping "
          "the wording:\n\n"
          "Preheat the oven to 180 degrees. Mix the flour, sugar and butter in a large bowl. Add "
          "two eggs and stir until the batter is smooth. Pour the batter into a greased tin. "
          "Bake for forty minutes, then let the cake cool before slicing it."}],
    ],
}

MAX_NEW_TOKENS: dict[str, int] = {"code": 128, "chat": 64, "retrieval": 96, "rewrite": 96}


def chat_input_ids(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> torch.Tensor:
    """The prompt ``messages`` through the tokenizer's chat template, ready for the assistant's
    answer: int64 ``[1, L]`` on the CPU."""
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                            return_tensors="pt")
    ids = encoded if isinstance(encoded, torch.Tensor) else encoded["input_ids"]
    return ids.to(torch.int64)
