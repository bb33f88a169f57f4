"""The judge's rubric prompts of the IMPACT writing evaluation: data the protocol defines, kept in this one place.

Source: declare-lab/instruct-eval at commit e2eb966, `subjective.py`, `score_answers`: the two
`template` strings (triple-quoted inside the function, so each line after the first carries the
function's 8-space indentation, two lines are 8 spaces only, one line ends with a space, and the
string ends with a newline and 8 spaces). They are reproduced byte for byte below, written with
explicit escapes so no editor can strip the trailing whitespace they contain. InstructEval fills them
with `template.format(text=sample.Answer, prompt=sample.Prompt)`; the coherence template has no
`{prompt}` field (InstructEval: "coherence is not prompt-specific"), so the prompt is ignored there.

sha256 of the UTF-8 bytes, as computed from the e2eb966 file (tests/test_evals_impact.py checks them):
relevance e5980ef1980cf9e43ce6116283ef40d65b71576cb5b1868646e96b768fe67710,
coherence 00b8b34b5c3a4c29ac5ea768233cd42a54a49f50ceb68ad870f75576ef3369ad.
"""

from __future__ import annotations

RELEVANCE = (
    "Text: {text}\n"
    "        \n"
    "        Prompt: {prompt}\n"
    "        \n"
    "        How relevant is the text to the prompt? Select a suitable option number between 1 and 5 based on the "
    "options below.\n"
    "\n"
    "        1. Inadequate: The text fails to provide any relevant information or insights related to the given "
    "prompt.\n"
    "        2. Limited: The text may contain some relevant information, but significant gaps exist, and key aspects "
    "of the prompt are not adequately covered.\n"
    "        3. Satisfactory: The text covers the main aspects of the prompt and provides relevant information, but "
    "it lacks depth and may not explore the topic in great detail.\n"
    "        4. Proficient: The text provides a comprehensive response by addressing the key aspects of the prompt, "
    "offering relevant and well-supported information or arguments. \n"
    "        5. Excellent: The text thoroughly and thoughtfully addresses the prompt, demonstrating a comprehensive "
    "understanding of the topic. It offers insightful and original ideas, supported by relevant arguments and "
    "information.\n"
    "        "
)

COHERENCE = (
    "Text: {text}\n"
    "        \n"
    "        How coherent is the text? Select a suitable option number between 1 and 5 based on the options below.\n"
    "\n"
    "        1. Inadequate: The text lacks logical organization, making it difficult to follow. Ideas are disjointed "
    "and phrased awkwardly, requiring significant effort to understand.\n"
    "        2. Limited: The text demonstrates some attempt at organization, but there are significant gaps in "
    "coherence. Ideas may be loosely connected, and the arguments lack clarity.\n"
    "        3. Satisfactory: The text generally follows a logical organization, but occasional disruptions or "
    "awkward phrasing may occur. There is an acceptable level of readability and understanding.\n"
    "        4. Proficient: The text is clearly organized and easy to understand. Ideas and arguments flow smoothly, "
    "contributing to easy comprehension and a pleasant reading experience.\n"
    "        5. Excellent: The text presents exceptionally coherent writing with a fluent and engaging flow of ideas, "
    "ensuring effortless comprehension and a delightful reading experience.\n"
    "        "
)

# mode -> template; the modes in the order InstructEval's README runs them (Table 5: Rel., then Coh.)
TEMPLATES = {"relevance": RELEVANCE, "coherence": COHERENCE}


def judge_prompt(mode: str, answer: str, prompt: str) -> str:
    """The exact text sent to the judge, as InstructEval's `template.format(text=..., prompt=...)` builds it."""
    return TEMPLATES[mode].format(text=answer, prompt=prompt)
