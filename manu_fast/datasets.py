"""MLLMU-Bench and CLEAR read as their authors' code reads them, and encoded with a model's own processor.

Every reader takes a parquet file, or a folder of them (read in sorted order, as a HF dataset config ships its
``train-0000N-of-0000M.parquet`` shards). A value that is missing, null, empty or of the wrong type raises a
``DataError`` naming the file, the row and the field; no row or question is skipped. Images are checked when read
(bytes or a path present) and decoded when a batch is encoded (``ImageRef``).

MLLMU-Bench (HF ``MLLMMU/MLLMU-Bench``; evaluation code ``eval.py`` of github.com/franciscoliu/MLLMU-Bench):

- splits ``forget_5/10/15``, ``retain_95/90/85``, ``Full_Set``, ``Retain_Set`` (real celebrities): ``image``
  (a ``{bytes, path}`` struct), ``ID`` (string), ``biography``, ``question``, ``answer``, ``Classification_Task``
  (struct of ``Image_Textual_Questions`` / ``Pure_Text_Questions``, lists of ``{Question, Options{A..D},
  Correct_Answer}``), ``Generation_Task`` and ``Mask_Task`` (lists of ``{Question, Ground_Truth, Type}``, Type
  ``Image_Textual`` or ``Pure_Text``); ``Test_Set`` has ``images`` (a list of such structs) in place of ``image``.
  ``load_mllmu_split`` reads them (JSON strings in place of the structs are accepted too).
- profiling data: MANU (github.com/franciscoliu/MANU, ``data_process/prune_data_creation.py``) profiles files of
  ``image, ID, metadata`` (``metadata`` a JSON string: a list of ``{Question, Answer}``), the people's fine-tuning
  question-answer pairs; the benchmark's ``ft_Data`` config holds those pairs for all 500 people.
  ``load_mllmu_profiles`` reads such a file, or an evaluation split plus ``qa`` (a file with ``ID`` and
  ``metadata``, e.g. ``ft_Data``) whose pairs are profiled for the split's people. Text-only items follow MANU's
  ``LLAVA_unimodal_Dataset`` (``data_process/data_preprocess.py``): "this person", "the person", "this individual",
  "the individual", "this profile" (and the capitalised forms) become the person's name in question and answer,
  and the pair that states the name ("What is the name of ...", MANU's 17 phrasings) is dropped. The name comes
  from ``names`` (a ``--names`` file), a ``name`` column, a JSON ``biography`` with ``Name``, or that pair's
  answer, read as MANU reads it (after "named", else after "is", else the whole answer).

CLEAR (HF ``therem/CLEAR``; code github.com/somvy/multimodal_unlearning, ``mm/dataset.py``, ``mm/eval.py``,
``config/mm/eval.yaml``):

- ``forget01/05/10``, ``retain90/95/99``, ``full``: ``image, caption, name``; the ``+tofu`` configs add TOFU's
  text-only question-answer pairs about the same fictitious authors (rows whose ``image`` is null, with
  ``question``/``answer``; the ``+tofu`` configs have no ``name`` column). ``load_clear_profiles`` reads both kinds:
  a caption row becomes (image, one of the nine caption questions, the caption verbatim, name included), a TOFU
  row (its question, its answer).
- ``*_perturbed`` and ``retain_perturbed`` add ``paraphrased_caption``, ``perturbed_captions`` and
  ``perturbed_names`` (``load_clear_perturbed``); ``real_faces`` holds ``image, answer, options`` and
  ``real_world`` ``question, answer, image, options`` (``load_clear_choices``).
"""
from __future__ import annotations

import io
import json
import random
import re
from dataclasses import dataclass, field as dataclass_field
from pathlib import Path

from .install import require
from .schema import MLLMU_TASKS  # noqa: F401  (a public name here too)


class DataError(ValueError):
    """A benchmark file that does not hold what its benchmark publishes: the message names the file, row and field."""


