"""Unlearning metrics: multiple-choice accuracy, probability of the right answer, cloze, ROUGE-L.

Pure functions on scores and strings, plus ``evaluate`` which runs a model over ``data.Batch`` lists for every
(split, modality) and reports the multiple-choice accuracy and the mean probability of the right answer.
"""
from __future__ import annotations

import re
import string

import torch


def mc_accuracy(option_scores: torch.Tensor, answer_index: torch.Tensor) -> float:
    """Fraction of rows whose highest-scoring option (logit or summed log-likelihood, (B, K)) is the right one.
    Ties go to the lowest option index (``argmax``)."""
    if option_scores.ndim != 2 or answer_index.shape != option_scores.shape[:1]:
        raise ValueError(f"need option_scores (B, K) and answer_index (B,), got {tuple(option_scores.shape)} "
                         f"and {tuple(answer_index.shape)}")
    return (option_scores.argmax(1) == answer_index.to(option_scores.device)).double().mean().item()


def answer_probability(logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """Probability (B,) the model gives the right answer token, softmax over the whole vocabulary of ``logits`` (B, V)."""
    if logits.ndim != 2 or target_ids.shape != logits.shape[:1]:
        raise ValueError(f"need logits (B, V) and target_ids (B,), got {tuple(logits.shape)} "
                         f"and {tuple(target_ids.shape)}")
    return logits.double().softmax(-1).gather(1, target_ids[:, None].to(logits.device)).squeeze(1)


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and articles removed, whitespace collapsed (the usual QA normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def cloze_correct(prediction: str, answer: str) -> bool:
    """A fill-in-the-blank answer is right when the normalised answer occurs in the normalised prediction."""
    expected = normalize_answer(answer)
    if not expected:
        raise ValueError(f"empty cloze answer {answer!r}")
    return f" {expected} " in f" {normalize_answer(prediction)} "


def cloze_accuracy(predictions, answers) -> float:
    predictions, answers = list(predictions), list(answers)
    if len(predictions) != len(answers) or not answers:
        raise ValueError(f"need as many predictions as answers (>= 1), got {len(predictions)} and {len(answers)}")
    return sum(cloze_correct(p, a) for p, a in zip(predictions, answers)) / len(answers)


def rouge_l(predictions, references) -> float:
    """Mean ROUGE-L F-measure (rouge-score package, stemming on) of predictions against references."""
    from rouge_score import rouge_scorer

    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references) or not references:
        raise ValueError(f"need as many predictions as references (>= 1), got {len(predictions)} "
                         f"and {len(references)}")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)) / len(references)


@torch.inference_mode()
def answer_logits(model, batch) -> torch.Tensor:
    """Next-token logits (B, V) at each row's answer position (``profile_mask`` is not a model input)."""
    inputs = {k: v for k, v in batch.inputs.items() if k != "profile_mask"}
    logits = model(**inputs).logits
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, batch.answer_position.to(logits.device)].float()


def evaluate_batches(model, batches) -> dict:
    """{"accuracy", "answer_prob", "n"} over ``batches`` (a list of ``data.Batch``), accuracy by option-logit argmax."""
    correct, prob, n = 0.0, 0.0, 0
    for batch in batches:
        logits = answer_logits(model, batch)
        option_logits = logits.gather(1, batch.option_ids.to(logits.device))
        b = option_logits.shape[0]
        correct += mc_accuracy(option_logits, batch.answer_index) * b
        prob += answer_probability(logits, batch.target_ids).sum().item()
        n += b
    if n == 0:
        raise ValueError("evaluate_batches got no questions")
    return {"accuracy": correct / n, "answer_prob": prob / n, "n": n}


def evaluate(model, data: dict) -> dict:
    """``data`` maps (split, modality) to a list of batches; returns {"split/modality": evaluate_batches(...)}."""
    was_training = model.training
    model.eval()
    try:
        return {f"{split}/{modality}": evaluate_batches(model, batches) for (split, modality), batches in data.items()}
    finally:
        model.train(was_training)


# ---- real benchmarks (MLLMU-Bench classification rows) through the model's own processor

def option_token_ids(processor, letters) -> list[int]:
    """The token each option letter is answered with: the first token after the generation prompt in the encoding
    of "<prompt> <letter>", the way answers are encoded for profiling (with SentencePiece, " A" encoded alone
    may split differently from " A" after the prompt)."""
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "?"}]}],
                                           add_generation_prompt=True)
    base = processor.tokenizer.encode(prompt, add_special_tokens=False)
    ids = []
    for letter in letters:
        full = processor.tokenizer.encode(f"{prompt} {letter}", add_special_tokens=False)
        if full[:len(base)] != base or len(full) == len(base):
            raise ValueError(f"option {letter!r} does not tokenize as a continuation of the generation prompt")
        ids.append(full[len(base)])
    if len(set(ids)) != len(ids):
        raise ValueError(f"the tokenizer maps option letters {list(letters)} to tokens {ids}, not all distinct")
    return ids


def evaluate_mc_items(model, processor, items, batch_size: int, device, dtype) -> dict:
    """{"accuracy", "answer_prob", "n"} of multiple-choice ``items`` of one modality: the model's next-token logits
    after the prompt, compared over the option letters' tokens (accuracy), and the softmax probability over the
    whole vocabulary of the right letter's token (answer_prob)."""
    from .data import encode_items
    width = max(len(i.options) for i in items)
    scores = torch.full((len(items), width), float("-inf"))  # options an item lacks never win
    right, probs, letter_ids = [], [], {}
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        enc = encode_items(processor, chunk, with_answer=False, device=device, dtype=dtype)
        with torch.inference_mode():
            logits = model(**enc, use_cache=False).logits
        rows = torch.arange(len(chunk), device=logits.device)
        last = logits[rows, enc["attention_mask"].sum(1).to(logits.device) - 1].float().cpu()  # right-padded
        targets = []
        for b, item in enumerate(chunk):
            letters = tuple(item.options)
            if letters not in letter_ids:
                letter_ids[letters] = option_token_ids(processor, letters)
            ids = letter_ids[letters]
            scores[start + b, :len(ids)] = last[b, ids]
            right.append(list(item.options).index(item.answer))
            targets.append(ids[right[-1]])
        probs.append(answer_probability(last, torch.tensor(targets)))
    return {"accuracy": mc_accuracy(scores, torch.tensor(right)), "answer_prob": torch.cat(probs).mean().item(),
            "n": len(items)}
