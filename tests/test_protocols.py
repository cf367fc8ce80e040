"""MLLMU-Bench's eval.py prompts pinned character for character (written here by hand from eval.py), the requests
the mllmu protocol builds (few-shot people, the questions it leaves out, the images each prompt shows), and CLEAR's
loss pass against an independent implementation of its label mask."""
import pytest
import torch

import bench_files as bf
from manu_fast.datasets import (BenchmarkItem, ChoiceQuestion, DataError, ImageRef, OpenQuestion, chat_texts,
                                load_image, load_mllmu_split)
from manu_fast.evaluate import answer_losses
from manu_fast.protocols import (classification_prompt, clear_text_prompt, cloze_prompt, draw_people,
                                 generation_prompt, mc_prompt, mllmu_requests, people_of)

JOB = ChoiceQuestion("What is the job of this person?", {"A": "doctor", "B": "pilot", "C": "chef", "D": "judge"}, "B")
HOME = ChoiceQuestion("Where does this person live?", {"A": "Oslo", "B": "Rome", "C": "Lima", "D": "Pune"}, "C")


def test_golden_classification_prompts():
    assert classification_prompt(HOME, True, [JOB, JOB]) == (
        "USER: <image>\n"
        "Question: What is the job of this person?\n"
        "A: doctor\n"
        "B: pilot\n"
        "C: chef\n"
        "D: judge\n"
        "Correct Answer: B\n"
        "USER: <image>\n"
        "Question: What is the job of this person?\n"
        "A: doctor\n"
        "B: pilot\n"
        "C: chef\n"
        "D: judge\n"
        "Correct Answer: B\n"
        "USER: <image>\n"
        "Where does this person live?\n"
        "A: Oslo\n"
        "B: Rome\n"
        "C: Lima\n"
        "D: Pune\n"
        "Just give ONE letter representing the answer directly.\n"
        "ASSISTANT:")
    assert classification_prompt(HOME, False, [JOB]) == (
        "USER:\n"
        "Question: What is the job of this person?\n"
        "A: doctor\nB: pilot\nC: chef\nD: judge\n"
        "Correct Answer: B\n"
        "USER:\n"
        "Where does this person live?\n"
        "A: Oslo\nB: Rome\nC: Lima\nD: Pune\n"
        "Just give ONE letter representing the answer directly.\n"
        "ASSISTANT:")
    three = ChoiceQuestion("Which?", {"A": "x", "B": "y", "C": "z"}, "A")
    assert classification_prompt(three, False) == ("USER:\nWhich?\nA: x\nB: y\nC: z\n"
                                                   "Just give ONE letter representing the answer directly.\nASSISTANT:")
    with pytest.raises(ValueError, match="has no option D"):
        classification_prompt(HOME, False, [three])
    assert mc_prompt(HOME.question, HOME.options) == ("Question: Where does this person live?\nA. Oslo\nB. Rome\n"
                                                      "C. Lima\nD. Pune\nAnswer:")


def test_golden_cloze_and_generation_prompts():
    shot = OpenQuestion("multimodal", "This person was born in __.", "Lima", 0)
    q = OpenQuestion("multimodal", "This person works as a __ in __.", "pilot", 3)
    instruction = "Please **ONLY** provide the correct answer that should replace the [Blank]."
    assert cloze_prompt(q, [shot]) == (
        f"USER:<image>\nThis person was born in [Blank].\n{instruction}\nCorrect Answer: Lima\n"
        f"USER: <image>\nThis person works as a [Blank] in [Blank].\n{instruction}\nASSISTANT:")
    text = OpenQuestion("text", "Ana works as a __.", "pilot", 1)
    text_shot = OpenQuestion("text", "Ana was born in __.", "Lima", 2)
    assert cloze_prompt(text, [text_shot]) == (
        f"USER:\nAna was born in [Blank].\n{instruction}\nCorrect Answer: Lima\n"
        f"USER:\nAna works as a [Blank].\n{instruction}\nASSISTANT:")
    assert generation_prompt(OpenQuestion("multimodal", "What does this person do?", "x", 0)) == (
        "USER: <image>\nWhat does this person do?\nAnswer the question based on your trained knowledge in one "
        "sentence accurately in ENGLISH.\nASSISTANT: ")
    assert generation_prompt(OpenQuestion("text", "What does Ana do?", "x", 0)) == (
        "USER: What does Ana do?\nAnswer the question based on your trained knowledge in one sentence in "
        "ENGLISH.\nASSISTANT:")


