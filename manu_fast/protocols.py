"""The benchmarks' evaluation protocols, on manu_fast's model calls (``manu_fast.evaluate``).

Each protocol returns ``{"split/modality": {task: metrics}}``; every metric is a mean over the questions counted in
its ``n``.

``logit`` (ours): each MLLMU-Bench classification question zero-shot through the model's chat template
("Question: ...\\nA. ...\\nAnswer:"); accuracy = the right letter has the highest next-token logit among the option
letters; ``answer_prob`` = its softmax probability over the vocabulary. Not comparable with published numbers.

``mllmu``: MLLMU-Bench's ``eval.py`` (github.com/franciscoliu/MLLMU-Bench), its raw LLaVA prompts and reply rules:

- classification: few-shot examples = every classification question of one person drawn from the evaluated split's
  IDs, read from ``Full_Set`` (in the drawn person's own rows the questions at the few-shot positions are not
  asked: ``skipped_few_shot``), then the question; prompt text pinned by ``classification_prompt``. Greedy
  generation; the answer is the first character of the reply, upper-cased (``evaluate.first_letter``); accuracy =
  that letter is right (``no_letter`` counts replies whose first character is no option letter);
- cloze (``Mask_Task``): "__" shown as "[Blank]" with eval.py's instruction, few-shot examples from two drawn
  people; right when the reply contains the ground truth, case-insensitively;
- generation (``Generation_Task``): zero-shot, 50 greedy tokens, ROUGE-1/2/L F-measure against the ground truth;
- splits: forget, retain, test (``Test_Set`` rows of the forget people, one of each person's renderings) and
  celebrity (``Retain_Set``); few-shot examples are shown on forget/retain/test (classification) and on every
  split (cloze), as eval.py's modes do.

Where eval.py is random (the few-shot people, Test_Set's rendering), the choice here is seeded (``seed``) and written
to the report. eval.py generates 50 tokens for a classification reply and reads its first character; here the
reply is cut at ``MLLMU_LETTER_TOKENS`` tokens (a reply blank for that long counts as no letter).

``clear``: CLEAR (``mm/eval.py``, ``mm/dataset.py``, ``config/mm/eval.yaml`` and ``mm/calculate_metrics.py`` of
github.com/somvy/multimodal_unlearning) on ``*_perturbed`` files, ``real_faces`` and ``real_world``, each task on
its first ``ds_size`` rows (eval.yaml: 300; 0 = all):

- losses: the mean per-token loss of an answer is taken over the whole assistant turn as the chat template renders
  it (``evaluate.answer_losses``: CLEAR's label mask, the template's closing tokens included);
- captions: the image and one of the nine caption questions; ``rougeL_recall`` of the greedy caption against the
  caption; ``prob`` = mean exp(-loss) of the caption; ``truth_ratio`` from the paraphrased caption against the
  perturbed captions (``evaluate.truth_ratio``: the perturbed losses averaged over the whole task, as
  ``calculate_metrics.py``; mean(min(r, 1/r)) on forget, mean(max(0, 1 - 1/r)) elsewhere);
- face_recognition: "The name of the person on the image is " with the image, against the name and
  ``perturbed_names``; ``prob`` = p(name) / (p(name) + sum p(wrong names)) (``evaluate.normalized_probability``);
- multiple_choice (``real_faces``, ``real_world``, its rows with and without image scored as one task, keyed
  ``real_world/mixed`` when both occur): the answer against the ``options``: ``accuracy`` (ours) = the answer has
  a lower mean token loss than every option that differs from it; ``prob``, ``truth_ratio``, ``rougeL_recall`` as
  for names;
- replies: greedy, from CLEAR's text prompt (``clear_text_prompt``: the encoded prompt and answer decoded without
  special tokens, so without the image, cut before the answer), or with ``generation_input="image"`` (ours) from
  the chat-template prompt with the image;
- Model Utility: the harmonic mean (``evaluate.harmonic_mean``) of ROUGE, Prob. and Truth Ratio of the non-forget
  tasks (Retain, Retain FaceRec, Real Faces, Real World: those run), as ``calculate_metrics.py``.

Differences from CLEAR's code: one caption question per row, fixed by ``seed`` (CLEAR draws anew each time a row
is read, also between the answer and the perturbed passes); an option equal to the answer is not a wrong option.
Where CLEAR's code does not run on current transformers (the LLaVA processor now expands ``<image>`` into the
image's tokens): the label mask counts the prompt's image tokens as expanded (CLEAR counts ``<image>`` as one
token, so its labels would start inside the prompt), and the perturbed pass keeps each answer's pixel values whole
(CLEAR flattens them to one row per answer).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from .datasets import (CLEAR_FACE_PROMPT, BenchmarkItem, ChoiceQuestion, ClearCaption, ClearChoice, DataError,
                         MllmuPerson, OpenQuestion, caption_question, chat_texts)
from .schema import CLEAR_DS_SIZE, GENERATION_INPUTS, MODALITIES, PROTOCOLS  # noqa: F401  (PROTOCOLS: public here too)
from .evaluate import (answer_losses, cloze_hit, evaluate_mc_items, first_letter, generate_texts, harmonic_mean,
                       mllmu_reply, normalized_probability, rouge, truth_ratio)

MLLMU_SPLITS = ("forget", "retain", "test", "celebrity")
MLLMU_CLASSIFICATION_SHOTS = 1  # eval.py: random.sample(id_list, 1) people for LLaVA's classification prompts
MLLMU_CLOZE_SHOTS = 2           # eval.py: random.sample(id_list, 2) for LLaVA's cloze prompts (1 for Idefics2)
CLASSIFICATION_FEW_SHOT_SPLITS = ("forget", "retain", "test")  # eval.py modes forget, retain_shared, test
MLLMU_LETTER_TOKENS = 8
MLLMU_NEW_TOKENS = 50  # eval.py's max_new_tokens
CLEAR_NEW_TOKENS = 300  # config/mm/eval.yaml generation.max_new_tokens
# calculate_metrics.py's names of the tasks (FILE_TO_TASK) and metrics in CLEAR's Model Utility: the non-forget ones
CLEAR_UTILITY_TASKS = {("retain", "captions"): "Retain", ("retain", "face_recognition"): "Retain FaceRec",
                       ("real_faces", "multiple_choice"): "Real Faces", ("real_world", "multiple_choice"): "Real World"}
CLEAR_UTILITY_METRICS = (("ROUGE", "rougeL_recall"), ("Prob.", "prob"), ("Truth Ratio", "truth_ratio"))
IMAGE = "<image>"  # eval.py's image placeholder, replaced by the processor's own image token
LETTER_INSTRUCTION = "Just give ONE letter representing the answer directly."
CLOZE_INSTRUCTION = "Please **ONLY** provide the correct answer that should replace the [Blank]."
GENERATION_INSTRUCTION = "Answer the question based on your trained knowledge in one sentence{} in ENGLISH."


# ---------------------------------------------------------------------------------------------------- logit protocol
def mc_prompt(question: str, options: dict[str, str]) -> str:
    """Our zero-shot multiple-choice prompt (the logit protocol), sent through the model's chat template."""
    return "\n".join([f"Question: {question}"] + [f"{k}. {v}" for k, v in options.items()] + ["Answer:"])


