"""The on-device sampler: greedy, seeds, filters, penalties, min_tokens bans, logprobs."""

import functools

import jax
import numpy as np
import pytest

from jpaged.core.scheduler import ScheduledSeq
from jpaged.engine.sampler import build_sampling_tensors, sample
from jpaged.sampling_params import SamplingParams

V = 32
sample_jit = jax.jit(sample, static_argnames=("flags",))


M = 16    # max_model_len: the fixed width of the penalty ids


def make_seq(params, seed=0, prompt=(1, 2, 3), output=()):
    """The row the scheduler hands over for a sequence about to sample its next token."""
    token_ids = list(prompt) + list(output)
    return ScheduledSeq(seq_id=0, request_id="r", num_computed_tokens=len(token_ids) - 1,
                        num_new_tokens=1, token_ids=token_ids, num_prompt_tokens=len(prompt),
                        block_table=(1,), params=params, seed=seed)


def run(logits, seqs, eos=(0,)):
    tensors, flags = build_sampling_tensors(seqs, len(logits), V, M, eos)
    tokens, lp, top_ids, top_lp = sample_jit(np.asarray(logits, np.float32), tensors, flags=flags)
    return np.asarray(tokens), np.asarray(lp), top_ids, top_lp


@pytest.fixture
def logits():
    return np.random.default_rng(0).standard_normal((4, V)).astype(np.float32) * 3


def test_greedy_is_argmax(logits):
    seqs = [make_seq(SamplingParams(temperature=0, logprobs=0)) for _ in range(4)]
    tokens, lp, _, _ = run(logits, seqs)
    np.testing.assert_array_equal(tokens, logits.argmax(-1))
    expected = jax.nn.log_softmax(logits)[np.arange(4), tokens]
    np.testing.assert_allclose(lp, expected, rtol=1e-5)


def test_same_seed_same_token_whatever_the_batch(logits):
    p = SamplingParams(temperature=1.0)
    alone = run(logits[:1], [make_seq(p, seed=123)])[0][0]
    others = [make_seq(p, seed=s) for s in (5, 6, 7)]
    mixed = run(np.concatenate([logits[1:], logits[:1]]), others + [make_seq(p, seed=123)])[0]
    assert mixed[3] == alone


def test_sampling_follows_the_softmax():
    """2000 seeds on one distribution: frequencies pass a chi-square test (p > 0.001)."""
    from scipy.stats import chisquare
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    row = np.log(np.concatenate([probs, [1e-12] * (V - 4)])).astype(np.float32)
    seqs = [make_seq(SamplingParams(temperature=1.0), seed=s) for s in range(2000)]
    tokens = run(np.tile(row, (len(seqs), 1)), seqs)[0]
    assert np.all(tokens < 4)
    counts = np.bincount(tokens, minlength=4)
    assert chisquare(counts, probs * len(seqs)).pvalue > 1e-3, counts


def test_steps_change_the_draw():
    """One seed, 3200 output positions, a uniform distribution: every position draws anew, so the
    tokens are uniform over the vocabulary (chi-square, p > 0.001), not one token repeated."""
    from scipy.stats import chisquare
    steps = 3200
    seqs = [make_seq(SamplingParams(temperature=1.0), seed=9, output=[5] * k) for k in range(steps)]
    tokens = run(np.zeros((steps, V), np.float32), seqs)[0]
    counts = np.bincount(tokens, minlength=V)
    assert chisquare(counts).pvalue > 1e-3, counts


@pytest.mark.parametrize("params,allowed", [
    (SamplingParams(temperature=1.0, top_k=2), {0, 1}),
    (SamplingParams(temperature=1.0, top_p=0.6), {0, 1}),     # 0.4 + 0.3 >= 0.6
    (SamplingParams(temperature=1.0, top_p=0.3), {0}),
    (SamplingParams(temperature=1.0, min_p=0.6), {0, 1}),     # keeps p >= 0.6 * 0.4 = 0.24
])
def test_filters_limit_the_support(params, allowed):
    probs = np.array([0.4, 0.3, 0.2, 0.1] + [0.0] * (V - 4)) + 1e-12
    row = np.log(probs / probs.sum()).astype(np.float32)
    seqs = [make_seq(params, seed=s) for s in range(300)]
    tokens = set(run(np.tile(row, (len(seqs), 1)), seqs)[0].tolist())
    assert tokens == allowed


def test_greedy_rows_stay_greedy_next_to_sampled_rows(logits):
    seqs = [make_seq(SamplingParams(temperature=0)), make_seq(SamplingParams(temperature=2.0, top_k=5)),
            make_seq(SamplingParams(temperature=0)), make_seq(SamplingParams(temperature=0.5))]
    tokens = run(logits, seqs)[0]
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()


def test_repetition_penalty_demotes_seen_tokens():
    row = np.zeros((1, V), np.float32)
    row[0, 4], row[0, 9] = 2.0, 1.5
    seqs = [make_seq(SamplingParams(temperature=0, repetition_penalty=2.0), prompt=(4,))]
    assert run(row, seqs)[0][0] == 9                   # 2.0 / 2 = 1.0 < 1.5


