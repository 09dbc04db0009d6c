"""The scheduler's whole step life cycle with exact page ids and refcounts: schedule() picks the
batch, update_from_output() applies a device result (made up here, row for row), and a
property-based run checks the block manager's invariants over random steps."""

from collections import Counter

import numpy as np
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from jpaged.core.beam_search import BeamSearch
from jpaged.core.block_manager import BlockManager
from jpaged.core.request import Request
from jpaged.core.scheduler import Scheduler, StepResult
from jpaged.core.sequence import SequenceStatus
from jpaged.sampling_params import SamplingParams

EOS = 1


def make_request(request_id, num_prompt, n=1, max_tokens=64, **params) -> Request:
    params = SamplingParams(n=n, max_tokens=max_tokens, **params)
    return Request.sampling(request_id, list(range(10, 10 + num_prompt)), params, 0, max_tokens)


def result_for(out, tokens=7) -> StepResult:
    """What the device would return: one token per row (an int for all, or a list per row)."""
    rows = tokens if isinstance(tokens, list) else [tokens] * len(out.scheduled)
    return StepResult(token_ids=np.array(rows, np.int32)[:, None])


def step(sched, tokens=7):
    out = sched.schedule()
    updates = sched.update_from_output(out, result_for(out, tokens))
    return out, updates


def test_prefill_then_decode_in_one_batch_with_pages_committed():
    bm = BlockManager(num_pages=10, page_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=16)
    a, b = make_request("a", 6), make_request("b", 3)
    sched.add_request(a)
    out, updates = step(sched)
    assert [(s.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 6)]
    assert a.seqs[0].block_table == [1, 2] and a.seqs[0].num_computed_tokens == 6
    assert a.seqs[0].output_token_ids == [7] and [u.new_token_ids for u in updates] == [[7]]
    assert a.seqs[0].num_committed_pages == 1 and set(bm.page_keys) == {1}   # page 1 is full
    sched.add_request(b)
    out, _ = step(sched)
    # a decodes one token, b prefills in the same step
    assert [(s.request_id, s.num_computed_tokens, s.num_new_tokens) for s in out.scheduled] == [
        ("a", 6, 1), ("b", 0, 3)]
    assert b.seqs[0].block_table == [3] and all(s.samples for s in out.scheduled)
    assert bm.refcounts[:4] == [0, 1, 1, 1]


def test_chunked_prefill_within_token_budget():
    bm = BlockManager(num_pages=10, page_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=8)
    a = make_request("a", 19)
    sched.add_request(a)
    chunks = []
    for _ in range(3):
        out, updates = step(sched)
        chunks.append((out.scheduled[0].num_new_tokens, out.scheduled[0].samples, len(updates)))
    assert chunks == [(8, False, 0), (8, False, 0), (3, True, 1)]
    assert a.seqs[0].output_token_ids == [7] and a.seqs[0].block_table == [1, 2, 3, 4, 5]


def test_max_num_seqs_limits_admission():
    bm = BlockManager(num_pages=20, page_size=4)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=64)
    for name in "abc":
        sched.add_request(make_request(name, 2))
    out = sched.schedule()
    assert [s.request_id for s in out.scheduled] == ["a", "b"]
    assert [s.request_id for s in sched.waiting] == ["c"]


def test_token_level_stops_in_vllm_order_and_requests_leave_the_registry():
    bm = BlockManager(num_pages=20, page_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64, eos_token_ids=(EOS,),
                      max_model_len=12)
    reqs = {"eos": make_request("eos", 3), "ignore": make_request("ignore", 3, ignore_eos=True),
            "stop_id": make_request("stop_id", 3, stop_token_ids=[5]),
            "min": make_request("min", 3, min_tokens=2),
            "length": make_request("length", 3, max_tokens=1),
            "model_len": make_request("model_len", 10)}
    for r in reqs.values():
        sched.add_request(r)
    # EOS for all but stop_id (token 5) and model_len, whose 11th token is 9
    step(sched, [EOS, EOS, 5, EOS, EOS, 9])
    finish = {name: (r.seqs[0].finish_reason, r.seqs[0].stop_reason) for name, r in reqs.items()}
    assert finish == {"eos": ("stop", None), "ignore": (None, None), "stop_id": ("stop", 5),
                      "min": (None, None), "length": ("length", None),
                      "model_len": (None, None)}
    assert set(sched.requests) == {"ignore", "min", "model_len"}
    step(sched, [EOS, EOS, 9])                 # min_tokens reached: EOS stops it now
    assert reqs["min"].seqs[0].finish_reason == "stop"
    assert reqs["model_len"].seqs[0].finish_reason == "length"      # 12 tokens = max_model_len
    assert reqs["ignore"].seqs[0].finish_reason is None
    sched.finish_sequence(reqs["ignore"].seqs[0], "stop", "a stop string")
    assert not sched.requests and not sched.has_unfinished() and bm.all_free()