def run_logit(model, processor, splits: dict[str, list[MllmuPerson]], *, seed: int, batch_size: int, device=None,
              dtype=None, progress: bool = False) -> dict:
    """The logit protocol over the classification questions of ``splits`` ({split: people})."""
    results = {}
    for split, people in splits.items():
        for modality in MODALITIES:
            items = [BenchmarkItem(p.person_id, None, modality, mc_prompt(q.question, q.options), q.answer,
                                   p.image(seed) if modality == "multimodal" else None, q.options)
                     for p in people for q in p.classification[modality]]
            if not items:
                raise DataError(f"{people[0].where}: the {split} file has no {modality} classification questions")
            results[f"{split}/{modality}"] = {"classification": evaluate_mc_items(
                model, processor, items, batch_size, device, dtype, progress)}
    return results


# ------------------------------------------------------------------------------------------------ MLLMU-Bench prompts
def _head(multimodal: bool) -> str:
    return f"USER: {IMAGE}\n" if multimodal else "USER:\n"


def classification_shot(q: ChoiceQuestion, multimodal: bool) -> str:
    """One few-shot example of eval.py's classification prompt (options A-D, as eval.py writes them)."""
    missing = [k for k in "ABCD" if k not in q.options]
    if missing:
        raise ValueError(f"few-shot question {q.question!r} has no option {missing[0]} (eval.py's examples show A-D)")
    return (_head(multimodal) + f"Question: {q.question}\n" + "".join(f"{k}: {q.options[k]}\n" for k in "ABCD")
            + f"Correct Answer: {q.answer}\n")


