"""Scheduler decisions with exact page ids: budgets, chunked prefill, preemption order."""

from jpaged.core.block_manager import BlockManager
from jpaged.sampling_params import SamplingParams
from jpaged.core.scheduler import Scheduler
from jpaged.core.sequence import Sequence, SequenceStatus


def seq(request_id, num_prompt):
    return Sequence(request_id, 0, list(range(num_prompt)), SamplingParams(), seed=0, max_tokens=64)


def run_step(sched, out, token=7):
    """What the engine does after the device step: advance and append a sampled token."""
    running = {q.seq_id: q for q in sched.running}
    for s in out.scheduled:
        running[s.seq_id].num_computed_tokens += s.num_new_tokens
        if s.samples:
            running[s.seq_id].token_ids.append(token)


def test_prefill_then_decode_in_one_batch():
    bm = BlockManager(num_pages=10, page_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=16)
    a, b = seq("a", 6), seq("b", 3)
    sched.add(a)
    out = sched.schedule()
    assert [(s.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 6)]
    assert a.block_table == [1, 2]
    run_step(sched, out)
    sched.add(b)
    out = sched.schedule()
    # a decodes one token, b prefills in the same step
    assert [(s.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 3)]
    assert b.block_table == [3]
    assert all(s.samples for s in out.scheduled)


def test_chunked_prefill_within_token_budget():
    bm = BlockManager(num_pages=10, page_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=8)
    a = seq("a", 19)
    sched.add(a)
    chunks = []
    for _ in range(3):
        out = sched.schedule()
        chunks.append((out.scheduled[0].num_new_tokens, out.scheduled[0].samples))
        run_step(sched, out)
    assert chunks == [(8, False), (8, False), (3, True)]
    assert a.num_output_tokens == 1
    assert a.block_table == [1, 2, 3, 4, 5]


def test_max_num_seqs_limits_admission():
    bm = BlockManager(num_pages=20, page_size=4)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=64)
    for name in "abc":
        sched.add(seq(name, 2))
    out = sched.schedule()
    assert [s.request_id for s in out.scheduled] == ["a", "b"]
    assert [s.request_id for s in sched.waiting] == ["c"]


def test_preempts_newest_and_resumes_it_first():
    bm = BlockManager(num_pages=5, page_size=2)      # 4 usable pages
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=32)
    a, b = seq("a", 4), seq("b", 4)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert (a.block_table, b.block_table) == ([1, 2], [3, 4])
    run_step(sched, out)
    # both need a third page now; none is free: b (newest) is preempted, a gets b's page back
    out = sched.schedule()
    assert [s.request_id for s in out.scheduled] == ["a"]
    assert out.preempted == [b.seq_id]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert a.block_table == [1, 2, 4]
    assert list(sched.waiting) == [b]
    assert sched.num_preemptions == {"recompute": 1, "swap": 0}
    run_step(sched, out)
    # a finishes; b is recomputed from scratch: prompt + its one output token
    sched.finish(a, "length")
    out = sched.schedule()
    assert [(s.request_id, s.num_new_tokens) for s in out.scheduled] == [("b", 5)]
    assert b.block_table == [3, 4, 2]              # free list was [3] + a's [4, 2, 1]
    sched.finish(b, "length")
    assert bm.all_free()


def test_running_sequence_preempts_itself_when_alone_at_the_end():
    bm = BlockManager(num_pages=4, page_size=2)      # 3 usable pages
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=32)
    a, b = seq("a", 2), seq("b", 4)
    sched.add(a)
    sched.add(b)
    run_step(sched, sched.schedule())
    assert (a.block_table, b.block_table) == ([1], [2, 3])
    out = sched.schedule()                           # a needs page 2 of its own: b goes
    assert out.preempted == [b.seq_id]
    assert [s.request_id for s in out.scheduled] == ["a"]
    assert a.block_table == [1, 3]


def test_preempt_all_running_requeues_in_order_and_frees_every_page():
    bm = BlockManager(num_pages=10, page_size=4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=64)
    a, b, c = seq("a", 6), seq("b", 3), seq("c", 2)
    for s in (a, b, c):
        sched.add(s)
    run_step(sched, sched.schedule())
    assert (a.block_table, b.block_table, a.num_computed_tokens) == ([1, 2], [3], 6)
    assert sched.preempt_all_running() == [a.seq_id, b.seq_id]
    assert list(sched.waiting) == [a, b, c] and not sched.running
    assert all(s.status is SequenceStatus.WAITING and s.num_computed_tokens == 0 for s in (a, b))
    assert bm.all_free() and sched.num_preemptions == {"recompute": 2, "swap": 0}
    # Recomputed from scratch (prompt + the output so far), on pages from the back of the free list.
    out = sched.schedule()
    assert [(s.request_id, s.num_computed_tokens, s.num_new_tokens) for s in out.scheduled] == [
        ("a", 0, 7), ("b", 0, 4)]
    assert (a.block_table, b.block_table) == ([4, 5], [6])


