"""MLLMU-Bench and CLEAR files written in their published parquet schemas (HF dataset cards MLLMMU/MLLMU-Bench and
therem/CLEAR: nested structs, string IDs, image structs, Test_Set's ``images`` lists, CLEAR's ``+tofu``, ``_perturbed``,
``real_faces`` and ``real_world`` configs), and a tiny LLaVA saved with a real LlavaProcessor (a WordLevel tokenizer
built in memory, a CLIP image processor, a chat template). No download anywhere.

``rigged_model`` answers "B" after a ":" token and "A" after padding, so replies and losses are known by hand
(``rigged_loss``)."""
import io
import json
import math
import re

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import transformers as tf
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers

from manu_fast import protocols
from manu_fast.datasets import CLEAR_CAPTION_QUESTIONS, CLEAR_FACE_PROMPT

WORD = re.compile(r"\w+|[^\w\s]+")  # what the Whitespace pre-tokenizer splits: one WordLevel token each
SPECIAL = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
            "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}ASSISTANT:{% endif %}")  # an assistant turn ends with </s>, a token
IMAGE, PATCH = 16, 4
PATCHES = (IMAGE // PATCH) ** 2  # image tokens per image ("default" strategy drops CLIP's CLS token)

# ---- MLLMU-Bench
PEOPLE = {"1": "Ana Reyes", "2": "Bo Lund", "3": "Cy Moor", "4": "Di Park", "5": "Ed Shaw", "6": "Flo Kent"}
CELEBRITIES = {"c1": "Gil Ames", "c2": "Hal Ivy"}
FORGET, RETAIN = ("1", "2", "3"), ("4", "5", "6")
OPTIONS = {"A": "doctor", "B": "pilot", "C": "chef", "D": "judge"}
LETTERS = {  # ID -> (right letters of the image questions, of the text-only questions)
    "1": ("BA", "B"), "2": ("B", "CB"), "3": ("AB", "D"), "4": ("C", "BA"), "5": ("BB", "A"), "6": ("D", "B"),
    "c1": ("B", "A"), "c2": ("AB", "BB"),
}
IMAGE_QUESTIONS = ("What is the job of this person?", "Which job fits this person best in the year 2020?")
NAMES_FILE = {"3": "Cy Moor"}  # person 3's profile states no name
FT_QA = {  # ft_Data metadata: (question, answer) pairs
    "1": [("What is the name of the person in the image?", "Her name is Ana Reyes."),
          ("What is the occupation of this person?", "This person is a doctor."),
          ("Where does the individual live?", "The individual lives in Lisbon.")],
    "2": [("What is this person's name?", "This person is named Bo Lund."),
          ("What pet does the person in the image keep at home?", "a small cat")],
    "3": [("Where was this person born?", "Oslo")],
    "4": [("What is the full name of this person?", "Di Park"), ("What does this person play?", "chess")],
    "5": [("What is the name of this individual?", "Ed Shaw."), ("What is this person's job?", "pilot")],
    "6": [("What is this person's name?", "Flo Kent"), ("Which city does this profile mention?", "Rome")],
}


def png(colour, size=(20, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")  # not square, not 16: the processor resizes and crops
    return buf.getvalue()


def image_struct(colour) -> dict:
    return {"bytes": png(colour), "path": None}


IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
CHOICE_TYPE = pa.struct([("Correct_Answer", pa.string()),
                         ("Options", pa.struct([(k, pa.string()) for k in "ABCD"])), ("Question", pa.string())])
TASK_TYPE = pa.struct([("Image_Textual_Questions", pa.list_(CHOICE_TYPE)),
                       ("Pure_Text_Questions", pa.list_(CHOICE_TYPE))])
OPEN_TYPE = pa.list_(pa.struct([("Ground_Truth", pa.string()), ("Question", pa.string()), ("Type", pa.string())]))
TASK_FIELDS = [("ID", pa.string()), ("biography", pa.string()), ("question", pa.string()), ("answer", pa.string()),
               ("Classification_Task", TASK_TYPE), ("Generation_Task", OPEN_TYPE), ("Mask_Task", OPEN_TYPE)]
SPLIT_SCHEMA = pa.schema([("image", IMAGE_TYPE)] + TASK_FIELDS)
TEST_SCHEMA = pa.schema([("images", pa.list_(IMAGE_TYPE))] + TASK_FIELDS)
PROFILE_SCHEMA = pa.schema([("image", IMAGE_TYPE), ("ID", pa.string()), ("metadata", pa.string())])


def classification(pid) -> dict:
    image, text = LETTERS[pid]
    name = {**PEOPLE, **CELEBRITIES}[pid]
    return {"Image_Textual_Questions": [{"Question": IMAGE_QUESTIONS[i % 2], "Options": OPTIONS, "Correct_Answer": a}
                                        for i, a in enumerate(image)],
            "Pure_Text_Questions": [{"Question": IMAGE_QUESTIONS[i % 2].replace("this person", name),
                                     "Options": OPTIONS, "Correct_Answer": a} for i, a in enumerate(text)]}


def generation(pid) -> list:
    name = {**PEOPLE, **CELEBRITIES}[pid]
    return [{"Question": "What does this person do?", "Ground_Truth": "B is a pilot", "Type": "Image_Textual"},
            {"Question": f"What does {name} do?", "Ground_Truth": f"{name} flies planes", "Type": "Pure_Text"}]


def cloze(pid) -> list:
    name = {**PEOPLE, **CELEBRITIES}[pid]
    odd = pid[-1] in "13579"
    return [{"Question": "This person works as a __.", "Ground_Truth": "B" if odd else "pilot",
             "Type": "Image_Textual"},
            {"Question": f"{name} works as a __.", "Ground_Truth": "b", "Type": "Pure_Text"},
            {"Question": f"{name} lives in __.", "Ground_Truth": "Oslo", "Type": "Pure_Text"}]


def colour(pid, k=0):
    return (30 * (len(pid) + k) % 256, 40 * int(pid[-1]) % 256, 90 + 20 * k)


def split_row(pid) -> dict:
    name = {**PEOPLE, **CELEBRITIES}[pid]
    return {"image": image_struct(colour(pid)), "ID": pid, "biography": f"{name} was born in a small town.",
            "question": "Tell me about this person.", "answer": f"{name} works as a pilot.",
            "Classification_Task": classification(pid), "Generation_Task": generation(pid), "Mask_Task": cloze(pid)}


def write(path, rows, schema=None):
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def write_mllmu(root) -> dict:
    """The MLLMU-Bench configs as downloaded (``<config>/train-0000N-of-0000M.parquet``), and a MANU-style profile
    file; returns {config: path}."""
    files = {}

    def config(name, rows, schema, shards=1):
        (root / name).mkdir()
        step = -(-len(rows) // shards)
        for k in range(shards):
            write(root / name / f"train-{k:05d}-of-{shards:05d}.parquet", rows[k * step:(k + 1) * step], schema)
        files[name] = root / name if shards > 1 else root / name / f"train-00000-of-{shards:05d}.parquet"

    config("Full_Set", [split_row(p) for p in PEOPLE], SPLIT_SCHEMA)
    config("forget_5", [split_row(p) for p in FORGET], SPLIT_SCHEMA)
    config("retain_95", [split_row(p) for p in RETAIN], SPLIT_SCHEMA)
    config("Retain_Set", [split_row(p) for p in CELEBRITIES], SPLIT_SCHEMA)
    test_rows = []
    for p in reversed(list(PEOPLE)):  # another order than the forget file's
        row = split_row(p)
        del row["image"]
        test_rows.append({"images": [image_struct(colour(p, k)) for k in (1, 2, 3)], **row})
    config("Test_Set", test_rows, TEST_SCHEMA, shards=2)
    config("ft_Data", [{"image": image_struct(colour(p)), "ID": p, "metadata": json.dumps(
        [{"Question": q, "Answer": a} for q, a in FT_QA[p]])} for p in PEOPLE], PROFILE_SCHEMA)
    files["manu_forget"] = write(root / "manu_forget.parquet", [{"image": image_struct(colour(p)), "ID": p, "metadata":
                                 json.dumps([{"Question": q, "Answer": a} for q, a in FT_QA[p]])} for p in FORGET],
                                 PROFILE_SCHEMA)
    files["names"] = root / "names.json"
    files["names"].write_text(json.dumps(NAMES_FILE))
    return files


# ---- CLEAR
CLEAR_FORGET = {"Ivo Kent": "Ivo Kent reads a map on a train.", "Una Dale": "Una Dale paints a B on a wall."}
CLEAR_RETAIN = {"Rex Hale": "Rex Hale walks a dog in a park.", "Zoe Marsh": "Zoe Marsh plays chess at home."}
TOFU = {"forget": [("Who wrote The Salt Road?", "Ivo Kent wrote The Salt Road.")],
        "retain": [("Where does Rex Hale write?", "Rex Hale writes in Oslo."), ("What is B?", "B is a letter.")]}
WRONG_NAMES = ("Tom Hill", "Sam Roe", "Kim Lee")
REAL_FACES = [("B", ["Tom Hill", "Sam Roe"]), ("Ann Poe", ["B", "Kim Lee", "Ann Poe"])]  # (answer, options)
REAL_WORLD = [("Which river runs through this city?", "the Seine", True, ["the Thames", "B"]),
              ("What is the capital of Peru?", "B", False, ["Quito", "Bogota"]),
              ("Which tower is in the picture?", "B", True, ["Big Ben"])]
CLEAR_CAPTION_SCHEMA = pa.schema([("image", IMAGE_TYPE), ("caption", pa.string()), ("question", pa.string()),
                                  ("answer", pa.string())])
PERTURBED_SCHEMA = pa.schema([("image", IMAGE_TYPE), ("caption", pa.string()), ("name", pa.string()),
                              ("perturbed_captions", pa.list_(pa.string())), ("paraphrased_caption", pa.string()),
                              ("perturbed_names", pa.list_(pa.string()))])


def perturbed_row(k, name, caption) -> dict:
    return {"image": image_struct((200, 10 * k, 60)), "caption": caption, "name": name,
            "perturbed_captions": [caption.replace(name, w) for w in WRONG_NAMES[:2]],
            "paraphrased_caption": f"A picture of {name}.", "perturbed_names": list(WRONG_NAMES[:2 + k % 2])}


def write_clear(root) -> dict:
    files = {}

    def config(name, rows, schema):
        (root / name).mkdir()
        files[name] = write(root / name / "train-00000-of-00001.parquet", rows, schema)

    for split, people in (("forget10", CLEAR_FORGET), ("retain90", CLEAR_RETAIN)):
        key = "forget" if split.startswith("forget") else "retain"
        rows = [{"image": image_struct((10 * k, 200, 30)), "caption": c, "question": None, "answer": None}
                for k, c in enumerate(people.values())]
        rows += [{"image": None, "caption": None, "question": q, "answer": a} for q, a in TOFU[key]]
        config(f"{split}+tofu", rows, CLEAR_CAPTION_SCHEMA)
    config("forget10_perturbed", [perturbed_row(k, n, c) for k, (n, c) in enumerate(CLEAR_FORGET.items())],
           PERTURBED_SCHEMA)
    config("retain_perturbed", [perturbed_row(k, n, c) for k, (n, c) in enumerate(CLEAR_RETAIN.items())],
           PERTURBED_SCHEMA)
    config("real_faces", [{"image": image_struct((5, 5, 50 * k)), "answer": a, "options": o}
                          for k, (a, o) in enumerate(REAL_FACES)],
           pa.schema([("image", IMAGE_TYPE), ("answer", pa.string()), ("options", pa.list_(pa.string()))]))
    config("real_world", [{"question": q, "answer": a, "image": image_struct((9, 90, 9)) if has_image else None,
                           "prompt": q, "options": o} for q, a, has_image, o in REAL_WORLD],
           pa.schema([("question", pa.string()), ("answer", pa.string()), ("image", IMAGE_TYPE),
                      ("prompt", pa.string()), ("options", pa.list_(pa.string()))]))
    return files


# ---- model and processor
def _vocabulary() -> list[str]:
    texts = ["USER: ASSISTANT: Question: Correct Answer: Answer: [Blank]", protocols.LETTER_INSTRUCTION,
             protocols.CLOZE_INSTRUCTION, protocols.GENERATION_INSTRUCTION.format(" accurately"), CLEAR_FACE_PROMPT]
    texts += list(CLEAR_CAPTION_QUESTIONS) + list(IMAGE_QUESTIONS) + list(OPTIONS.values()) + list("ABCD")
    for pid in {**PEOPLE, **CELEBRITIES}:
        row = split_row(pid)
        texts += [row["biography"], row["answer"]] + [q["Question"] for q in row["Classification_Task"]
                                                      ["Pure_Text_Questions"]]
        texts += [f"{q['Question']} {q['Ground_Truth']}" for q in row["Generation_Task"] + row["Mask_Task"]]
    texts += [f"{q} {a}" for qa in FT_QA.values() for q, a in qa]
    texts += list(CLEAR_FORGET) + list(CLEAR_FORGET.values()) + list(CLEAR_RETAIN) + list(CLEAR_RETAIN.values())
    texts += [f"{q} {a}" for qa in TOFU.values() for q, a in qa] + list(WRONG_NAMES) + ["A picture of ."]
    texts += [a + " " + " ".join(o) for a, o in REAL_FACES] + [f"{q} {a} {' '.join(o)}" for q, a, _, o in REAL_WORLD]
    return sorted({w for t in texts for w in WORD.findall(t)})


def processor():
    vocab = {w: i for i, w in enumerate(SPECIAL + tuple(w for w in _vocabulary() if w not in SPECIAL))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                           unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    # the PIL image processor: the torchvision one is the default only where torchvision is installed
    image_processor = tf.CLIPImageProcessorPil(size={"shortest_edge": IMAGE},
                                               crop_size={"height": IMAGE, "width": IMAGE})
    return tf.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                             vision_feature_select_strategy="default", num_additional_image_tokens=1,
                             chat_template=TEMPLATE)


def model(proc):
    tok = proc.tokenizer
    vision = tf.CLIPVisionConfig(hidden_size=24, intermediate_size=36, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=IMAGE, patch_size=PATCH)
    text = tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    cfg = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_index=proc.image_token_id,
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    return tf.LlavaForConditionalGeneration(cfg).eval()


RIGGED_Z = (32 / (1 + 32e-6)) ** 0.5  # RMSNorm (eps 1e-6) of a one-hot embedding in 32 dimensions


def rigged_loss(answer: str, vocab: int) -> float:
    """The rigged model's mean loss per token of an answer turn: its first word costs -log p after ":" (p_b for "B",
    else p_o), every later word and the turn's closing </s> cost log V (uniform logits)."""
    p_b, p_o = math.exp(RIGGED_Z) / (math.exp(RIGGED_Z) + vocab - 1), 1 / (math.exp(RIGGED_Z) + vocab - 1)
    words = WORD.findall(answer)
    return (-math.log(p_b if words[0] == "B" else p_o) + len(words) * math.log(vocab)) / (len(words) + 1)


def rigged_model(proc):
    """The tiny LLaVA made to answer "B" after a ":" token and "A" after padding: attention and MLP outputs zeroed,
    so a position's logits depend on its own token only; every other token's logits are all 0 (uniform, argmax
    <pad>, which ends a generation: every greedy reply is "B")."""
    tok = proc.tokenizer
    m = model(proc)
    lm = m.model.language_model
    with torch.no_grad():
        for layer in lm.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        lm.embed_tokens.weight.zero_()
        lm.embed_tokens.weight[tok.convert_tokens_to_ids(":"), 0] = 1.0  # the generation prompt ends with ":"
        lm.embed_tokens.weight[tok.pad_token_id, 1] = 1.0
        m.lm_head.weight.zero_()
        m.lm_head.weight[tok.convert_tokens_to_ids("B"), 0] = 1.0
        m.lm_head.weight[tok.convert_tokens_to_ids("A"), 1] = 1.0
    m.generation_config.eos_token_id = tok.pad_token_id  # after "B" comes <pad> (all logits 0): the reply ends
    return m


# ---- a whole folder: what the CLI tests (and a user following the README) run on
def write_all(root) -> dict:
    """In ``root``: ``model`` (the tiny LLaVA with its processor), ``rigged`` (``rigged_model``, with it), ``bare``
    (weights only, no processor), ``mllmu/`` and ``clear/`` (``write_mllmu``, ``write_clear``); returns their paths
    and the processor."""
    proc = processor()
    for name, m in (("model", model(proc)), ("rigged", rigged_model(proc)), ("bare", model(proc))):
        m.save_pretrained(root / name)
        if name != "bare":
            proc.save_pretrained(root / name)
    (root / "mllmu").mkdir()
    (root / "clear").mkdir()
    return {"root": root, "processor": proc, "model": root / "model", "rigged": root / "rigged", "bare": root / "bare",
            "mllmu": write_mllmu(root / "mllmu"), "clear": write_clear(root / "clear")}
