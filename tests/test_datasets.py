"""MLLMU-Bench and CLEAR loaders on files in the published schemas (tests/bench_files.py): every field read as the
benchmarks' own code reads it, MANU's text-only rules, and one clear error (file, row, field) per kind of bad row."""
import copy
import json
import re

import pytest

import bench_files as bf
from manu_fast.datasets import (CLEAR_CAPTION_QUESTIONS, NAME_QUESTIONS, ChoiceQuestion, DataError, OpenQuestion,
                                  caption_question, load_clear_choices, load_clear_perturbed, load_clear_profiles,
                                  load_mllmu_profiles, load_mllmu_split, load_names, name_in_answer, read_rows,
                                  replace_placeholders)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    (root / "mllmu").mkdir()
    (root / "clear").mkdir()
    return {**bf.write_mllmu(root / "mllmu"), **bf.write_clear(root / "clear")}


def test_mllmu_split_as_published(files):
    people = load_mllmu_split(files["Full_Set"])
    assert [p.person_id for p in people] == list(bf.PEOPLE)
    one = people[0]
    assert one.classification["multimodal"] == [ChoiceQuestion(bf.IMAGE_QUESTIONS[0], bf.OPTIONS, "B"),
                                                ChoiceQuestion(bf.IMAGE_QUESTIONS[1], bf.OPTIONS, "A")]
    assert one.classification["text"] == [ChoiceQuestion("What is the job of Ana Reyes?", bf.OPTIONS, "B")]
    assert list(one.classification["text"][0].options) == ["A", "B", "C", "D"]
    assert one.generation[1] == OpenQuestion("text", "What does Ana Reyes do?", "Ana Reyes flies planes", 1)
    assert [(q.modality, q.index, q.answer) for q in one.cloze] == [("multimodal", 0, "B"), ("text", 1, "b"),
                                                                    ("text", 2, "Oslo")]
    assert one.image(0).load().getpixel((0, 0)) == bf.colour("1")
    only = load_mllmu_split(files["forget_5"], ("classification",))[0]
    assert only.generation is None and only.cloze is None  # a task not asked for is not read (nor required)


def test_json_string_columns_and_integer_ids_read_like_structs(files, tmp_path):
    rows = []
    for row in read_rows(files["forget_5"]):
        v = dict(row.values)
        v.update(ID=int(v["ID"]), **{c: json.dumps(v[c]) for c in ("Classification_Task", "Generation_Task",
                                                                     "Mask_Task")})
        rows.append(v)
    as_json = load_mllmu_split(bf.write(tmp_path / "json.parquet", rows))
    as_struct = load_mllmu_split(files["forget_5"])
    for a, b in zip(as_json, as_struct):
        assert (a.person_id, a.classification, a.generation, a.cloze) == (b.person_id, b.classification,
                                                                          b.generation, b.cloze)


def test_image_as_path_or_raw_bytes(tmp_path):
    png = tmp_path / "face.png"
    png.write_bytes(bf.png((1, 2, 3)))
    meta = json.dumps([{"Question": "Where was this person born?", "Answer": "Lima"}])
    rows = [{"image": {"bytes": None, "path": str(png)}, "ID": "1", "name": "Ana", "metadata": meta},
            {"image": bf.png((4, 5, 6)), "ID": "2", "name": "Bo", "metadata": meta}]
    items = load_mllmu_profiles(bf.write(tmp_path / "p.parquet", rows[:1]))
    assert items[0].image.load().getpixel((0, 0)) == (1, 2, 3)
    items = load_mllmu_profiles(bf.write(tmp_path / "b.parquet", rows[1:]))
    assert items[0].image.load().getpixel((0, 0)) == (4, 5, 6)