def test_several_tokens_per_row_stop_at_the_first_stop():
    """A row may bring several tokens (speculative decoding); appending stops at a stop token."""
    bm = BlockManager(num_pages=10, page_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=16, eos_token_ids=(EOS,))
    a, b = make_request("a", 3), make_request("b", 3)
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    result = StepResult(token_ids=np.array([[4, EOS, 6], [4, 5, 6]], np.int32),
                        num_tokens=np.array([3, 2], np.int32))
    updates = sched.update_from_output(out, result)
    assert [u.new_token_ids for u in updates] == [[4, EOS], [4, 5]]
    assert a.seqs[0].finish_reason == "stop" and b.seqs[0].output_token_ids == [4, 5]


def test_logprobs_are_recorded_with_the_sampled_token_first():
    bm = BlockManager(num_pages=10, page_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=16)
    a = make_request("a", 3, logprobs=2)
    sched.add_request(a)
    out = sched.schedule()
    result = StepResult(token_ids=np.array([[9]], np.int32),
                        logprobs=np.array([[-2.0]], np.float32),
                        top_ids=np.array([[[3, 4, 9]]], np.int32),
                        top_logprobs=np.array([[[-0.5, -1.0, -2.0]]], np.float32))
    sched.update_from_output(out, result)
    [entry] = a.seqs[0].logprobs
    assert [(t, lp.logprob, lp.rank) for t, lp in entry.items()] == [
        (9, -2.0, None), (3, -0.5, 1), (4, -1.0, 2)]
    assert a.seqs[0].cumulative_logprob == -2.0


def test_preempts_newest_and_resumes_it_first():
    bm = BlockManager(num_pages=5, page_size=2, enable_prefix_caching=False)   # 4 usable pages
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=32)
    a, b = make_request("a", 4, max_tokens=2), make_request("b", 4)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)
    a0, b0 = a.seqs[0], b.seqs[0]
    assert (a0.block_table, b0.block_table) == ([1, 2], [3, 4])
    # both need a third page now; none is free: b (newest) is preempted, a gets b's page back
    out, _ = step(sched)
    assert [s.request_id for s in out.scheduled] == ["a"] and out.preempted == [b0.seq_id]
    assert b0.status is SequenceStatus.WAITING and b0.num_computed_tokens == 0
    assert b0.block_table == [] and list(sched.waiting) == [b0]
    assert (sched.stats.preemptions_recompute, sched.stats.preemptions_swap) == (1, 0)
    # a finished by length (2 tokens) and freed [4, 2, 1]; b is recomputed: prompt + its token
    assert a0.finish_reason == "length" and "a" not in sched.requests
    out, _ = step(sched)
    assert [(s.request_id, s.num_new_tokens) for s in out.scheduled] == [("b", 5)]
    assert b0.block_table == [3, 4, 2]             # free list was [3] + a's [4, 2, 1]


def test_preempt_all_running_requeues_in_order_and_frees_every_page():
    bm = BlockManager(num_pages=10, page_size=4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=64)
    a, b, c = make_request("a", 6), make_request("b", 3), make_request("c", 2)
    for r in (a, b, c):
        sched.add_request(r)
    step(sched)
    a0, b0 = a.seqs[0], b.seqs[0]
    assert (a0.block_table, b0.block_table, a0.num_computed_tokens) == ([1, 2], [3], 6)
    assert sched.preempt_all_running() == [a0.seq_id, b0.seq_id]
    assert list(sched.waiting) == [a0, b0, c.seqs[0]] and not sched.running
    assert all(s.status is SequenceStatus.WAITING and s.num_computed_tokens == 0 for s in (a0, b0))
    assert bm.all_free() and sched.stats.preemptions_recompute == 2
    # Recomputed from scratch (prompt + the output so far), on pages from the back of the free list.
    out = sched.schedule()
    assert [(s.request_id, s.num_computed_tokens, s.num_new_tokens) for s in out.scheduled] == [
        ("a", 0, 7), ("b", 0, 4)]
    assert (a0.block_table, b0.block_table) == ([4, 5], [6])


