"""The continuous-batching policy on its own: a fake model step drives the scheduler as the engine does."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from llama4.inference.requests import QueueFull
from llama4.inference.scheduler import Scheduler


@dataclass(eq=False)
class FakeSeq:
    name: str
    prompt: list[int]
    max_new: int = 3
    whole: bool = False  # a prompt with images or scored: prefilled in full
    cached: int = 0  # prompt tokens the fake prefix cache holds for it
    cancelled: bool = False
    started: bool = False
    prefilled: int = 0
    pieces: int = 0
    tokens: list[int] = field(default_factory=list)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)

    @property
    def whole_prompt(self) -> bool:
        return self.whole

    def shares_prompt(self, other: FakeSeq) -> bool:
        return self.prompt == other.prompt and self.whole == other.whole


class FakeEngine:
    """The engine's iteration with a fake model: a piece moves ``prefilled`` on, a decode step gives every
    running row one token. ``step`` returns what happened, in order."""

    def __init__(self, max_batch: int = 2, max_queue: int = 8, prefill_chunk: int = 4, share_prompts: bool = True):
        self.consulted: list[str] = []
        self.scheduler = Scheduler(max_batch, max_queue, prefill_chunk, self.consult, share_prompts)

    def consult(self, seq: FakeSeq) -> None:
        self.consulted.append(seq.name)
        if not seq.whole_prompt:
            seq.prefilled = min(seq.cached, seq.prompt_len - 1)

    def add(self, *seqs: FakeSeq) -> None:
        for seq in seqs:
            self.scheduler.add(seq)

    def step(self) -> list[tuple]:
        s, log = self.scheduler, []
        log += [("cancelled", seq.name) for seq in s.admit()]
        prefilling, running = s.drop_cancelled()
        log += [("cancelled", seq.name) for seq in prefilling + running]
        log += [("joined", seq.name) for seq in s.join_short()]
        piece = s.next_piece()
        if piece is not None:
            log.append(("piece", piece.seq.name, piece.start, piece.size))
            piece.seq.prefilled += piece.size
            if piece.seq.prefilled == piece.seq.prompt_len:
                for seq in [*s.prefilled(piece.seq), piece.seq]:  # the twins first, as the engine admits them
                    log.append(("first", seq.name))
                    seq.tokens.append(0)
                    if len(seq.tokens) < seq.max_new:
                        s.join(seq)
        if s.running:
            log += [("token", seq.name) for seq in s.running]
            for seq in s.running:
                seq.tokens.append(len(seq.tokens))
            for seq in s.keep_rows([i for i, seq in enumerate(s.running) if len(seq.tokens) < seq.max_new]):
                log.append(("done", seq.name))
        return log

    def run(self, limit: int = 100) -> list[list[tuple]]:
        steps = []
        for _ in range(limit):
            if not (self.scheduler.waiting or self.scheduler.busy):
                return steps
            steps.append(self.step())
        raise AssertionError("the scheduler did not become idle")


def names(steps, kind: str) -> list[str]:
    return [e[1] for step in steps for e in step if e[0] == kind]


def test_admission_is_fifo_and_limited_by_the_batch():
    engine = FakeEngine(max_batch=2)
    seqs = [FakeSeq(name, [i, 2, 3]) for i, name in enumerate("abcd")]
    engine.add(*seqs)
    engine.step()
    assert {s.name for s in engine.scheduler.prefilling + engine.scheduler.running} == {"a", "b"}
    assert [s.name for s in engine.scheduler.waiting] == ["c", "d"]
    steps = engine.run()
    assert names(steps, "first") == ["b", "c", "d"]  # (a's came in the first step)
    assert all(len(s.tokens) == 3 for s in seqs)
    assert engine.consulted == ["a", "b", "c", "d"]


def test_a_full_queue_refuses_at_once_and_admission_makes_room():
    engine = FakeEngine(max_batch=1, max_queue=2)
    engine.add(FakeSeq("a", [1, 2]), FakeSeq("b", [1, 2]))
    with pytest.raises(QueueFull, match="2 waiting"):
        engine.scheduler.add(FakeSeq("c", [1, 2]))
    engine.step()  # a enters the batch: one place in the queue
    engine.scheduler.add(FakeSeq("c", [1, 2]))
    with pytest.raises(QueueFull):
        engine.scheduler.add(FakeSeq("d", [1, 2]))


def test_a_cancelled_waiting_request_never_runs():
    engine = FakeEngine(max_batch=1)
    a, b, c = FakeSeq("a", [1, 2, 3]), FakeSeq("b", [4, 5, 6]), FakeSeq("c", [7, 8, 9])
    engine.add(a, b, c)
    engine.step()
    b.cancelled = True
    steps = engine.run()
    assert ("cancelled", "b") in steps[0] and not b.pieces and not b.tokens
    assert "b" not in engine.consulted and names(steps, "first") == ["c"]


def test_cancelled_prefilling_and_running_sequences_leave_at_the_next_step():
    engine = FakeEngine(max_batch=3, prefill_chunk=2)
    running, other = FakeSeq("r", [1, 2], max_new=50), FakeSeq("o", [3, 4], max_new=50)
    prefilling = FakeSeq("p", list(range(9)))
    engine.add(running, other)
    engine.step()
    engine.step()
    engine.add(prefilling)
    engine.step()
    assert prefilling.pieces == 1 and [s.name for s in engine.scheduler.running] == ["r", "o"]
    running.cancelled = prefilling.cancelled = True
    log = engine.step()
    assert log[:2] == [("cancelled", "p"), ("cancelled", "r")]
    assert [s.name for s in engine.scheduler.running] == ["o"] and not engine.scheduler.prefilling
    assert ("token", "o") in log and prefilling.pieces == 1


def test_a_long_prompt_delays_running_rows_by_one_piece_per_step():
    engine = FakeEngine(max_batch=2, prefill_chunk=4)
    short, long_ = FakeSeq("short", [1, 2], max_new=100), FakeSeq("long", list(range(10)), max_new=3)
    engine.add(short)
    engine.step()
    engine.add(long_)
    steps = [engine.step() for _ in range(3)]
    for log in steps:  # each step: one piece of the long prompt, then the running row's token
        assert [e[0] for e in log if e[0] in ("piece", "token")][:2] == ["piece", "token"]
        assert ("token", "short") in log
    assert [e[2:] for log in steps for e in log if e[0] == "piece"] == [(0, 4), (4, 4), (8, 2)]
    # with its last piece it gets its first token and decodes in the same step
    assert steps[-1][-2:] == [("token", "short"), ("token", "long")] and len(long_.tokens) == 2


def test_prefill_is_first_come_first_served():
    engine = FakeEngine(max_batch=2, prefill_chunk=3)
    a, b = FakeSeq("a", list(range(7))), FakeSeq("b", list(range(5)))
    engine.add(a, b)
    steps = engine.run()
    pieces = [(e[1], e[2]) for log in steps for e in log if e[0] == "piece"]
    assert pieces == [("a", 0), ("a", 3), ("a", 6), ("b", 0), ("b", 3)]


def test_the_choices_of_n_share_one_prefill():
    engine = FakeEngine(max_batch=4, prefill_chunk=4)
    choices = [FakeSeq(f"n{i}", list(range(6))) for i in range(3)]
    other = FakeSeq("other", list(range(1, 7)))
    engine.add(*choices, other)
    log = engine.step()
    assert [e for e in log if e[0] == "piece"] == [("piece", "n0", 0, 4)]
    log = engine.step()
    assert [e for e in log if e[0] in ("piece", "first")] == [("piece", "n0", 4, 2), ("first", "n1"),
                                                               ("first", "n2"), ("first", "n0")]
    assert [s.name for s in engine.scheduler.running] == ["n1", "n2", "n0"]
    assert engine.scheduler.prefilling == [other] and not any(c.pieces for c in choices[1:])


def test_without_shared_prompts_each_choice_of_n_prefills_its_own():
    """A runner that cannot copy caches (context parallelism): the same prompt is prefilled once per sequence."""
    engine = FakeEngine(max_batch=4, prefill_chunk=8, share_prompts=False)
    engine.add(*[FakeSeq(f"n{i}", list(range(6))) for i in range(2)])
    pieces = [e for step in engine.run() for e in step if e[0] in ("piece", "first")]
    assert pieces == [("piece", "n0", 0, 6), ("first", "n0"), ("piece", "n1", 0, 6), ("first", "n1")]


def test_a_prompt_cached_but_for_its_last_token_joins_without_a_prefill():
    engine = FakeEngine(max_batch=3, prefill_chunk=4)
    hit = FakeSeq("hit", list(range(9)), cached=20)  # the store gives at most all but the last token
    partial = FakeSeq("partial", list(range(9)), cached=5)
    engine.add(partial, hit)
    log = engine.step()
    assert log[0] == ("joined", "hit") and ("piece", "partial", 5, 4) in log and hit.pieces == 0
    assert engine.consulted == ["partial", "hit"]


def test_whole_prompts_never_join_short_and_consult_at_their_first_piece():
    engine = FakeEngine(max_batch=3, prefill_chunk=4)
    text, image = FakeSeq("text", [1, 2, 3]), FakeSeq("image", [5, 6], whole=True, cached=20)
    twin = FakeSeq("twin", [5, 6], cached=20)  # the same tokens without images: not a twin of the image prompt
    engine.add(image, text, twin)
    log = engine.step()
    assert ("joined", "twin") in log and ("piece", "image", 0, 2) in log
    assert engine.consulted == ["text", "twin", "image"]