def test_test_set_images_lists_in_a_folder_of_shards(files):
    people = load_mllmu_split(files["Test_Set"])  # a folder: two shards, read in order
    assert [p.person_id for p in people] == list(reversed(list(bf.PEOPLE)))
    person = people[0]
    assert len(person.images) == 3
    chosen = {person.image(seed).load().getpixel((0, 0)) for seed in range(12)}
    assert chosen <= {bf.colour(person.person_id, k) for k in (1, 2, 3)} and len(chosen) > 1
    assert person.image(5) == person.image(5)


def _corrupt(files, tmp_path, edit, config="forget_5", schema=bf.SPLIT_SCHEMA):
    rows = [copy.deepcopy(r.values) for r in read_rows(files[config])]
    edit(rows)
    return bf.write(tmp_path / "bad.parquet", rows, schema)


def _set(path, value):
    def edit(rows):
        target = rows
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


@pytest.mark.parametrize("edit,match", [
    (_set([1, "Classification_Task", "Image_Textual_Questions", 0, "Options", "C"], None),
     "row 1: Classification_Task.Image_Textual_Questions[0].Options.C is null, not text"),
    (_set([0, "Classification_Task", "Pure_Text_Questions", 0, "Correct_Answer"], "E"),
     "row 0: Classification_Task.Pure_Text_Questions[0].Correct_Answer 'E' is not one of the options"),
    (_set([0, "Classification_Task", "Pure_Text_Questions", 0, "Correct_Answer"], "B "),  # eval.py: never right
     "row 0: Classification_Task.Pure_Text_Questions[0].Correct_Answer 'B ' is not one of the options"),
    (_set([2, "Classification_Task", "Pure_Text_Questions", 0, "Question"], "  "),
     "row 2: Classification_Task.Pure_Text_Questions[0].Question is empty, not text"),
    (_set([0, "Classification_Task", "Image_Textual_Questions"], None),
     "row 0: Classification_Task.Image_Textual_Questions is null, not a list"),
    (_set([1, "Mask_Task", 2, "Type"], "Audio"), "row 1: Mask_Task[2].Type is 'Audio', not one of"),
    (_set([1, "Generation_Task", 0, "Ground_Truth"], None), "row 1: Generation_Task[0].Ground_Truth is null"),
    (_set([2, "image"], None), "row 2: image is null (no image bytes or path)"),
    (_set([2, "image"], {"bytes": None, "path": None}), "row 2: image is a dict (no image bytes or path)"),
    (_set([2, "ID"], "1"), "row 2: ID '1' already used by"),
    (_set([1, "ID"], None), "row 1: ID is null, not a string"),
])
def test_bad_mllmu_rows_name_file_row_and_field(files, tmp_path, edit, match):
    path = _corrupt(files, tmp_path, edit)
    with pytest.raises(DataError, match=re.escape(f"bad.parquet {match}")):
        load_mllmu_split(path)


