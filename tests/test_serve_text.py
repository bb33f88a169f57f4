"""serve/text.py: incremental text, held-back tails, and OpenAI's stop-string cut (pure Python)."""

from flacuna_jax.serve.text import TextStream


def chars(ids):  # a toy tokenizer: id = a character's code point; 0xFFFD stands for an incomplete character
    return "".join(chr(i) for i in ids)


def ids(text):
    return [ord(c) for c in text]


def stream_all(text, stop, decode=chars):
    """The pieces a stream shows, token by token, and whether it stopped."""
    s, pieces = TextStream(decode, stop), []
    for n in range(1, len(text) + 1):
        pieces.append(s.push(ids(text[:n])))
        if s.stopped:
            return pieces, True
    pieces.append(s.finish(ids(text)))
    return pieces, False


def test_stop_string_cuts_before_it_and_pieces_concatenate_to_the_text():
    pieces, stopped = stream_all("Hello wor\nUSER: more", ["\nUSER:"])
    assert stopped and "".join(pieces) == "Hello wor"  # the stop string itself is not returned
    assert all("\n" not in p for p in pieces)  # a possible stop start was held back, never shown
    pieces, stopped = stream_all("no stop here", ["###"])
    assert not stopped and "".join(pieces) == "no stop here"


def test_the_first_occurrence_of_any_stop_wins():
    pieces, stopped = stream_all("a,b;c", [";", ","])
    assert stopped and "".join(pieces) == "a"


def test_a_held_tail_that_is_not_a_stop_is_released():
    pieces, stopped = stream_all("ab#c", ["##"])
    assert not stopped and "".join(pieces) == "ab#c"
    assert pieces[2] == ""  # "ab#": the "#" could start "##", so it waited
    s = TextStream(chars, ["##"])
    assert s.push(ids("ab#")) == "ab" and s.finish(ids("ab#")) == "#"  # the end releases it


def test_incomplete_characters_wait_for_the_rest():
    s = TextStream(chars)
    assert s.push([ord("x"), 0xFFFD]) == "x"
    assert s.push([ord("x"), ord("é")]) == "é"


def test_a_decode_that_rewrites_earlier_text_never_retracts_what_was_shown():
    texts = {1: "ab", 2: "aX", 3: "aXc"}
    s = TextStream(lambda i: texts[len(i)])
    shown = s.push([0]) + s.push([0, 0]) + s.finish([0, 0, 0])
    assert shown == s.text == "ab"  # the shown text stays a prefix of itself: stream == final