def test_frequency_and_presence_penalties_count_output_tokens():
    row = np.zeros((1, V), np.float32)
    row[0, 4], row[0, 9] = 2.0, 1.0
    freq = make_seq(SamplingParams(temperature=0, frequency_penalty=0.6), output=(4, 4))
    assert run(row, [freq])[0][0] == 9                 # 2.0 - 2 * 0.6 = 0.8 < 1.0
    pres = make_seq(SamplingParams(temperature=0, presence_penalty=0.5), output=(4, 4))
    assert run(row, [pres])[0][0] == 4                 # 2.0 - 0.5 = 1.5 > 1.0


def test_min_tokens_bans_eos_and_stop_ids():
    row = np.zeros((1, V), np.float32)
    row[0, 0], row[0, 3], row[0, 5] = 9.0, 8.0, 1.0   # 0 is EOS, 3 a stop token id
    p = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[3])
    assert run(row, [make_seq(p, output=(7,))])[0][0] == 5
    assert run(row, [make_seq(p, output=(7, 7))])[0][0] == 0


def test_logit_bias_moves_only_its_own_row(logits):
    """vLLM's logit_bias: added to the logits before sampling (+100 forces a token, -100 bans
    the argmax) in its row only; the returned log-probs are the model's own."""
    target, top = 7, int(logits[1].argmax())
    seqs = [make_seq(SamplingParams(temperature=0, logprobs=0, logit_bias={target: 100.0})),
            make_seq(SamplingParams(temperature=0, logprobs=0, logit_bias={top: -100.0})),
            make_seq(SamplingParams(temperature=0, logprobs=0)),
            make_seq(SamplingParams(temperature=1.0, logit_bias={target: 100.0}), seed=3)]
    tokens, lp, _, _ = run(logits, seqs)
    second = np.argsort(logits[1])[-2]
    assert tokens.tolist() == [target, second, int(logits[2].argmax()), target]
    np.testing.assert_allclose(lp[0], jax.nn.log_softmax(logits[0])[target], rtol=1e-5)


def test_min_tokens_bans_eos_even_with_ignore_eos():
    """vLLM always adds the model's EOS to the ids banned under min_tokens."""
    row = np.zeros((2, V), np.float32)
    row[:, 0], row[:, 5] = 9.0, 1.0                     # 0 is EOS
    p = SamplingParams(temperature=0, min_tokens=2, ignore_eos=True)
    tokens = run(row, [make_seq(p, output=(7,)), make_seq(p, output=(7, 7))])[0]
    assert tokens.tolist() == [5, 0]                    # banned under min_tokens, free after


def test_penalty_and_ban_shapes_do_not_grow_with_the_output():
    """Fixed shapes: the same compiled sampler serves every output length."""
    traces = []

    @jax.jit
    def traced(logits, tensors):
        traces.append(1)
        return sample(logits, tensors, flags=flags)

    p = SamplingParams(temperature=0, repetition_penalty=1.3, min_tokens=12)
    for length in (1, 2, 5, 9):
        tensors, flags = build_sampling_tensors([make_seq(p, output=(4,) * length)], 2, V, M, (0,))
        assert tensors.token_ids.shape == (2, M) and tensors.banned.shape == (2, V)
        traced(np.zeros((2, V), np.float32), tensors)
    assert len(traces) == 1


def test_logprobs_top_k(logits):
    seqs = [make_seq(SamplingParams(temperature=0, logprobs=3)) for _ in range(4)]
    tokens, lp, top_ids, top_lp = run(logits, seqs)
    ref = np.asarray(jax.nn.log_softmax(logits))
    np.testing.assert_array_equal(np.asarray(top_ids)[:, 0], logits.argmax(-1))
    np.testing.assert_allclose(np.asarray(top_lp)[:, :3], -np.sort(-ref)[:, :3], rtol=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-1), "temperature must be >= 0"),
    (dict(top_p=0.0), "top_p must be in"),
    (dict(top_k=-5), "top_k must be"),
    (dict(max_tokens=0), "max_tokens must be at least 1"),
    (dict(n=0), "n must be"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"),
    (dict(logprobs=50), "logprobs must be"),
    (dict(stop=[""]), "stop must be"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(max_tokens="5"), r"max_tokens must be an int or None, got '5' \(str\)"),
    (dict(stop=5), r"stop must be a string, a list of strings or None, got 5 \(int\)"),
    (dict(stop=["a", 3]), r"stop must be a string, a list of strings or None, got \['a', 3\]"),
    (dict(temperature="hot"), r"temperature must be a number, got 'hot' \(str\)"),
    (dict(n=2.0), r"n must be an int, got 2.0 \(float\)"),
    (dict(seed="1"), r"seed must be an int or None, got '1' \(str\)"),
    (dict(ignore_eos="yes"), r"ignore_eos must be a bool, got 'yes' \(str\)"),
    (dict(stop_token_ids=[1, "2"]), r"stop_token_ids must be a list of ints or None"),
    (dict(logprobs=1.5), r"logprobs must be an int or None, got 1.5 \(float\)"),
    (dict(top_k=None), r"top_k must be an int, got None \(NoneType\)"),
    (dict(logit_bias={"a": 1.0}), r"logit_bias must be a dict of token id \(int\) -> bias"),
    (dict(logit_bias={5: float("inf")}), r"logit_bias must map non-negative token ids to finite"),
])
def test_bad_sampling_params_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