# ---------------------------------------------------------------------------------------------------- rows and fields
def parquet_files(path) -> list[Path]:
    """``path`` itself, or the ``*.parquet`` files of the folder ``path`` in sorted order."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"{path}: folder holds no .parquet file")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    return [path]


@dataclass
class Row:
    """One parquet row and where it came from (``where`` = "FILE row N", N counted from 0 in that file)."""

    values: dict
    where: str

    def has(self, column: str) -> bool:
        return column in self.values

    def get(self, column: str):
        if column not in self.values:
            raise DataError(f"{self.where}: no column {column!r} (the file has {sorted(self.values)})")
        return self.values[column]


def read_rows(path) -> list[Row]:
    """Every row of a parquet file (or folder of them), nested structs and lists as Python dicts and lists."""
    pq = require("pyarrow.parquet", "reading MLLMU-Bench / CLEAR parquet files")

    rows = []
    for file in parquet_files(path):
        try:
            table = pq.read_table(file)
        except Exception as e:  # pyarrow raises several error types for files that are not parquet
            raise DataError(f"{file}: not a readable parquet file ({e})") from None
        rows += [Row(values, f"{file} row {i}") for i, values in enumerate(table.to_pylist())]
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _describe(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, str) and not value.strip():
        return "empty"
    return f"a {type(value).__name__}"


def text_field(value, where: str, field: str) -> str:
    """``value`` if it is a non-empty string, else a DataError naming ``where`` and ``field``."""
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: {field} is {_describe(value)}, not text")
    return value


def _parsed(value, kind: type, where: str, field: str):
    """A dict / list as parquet gives it, or the same held as a JSON string."""
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError) as e:
            raise DataError(f"{where}: {field} is not valid JSON ({e})") from None
    if not isinstance(value, kind):
        raise DataError(f"{where}: {field} is {_describe(value)}, not a {kind.__name__}")
    return value


def _member(value: dict, key: str, where: str, field: str):
    if key not in value:
        raise DataError(f"{where}: {field} has no {key!r} (has {sorted(value)})")
    return value[key]


def person_id(row: Row) -> str:
    """The row's ``ID`` as a string (published as a string; integers are accepted and converted)."""
    value = row.get("ID")
    if isinstance(value, bool) or not isinstance(value, (str, int)) or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{row.where}: ID is {_describe(value)}, not a string")
    return str(value)


# ---------------------------------------------------------------------------------------------------- images
@dataclass(frozen=True)
class ImageRef:
    """An image as parquet holds it (HF ``{bytes, path}`` struct, raw bytes or a path), decoded by ``load``."""

    source: object = dataclass_field(repr=False)
    where: str = ""

    def load(self):
        Image = require("PIL.Image", "decoding the benchmarks' images")
        UnidentifiedImageError = Image.UnidentifiedImageError

        value = self.source
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        try:
            if isinstance(value, (bytes, bytearray)):
                return Image.open(io.BytesIO(value)).convert("RGB")
            return Image.open(value).convert("RGB")
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
            raise DataError(f"{self.where}: cannot decode the image ({e})") from None


def image_ref(value, where: str, field: str = "image") -> ImageRef:
    """An ``ImageRef`` for a parquet image value; a DataError if it holds neither bytes nor a path."""
    source = value
    if isinstance(value, dict):
        source = value.get("bytes") or value.get("path")
    if not isinstance(source, (bytes, bytearray, str)) or not source:
        raise DataError(f"{where}: {field} is {_describe(value)} (no image bytes or path)")
    return ImageRef(value, f"{where} {field}")


def load_image(image):
    """A PIL RGB image from an ``ImageRef`` or a PIL image."""
    return image.load() if isinstance(image, ImageRef) else image.convert("RGB")


