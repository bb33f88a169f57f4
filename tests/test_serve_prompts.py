"""serve/prompts.py: chat messages -> the ids training renders (Vicuna v1.1), errors that name the
message, completions' prompts, and the shared system-prompt prefix (tokenizer only, no model)."""

import pytest

from flacuna_jax.serve.prompts import PromptError, Prompts
from flacuna_jax.serve.schemas import ChatMessage
from flacuna_jax.templates import SYSTEM, encode_generation_prompt
from flacuna_jax.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(char_tokenizer_dir):
    return load_tokenizer(char_tokenizer_dir)


def msgs(*pairs):
    return [ChatMessage(role=r, content=c) for r, c in pairs]


def test_chat_is_rendered_as_training_renders_it(tok):
    p = Prompts(tok, [2])
    ids, decode = p.chat(msgs(("user", "hi"), ("assistant", "hello!"), ("user", "and you?")))
    assert ids == encode_generation_prompt([("hi", "hello!")], "and you?", tok)
    text = p.codec.segments.decode(ids)
    assert text == SYSTEM + " USER: hi ASSISTANT: hello!</s>USER: and you? ASSISTANT:"
    reply = tok(" Fine.", add_special_tokens=False)["input_ids"]
    assert decode(reply + [2]) == "Fine."  # as `generate` shows a reply: EOS dropped, the leading space too
    system, _ = p.chat(msgs(("system", "Be terse."), ("user", "hi")))
    assert system == encode_generation_prompt([], "hi", tok, "Be terse.")  # a system message replaces the default
    developer, _ = p.chat([ChatMessage(role="developer", content="Be terse."), ChatMessage(role="user", content=[
        {"type": "text", "text": "h"}, {"type": "text", "text": "i"}])])
    assert developer == system  # OpenAI's developer role is the system prompt; text parts are joined


@pytest.mark.parametrize("pairs,param", [
    ((("user", "a"), ("user", "b")), "messages[1].role"),
    ((("user", "a"), ("system", "s")), "messages[1].role"),
    ((("user", "a"), ("assistant", "b")), "messages[1].role"),
    ((("system", "s"), ("assistant", "b"), ("user", "c")), "messages[1].role"),
])
def test_bad_conversations_name_the_message(tok, pairs, param):
    with pytest.raises(PromptError) as e:
        Prompts(tok).chat(msgs(*pairs))
    assert e.value.param == param


def test_the_tokenizer_template_needs_one(tok):
    with pytest.raises(PromptError, match="no chat template") as e:
        Prompts(tok).chat(msgs(("user", "a")), "tokenizer")
    assert e.value.param == "template"


def test_completion_prompts_and_the_shared_prefix(tok):
    p = Prompts(tok)
    assert p.completion_ids("ab", 101) == tok("ab")["input_ids"] and p.completion_ids([5, 6], 101) == [5, 6]
    with pytest.raises(PromptError, match="outside the vocabulary"):
        p.completion_ids([5, 101], 101)
    [prefix] = p.shared_prefixes()  # the char tokenizer has no chat template: Vicuna's only
    assert p.chat(msgs(("user", "anything")))[0][:len(prefix)] == prefix
    assert p.codec.segments.decode(prefix) == SYSTEM + " USER: "