def test_n_samples_fork_when_the_prompt_is_done_and_copy_on_write_their_last_page():
    bm = BlockManager(num_pages=16, page_size=4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=4)
    a, b = make_request("a", 6, n=3), make_request("b", 2)
    sched.add_request(a)
    sched.add_request(b)
    out, _ = step(sched)                        # a's first chunk: 4 of 6 prompt tokens
    assert [(s.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 4)]
    out, updates = step(sched, [7, 8, 9, 5])    # a's last 2 prompt tokens, forks, and b
    rows = [(s.request_id, s.num_computed_tokens, s.num_new_tokens, s.block_table, s.samples)
            for s in out.scheduled]
    assert rows == [("a", 4, 2, (1, 2), True), ("a", 6, 0, (1, 2), True),
                    ("a", 6, 0, (1, 2), True), ("b", 0, 2, (3,), True)]
    assert [s.output_token_ids for s in a.seqs] == [[7], [8], [9]]
    assert [(u.seq.index, u.new_token_ids) for u in updates[:3]] == [(0, [7]), (1, [8]), (2, [9])]
    assert bm.refcounts[1:4] == [3, 3, 1]
    out, _ = step(sched)
    # Each writes position 6 in shared page 2: the first two get copies, the last writes in place.
    assert out.pages_to_copy == [(2, 4), (2, 5)]
    assert [s.block_table for s in out.scheduled] == [(1, 4), (1, 5), (1, 2), (3,)]
    assert bm.refcounts[1:6] == [3, 1, 1, 1, 1]
    sched.abort_request("a")
    assert bm.refcounts[1:6] == [0, 0, 1, 0, 0] and "a" not in sched.requests   # b keeps 3
    assert all(s.finish_reason == "abort" for s in a.seqs)


def test_abort_before_the_forks_frees_the_prompt_and_its_pending_samples():
    bm = BlockManager(num_pages=16, page_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=4)
    a = make_request("a", 6, n=3)
    sched.add_request(a)
    step(sched)                                # 4 of 6 prompt tokens: samples not forked yet
    assert a.seqs[0].pending_forks == a.seqs[1:]
    assert sched.abort_request("a") is a and sched.abort_request("a") is None
    assert [s.finish_reason for s in a.seqs] == ["abort"] * 3 and bm.all_free()
    assert not sched.has_unfinished()


def test_waiting_requests_are_admitted_while_a_request_prefills_for_its_samples():
    """No head-of-line blocking: the pending samples hold seats, not the queue."""
    bm = BlockManager(num_pages=32, page_size=4)
    sched = Scheduler(bm, max_num_seqs=5, max_num_batched_tokens=8)
    for r in (make_request("big", 20, n=4), make_request("small", 3), make_request("late", 3)):
        sched.add_request(r)
    out, _ = step(sched)
    assert [(s.request_id, s.num_new_tokens) for s in out.scheduled] == [("big", 8)]
    out, _ = step(sched)                        # big continues; small fits its seat and budget
    assert [(s.request_id, s.num_new_tokens) for s in out.scheduled] == [("big", 8)]
    out = sched.schedule()
    assert [(s.request_id, s.num_new_tokens) for s in out.scheduled] == [
        ("big", 4), ("big", 0), ("big", 0), ("big", 0), ("small", 3)]
    assert [s.request_id for s in sched.waiting] == ["late"]   # 5 seats: 4 samples + small