def request(request_id, num_prompt, n):
    """Sample 0 of an n-sample request, holding the other samples as pending forks."""
    first = seq(request_id, num_prompt)
    first.pending_forks = [Sequence(request_id, i, list(range(num_prompt)), SamplingParams(),
                                    seed=i, max_tokens=64) for i in range(1, n)]
    return first


def test_n_samples_fork_when_the_prompt_is_done_and_copy_on_write_their_last_page():
    bm = BlockManager(num_pages=16, page_size=4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=4)
    a = request("a", 6, n=3)
    b = seq("b", 2)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()                      # a's first chunk: 4 of 6 prompt tokens
    assert [(s.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 4)]
    run_step(sched, out)
    out = sched.schedule()                      # a's last 2 prompt tokens, forks, and b
    rows = [(s.request_id, s.num_computed_tokens, s.num_new_tokens, s.block_table, s.samples)
            for s in out.scheduled]
    assert rows == [("a", 4, 2, (1, 2), True), ("a", 6, 0, (1, 2), True),
                    ("a", 6, 0, (1, 2), True), ("b", 0, 2, (3,), True)]
    assert bm.refcounts[1:4] == [3, 3, 1] and out.pages_to_copy == []
    run_step(sched, out)                        # every sample appends its own token at 6
    out = sched.schedule()
    # Each writes position 6 in shared page 2: the first two get copies, the last writes in place.
    assert out.pages_to_copy == [(2, 4), (2, 5)]
    assert [s.block_table for s in out.scheduled] == [(1, 4), (1, 5), (1, 2), (3,)]
    assert bm.refcounts[1:6] == [3, 1, 1, 1, 1]


def test_waiting_requests_are_admitted_while_a_request_prefills_for_its_samples():
    """No head-of-line blocking: the pending samples hold seats, not the queue."""
    bm = BlockManager(num_pages=32, page_size=4)
    sched = Scheduler(bm, max_num_seqs=5, max_num_batched_tokens=8)
    sched.add(request("big", 20, n=4))
    sched.add(seq("small", 3))
    sched.add(seq("late", 3))
    out = sched.schedule()
    assert [(s.request_id, s.num_new_tokens) for s in out.scheduled] == [("big", 8)]
    run_step(sched, out)
    out = sched.schedule()                     # big continues; small fits its seat and budget
    assert [(s.request_id, s.num_new_tokens) for s in out.scheduled] == [("big", 8)]
    run_step(sched, out)
    out = sched.schedule()
    assert [(s.request_id, s.num_new_tokens) for s in out.scheduled] == [
        ("big", 4), ("big", 0), ("big", 0), ("big", 0), ("small", 3)]
    assert [s.request_id for s in sched.waiting] == ["late"]   # 5 seats: 4 samples + small


def test_swap_preemption_moves_pages_to_the_host_and_back_before_waiting_requests():
    bm = BlockManager(num_pages=5, page_size=2, enable_prefix_caching=False, num_host_pages=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=32, preemption_mode="swap")
    a, b, c = seq("a", 4), seq("b", 4), seq("c", 2)
    sched.add(a)
    sched.add(b)
    run_step(sched, sched.schedule())
    assert (a.block_table, b.block_table) == ([1, 2], [3, 4])
    sched.add(c)
    out = sched.schedule()                      # a needs a third page: b goes to the host
    assert out.preempted == [b.seq_id] and out.swap_out == [(3, 3), (4, 2)]
    assert b.status is SequenceStatus.SWAPPED and b.num_computed_tokens == 4
    assert [s.request_id for s in out.scheduled] == ["a"] and list(sched.waiting) == [c]
    assert sched.num_preemptions == {"recompute": 0, "swap": 1}
    run_step(sched, out)
    sched.finish(a, "length")
    out = sched.schedule()                      # b comes back (before c) and decodes
    assert out.swap_in == [(3, 3), (2, 4)] and b.block_table == [3, 4, 2]   # free: 3, 4, 2, 1
    assert [(s.request_id, s.num_new_tokens) for s in out.scheduled] == [("b", 1), ("c", 2)]
    sched.finish(b, "length")
    sched.finish(c, "length")
    assert bm.all_free()


def test_swap_falls_back_to_recompute_when_the_host_pool_is_full(caplog):
    bm = BlockManager(num_pages=5, page_size=2, enable_prefix_caching=False, num_host_pages=1)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=32, preemption_mode="swap")
    a, b = seq("a", 4), seq("b", 4)
    sched.add(a)
    sched.add(b)
    run_step(sched, sched.schedule())
    out = sched.schedule()
    assert out.preempted == [b.seq_id] and out.swap_out == []
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0
    assert sched.num_preemptions == {"recompute": 1, "swap": 0}
    assert "swap space full (1 free host pages, sequence" in caplog.text
