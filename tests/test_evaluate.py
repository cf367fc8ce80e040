"""Metrics on hand-computed cases, and the model-level evaluate on a model whose answers are known."""
import math

import pytest
import torch

from manu_fast.data import SyntheticProfiles
from manu_fast.evaluate import (answer_probability, cloze_accuracy, cloze_correct, evaluate, mc_accuracy,
                                normalize_answer, rouge_l)


def test_mc_accuracy_hand_computed_ties_go_to_first():
    scores = torch.tensor([[0.1, 0.9, 0.0], [2.0, 2.0, 1.0], [0.0, 0.0, 3.0], [5.0, 1.0, 1.0]])
    assert mc_accuracy(scores, torch.tensor([1, 1, 2, 0])) == pytest.approx(0.75)  # row 2 ties -> option 0
    with pytest.raises(ValueError, match="option_scores"):
        mc_accuracy(scores, torch.tensor([0, 1]))


def test_answer_probability_is_the_softmax_entry():
    logits = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0]])
    p = answer_probability(logits, torch.tensor([1, 0]))
    torch.testing.assert_close(p, torch.tensor([0.75, 0.5], dtype=torch.float64))


def test_cloze_normalisation():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert cloze_correct("She was born in New York City.", "new york")
    assert not cloze_correct("She was born in Newark.", "New York")
    assert not cloze_correct("a cathedral", "cat")  # whole words only
    assert cloze_accuracy(["Paris, France", "Rome"], ["paris", "Madrid"]) == 0.5
    with pytest.raises(ValueError, match="empty cloze answer"):
        cloze_correct("x", "the")


def test_rouge_l_hand_computed():
    pytest.importorskip("rouge_score", reason="rouge-score is the 'eval' extra (absent on the offline GPU image)")
    # LCS("the cat sat on mat", "the cat lay on the mat") = the cat on mat = 4; P = 4/5, R = 4/6
    p, r = 4 / 5, 4 / 6
    assert rouge_l(["the cat sat on mat"], ["the cat lay on the mat"]) == pytest.approx(2 * p * r / (p + r))
    assert rouge_l(["a b", "x"], ["a b", "y"]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="as many"):
        rouge_l(["a"], [])


class _OracleModel(torch.nn.Module):
    """Puts logit `strength` on the right answer of the first `right` rows, on a wrong option elsewhere."""

    def __init__(self, batch, vocab, right):
        super().__init__()
        self.batch, self.vocab, self.right = batch, vocab, right

    def forward(self, input_ids, **kwargs):
        b, length = input_ids.shape
        logits = torch.zeros(b, length, self.vocab)
        wrong = self.batch.option_ids.gather(1, ((self.batch.answer_index + 1) % 4)[:, None]).squeeze(1)
        ids = torch.where(torch.arange(b) < self.right, self.batch.target_ids, wrong)
        logits[torch.arange(b), self.batch.answer_position, ids] = 5.0
        return type("Out", (), {"logits": logits})()


def test_evaluate_counts_right_answers_and_probability():
    d = SyntheticProfiles(num_people=4)
    batch = d.batch(d.questions([0, 1], (2,)), "text", 16)
    n = len(batch.questions)
    model = _OracleModel(batch, d.vocab_size, right=3)
    out = evaluate(model, {("forget", "text"): [batch]})["forget/text"]
    assert out["n"] == n and out["accuracy"] == pytest.approx(3 / n)
    p_hit = math.exp(5) / (math.exp(5) + d.vocab_size - 1)
    p_miss = 1 / (math.exp(5) + d.vocab_size - 1)
    assert out["answer_prob"] == pytest.approx((3 * p_hit + (n - 3) * p_miss) / n)
