"""Unlearning metrics, and the model calls behind them.

Pure functions: multiple-choice accuracy, the probability of the right answer, MLLMU-Bench's reply rules (first
letter, cloze hit), ROUGE, CLEAR's truth ratio, normalised probability and Model Utility (harmonic mean). Model
calls: ``evaluate`` (the synthetic benchmark's ``data.Batch`` lists), ``evaluate_mc_items`` (option-letter logits
after a chat-template prompt: our logit protocol), ``generate_texts`` (greedy continuations of raw prompts),
``answer_losses`` (mean negative log-likelihood per token of each answer turn, as CLEAR scores it). The benchmark
protocols built on them are in ``manu_fast.protocols``.
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


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


# ---------------------------------------------------------------------------------------------------- MLLMU-Bench rules
def mllmu_reply(continuation: str) -> str:
    """The reply MLLMU-Bench's ``eval.py`` reads from a generation: the text after the prompt's final "ASSISTANT:"
    up to any "ASSISTANT:" the model writes itself, stripped."""
    return continuation.split("ASSISTANT:")[0].strip()


def first_letter(reply: str, letters) -> str | None:
    """The answer letter of a classification reply (``eval.py``): its first character, upper-cased, if that is one
    of ``letters``, else None (no answer). "answer: B" therefore reads as "A"."""
    return reply[0].upper() if reply and reply[0].upper() in letters else None


def cloze_hit(reply: str, truth: str) -> bool:
    """A fill-in-the-blank reply is right when it contains the ground truth, case-insensitively (``eval.py``)."""
    if not truth.strip():
        raise ValueError(f"empty cloze ground truth {truth!r}")
    return truth.lower() in reply.lower()


def require_rouge():
    """The rouge-score package's scorer module, or an ImportError saying how to install it."""
    from .install import require
    return require("rouge_score.rouge_scorer", "ROUGE")