def test_bad_images_and_files(files, tmp_path):
    test = _corrupt(files, tmp_path, _set([0, "images"], []), "Test_Set", bf.TEST_SCHEMA)
    with pytest.raises(DataError, match="row 0: images is an empty list"):
        load_mllmu_split(test)
    broken = _corrupt(files, tmp_path, _set([1, "image", "bytes"], b"not a png"))
    person = load_mllmu_split(broken)[1]
    with pytest.raises(DataError, match="bad.parquet row 1 image: cannot decode the image"):
        person.image(0).load()
    missing = bf.write(tmp_path / "no_tasks.parquet", [{"image": bf.image_struct((1, 2, 3)), "ID": "9"}])
    with pytest.raises(DataError, match=r"no_tasks.parquet row 0: no column 'Classification_Task' \(the file has"):
        load_mllmu_split(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no .parquet file"):
        read_rows(tmp_path / "empty")
    (tmp_path / "junk.parquet").write_bytes(b"junk")
    with pytest.raises(DataError, match="junk.parquet: not a readable parquet file"):
        read_rows(tmp_path / "junk.parquet")


def test_placeholders_replaced_as_manu_does():
    name = "Ana Reyes"
    assert replace_placeholders("Where does this person live? This person's dog", name) == \
        "Where does Ana Reyes live? Ana Reyes's dog"
    assert replace_placeholders("The individual met the person and the individual's son", name) == \
        "Ana Reyes met Ana Reyes and Ana Reyes's son"
    assert replace_placeholders("What is this profile about? This profile says", name) == \
        "What is Ana Reyes about? Ana Reyes says"
    # whole words only (MANU's str.replace would write "Ana Reyesality" and "Ana Reyess")
    assert replace_placeholders("the personality of these persons, the persons", name) == \
        "the personality of these persons, the persons"
    assert replace_placeholders("What is thisperson? the person_id", name) == "What is thisperson? the person_id"


@pytest.mark.parametrize("answer,name", [
    ("Her name is Ana Reyes.", "Ana Reyes"), ("This person is named Bo Lund.", "Bo Lund"), ("Di Park", "Di Park"),
    ("  Ed Shaw.  ", "Ed Shaw"), ("The individual named in the profile is Flo Kent", "in the profile is Flo Kent"),
])
def test_name_in_answer_reads_like_manu(answer, name):
    assert name_in_answer(answer) == name  # MANU prefers "named" even when "is" comes later


def test_mllmu_profiles_from_a_split_and_ft_data(files):
    items = load_mllmu_profiles(files["forget_5"], load_names(files["names"]), qa=files["ft_Data"])
    pid = {i.person_id for i in items}
    assert pid == set(bf.FORGET)
    one = [(i.modality, i.prompt, i.answer) for i in items if i.person_id == "1"]
    assert one == [
        ("multimodal", "What is the name of the person in the image?", "Her name is Ana Reyes."),
        ("multimodal", "What is the occupation of this person?", "This person is a doctor."),
        ("text", "What is the occupation of Ana Reyes?", "Ana Reyes is a doctor."),
        ("multimodal", "Where does the individual live?", "The individual lives in Lisbon."),
        ("text", "Where does Ana Reyes live?", "Ana Reyes lives in Lisbon.")]
    assert all(i.image is not None for i in items if i.modality == "multimodal")
    assert all(i.image is None for i in items if i.modality == "text")
    assert {i.name for i in items if i.person_id == "3"} == {"Cy Moor"}  # from the names file
    assert not any(i.prompt in NAME_QUESTIONS for i in items if i.modality == "text")
    assert items[0].image.load().getpixel((0, 0)) == bf.colour("1")  # the split's own image


def test_mllmu_profile_names_precedence(files, tmp_path):
    meta = json.dumps([{"Question": "What is this person's name?", "Answer": "Her name is Ana Reyes."},
                       {"Question": "Where was this person born?", "Answer": "Lisbon"}])
    row = {"image": bf.image_struct((1, 1, 1)), "ID": "1", "metadata": meta}

    def text_prompts(path, names=None):
        return [i.prompt for i in load_mllmu_profiles(path, names) if i.modality == "text"]

    plain = bf.write(tmp_path / "plain.parquet", [row])
    assert text_prompts(plain) == ["Where was Ana Reyes born?"]
    assert text_prompts(plain, {"1": "Ana R. Reyes"}) == ["Where was Ana R. Reyes born?"]  # --names wins
    named = bf.write(tmp_path / "named.parquet", [{**row, "name": "A. Reyes"}])
    assert text_prompts(named) == ["Where was A. Reyes born?"]
    bio = bf.write(tmp_path / "bio.parquet", [{**row, "biography": json.dumps({"Name": "Ana Bio", "Born": "1990"})}])
    assert text_prompts(bio) == ["Where was Ana Bio born?"]
    prose = bf.write(tmp_path / "prose.parquet", [{**row, "biography": "Ana Reyes was born in Lisbon."}])
    assert text_prompts(prose) == ["Where was Ana Reyes born?"]  # a prose biography is not read


def test_bad_profile_rows(files, tmp_path):
    def profile(meta, name="x"):
        path = bf.write(tmp_path / "p.parquet", [{"image": bf.image_struct((1, 1, 1)), "ID": "1", "name": name,
                                                  "metadata": meta}])
        return load_mllmu_profiles(path)

    with pytest.raises(DataError, match="p.parquet row 0: metadata is not valid JSON"):
        profile("[{")
    with pytest.raises(DataError, match=r"row 0: metadata\[1\].Answer is empty, not text"):
        profile(json.dumps([{"Question": "q", "Answer": "a"}, {"Question": "q2", "Answer": ""}]))
    with pytest.raises(DataError, match=r"row 0: metadata\[0\] has no 'Answer'"):
        profile(json.dumps([{"Question": "q"}]))
    with pytest.raises(DataError, match="row 0: metadata holds no question-answer pair"):
        profile("[]")
    with pytest.raises(DataError, match=r"ft_Data.*no row with ID 'c1' \(a person of .*Retain_Set"):
        load_mllmu_profiles(files["Retain_Set"], qa=files["ft_Data"])
    (tmp_path / "names.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="must hold a JSON object"):
        load_names(tmp_path / "names.json")
    (tmp_path / "names.json").write_text('{"1": null}')
    with pytest.raises(DataError, match="name of ID '1' is null"):
        load_names(tmp_path / "names.json")


def test_clear_profiles_captions_keep_the_name_tofu_rows_are_text(files):
    items = load_clear_profiles(files["forget10+tofu"], seed=3)
    assert [(i.modality, i.answer) for i in items] == [("multimodal", c) for c in bf.CLEAR_FORGET.values()] + \
        [("text", a) for _, a in bf.TOFU["forget"]]
    assert all(i.prompt in CLEAR_CAPTION_QUESTIONS for i in items[:2]) and items[2].prompt == bf.TOFU["forget"][0][0]
    assert [i.prompt for i in load_clear_profiles(files["forget10+tofu"], seed=3)] == [i.prompt for i in items]
    questions = {caption_question(seed, "Ivo Kent reads a map on a train.") for seed in range(40)}
    assert len(questions) > 4  # the seed picks among the nine


def test_clear_evaluation_files(files, tmp_path):
    rows = load_clear_perturbed(files["forget10_perturbed"])
    assert [(r.name, r.caption) for r in rows] == list(bf.CLEAR_FORGET.items())
    assert rows[1].perturbed_names == list(bf.WRONG_NAMES) and rows[0].paraphrased_caption == "A picture of Ivo Kent."
    faces = load_clear_choices(files["real_faces"], "real_faces")
    assert [(f.question, f.answer, f.options) for f in faces] == [("The name of the person on the image is ", a, o)
                                                                  for a, o in bf.REAL_FACES]
    world = load_clear_choices(files["real_world"], "real_world")
    assert [w.modality for w in world] == ["multimodal", "text", "multimodal"]
    with pytest.raises(DataError, match=r"forget_5/train-00000-of-00001.parquet row 0: no column 'caption'"):
        load_clear_perturbed(files["forget_5"])  # an MLLMU-Bench file given as CLEAR's
    bad = [copy.deepcopy(r.values) for r in read_rows(files["retain_perturbed"])]
    bad[1]["perturbed_names"] = []
    with pytest.raises(DataError, match="bad.parquet row 1: perturbed_names is an empty list"):
        load_clear_perturbed(bf.write(tmp_path / "bad.parquet", bad, bf.PERTURBED_SCHEMA))
    tofu = [copy.deepcopy(r.values) for r in read_rows(files["retain90+tofu"])]
    tofu[3]["answer"] = None
    with pytest.raises(DataError, match="tofu.parquet row 3: answer is null"):
        load_clear_profiles(bf.write(tmp_path / "tofu.parquet", tofu, bf.CLEAR_CAPTION_SCHEMA))