# ---------------------------------------------------------------------------------------------------- model inputs
@dataclass
class BenchmarkItem:
    """One question (or caption request) about one person, in one modality, for a chat-template processor.

    ``prompt`` holds no image placeholder (the chat template adds the processor's own). For multiple-choice items
    ``options`` maps letters to texts and ``answer`` is the right letter.
    """

    person_id: str
    name: str | None
    modality: str
    prompt: str
    answer: str
    image: ImageRef | None = None
    options: dict[str, str] | None = None


def encode_texts(processor, texts: list[str], images: list | None, *, padding_side: str, device=None, dtype=None):
    """``texts`` (image placeholders already in them) and the images they show, in order, through ``processor``.
    Floating-point tensors (pixel values) are cast to ``dtype``."""
    kwargs = {"images": [load_image(i) for i in images]} if images else {}
    enc = processor(text=texts, return_tensors="pt", padding=True, padding_side=padding_side, **kwargs)
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in enc.items()}


def chat_texts(processor, items: list[BenchmarkItem], *, with_answer: bool, as_turn: bool = False) -> list[str]:
    """Each item's user turn (image + prompt) through the processor's chat template with the generation prompt,
    followed by " answer" when ``with_answer``; with ``as_turn`` the answer is instead the assistant's turn as the
    template renders it (CLEAR's ``convert_mm_data_to_model_format``: the turn's closing tokens included)."""
    if getattr(processor, "chat_template", None) is None:
        raise ValueError(f"{type(processor).__name__} has no chat template: save the model's processor with one")
    texts = []
    for item in items:
        image = [{"type": "image"}] if item.modality == "multimodal" else []
        conversation = [{"role": "user", "content": image + [{"type": "text", "text": item.prompt}]}]
        if with_answer and as_turn:
            conversation.append({"role": "assistant", "content": [{"type": "text", "text": item.answer}]})
            texts.append(processor.apply_chat_template(conversation, add_generation_prompt=False))
            continue
        text = processor.apply_chat_template(conversation, add_generation_prompt=True)
        texts.append(text + " " + item.answer if with_answer else text)
    return texts