@pytest.fixture(scope="module")
def people(tmp_path_factory):
    root = tmp_path_factory.mktemp("mllmu")
    files = bf.write_mllmu(root)
    return {name: load_mllmu_split(files[name]) for name in ("Full_Set", "forget_5", "retain_95", "Retain_Set",
                                                             "Test_Set")}


def test_requests_follow_eval_py(people):
    full = people["Full_Set"]
    splits = {"forget": people["forget_5"], "celebrity": people["Retain_Set"]}
    requests, few_shot, skipped = mllmu_requests(splits, full, ("classification", "cloze", "generation"), seed=0)
    shot = few_shot["forget"]["classification"]
    assert shot == draw_people(list(bf.FORGET), 1, 0, "forget", "classification") and shot[0] in bf.FORGET
    by_id = {p.person_id: p for p in full}
    examples = by_id[shot[0]].classification["multimodal"]
    asked = [r for r in requests if (r.split, r.modality, r.task) == ("forget", "multimodal", "classification")]
    # the few-shot person's own first len(examples) questions are not asked; every prompt shows the examples
    assert [(r.person_id, r.index) for r in asked] == [
        (p, k) for p in bf.FORGET for k in range(len(bf.LETTERS[p][0])) if not (p == shot[0] and k < len(examples))]
    assert skipped["forget/multimodal"]["classification"] == len(examples)
    first = asked[0]
    question = next(p for p in people["forget_5"] if p.person_id == first.person_id).classification["multimodal"][
        first.index]
    assert first.prompt == classification_prompt(question, True, examples)
    assert len(first.images) == len(examples) + 1 == first.prompt.count("<image>")
    assert first.letters == ("A", "B", "C", "D") and first.answer == question.answer
    # cloze: two people, their examples in Full_Set's order, the image examples with their images
    cloze_people = few_shot["forget"]["cloze"]
    assert len(cloze_people) == 2 and cloze_people == sorted(cloze_people, key=list(bf.PEOPLE).index)
    cloze = [r for r in requests if r.task == "cloze" and r.split == "forget"]
    assert {r.person_id for r in cloze} == set(bf.FORGET) - set(cloze_people)
    image_cloze = next(r for r in cloze if r.modality == "multimodal")
    assert len(image_cloze.images) == image_cloze.prompt.count("<image>") == 3  # one example per person, then it
    # celebrity: no Full_Set row for the drawn people -> no examples, nothing skipped
    assert few_shot["celebrity"] == {"classification": [], "cloze": []}
    celeb = [r for r in requests if r.split == "celebrity" and r.task == "classification"]
    assert len(celeb) == sum(len(a) + len(b) for a, b in (bf.LETTERS[c] for c in bf.CELEBRITIES))
    assert all(not r.prompt.startswith("USER: <image>\nQuestion:") for r in celeb)
    # generation: zero-shot, every question
    assert sum(r.task == "generation" for r in requests) == 2 * (len(bf.FORGET) + len(bf.CELEBRITIES))
    # a retain person missing from the few-shot file is an error (the wrong file was passed)
    with pytest.raises(DataError, match="the few-shot file has no ID"):
        mllmu_requests({"retain": people["retain_95"]}, people["Retain_Set"], ("classification",), seed=0)


def test_draws_are_seeded_and_test_rows_follow_the_forget_people(people):
    ids = list(bf.PEOPLE)
    assert draw_people(ids, 2, 7, "forget", "cloze") == draw_people(ids, 2, 7, "forget", "cloze")
    assert len({tuple(draw_people(ids, 2, s, "forget", "cloze")) for s in range(20)}) > 3
    test = people_of(people["Test_Set"], people["forget_5"], "Test_Set")
    assert [p.person_id for p in test] == list(bf.FORGET) and len(test[0].images) == 3
    with pytest.raises(DataError, match="Test_Set has no row with ID 'c1'"):
        people_of(people["Test_Set"], people["Retain_Set"], "Test_Set")


def test_celebrity_people_also_in_full_set_show_no_examples_and_pass_no_example_images(people):
    """eval.py's celebrity mode draws a person from Retain_Set and reads their examples from Full_Set; when the ID is
    also in Full_Set it passes the examples' images but shows no example (processor error: more images than
    placeholders). Here such a person gives neither; their questions at the examples' positions are not asked."""
    full = people["Full_Set"] + people["Retain_Set"]
    requests, few_shot, skipped = mllmu_requests({"celebrity": people["Retain_Set"]}, full, ("classification",), 0)
    drawn = few_shot["celebrity"]["classification"]
    assert len(drawn) == 1 and drawn[0] in bf.CELEBRITIES
    assert requests and all(len(r.images) == r.prompt.count("<image>") <= 1 for r in requests)
    assert not any("Correct Answer:" in r.prompt for r in requests)
    image_letters, text_letters = bf.LETTERS[drawn[0]]
    assert skipped["celebrity/multimodal"]["classification"] == len(image_letters)
    assert skipped["celebrity/text"]["classification"] == len(text_letters)


