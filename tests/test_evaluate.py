"""Metrics on hand-computed cases; the model calls (synthetic evaluate, greedy generation, answer losses) on models
whose answers are known, batched against one item at a time."""
import math

import pytest
import torch

import bench_files as bf
from manu_fast.datasets import BenchmarkItem, ImageRef
from manu_fast.synthetic import SyntheticProfiles
from manu_fast.evaluate import (answer_losses, answer_probability, cloze_hit, evaluate, first_letter, generate_texts,
                                harmonic_mean, mc_accuracy, mllmu_reply, normalized_probability, rouge,
                                truth_ratio)


def test_mc_accuracy_hand_computed_ties_go_to_first():
    scores = torch.tensor([[0.1, 0.9, 0.0], [2.0, 2.0, 1.0], [0.0, 0.0, 3.0], [5.0, 1.0, 1.0]])
    assert mc_accuracy(scores, torch.tensor([1, 1, 2, 0])) == pytest.approx(0.75)  # row 2 ties -> option 0
    with pytest.raises(ValueError, match="option_scores"):
        mc_accuracy(scores, torch.tensor([0, 1]))


def test_answer_probability_is_the_softmax_entry():
    logits = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0]])
    p = answer_probability(logits, torch.tensor([1, 0]))
    torch.testing.assert_close(p, torch.tensor([0.75, 0.5], dtype=torch.float64))


def test_mllmu_reply_rules():
    assert mllmu_reply("  B\nASSISTANT: C") == "B"
    assert first_letter(mllmu_reply(" b) pilot"), "ABCD") == "B"
    assert first_letter("Answer: B", "ABCD") == "A"  # eval.py reads the first character, whatever it is
    assert first_letter("E", "ABCD") is None and first_letter("", "ABCD") is None
    assert cloze_hit("She was born in New York City.", "new york")
    assert cloze_hit("a cathedral", "cat")  # eval.py: a substring, not a whole word
    assert not cloze_hit("She was born in Newark.", "New York")
    with pytest.raises(ValueError, match="empty cloze ground truth"):
        cloze_hit("x", " ")


def test_rouge_hand_computed():
    pytest.importorskip("rouge_score", reason="rouge-score is the 'eval' extra (absent on the offline GPU image)")
    # LCS("the cat sat on mat", "the cat lay on the mat") = the cat on mat = 4; P = 4/5, R = 4/6
    p, r = 4 / 5, 4 / 6
    got = rouge(["the cat sat on mat"], ["the cat lay on the mat"])
    assert got["rougeL"] == pytest.approx(2 * p * r / (p + r)) and got["rouge1"] == pytest.approx(2 * p * r / (p + r))
    assert got["rouge2"] == pytest.approx(2 * (1 / 4) * (1 / 5) / (1 / 4 + 1 / 5))  # one shared bigram: "the cat"
    assert rouge(["the cat sat on mat"], ["the cat lay on the mat"], "recall")["rougeL"] == pytest.approx(r)
    assert rouge(["a b", "x"], ["a b", "y"])["rougeL"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="as many"):
        rouge(["a"], [])
    with pytest.raises(ValueError, match="measure"):
        rouge(["a"], ["a"], "f1")


def test_truth_ratio_probability_and_utility_hand_computed():
    # CLEAR: the perturbed losses averaged over the task (2, 4, 3 -> 3), then r_i = e^(3 - paraphrased_i)
    assert truth_ratio([1.0, 4.0], [[2.0, 4.0], [3.0]], forget=True) == pytest.approx(
        (math.exp(-2) + math.exp(-1)) / 2)
    assert truth_ratio([3 - math.log(2), 3 - math.log(0.5)], [[2.0, 4.0], [3.0]], forget=False) == pytest.approx(
        (0.5 + 0.0) / 2)
    assert normalized_probability(1.0, [2.0, 4.0]) == pytest.approx(
        math.exp(-1) / (math.exp(-1) + math.exp(-2) + math.exp(-4)))
    assert harmonic_mean([0.5, 0.25, 1.0]) == pytest.approx(3 / (2 + 4 + 1))
    assert harmonic_mean([0.5, 0.0]) == 0.0
    with pytest.raises(ValueError, match="paraphrased and perturbed"):
        truth_ratio([1.0], [[]], forget=True)
    with pytest.raises(ValueError, match="non-negative"):
        harmonic_mean([0.5, -1.0])


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


@pytest.fixture(scope="module")
def rigged():
    processor = bf.processor()
    return processor, bf.rigged_model(processor), bf.model(processor)


def _items(modality):
    image = ImageRef(bf.image_struct((7, 8, 9)), "x") if modality == "multimodal" else None
    answers = ["B", "Ana Reyes", "a small cat", "pilot B pilot"]
    return [BenchmarkItem(str(k), None, modality, q, a, image) for k, (q, a) in
            enumerate(zip(["What is the job of this person?", "Where was this person born?", "q", "Who?"], answers))]


@pytest.mark.parametrize("modality", ["multimodal", "text"])
def test_answer_losses_by_hand_and_batched(rigged, modality):
    """Rigged model: the answer turn's tokens, its closing </s> included, cost what ``bf.rigged_loss`` says.
    The random model: batched (right-padded) losses equal the losses of one item at a time."""
    processor, model, random_model = rigged
    items = _items(modality)
    want = [bf.rigged_loss(item.answer, len(processor.tokenizer)) for item in items]
    assert answer_losses(model, processor, items, batch_size=3) == pytest.approx(want, rel=1e-6)
    batched = answer_losses(random_model, processor, items, batch_size=4)
    alone = [answer_losses(random_model, processor, [i], batch_size=1)[0] for i in items]
    assert batched == pytest.approx(alone, rel=1e-5)


def test_generate_texts_left_padded_batches_match_single_prompts(rigged):
    processor, model, random_model = rigged
    image = ImageRef(bf.image_struct((7, 8, 9)), "x")
    requests = [("USER: <image>\nWhat is the job of this person?\nASSISTANT:", [image]),
                ("USER: <image>\nA <image>\nWhat is the job of this person? chef pilot\nASSISTANT:", [image, image]),
                ("USER: <image>\nB\nASSISTANT:", [image])]
    assert generate_texts(model, processor, requests, max_new_tokens=3, batch_size=2) == ["B"] * 3
    batched = generate_texts(random_model, processor, requests, max_new_tokens=4, batch_size=3)
    alone = [generate_texts(random_model, processor, [r], max_new_tokens=4, batch_size=1)[0] for r in requests]
    assert batched == alone
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_texts(model, processor, requests, max_new_tokens=0, batch_size=1)