def classification_prompt(q: ChoiceQuestion, multimodal: bool, shots=()) -> str:
    """eval.py's classification prompt: the few-shot examples, then "USER: <image>\\n" (or "USER:\\n"), the question,
    one "K: text" line per option, the instruction and "ASSISTANT:"."""
    options = "\n".join(f"{k}: {v}" for k, v in q.options.items())
    return ("".join(classification_shot(s, multimodal) for s in shots) + _head(multimodal)
            + f"{q.question}\n{options}\n{LETTER_INSTRUCTION}\nASSISTANT:")


def cloze_question(question: str) -> str:
    """A ``Mask_Task`` question as eval.py asks it: "__" shown as "[Blank]", then the instruction."""
    return question.replace("__", "[Blank]") + "\n" + CLOZE_INSTRUCTION


def cloze_prompt(q: OpenQuestion, shots=()) -> str:
    """eval.py's fill-in-the-blank prompt (``shots``: few-shot questions of the same modality)."""
    if q.modality == "multimodal":
        examples = "".join(f"USER:{IMAGE}\n{cloze_question(s.question)}\nCorrect Answer: {s.answer}\n" for s in shots)
        return f"{examples}USER: {IMAGE}\n{cloze_question(q.question)}\nASSISTANT:"
    examples = "".join(f"USER:\n{cloze_question(s.question)}\nCorrect Answer: {s.answer}\n" for s in shots)
    return f"{examples}USER:\n{cloze_question(q.question)}\nASSISTANT:"


def generation_prompt(q: OpenQuestion) -> str:
    """eval.py's generation prompt (its multimodal form says "accurately" and ends with a space, its text form not)."""
    if q.modality == "multimodal":
        return f"USER: {IMAGE}\n{q.question}\n{GENERATION_INSTRUCTION.format(' accurately')}\nASSISTANT: "
    return f"USER: {q.question}\n{GENERATION_INSTRUCTION.format('')}\nASSISTANT:"


# ----------------------------------------------------------------------------------------------- MLLMU-Bench requests
@dataclass
class Request:
    """One question to generate a reply for: ``prompt`` shows ``images`` (in order) at its image placeholders."""

    split: str
    modality: str
    task: str
    person_id: str
    index: int
    prompt: str
    images: list
    answer: str
    letters: tuple = ()


def people_of(people: list[MllmuPerson], wanted: list[MllmuPerson], what: str) -> list[MllmuPerson]:
    """The rows of ``people`` with the IDs of ``wanted``, in ``wanted``'s order (eval.py evaluates ``Test_Set`` on
    the forget split's people); a wanted ID that ``people`` lacks is an error."""
    by_id = {p.person_id: p for p in people}
    missing = [w for w in wanted if w.person_id not in by_id]
    if missing:
        raise DataError(f"{what} has no row with ID {missing[0].person_id!r} (a person of {missing[0].where})")
    return [by_id[w.person_id] for w in wanted]


def draw_people(ids: list[str], k: int, seed: int, split: str, task: str) -> list[str]:
    """``k`` of ``ids`` (eval.py: ``random.sample(id_list, k)``), seeded by ``seed``, the split and the task."""
    return random.Random(f"{seed}/{split}/{task}").sample(ids, min(k, len(ids)))


def _shot_people(drawn: list[str], full_set: list[MllmuPerson], split: str) -> list[MllmuPerson]:
    """The drawn people's Full_Set rows in Full_Set's order (eval.py filters Full_Set by the drawn IDs). A drawn
    person absent from Full_Set gives no examples on the celebrity split (as in eval.py, where Retain_Set's people
    are not in Full_Set) and is an error elsewhere."""
    found = [p for p in full_set if p.person_id in drawn]
    if split != "celebrity" and len(found) != len(drawn):
        missing = sorted(set(drawn) - {p.person_id for p in found})
        raise DataError(f"{full_set[0].where.rsplit(' row ', 1)[0]}: the few-shot file has no ID {missing[0]!r} "
                        f"(a person of the {split} split): pass MLLMU-Bench's Full_Set with --few-shot")
    return found