def _clear_losses(model, processor, items, closing: bool = True) -> tuple[list[float], list[int]]:
    """CLEAR's loss pass written independently from ``mm/dataset.py`` (``convert_mm_data_to_model_format``,
    ``mm_data_collator_preprocessor``) and ``mm/eval.py`` (``get_batch_loss`` / number of labels): left-padded as
    eval.py sets the tokenizer, labels = the full text's tokens after the prompt's, the prompt counted with
    ``tokenizer.tokenize(add_special_tokens=True)``; each ``<image>`` counted as the PATCHES tokens the processor
    expands it into (CLEAR counts it as one: what it evidently means on current transformers). ``closing=False``
    leaves out the template's closing token (the answer alone, as manu_fast scored it before)."""
    tok = processor.tokenizer
    full, prompt_tokens = [], []
    for item in items:
        user = [{"type": "image"}] if item.image is not None else []
        conversation = [{"role": "user", "content": user + [{"type": "text", "text": item.prompt}]}]
        prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
        prompt_tokens.append(len(tok.tokenize(prompt, add_special_tokens=True)) + prompt.count("<image>")
                             * (bf.PATCHES - 1))
        conversation.append({"role": "assistant", "content": [{"type": "text", "text": item.answer}]})
        full.append(processor.apply_chat_template(conversation, add_generation_prompt=False))
    images = [load_image(i.image) for i in items if i.image is not None]
    enc = processor(text=full, images=images or None, return_tensors="pt", padding="longest", padding_side="left")
    labels = enc["input_ids"].clone()
    for row, n in zip(labels, prompt_tokens):
        row[:(row != tok.pad_token_id).nonzero()[0, 0] + n] = -100
        if not closing:
            row[-1] = -100
    with torch.no_grad():
        logits = model(**enc).logits.double()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
    counted = (labels[:, 1:] != -100).sum(-1)
    return (loss.sum(-1) / counted).tolist(), counted.tolist()


@pytest.mark.parametrize("modality", ["multimodal", "text"])
def test_answer_losses_match_clear_label_mask(modality):
    """answer_losses (right-padded, the prompt encoded apart) equals CLEAR's left-padded label-mask pass on the tiny
    LLaVA, and counts every answer word plus the template's closing </s>."""
    processor = bf.processor()
    model = bf.model(processor)
    image = ImageRef(bf.image_struct((7, 8, 9)), "x") if modality == "multimodal" else None
    answers = ["B", "Ivo Kent reads a map on a train.", "A picture of Una Dale.", "Tom Hill"]
    items = [BenchmarkItem(str(k), None, modality, q, a, image)
             for k, (q, a) in enumerate(zip(bf.CLEAR_CAPTION_QUESTIONS, answers))]
    want, counted = _clear_losses(model, processor, items)
    assert counted == [len(bf.WORD.findall(a)) + 1 for a in answers]
    got = answer_losses(model, processor, items, batch_size=3)
    diff = max(abs(g - w) for g, w in zip(got, want))
    without, _ = _clear_losses(model, processor, items, closing=False)
    gap = max(abs(g - w) for g, w in zip(got, without))
    print(f"CLEAR label-mask parity ({modality}): max |answer_losses - CLEAR| = {diff:.2e} nats; "
          f"{gap:.2e} without the closing token")
    assert diff < 1e-5 and gap > 1e-3


def test_clear_text_prompt_is_the_decoded_text_before_the_answer():
    """eval.py generates from the decoded input (special tokens skipped: no <s>, image or </s>) cut at the answer."""
    processor = bf.processor()
    item = BenchmarkItem("x", None, "multimodal", bf.CLEAR_FACE_PROMPT, "Ivo Kent", None)
    full = chat_texts(processor, [item], with_answer=True, as_turn=True)[0]
    assert full == "<s>USER: <image>\nThe name of the person on the image is  ASSISTANT: Ivo Kent </s>"
    # the WordLevel tokenizer decodes with a space between tokens
    assert (clear_text_prompt(processor, full, "Ivo Kent")
            == "USER : The name of the person on the image is ASSISTANT : ")
    with pytest.raises(ValueError, match="'Una Dale' is not in its decoded text"):
        clear_text_prompt(processor, full, "Una Dale")