def rouge(predictions, references, measure: str = "fmeasure") -> dict:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L ``measure`` (fmeasure, recall or precision) of predictions against
    references, rouge-score with stemming (as both MLLMU-Bench and CLEAR score)."""
    scorer = require_rouge().RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references) or not references:
        raise ValueError(f"need as many predictions as references (>= 1), got {len(predictions)} "
                         f"and {len(references)}")
    if measure not in ("fmeasure", "recall", "precision"):
        raise ValueError(f"measure must be fmeasure, recall or precision, got {measure!r}")
    totals = dict.fromkeys(("rouge1", "rouge2", "rougeL"), 0.0)
    for p, r in zip(predictions, references):
        scores = scorer.score(r, p)
        for k in totals:
            totals[k] += getattr(scores[k], measure)
    return {k: v / len(references) for k, v in totals.items()}


# ---------------------------------------------------------------------------------------------------- CLEAR / TOFU rules
def truth_ratio(paraphrased_losses, perturbed_losses, forget: bool) -> float:
    """CLEAR's truth-ratio score of one task (``mm/calculate_metrics.py``), from mean per-token losses:
    ``paraphrased_losses`` one per item, ``perturbed_losses`` a list per item. Each item's ratio is
    r = exp(mean of all the task's perturbed losses - its paraphrased loss) (CLEAR averages the perturbed losses over
    the whole task, not per item); the score is mean(min(r, 1/r)) on forget data (1 when the model no longer prefers
    the truth) and mean(max(0, 1 - 1/r)) elsewhere (high when it does)."""
    paraphrased = list(paraphrased_losses)
    perturbed = [loss for losses in perturbed_losses for loss in losses]
    if not paraphrased or not perturbed:
        raise ValueError(f"truth_ratio needs paraphrased and perturbed losses, got {len(paraphrased)} "
                         f"and {len(perturbed)}")
    mean_perturbed = sum(perturbed) / len(perturbed)
    ratios = [math.exp(mean_perturbed - p) for p in paraphrased]
    values = [min(r, 1 / r) if forget else max(0.0, 1 - 1 / r) for r in ratios]
    return sum(values) / len(values)


def harmonic_mean(values) -> float:
    """The harmonic mean of non-negative ``values`` (0 if one is 0, as scipy's ``hmean``): CLEAR's Model Utility."""
    values = list(values)
    if not values or any(v < 0 for v in values):
        raise ValueError(f"harmonic_mean needs non-negative values, got {values}")
    return 0.0 if min(values) == 0 else len(values) / sum(1 / v for v in values)


def normalized_probability(true_loss: float, wrong_losses) -> float:
    """p(true) / (p(true) + sum p(wrong)), each p = exp(-mean per-token loss) (CLEAR's "Prob." of name and
    multiple-choice tasks)."""
    p_true = math.exp(-true_loss)
    return p_true / (p_true + sum(math.exp(-w) for w in wrong_losses))


# ---------------------------------------------------------------------------------------------------- synthetic benchmark
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


# ---------------------------------------------------------------------------------------------------- real benchmarks
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


def _batches(items: list, batch_size: int, desc: str, progress: bool):
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    starts = range(0, len(items), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        yield start, items[start:start + batch_size]


def evaluate_mc_items(model, processor, items, batch_size: int, device, dtype, progress: bool = False) -> dict:
    """{"accuracy", "answer_prob", "n"} of multiple-choice ``items`` of one modality: the model's next-token logits
    after the prompt, compared over the option letters' tokens (accuracy), and the softmax probability over the
    whole vocabulary of the right letter's token (answer_prob)."""
    from .datasets import encode_items
    width = max(len(i.options) for i in items)
    scores = torch.full((len(items), width), float("-inf"))  # options an item lacks never win
    right, probs, letter_ids = [], [], {}
    for start, chunk in _batches(items, batch_size, "multiple choice", progress):
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


@torch.inference_mode()
def generate_texts(model, processor, requests, max_new_tokens: int, batch_size: int, device=None, dtype=None,
                   progress: bool = False, desc: str = "generate") -> list[str]:
    """Greedy continuations of raw prompts: ``requests`` is a list of (text with image placeholders, the images it
    shows in order); each text is tokenized as the processor does by default (a Llama tokenizer adds BOS), left-padded
    in batches, and its first ``max_new_tokens`` generated tokens are decoded without special tokens."""
    from .datasets import encode_texts
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    pad = processor.tokenizer.pad_token_id
    if pad is None:
        pad = processor.tokenizer.eos_token_id
    out = []
    for _, chunk in _batches(requests, batch_size, desc, progress):
        images = [image for _, shown in chunk for image in shown]
        enc = encode_texts(processor, [text for text, _ in chunk], images or None, padding_side="left",
                           device=device, dtype=dtype)
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        out += processor.tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


@torch.inference_mode()
def answer_losses(model, processor, items, batch_size: int, device=None, dtype=None, progress: bool = False,
                  desc: str = "answer loss") -> list[float]:
    """Mean negative log-likelihood per token of each item's answer turn, scored as CLEAR scores it: the user turn
    and the answer as the assistant's turn through the chat template (``datasets.chat_texts`` with ``as_turn``), every
    token past the generation prompt's own encoding counted, the template's closing tokens (end-of-turn, end of
    sequence, a trailing space token) included. Items of one modality per call."""
    from .datasets import encode_items
    out = []
    for _, chunk in _batches(items, batch_size, desc, progress):
        full = encode_items(processor, chunk, with_answer=True, as_turn=True, device=device, dtype=dtype)
        prompt = encode_items(processor, chunk, with_answer=False)
        logits = model(**full, use_cache=False).logits
        ends = full["attention_mask"].sum(1).tolist()
        starts = prompt["attention_mask"].sum(1).tolist()
        for b, (start, end) in enumerate(zip(starts, ends)):
            ids = full["input_ids"][b]
            if end <= start or not torch.equal(ids[:start].cpu(), prompt["input_ids"][b, :start]):
                raise ValueError(f"{chunk[b].person_id}: the answer {chunk[b].answer!r} does not tokenize as a "
                                 f"continuation of its prompt")
            logp = logits[b, start - 1:end - 1].double().log_softmax(-1)
            out.append(-logp.gather(1, ids[start:end, None].to(logp.device)).mean().item())
    return out