def mllmu_requests(splits: dict[str, list[MllmuPerson]], full_set: list[MllmuPerson], tasks, seed: int):
    """Every request of the mllmu protocol, and the report's ``few_shot`` ({split: {task: [IDs]}}) and
    ``skipped`` ({"split/modality": {task: questions not asked because they are few-shot examples}})."""
    requests, few_shot, skipped = [], {}, {}
    for split, people in splits.items():
        ids = [p.person_id for p in people]
        few_shot[split] = {}
        for modality in MODALITIES:
            skipped[f"{split}/{modality}"] = {}
        if "classification" in tasks:
            shots = _shot_people(draw_people(ids, MLLMU_CLASSIFICATION_SHOTS, seed, split, "classification"),
                                 full_set, split)
            few_shot[split]["classification"] = [p.person_id for p in shots]
            show = split in CLASSIFICATION_FEW_SHOT_SPLITS
            for modality in MODALITIES:
                mm = modality == "multimodal"
                examples = [q for p in shots for q in p.classification[modality]] if show else []
                example_images = ([p.image(seed) for p in shots for _ in p.classification[modality]]
                                  if mm and show else [])
                used = {p.person_id: len(p.classification[modality]) for p in shots}
                n_skipped = 0
                for person in people:
                    for k, q in enumerate(person.classification[modality]):
                        if k < used.get(person.person_id, 0):
                            n_skipped += 1
                            continue
                        requests.append(Request(split, modality, "classification", person.person_id, k,
                                                classification_prompt(q, mm, examples),
                                                example_images + [person.image(seed)] if mm else [], q.answer,
                                                tuple(q.options)))
                skipped[f"{split}/{modality}"]["classification"] = n_skipped
        if "cloze" in tasks:
            shots = _shot_people(draw_people(ids, MLLMU_CLOZE_SHOTS, seed, split, "cloze"), full_set, split)
            few_shot[split]["cloze"] = [p.person_id for p in shots]
            used = {(p.person_id, q.modality, q.index) for p in shots for q in p.cloze}
            n_skipped = dict.fromkeys(MODALITIES, 0)
            for person in people:
                for q in person.cloze:
                    if (person.person_id, q.modality, q.index) in used:
                        n_skipped[q.modality] += 1
                        continue
                    mm = q.modality == "multimodal"
                    examples = [s for p in shots for s in p.cloze if s.modality == q.modality]
                    images = [p.image(seed) for p in shots for s in p.cloze if s.modality == q.modality] if mm else []
                    requests.append(Request(split, q.modality, "cloze", person.person_id, q.index,
                                            cloze_prompt(q, examples), images + [person.image(seed)] if mm else [],
                                            q.answer))
            for modality in MODALITIES:
                skipped[f"{split}/{modality}"]["cloze"] = n_skipped[modality]
        if "generation" in tasks:
            for person in people:
                for q in person.generation:
                    requests.append(Request(split, q.modality, "generation", person.person_id, q.index,
                                            generation_prompt(q), [person.image(seed)] if q.modality == "multimodal"
                                            else [], q.answer))
    return requests, few_shot, skipped


