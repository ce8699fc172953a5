"""Incremental detokenisation, stop sequences and streaming holdback."""

from edge_sdk.text import TextAssembler

PIECES = {0: b"", 1: b"hel", 2: b"lo", 3: b" wor", 4: b"ld", 5: b"\xc3", 6: b"\xa9", 7: b"\n\n", 8: b"END"}


def run(tokens, stop=()):
    asm = TextAssembler(PIECES.__getitem__, stop)
    released = [asm.add(t) for t in tokens]
    if not asm.stopped:
        released.append(asm.finish())
    return asm, released


def test_plain_text_is_released_token_by_token():
    asm, released = run([1, 2, 3, 4])
    assert released[:4] == ["hel", "lo", " wor", "ld"]
    assert asm.text == "hello world"


def test_multibyte_character_split_across_tokens():
    asm, released = run([5, 6, 1])
    assert released[0] == ""          # half a character is held back
    assert released[1] == "é"
    assert asm.text == "éhel"


def test_stop_sequence_cuts_text_and_stops():
    asm, released = run([1, 2, 7, 3], stop=["\n\n"])
    assert asm.stopped
    assert asm.text == "hello"
    assert "".join(released) == "hello"


def test_stop_sequence_spanning_tokens():
    asm, _ = run([1, 2, 3, 4], stop=["lo w"])
    assert asm.stopped and asm.text == "hel"


def test_possible_stop_prefix_is_held_back_then_released():
    asm = TextAssembler(PIECES.__getitem__, ["END!"])
    assert asm.add(1) == "hel"
    assert asm.add(8) == ""           # "END" may become "END!"
    assert asm.add(2) == "ENDlo"      # it did not
    assert not asm.stopped


def test_holdback_released_at_finish():
    asm = TextAssembler(PIECES.__getitem__, ["END!"])
    asm.add(8)
    assert asm.finish() == "END"