def test_beam_search_forks_chosen_parents_and_frees_the_dropped_ones():
    bm = BlockManager(num_pages=16, page_size=4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=16, eos_token_ids=(EOS,))
    search = BeamSearch(beam_width=2, max_tokens=8, eos_token_ids=(EOS,), length_penalty=1.0)
    params = SamplingParams(temperature=0.0, logprobs=search.num_candidates, max_tokens=8,
                            ignore_eos=True)
    beam = Request.beam_search("beam", [10, 11, 12, 13, 14], search, params)
    sched.add_request(beam)
    assert beam.seqs[0].seats == 2                  # the second beam's seat is held

    def candidates(out, per_row):
        k = search.num_candidates
        ids = np.zeros((len(out.scheduled), 1, k), np.int32)
        lps = np.full((len(out.scheduled), 1, k), -50.0, np.float32)
        for i, pairs in enumerate(per_row):
            ids[i, 0, :len(pairs)] = [t for t, _ in pairs]
            lps[i, 0, :len(pairs)] = [lp for _, lp in pairs]
        return StepResult(token_ids=ids[:, :, 0], top_ids=ids, top_logprobs=lps)

    out = sched.schedule()                          # the prompt: pages 1, 2
    sched.update_from_output(out, candidates(out, [[(20, -0.1), (21, -0.2)]]))
    first, second = beam.seqs                        # 20 extends the beam, 21 is a fork
    assert (first.output_token_ids, second.output_token_ids) == ([20], [21])
    assert first.block_table == second.block_table == [1, 2] and bm.refcounts[1:3] == [2, 2]
    assert first.extra_seats == 0 and second.status is SequenceStatus.RUNNING
    out = sched.schedule()                          # both write position 5 in shared page 2
    assert out.pages_to_copy == [(2, 3)]
    # Both best candidates extend the second beam: the first beam is dropped and freed.
    sched.update_from_output(out, candidates(out, [[(30, -5.0)], [(31, -0.1), (32, -0.2)]]))
    assert [s.output_token_ids for s in beam.seqs] == [[21, 31], [21, 32]]
    assert first.finish_reason == "abort" and first.block_table == []
    assert bm.refcounts[1:4] == [2, 2, 0]
    out = sched.schedule()
    # An EOS finishes one hypothesis; 2 finished hypotheses end the search (early stopping).
    sched.update_from_output(out, candidates(out, [[(EOS, -0.1), (40, -3.0)],
                                                   [(EOS, -0.2), (41, -3.0)]]))
    assert beam.finished and [h.output_tokens for h in beam.finished_beams] == [
        (21, 31, EOS), (21, 32, EOS)]
    assert "beam" not in sched.requests and bm.all_free() and not sched.has_unfinished()


def test_swap_preemption_moves_pages_to_the_host_and_back_before_waiting_requests():
    bm = BlockManager(num_pages=5, page_size=2, enable_prefix_caching=False, num_host_pages=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=32, preemption_mode="swap")
    a, b, c = make_request("a", 4, max_tokens=2), make_request("b", 4, max_tokens=2), \
        make_request("c", 2, max_tokens=1)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)
    b0 = b.seqs[0]
    assert (a.seqs[0].block_table, b0.block_table) == ([1, 2], [3, 4])
    sched.add_request(c)
    out, _ = step(sched)                        # a needs a third page: b goes to the host
    assert out.preempted == [b0.seq_id] and out.swap_out == [(3, 3), (4, 2)]
    assert b0.status is SequenceStatus.SWAPPED and b0.num_computed_tokens == 4
    assert [s.request_id for s in out.scheduled] == ["a"] and list(sched.waiting) == [c.seqs[0]]
    assert (sched.stats.preemptions_recompute, sched.stats.preemptions_swap) == (0, 1)
    assert a.finished                            # 2 tokens: its pages are free again
    out, _ = step(sched)                        # b comes back (before c) and decodes
    assert out.swap_in == [(3, 3), (2, 4)] and [(s.request_id, s.num_new_tokens)
                                                for s in out.scheduled] == [("b", 1), ("c", 2)]
    assert b.finished and c.finished and bm.all_free()
    assert (sched.stats.swapped_out_pages, sched.stats.swapped_in_pages) == (2, 2)


def test_swap_falls_back_to_recompute_when_the_host_pool_is_full(caplog):
    bm = BlockManager(num_pages=5, page_size=2, enable_prefix_caching=False, num_host_pages=1)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=32, preemption_mode="swap")
    a, b = make_request("a", 4), make_request("b", 4)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)
    out = sched.schedule()
    b0 = b.seqs[0]
    assert out.preempted == [b0.seq_id] and out.swap_out == []
    assert b0.status is SequenceStatus.WAITING and b0.num_computed_tokens == 0
    assert (sched.stats.preemptions_recompute, sched.stats.preemptions_swap) == (1, 0)
    assert "swap space full (1 free host pages, sequence" in caplog.text