def score_mllmu(requests: list[Request], replies: list[str], skipped: dict, tasks) -> dict:
    """{"split/modality": {task: metrics}} from the replies to ``requests`` (see the module docstring); a task with
    no question asked has n = 0 and None metrics."""
    groups = {}
    for request, reply in zip(requests, replies, strict=True):
        groups.setdefault((request.split, request.modality, request.task), []).append((request, mllmu_reply(reply)))
    results = {}
    for key in skipped:
        split, modality = key.split("/")
        results[key] = {}
        for task in tasks:
            pairs = groups.get((split, modality, task), [])
            metrics = {"n": len(pairs)}
            if task == "classification":
                letters = [first_letter(reply, r.letters) for r, reply in pairs]
                metrics.update(accuracy=_mean(letter == r.answer for (r, _), letter in zip(pairs, letters)),
                               no_letter=sum(letter is None for letter in letters))
            elif task == "cloze":
                metrics["accuracy"] = _mean(cloze_hit(reply, r.answer) for r, reply in pairs)
            else:
                metrics.update(rouge([reply for _, reply in pairs], [r.answer for r, _ in pairs]) if pairs
                               else dict.fromkeys(("rouge1", "rouge2", "rougeL")))
            if task in skipped[key]:
                metrics["skipped_few_shot"] = skipped[key][task]
            metrics["predictions"] = [{"id": r.person_id, "index": r.index, "answer": r.answer, "reply": reply}
                                      for r, reply in pairs]
            results[key][task] = metrics
    return results


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def run_mllmu(model, processor, splits: dict[str, list[MllmuPerson]], full_set: list[MllmuPerson], tasks, *,
              seed: int, batch_size: int, max_new_tokens: int = MLLMU_NEW_TOKENS, device=None, dtype=None,
              progress: bool = False) -> tuple[dict, dict]:
    """The mllmu protocol over ``splits`` ({split: people}); returns (results, {"few_shot": ...})."""
    requests, few_shot, skipped = mllmu_requests(splits, full_set, tasks, seed)
    image = getattr(processor, "image_token", None) or IMAGE
    replies = [None] * len(requests)
    for task in ("classification", "cloze", "generation"):
        for modality in MODALITIES:  # one modality per batch
            chosen = [i for i, r in enumerate(requests) if r.task == task and r.modality == modality]
            if not chosen:
                continue
            texts = generate_texts(model, processor, [(requests[i].prompt.replace(IMAGE, image), requests[i].images)
                                                      for i in chosen],
                                   MLLMU_LETTER_TOKENS if task == "classification" else max_new_tokens, batch_size,
                                   device, dtype, progress, desc=f"mllmu {task} {modality}")
            for i, text in zip(chosen, texts):
                replies[i] = text
    return score_mllmu(requests, replies, skipped, tasks), {"few_shot": few_shot}


# ---------------------------------------------------------------------------------------------------- CLEAR
def clear_text_prompt(processor, full_text: str, answer: str) -> str:
    """CLEAR's generation input (``mm/eval.py``): the encoded full text (user turn and answer turn) decoded without
    special tokens (the image placeholder, BOS and end-of-turn tokens dropped), cut before the last occurrence of the
    answer decoded the same way; generated from as text alone."""
    tok = processor.tokenizer
    decoded = tok.decode(tok(full_text)["input_ids"], skip_special_tokens=True)
    cut = decoded.rfind(tok.decode(tok(answer)["input_ids"], skip_special_tokens=True))
    if cut < 0:
        raise ValueError(f"the answer {answer!r} is not in its decoded text {decoded!r}: no CLEAR text prompt")
    return decoded[:cut]


def _by_modality(modalities: list[str], payloads: list, call) -> list:
    """``call(payloads of one modality, modality)`` for each modality present, the results put back in ``payloads``'
    order (a batch is encoded with images or without)."""
    out = [None] * len(payloads)
    for modality in MODALITIES:
        chosen = [i for i, m in enumerate(modalities) if m == modality]
        if chosen:
            for i, value in zip(chosen, call([payloads[i] for i in chosen], modality), strict=True):
                out[i] = value
    return out