def encode_items(processor, items: list[BenchmarkItem], *, with_answer: bool, as_turn: bool = False, device=None,
                 dtype=None, padding_side: str = "right"):
    """One batch of ``items`` (all multimodal, or all text-only) encoded through the chat template (``chat_texts``).

    Right-padded by default, so every real token keeps the position it has in an unpadded run and the last real
    token of row b is at ``attention_mask[b].sum() - 1``."""
    if not items:
        raise ValueError("encode_items needs at least one item")
    modality = items[0].modality
    if any(i.modality != modality for i in items):
        raise ValueError("encode_items: a batch must be all multimodal or all text-only")
    images = None
    if modality == "multimodal":
        missing = [i.person_id for i in items if i.image is None]
        if missing:
            raise ValueError(f"multimodal questions about person(s) {missing[:3]} have no image")
        images = [i.image for i in items]
    return encode_texts(processor, chat_texts(processor, items, with_answer=with_answer, as_turn=as_turn), images,
                        padding_side=padding_side, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------- MLLMU-Bench
MLLMU_SECTIONS = {"Image_Textual_Questions": "multimodal", "Pure_Text_Questions": "text"}
MLLMU_TYPES = {"Image_Textual": "multimodal", "Pure_Text": "text"}
_TASK_COLUMN = {"classification": "Classification_Task", "generation": "Generation_Task", "cloze": "Mask_Task"}

# MANU's questions that ask for the person's name (LLAVA_unimodal_Dataset.flatten_dataset), matched exactly
NAME_QUESTIONS = frozenset((
    "What is the name of the person in this profile?", "What is this person's name as stated in the biography?",
    "What is the person's name?", "What is the name of the person in the image?", "What is this person's name?",
    "What is the full name of this person?", "What is the full name of the person in the image?",
    "What is the name of the person in this biography?", "What is the name of the person in the profile?",
    "What is the name of the person in the biography?", "What is the person's name as stated in the profile?",
    "What is this person's full name?", "What is the name of this individual?",
    "What is the name of the individual in the profile?", "What is the name of this person?",
    "What is the name associated with this profile?", "What is the name of the individual in the image?",
))
# MANU's placeholders (replace_placeholders), matched as whole words: MANU's plain str.replace also rewrites
# "the personality" into "<name>ality"; "This profile" is added to its lower-case "this profile"
PLACEHOLDER = re.compile(r"\b(?:[Tt]his|[Tt]he) (?:person|individual)\b|\b[Tt]his profile\b")


def replace_placeholders(text: str, name: str) -> str:
    """The text-only form of a profile sentence: each placeholder for the person ("this person", "the
    individual", ...) replaced by ``name`` (so "this person's" becomes "<name>'s")."""
    return PLACEHOLDER.sub(lambda _: name, text)


def name_in_answer(answer: str) -> str:
    """The name in the answer to a name question, read as MANU reads it: the text after "named" if the answer has
    it, else after the word "is", else the whole answer (stripped, final period removed)."""
    text = answer.strip().rstrip(".")
    if "named" in text:
        return text[text.index("named") + len("named"):].strip()
    match = re.search(r"\bis\b (.+)", text)
    return match.group(1).strip() if match else text


@dataclass(frozen=True)
class ChoiceQuestion:
    """One MLLMU-Bench classification question: ``options`` letter -> text in file order, ``answer`` a letter."""

    question: str
    options: dict[str, str]
    answer: str


@dataclass(frozen=True)
class OpenQuestion:
    """One generation or fill-in-the-blank (``Mask_Task``) question; ``index`` is its position in its list."""

    modality: str
    question: str
    answer: str
    index: int


@dataclass
class MllmuPerson:
    """One MLLMU-Bench row: the person's image(s) and the questions of each task read (None: task not read)."""

    person_id: str
    where: str
    images: list[ImageRef]
    classification: dict[str, list[ChoiceQuestion]] | None = None
    generation: list[OpenQuestion] | None = None
    cloze: list[OpenQuestion] | None = None

    def image(self, seed: int) -> ImageRef:
        """The image to ask with: the only one, or (``Test_Set``) one of the renderings chosen by ``seed`` and the
        person's ID (``eval.py`` draws one with ``random.choice`` per task)."""
        if len(self.images) == 1:
            return self.images[0]
        return random.Random(f"{seed}/{self.person_id}").choice(self.images)


def _images(row: Row) -> list[ImageRef]:
    """``images`` (Test_Set's renderings) when the row has them, as eval.py prefers them, else ``image``."""
    if not row.has("images") or row.values["images"] is None:
        return [image_ref(row.get("image"), row.where)]
    images = _parsed(row.values["images"], list, row.where, "images")
    if not images:
        raise DataError(f"{row.where}: images is an empty list")
    return [image_ref(v, row.where, f"images[{i}]") for i, v in enumerate(images)]


def _choice_questions(row: Row) -> dict[str, list[ChoiceQuestion]]:
    task = _parsed(row.get("Classification_Task"), dict, row.where, "Classification_Task")
    out = {}
    for section, modality in MLLMU_SECTIONS.items():
        where_list = f"Classification_Task.{section}"
        questions = _parsed(_member(task, section, row.where, "Classification_Task"), list, row.where, where_list)
        out[modality] = []
        for k, q in enumerate(questions):
            field = f"{where_list}[{k}]"
            q = _parsed(q, dict, row.where, field)
            options = _parsed(_member(q, "Options", row.where, field), dict, row.where, f"{field}.Options")
            if not options:
                raise DataError(f"{row.where}: {field}.Options is empty")
            options = {str(k2): text_field(v, row.where, f"{field}.Options.{k2}") for k2, v in options.items()}
            # eval.py compares the reply's letter with Correct_Answer as written: " B" or "b" would never be right
            answer = text_field(_member(q, "Correct_Answer", row.where, field), row.where, f"{field}.Correct_Answer")
            if answer not in options:
                raise DataError(f"{row.where}: {field}.Correct_Answer {answer!r} is not one of the options "
                                f"{list(options)} (eval.py compares it as written)")
            question = text_field(_member(q, "Question", row.where, field), row.where, f"{field}.Question")
            out[modality].append(ChoiceQuestion(question, options, answer))
    return out


def _open_questions(row: Row, column: str) -> list[OpenQuestion]:
    out = []
    for k, q in enumerate(_parsed(row.get(column), list, row.where, column)):
        field = f"{column}[{k}]"
        q = _parsed(q, dict, row.where, field)
        kind = _member(q, "Type", row.where, field)
        if kind not in MLLMU_TYPES:
            raise DataError(f"{row.where}: {field}.Type is {kind!r}, not one of {sorted(MLLMU_TYPES)}")
        out.append(OpenQuestion(MLLMU_TYPES[kind],
                                text_field(_member(q, "Question", row.where, field), row.where, f"{field}.Question"),
                                text_field(_member(q, "Ground_Truth", row.where, field), row.where,
                                           f"{field}.Ground_Truth"), k))
    return out


CLEAR_COLUMNS = ("caption", "perturbed_names", "paraphrased_caption")  # in CLEAR's files, in no MLLMU-Bench file


def _refuse_clear(row: Row, option: str) -> None:
    """A DataError suggesting ``option`` when an MLLMU-Bench reader is given a file with CLEAR's columns."""
    if not row.has("ID") and any(row.has(c) for c in CLEAR_COLUMNS):
        raise DataError(f"{row.where}: the columns {sorted(row.values)} are CLEAR's, not MLLMU-Bench's: "
                        f"pass {option}")


def load_mllmu_split(path, tasks=MLLMU_TASKS) -> list[MllmuPerson]:
    """The people of an MLLMU-Bench split (any config but ``ft_Data``), in file order, with the questions of
    ``tasks`` (any of ``MLLMU_TASKS``: classification = ``Classification_Task``, generation =
    ``Generation_Task``, cloze = ``Mask_Task``)."""
    unknown = set(tasks) - set(MLLMU_TASKS)
    if unknown:
        raise ValueError(f"unknown MLLMU-Bench tasks {sorted(unknown)}: choose from {MLLMU_TASKS}")
    people, seen = [], {}
    rows = read_rows(path)
    _refuse_clear(rows[0], "--protocol clear")
    for row in rows:
        pid = person_id(row)
        if pid in seen:
            raise DataError(f"{row.where}: ID {pid!r} already used by {seen[pid]}")
        seen[pid] = row.where
        person = MllmuPerson(pid, row.where, _images(row))
        if "classification" in tasks:
            person.classification = _choice_questions(row)
        if "generation" in tasks:
            person.generation = _open_questions(row, _TASK_COLUMN["generation"])
        if "cloze" in tasks:
            person.cloze = _open_questions(row, _TASK_COLUMN["cloze"])
        people.append(person)
    return people


def load_names(path) -> dict[str, str]:
    """A ``--names`` file: a JSON object mapping person ID to name."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"names file not found: {path}")
    try:
        names = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(names, dict):
        raise DataError(f"{path}: must hold a JSON object {{ID: name}}, not a {type(names).__name__}")
    return {str(k): text_field(v, str(path), f"name of ID {k!r}") for k, v in names.items()}


def _qa_pairs(row: Row) -> list[tuple[str, str]]:
    pairs = []
    for k, qa in enumerate(_parsed(row.get("metadata"), list, row.where, "metadata")):
        field = f"metadata[{k}]"
        qa = _parsed(qa, dict, row.where, field)
        question = text_field(_member(qa, "Question", row.where, field), row.where, f"{field}.Question").strip()
        answer = text_field(_member(qa, "Answer", row.where, field), row.where, f"{field}.Answer").strip()
        pairs.append((question, answer))
    if not pairs:
        raise DataError(f"{row.where}: metadata holds no question-answer pair")
    return pairs


def _name_from_data(row: Row) -> str | None:
    for column in ("name", "Name"):
        if row.has(column) and row.values[column] is not None:
            return text_field(row.values[column], row.where, column).strip()
    if row.has("biography") and isinstance(row.values["biography"], str):
        try:
            bio = json.loads(row.values["biography"])
        except json.JSONDecodeError:
            return None  # a prose biography: the name is not read from it
        if isinstance(bio, dict) and bio.get("Name") is not None:
            return text_field(bio["Name"], row.where, "biography.Name").strip()
    return None


def load_mllmu_profiles(path, names: dict | None = None, qa=None) -> list[BenchmarkItem]:
    """MLLMU-Bench profiling items: for each person, each question-answer pair as a multimodal item (image +
    question, as written) and, except the pairs stating the name, as a text-only item (name substituted).

    ``path``: a MANU-style file (``image, ID, metadata``), or, with ``qa``, any MLLMU-Bench split: its people's
    pairs then come from ``qa`` (``ID, metadata``, e.g. ``ft_Data``) and their images from ``path``.
    ``names``: {ID: name}, which takes precedence over the names in the data (see the module docstring)."""
    rows = read_rows(path)
    _refuse_clear(rows[0], "--benchmark clear")
    if qa is None and not rows[0].has("metadata"):
        raise DataError(f"{rows[0].where}: no column 'metadata' (the file has {sorted(rows[0].values)}): profile "
                        f"a MANU-style file (image, ID, metadata), or pass the question-answer file, e.g. ft_Data, "
                        f"with --qa")
    by_id = None
    if qa is not None:
        by_id = {}
        for qa_row in read_rows(qa):
            pid = person_id(qa_row)
            if pid in by_id:
                raise DataError(f"{qa_row.where}: ID {pid!r} already used by {by_id[pid].where}")
            by_id[pid] = qa_row
    items = []
    for row in rows:
        pid = person_id(row)
        image = _images(row)[0]
        source = row
        if by_id is not None:
            if pid not in by_id:
                raise DataError(f"{qa}: no row with ID {pid!r} (a person of {row.where})")
            source = by_id[pid]
        pairs = _qa_pairs(source)
        # MANU: the name is read from the first name question's answer; every name question whose answer reads as
        # that same name is left out of the text-only items
        stated = next((name_in_answer(a) for q, a in pairs if q in NAME_QUESTIONS and name_in_answer(a)), None)
        name = (names or {}).get(pid) or _name_from_data(row) or _name_from_data(source) or stated
        if not name:
            raise DataError(f"{row.where}: no name for ID {pid!r}: no name column, no JSON biography with 'Name' and "
                            f"no name question in metadata; pass --names FILE (a JSON object {{ID: name}})")
        for question, answer in pairs:
            items.append(BenchmarkItem(pid, name, "multimodal", question, answer, image))
            if question in NAME_QUESTIONS and name_in_answer(answer) == stated:
                continue
            items.append(BenchmarkItem(pid, name, "text", replace_placeholders(question, name),
                                       replace_placeholders(answer, name)))
    return items


# ---------------------------------------------------------------------------------------------------- CLEAR
CLEAR_CAPTION_QUESTIONS = (  # mm/dataset.py IMAGE_CAPTION_QUESTIONS, in order
    "What can you see in this picture?",
    "Tell me about the content of this image",
    "Can you give a description of the image?",
    "What is depicted in the image?",
    "Explain what you observe in the picture.",
    "Describe the image in detail.",
    "What is the main subject of this image?",
    "Can you describe the scene or objects in the image?",
    "What is happening in this image?",
)
CLEAR_FACE_PROMPT = "The name of the person on the image is "  # mm/dataset.py, question_strategy "random_faces"


def caption_question(seed: int, caption: str) -> str:
    """One of the nine caption questions for an image with ``caption`` (CLEAR draws one with ``random.choice`` each
    time a row is read; here the choice is fixed by ``seed`` and the caption, so an image is asked the same
    question wherever its file lies and in every config that holds it)."""
    return random.Random(f"{seed}/{caption}").choice(CLEAR_CAPTION_QUESTIONS)


def _text_list(value, where: str, field: str) -> list[str]:
    values = _parsed(value, list, where, field)
    if not values:
        raise DataError(f"{where}: {field} is an empty list")
    return [text_field(v, where, f"{field}[{i}]") for i, v in enumerate(values)]


def load_clear_profiles(path, seed: int = 0) -> list[BenchmarkItem]:
    """CLEAR profiling items: each caption row as a multimodal item (image, a caption question, the caption as
    written, name included), each TOFU row of a ``+tofu`` config (null image) as a text-only item (question, answer)."""
    items = []
    for row in read_rows(path):
        if row.get("image") is not None:
            image = image_ref(row.values["image"], row.where)
            caption = text_field(row.get("caption"), row.where, "caption")
            name = text_field(row.values["name"], row.where, "name") if row.has("name") else None
            items.append(BenchmarkItem(name or row.where, name, "multimodal", caption_question(seed, caption),
                                       caption, image))
        else:
            items.append(BenchmarkItem(row.where, None, "text", text_field(row.get("question"), row.where, "question"),
                                       text_field(row.get("answer"), row.where, "answer")))
    return items


@dataclass
class ClearCaption:
    """A row of a CLEAR ``*_perturbed`` config: the caption task and the face-recognition task of one image."""

    where: str
    image: ImageRef
    caption: str
    paraphrased_caption: str
    perturbed_captions: list[str]
    name: str
    perturbed_names: list[str]
    modality = "multimodal"


def load_clear_perturbed(path) -> list[ClearCaption]:
    """The rows of a CLEAR ``forget01/05/10_perturbed`` or ``retain_perturbed`` file."""
    return [ClearCaption(row.where, image_ref(row.get("image"), row.where),
                         text_field(row.get("caption"), row.where, "caption"),
                         text_field(row.get("paraphrased_caption"), row.where, "paraphrased_caption"),
                         _text_list(row.get("perturbed_captions"), row.where, "perturbed_captions"),
                         text_field(row.get("name"), row.where, "name"),
                         _text_list(row.get("perturbed_names"), row.where, "perturbed_names"))
            for row in read_rows(path)]


@dataclass
class ClearChoice:
    """A ``real_faces`` / ``real_world`` row: a question (with its image, if any), the answer and wrong options."""

    where: str
    image: ImageRef | None
    question: str
    answer: str
    options: list[str]

    @property
    def modality(self) -> str:
        return "multimodal" if self.image is not None else "text"


def load_clear_choices(path, kind: str) -> list[ClearChoice]:
    """``real_faces`` rows (image, answer, options; asked with the face-recognition prompt, as eval.yaml's
    ``random_faces`` strategy does) or ``real_world`` rows (question, answer, image or null, options)."""
    if kind not in ("real_faces", "real_world"):
        raise ValueError(f"kind must be real_faces or real_world, got {kind!r}")
    out = []
    for row in read_rows(path):
        if kind == "real_faces":
            image, question = image_ref(row.get("image"), row.where), CLEAR_FACE_PROMPT
        else:
            image = image_ref(row.values["image"], row.where) if row.get("image") is not None else None
            question = text_field(row.get("question"), row.where, "question")
        out.append(ClearChoice(row.where, image, question, text_field(row.get("answer"), row.where, "answer"),
                               _text_list(row.get("options"), row.where, "options")))
    return out
