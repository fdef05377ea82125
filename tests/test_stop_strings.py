"""Stop strings across arbitrary delta boundaries: nothing leaks, nothing held back needlessly."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from qwen_jax.stop_strings import StopStringMatcher

# A small alphabet so that stop strings and their partial matches occur often.
ALPHABET = "ab<|>é"
texts = st.text(alphabet=ALPHABET, max_size=40)
stop_lists = st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=5), min_size=1, max_size=4)


def first_stop(text: str, stops) -> int | None:
    """Where the text ends: at the start of the stop string that completes first (ties: the one
    that starts first), as a generator that checks after every token would see it."""
    hits = [(i + len(s), i) for s in stops if (i := text.find(s)) >= 0]
    return min(hits)[1] if hits else None


@st.composite
def split_text(draw):
    text = draw(texts)
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=12)))
    bounds = [0, *cuts, len(text)]
    return text, [text[a:b] for a, b in zip(bounds, bounds[1:])]


@given(split_text(), stop_lists)
def test_emitted_text_is_text_up_to_first_stop(split, stops):
    text, deltas = split
    m = StopStringMatcher(stops)
    cut = first_stop(text, stops)
    expected = text if cut is None else text[:cut]
    emitted, seen, stopped = "", "", False
    for delta in deltas:
        out, stopped = m.push(delta)
        emitted += out
        seen += delta
        # Never past the first stop, never a stop string in what was sent.
        assert expected.startswith(emitted)
        assert not any(s in emitted for s in stops)
        if not stopped:
            # Held back only what could still start a stop string (a proper prefix of one).
            held = seen[len(emitted) :]
            assert seen.startswith(emitted)
            assert held == "" or any(s.startswith(held) and s != held for s in stops)
        if stopped:
            break
    if stopped:
        assert emitted == expected
        assert m.flush() == ""
    else:
        assert cut is None  # all text was pushed, so a stop in it would have been found
        emitted += m.flush()
        assert emitted == seen == text


def test_the_stop_that_completes_first_wins_however_the_text_is_split():
    """'>' completes at index 2, before '<><' (which starts earlier) completes at 3."""
    for deltas in (["<><"], ["<>", "<"], ["<", "><"], ["<", ">", "<"]):
        m = StopStringMatcher([">", "<><"])
        emitted = ""
        for d in deltas:
            out, stopped = m.push(d)
            emitted += out
            if stopped:
                break
        assert (emitted, stopped) == ("<", True), deltas


def test_stop_split_across_deltas_is_dropped():
    m = StopStringMatcher(["<|im_end|>"])
    assert m.push("Hello <|im") == ("Hello ", False)
    assert m.push("_end|> trailing") == ("", True)
    assert m.push("more") == ("", True)
    assert m.flush() == ""


def test_false_alarm_is_released():
    m = StopStringMatcher(["STOP"])
    assert m.push("ST") == ("", False)
    assert m.push("ART") == ("START", False)
    assert m.push("S") == ("", False)
    assert m.flush() == "S"


def test_earliest_of_several_stops_wins():
    m = StopStringMatcher(["world", "lo w"])
    out, stopped = m.push("hello world")
    assert (out, stopped) == ("hel", True)


def test_no_stops_passes_everything_through():
    m = StopStringMatcher([])
    assert m.push("abc") == ("abc", False)
    assert m.flush() == ""


def test_empty_stop_strings_are_ignored():
    m = StopStringMatcher(["", "x"])
    assert m.push("abc") == ("abc", False)
    assert m.push("yxz") == ("y", True)


def test_non_ascii_stop():
    m = StopStringMatcher(["。\n"])
    assert m.push("你好。") == ("你好", False)
    assert m.push("\n再见") == ("", True)


@given(split_text(), stop_lists)
def test_with_include_the_text_ends_after_the_first_stop_and_names_it(split, stops):
    """vLLM's include_stop_str_in_output: the same cut, moved past the stop string that made it."""
    text, deltas = split
    hits = [(i + len(s), i, s) for s in stops if (i := text.find(s)) >= 0]
    m = StopStringMatcher(stops, include=True)
    emitted, stopped = "", False
    for delta in deltas:
        out, stopped = m.push(delta)
        emitted += out
        if stopped:
            break
    if hits:
        end, _, stop = min(hits)
        assert stopped and emitted == text[:end] and m.matched == stop
    else:
        assert not stopped and m.matched is None
        assert emitted + m.flush() == text


@given(split_text(), stop_lists, st.integers(0, 12))
def test_no_stop_ends_in_the_text_pushed_without_matching(split, stops, unmatched):
    """min_tokens (vLLM's): the first deltas are pushed with match=False. The text then ends at
    the first stop string that ends after them, which may begin inside them; none that ends
    inside them counts."""
    text, deltas = split
    boundary = len("".join(deltas[:unmatched]))
    hits = [(i + len(s), i) for s in stops
            if (i := text.find(s, max(0, boundary - len(s) + 1))) >= 0]
    expected = text[: min(hits)[1]] if hits else text
    m = StopStringMatcher(stops)
    emitted, stopped = "", False
    for k, delta in enumerate(deltas):
        out, stopped = m.push(delta, match=k >= unmatched)
        emitted += out
        assert expected.startswith(emitted)
        if stopped:
            break
    if not stopped:
        emitted += m.flush()
    assert emitted == expected and stopped == bool(hits)
