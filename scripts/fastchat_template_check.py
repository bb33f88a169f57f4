"""Renders the golden conversations of tests/test_templates.py with FastChat's own code and compares.

    git clone https://github.com/lm-sys/FastChat && git -C FastChat checkout v0.2.18
    .venv/bin/python scripts/fastchat_template_check.py --fastchat FastChat

FastChat v0.2.18 (commit d578599c69d060e6d40943f1b5b72af98956092a, 5 July 2023, the release of the
Flacuna paper's week) is where the goldens come from; v0.2.36 (b21d0f780ca4472a13714262a0790f2ee1ade659)
renders them the same. Each conversation goes through what fastchat/train/train.py's `preprocess` does
with `get_conv_template("vicuna_v1.1")`: the first turn dropped when it is not the human's, then
`append_message(role, value)` per turn and `get_prompt()`. Two things that `preprocess` does not
handle are mapped the way flacuna_jax maps them: a leading "system" turn sets the template's system
message (`set_system_message`, or `system` before v0.2.2x), and "user"/"assistant" mean human/gpt.
Only fastchat/conversation.py is imported (standard library only): no FastChat dependency is
installed. GENERATION_GOLDEN (the prompt `generate` feeds) ends with the assistant's message None, as
FastChat's own inference does. Prints one line per golden; exits 1 if any differs.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROLES = {"human": 0, "user": 0, "gpt": 1, "assistant": 1}


def load_conversation_module(fastchat: Path):
    spec = importlib.util.spec_from_file_location("fastchat_conversation", fastchat / "fastchat" / "conversation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastchat_conversation"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def fastchat_render(conversation_module, turns: list[dict]) -> str:
    conv = conversation_module.get_conv_template("vicuna_v1.1")
    if turns and turns[0]["from"] == "system":
        if hasattr(conv, "set_system_message"):
            conv.set_system_message(turns[0]["value"])
        else:
            conv.system = turns[0]["value"]
        turns = turns[1:]
    if turns and ROLES[turns[0]["from"]] != 0:  # train.py: "Skip the first one if it is not from human"
        turns = turns[1:]
    conv.messages = []
    for j, turn in enumerate(turns):
        role = conv.roles[ROLES[turn["from"]]]
        assert role == conv.roles[j % 2], "roles must alternate"
        conv.append_message(role, turn["value"])
    return conv.get_prompt()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fastchat", required=True, help="a checkout of github.com/lm-sys/FastChat (e.g. at v0.2.18)")
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from tests.test_templates import GENERATION_GOLDEN, GOLDEN

    module = load_conversation_module(Path(a.fastchat))
    cases = [(name, conv, expected) for name, conv, expected, _, _ in GOLDEN]
    for i, (history, question, system, expected) in enumerate(GENERATION_GOLDEN):  # the reply left open: None
        turns = [{"from": "system", "value": system}] if system is not None else []
        turns += [t for q, r in history for t in ({"from": "human", "value": q}, {"from": "gpt", "value": r})]
        cases.append((f"generation_{i}", turns + [{"from": "human", "value": question}, {"from": "gpt", "value": None}],
                      expected))
    differ = 0
    for name, conv, expected in cases:
        got = fastchat_render(module, conv)
        differ += got != expected
        print(f"{'same' if got == expected else 'DIFFERS'}  {name}" + ("" if got == expected else f"\n  fastchat: {got!r}"
                                                                       f"\n  golden:   {expected!r}"))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