def _modality_label(rows) -> str:
    kinds = {r.modality for r in rows}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def run_clear(model, processor, splits: dict[str, list[ClearCaption]], choices: dict[str, list[ClearChoice]], *,
              seed: int, batch_size: int, max_new_tokens: int = CLEAR_NEW_TOKENS, ds_size: int = CLEAR_DS_SIZE,
              generation_input: str = "text", device=None, dtype=None, progress: bool = False) -> tuple[dict, dict]:
    """The clear protocol: captions and face recognition on ``splits`` ({"forget"/"retain": rows}), multiple choice
    on ``choices`` ({"real_faces"/"real_world": rows}), each on its first ``ds_size`` rows (0: all). Returns
    (results, {"ds_size", "generation_input", "rows": {task data: [scored, in file]}, "model_utility"}). See the
    module docstring."""
    if ds_size < 0:
        raise ValueError(f"ds_size must be >= 0 (0 = all rows), got {ds_size}")
    if generation_input not in GENERATION_INPUTS:
        raise ValueError(f"generation_input must be one of {GENERATION_INPUTS}, got {generation_input!r}")
    run = {"batch_size": batch_size, "device": device, "dtype": dtype, "progress": progress}

    def task(rows, questions, truths, paraphrases, wrongs, *, forget=False, prob="normalized", choice=False, desc=""):
        """One task's metrics: ``rows`` asked ``questions``; right answers ``truths``, truth-ratio bases
        ``paraphrases``, wrong answers ``wrongs`` (a list per row)."""
        def items(answers):
            return [BenchmarkItem(r.where, None, r.modality, q, a, r.image) for r, q, a in zip(rows, questions, answers)]
        asked = items(truths)
        flat = asked + items(paraphrases) + [BenchmarkItem(r.where, None, r.modality, q, w, r.image)
                                             for r, q, ws in zip(rows, questions, wrongs) for w in ws]
        values = _by_modality([i.modality for i in flat], flat, lambda chunk, modality: answer_losses(
            model, processor, chunk, desc=f"clear {desc} {modality} losses", **run))
        n = len(rows)
        true, para, rest, wrong = values[:n], values[n:2 * n], values[2 * n:], []
        for ws in wrongs:
            wrong.append(rest[:len(ws)])
            rest = rest[len(ws):]
        if generation_input == "text":
            inputs = [(clear_text_prompt(processor, text, i.answer), []) for text, i in
                      zip(chat_texts(processor, asked, with_answer=True, as_turn=True), asked)]
        else:
            inputs = [(text, [i.image] if i.image is not None else []) for text, i in
                      zip(chat_texts(processor, asked, with_answer=False), asked)]
        replies = [t.strip() for t in _by_modality([i.modality for i in asked], inputs, lambda chunk, modality:
                                                   generate_texts(model, processor, chunk, max_new_tokens,
                                                                  desc=f"clear {desc} generation", **run))]
        metrics = {"n": n, "rougeL_recall": rouge(replies, truths, "recall")["rougeL"],
                   "prob": _mean(math.exp(-t) for t in true) if prob == "exp"
                   else _mean(normalized_probability(t, w) for t, w in zip(true, wrong)),
                   "truth_ratio": truth_ratio(para, wrong, forget)}
        if choice:
            metrics["accuracy"] = _mean(t < min(w) for t, w in zip(true, wrong))
        metrics["predictions"] = [{"where": r.where, "answer": t, "reply": g} for r, t, g in zip(rows, truths, replies)]
        return metrics

    results, rows_scored, utility = {}, {}, {}
    for split, all_rows in splits.items():
        rows = all_rows[:ds_size or None]
        rows_scored[split] = [len(rows), len(all_rows)]
        forget = split == "forget"
        results[f"{split}/multimodal"] = by_task = {
            "captions": task(rows, [caption_question(seed, r.caption) for r in rows], [r.caption for r in rows],
                             [r.paraphrased_caption for r in rows], [r.perturbed_captions for r in rows],
                             forget=forget, prob="exp", desc=f"{split} captions"),
            "face_recognition": task(rows, [CLEAR_FACE_PROMPT] * len(rows), [r.name for r in rows],
                                     [r.name for r in rows], [r.perturbed_names for r in rows], forget=forget,
                                     desc=f"{split} names")}
        if not forget:
            utility.update({CLEAR_UTILITY_TASKS[split, name]: m for name, m in by_task.items()})
    for kind, all_rows in choices.items():
        rows = all_rows[:ds_size or None]
        rows_scored[kind] = [len(rows), len(all_rows)]
        wrongs = [[o for o in dict.fromkeys(r.options) if o != r.answer] for r in rows]
        empty = [r.where for r, w in zip(rows, wrongs) if not w]
        if empty:
            raise DataError(f"{empty[0]}: options hold no answer other than the right one")
        answers = [r.answer for r in rows]
        metrics = task(rows, [r.question for r in rows], answers, answers, wrongs, choice=True, desc=kind)
        results[f"{kind}/{_modality_label(rows)}"] = {"multiple_choice": metrics}
        utility[CLEAR_UTILITY_TASKS[kind, "multiple_choice"]] = metrics
    values = {f"{name} {label}": m[field] for label, m in utility.items() for name, field in CLEAR_UTILITY_METRICS}
    return results, {"ds_size": ds_size, "generation_input": generation_input, "rows": rows_scored,
                     "model_utility": {"value": harmonic_mean(values.values()) if values else None,
                                       "tasks": list(utility), "of": values}}
