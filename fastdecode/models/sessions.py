"""A multi-turn, agent-like workload: sessions that revisit and edit the same code or document.

Each session starts from a piece of code or a document and asks for one edit per turn, each time
for the whole result, so every answer repeats much of the previous one: the traffic of coding
agents and document editors, where a drafter that remembers the conversation copies the most.
:data:`SESSIONS` holds 16 sessions (8 texts, two chains of edits each) of :data:`TURNS` user
turns; a turn's prompt is the conversation so far (each earlier answer as the assistant's
message) and the turn's request. :data:`MAX_NEW_TOKENS` is the decoding budget per turn.
"""

from __future__ import annotations

from fastdecode.models.prompts import Message

_CODE = {
    "stack": '''\
class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        return self.items.pop()

    def size(self):
        return len(self.items)
''',
    "prices": '''\
def total_price(items, tax):
    total = 0
    for item in items:
        total = total + item["price"] * item["qty"]
    return total + total * tax
''',
    "words": '''\
def count_words(text):
    counts = {}
    for word in text.split():
        word = word.lower()
        counts[word] = counts.get(word, 0) + 1
    return counts
''',
    "temps": '''\
def to_fahrenheit(celsius):
    return celsius * 9 / 5 + 32


def to_celsius(fahrenheit):
    return (fahrenheit - 32) * 5 / 9
''',
}

_DOCS = {
    "notice": (
        "The library will be closed on Monday for the public holiday. Books that are due on "
        "Monday can be returned on Tuesday without a fine. The reading room reopens at nine "
        "o'clock on Tuesday morning, and the children's story hour moves to Wednesday."),
    "recipe": (
        "Cut the potatoes into small cubes and boil them for ten minutes. Fry the onions in a "
        "little oil until they are soft. Add the potatoes, a pinch of salt and the chopped "
        "parsley, and fry everything together for five more minutes."),
    "email": (
        "Dear Ms Novak, thank you for your order of twelve chairs. The chairs will be delivered "
        "on the fourth of May between eight and noon. Please make sure that someone is at home "
        "to sign for the delivery. Kind regards, Tom Berg."),
    "report": (
        "Sales in the north region rose by eight percent in March. The new shop in Harlow "
        "opened on time and had two thousand visitors in its first week. Costs stayed within "
        "the budget, but the delivery van needs new tyres before the summer."),
}

_CODE_EDITS = (
    ("Add a docstring to every function in this code and show the complete code.",
     "Now add type hints to every function and show the complete code again."),
    ("Rename the variables in this code to longer, clearer names and show the complete code.",
     "Now add a comment above each function saying what it returns, and show the complete "
     "code again."),
)

_DOC_EDITS = (
    ("Rewrite this text in a more formal tone, keeping every fact:",
     "Now split your text into a bulleted list, one bullet per sentence, keeping the wording."),
    ("Correct any awkward phrasing in this text and return the whole text:",
     "Now add a short title above the text and return the whole text again."),
)

TURNS = 2
MAX_NEW_TOKENS = 128


def _sessions() -> list[list[str]]:
    sessions = []
    for code in _CODE.values():
        for first, second in _CODE_EDITS:
            sessions.append([f"{first}\n\n```python\n{code}```", second])
    for doc in _DOCS.values():
        for first, second in _DOC_EDITS:
            sessions.append([f"{first}\n\n{doc}", second])
    return sessions


SESSIONS: list[list[str]] = _sessions()
"""16 sessions, each a list of ``TURNS`` user requests."""


def conversation(turns: list[str], answers: list[str]) -> list[Message]:
    """The chat messages of a session's next turn: its first ``len(answers) + 1`` requests,
    each earlier one followed by its answer."""
    if len(answers) >= len(turns):
        raise ValueError(f"answers must be fewer than the session's {len(turns)} turns, "
                         f"found {len(answers)}")
    messages: list[Message] = []
    for request, answer in zip(turns, answers):
        messages += [{"role": "user", "content": request},
                     {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": turns[len(answers)]})
    return messages