def test_committed_pages_are_shared_by_a_later_request_with_the_same_prompt():
    bm = BlockManager(num_pages=12, page_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    first = make_request("first", 9, max_tokens=1)
    sched.add_request(first)
    step(sched)                                  # 9 prompt tokens: pages 1, 2 full and named
    assert first.finished and bm.all_free() and bm.num_cached_free_pages == 2
    again = make_request("again", 9, max_tokens=1)
    sched.add_request(again)
    out, _ = step(sched)
    assert [(s.num_computed_tokens, s.num_new_tokens, s.block_table) for s in out.scheduled] == [
        (8, 1, (1, 2, 4))]        # the prefix's own pages, then the front of the free list
    assert sched.stats.num_cached_tokens == 8
    assert (sched.stats.prefix_cache_queries, sched.stats.prefix_cache_hits) == (3, 2)  # 1st: a miss


class SchedulerMachine(RuleBasedStateMachine):
    """Random requests (n samples, beams), aborts and steps with random tokens: after every
    step the block manager's books balance, and draining everything frees every page."""

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(num_pages=12, page_size=2, num_host_pages=6)
        self.sched = Scheduler(self.bm, max_num_seqs=4, max_num_batched_tokens=8,
                               preemption_mode="swap", eos_token_ids=(EOS,), max_model_len=24)
        self.count = 0
        self.rng = np.random.default_rng(0)

    @rule(num_prompt=st.integers(1, 10), n=st.integers(1, 3), max_tokens=st.integers(1, 8),
          beam=st.booleans())
    def add(self, num_prompt, n, max_tokens, beam):
        request_id = f"r{self.count}"
        self.count += 1
        prompt = list(range(3, 3 + num_prompt))
        if beam:
            search = BeamSearch(2, max_tokens, (EOS,), 1.0)
            params = SamplingParams(temperature=0, logprobs=search.num_candidates,
                                    max_tokens=max_tokens, ignore_eos=True)
            self.sched.add_request(Request.beam_search(request_id, prompt, search, params))
        else:
            params = SamplingParams(n=n, max_tokens=max_tokens)
            self.sched.add_request(Request.sampling(request_id, prompt, params, 0, max_tokens))

    @rule(index=st.integers(0, 100))
    def abort(self, index):
        if self.sched.requests:
            ids = sorted(self.sched.requests)
            self.sched.abort_request(ids[index % len(ids)])

    @rule()
    def step(self):
        out = self.sched.schedule()
        rows, k = len(out.scheduled), 4
        top_ids = self.rng.integers(0, 6, size=(rows, 1, k)).astype(np.int32)
        top_lps = -np.sort(self.rng.random((rows, 1, k)).astype(np.float32), axis=-1)
        self.sched.update_from_output(out, StepResult(top_ids[:, :, 0], top_ids=top_ids,
                                                      top_logprobs=top_lps))

    @invariant()
    def books_balance(self):
        bm, sched = self.bm, self.sched
        holders = Counter(p for s in (*sched.running, *sched.waiting) for p in s.block_table)
        assert all(bm.refcounts[p] == holders.get(p, 0) for p in range(1, bm.num_pages))
        assert all(bm.refcounts[p] == 0 for p in bm.free_pages) and bm.refcounts[0] == 0
        assert len(bm.free_pages) + len(holders) == bm.num_usable_pages
        host = [p for s in sched.swapped for p in s.host_block_table]
        assert len(host) + len(bm.free_host_pages) == bm.num_host_pages
        live = {s.request_id for s in (*sched.running, *sched.waiting, *sched.swapped)}
        assert live == set(sched.requests)

    def teardown(self):
        for request_id in list(self.sched.requests):
            self.sched.abort_request(request_id)
        assert self.bm.all_free() and not self.sched.has_unfinished()


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_pages_behind_a_shared_sliding_window_are_released_as_sequences_advance():
    """Every layer attends within 4 positions: after each step the pages holding only positions
    the next token cannot see become the null page, and go back to the free list."""
    bm = BlockManager(num_pages=8, page_size=4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=8, sliding_window=4)
    a = make_request("a", 10)
    sched.add_request(a)
    seq = a.seqs[0]
    step(sched)                                 # positions 0..7 prefilled: the next sees 5..8
    assert seq.block_table == [0, 2] and bm.refcounts[:3] == [0, 0, 1]
    step(sched)                                 # 8, 9, then a token: the next (10) sees 7..10
    assert seq.block_table == [0, 2, 3] and seq.num_computed_tokens == 10
    step(sched)                                 # the next (11) sees 8..11: page 2 (4..7) goes
    assert seq.block_table == [0, 0, 3] and bm.refcounts[:4] == [0, 0, 0, 1]
    assert bm.num_free_pages == 6
    sched.abort_request("a")
    assert bm.all_free()
