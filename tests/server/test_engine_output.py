"""OutputProcessor: eos, ignore_eos, stop ids, min/max tokens, stop-string hold-back, on fake text."""
import itertools

from server.output import OutputProcessor, _held_back
from server.sampling import SamplingParams
from server.sequence import FinishReason, Sequence

EOS = 2
_ids = itertools.count()


class CharTokenizer:
    """Token id i >= 10 is the character chr(i); ids below 10 are specials and decode to ''."""

    eos_id = EOS

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i >= 10)

    def decode_continuation(self, ids):
        return self.decode(ids)


class Detok:
    def __init__(self, tok):
        self.tok = tok

    def push(self, ids):
        return self.tok.decode(ids)

    def flush(self):
        return ""


def setup(max_model_len=100, **params):
    proc = OutputProcessor(CharTokenizer(), max_model_len, Detok)
    seq = Sequence(next(_ids), "r", 0, [11, 12], 2, SamplingParams(**params), ())
    proc.start(seq)
    return proc, seq


def feed(proc, seq, text_or_ids):
    ids = [ord(c) for c in text_or_ids] if isinstance(text_or_ids, str) else text_or_ids
    for i in ids:
        done = proc.append(seq, i, None, None)
        if done:
            seq.finish_reason, seq.stop_reason = done
            return done
    return None


def test_eos_stops_unless_ignored_or_too_early():
    proc, seq = setup(max_tokens=10)
    assert feed(proc, seq, "ab") is None
    assert feed(proc, seq, [EOS]) == (FinishReason.STOP, None)
    assert proc.delta(seq, 2).text == "ab" and seq.output_ids == [ord("a"), ord("b"), EOS]
    proc, seq = setup(max_tokens=4, ignore_eos=True)
    assert feed(proc, seq, [EOS, EOS, EOS]) is None
    assert feed(proc, seq, [EOS]) == (FinishReason.LENGTH, None)
    proc, seq = setup(max_tokens=9, min_tokens=3)
    assert feed(proc, seq, [ord("a"), EOS]) is None  # before min_tokens eos is just a token
    assert feed(proc, seq, [EOS]) == (FinishReason.STOP, None)


def test_stop_token_ids_report_the_id():
    proc, seq = setup(stop_token_ids=[ord("x")], max_tokens=20)
    assert feed(proc, seq, "abx") == (FinishReason.STOP, ord("x"))
    assert proc.delta(seq, 2).text == "ab"


def test_max_model_len_ends_with_length():
    proc, seq = setup(max_model_len=5, max_tokens=None)
    assert feed(proc, seq, "abc") == (FinishReason.LENGTH, None)
    assert seq.num_tokens == 5


def test_hold_back_and_release():
    proc, seq = setup(stop=["STOP"], max_tokens=30)
    feed(proc, seq, "helloST")
    assert proc.delta(seq, 2).text == "hello"  # "ST" might start the stop string
    feed(proc, seq, "AX")
    assert proc.delta(seq, 2).text == "STAX"  # it did not: released
    assert feed(proc, seq, "STO") is None and proc.delta(seq, 2).text == ""
    assert feed(proc, seq, "P") == (FinishReason.STOP, "STOP")
    assert proc.delta(seq, 2).text == ""


def test_earliest_of_several_stop_strings_and_include():
    proc, seq = setup(stop=["cd", "bcde"], max_tokens=30, include_stop_str_in_output=True)
    assert feed(proc, seq, "abcd") == (FinishReason.STOP, "cd")
    assert proc.delta(seq, 2).text == "abcd"


def test_held_back_length():
    assert _held_back("xxab", ["abc"]) == 2
    assert _held_back("xxab", ["b", "abz"]) == 2
    assert _held_back("abc", ["abc"]) == 0  # a complete match is not held back, it is a stop
    assert _held_back("", ["abc"]) == 0
