"""The real-benchmark path offline: a tiny LLaVA saved with a real LlavaProcessor (a WordLevel tokenizer built in
memory, a CLIP image processor, a chat template), MLLMU-Bench-shaped parquet files with PNG images, and the CLI's
profile -> report -> select -> prune -> evaluate on them. No download anywhere."""
import io
import json
import math
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers as tf
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers

from manu_fast.cli import main
from manu_fast.data import mc_prompt, substitute_name
from manu_fast.masks import Masks
from manu_fast.stats import F, NeuronStats

WORD = re.compile(r"\w+|[^\w\s]+")  # what the Whitespace pre-tokenizer splits: one WordLevel token each
SPECIAL = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
            "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
IMAGE, PATCH = 16, 4
PATCHES = (IMAGE // PATCH) ** 2  # image tokens per image ("default" strategy drops CLIP's CLS token)

PEOPLE = {"1": "Ana Reyes", "2": "Bo Lund", "3": "Cy Moor", "4": "Di Park"}
PROFILES = {  # split -> {person: [(question, answer)]}: questions of different lengths, so batches are padded
    "forget": {"1": [("What is the occupation of this person?", "doctor"), ("Where was this person born?", "Lisbon")],
               "2": [("What pet does the person in the image keep at home?", "a small cat")]},
    "retain": {"3": [("Where was this person born?", "Oslo")],
               "4": [("What is the occupation of this person?", "pilot"), ("What does this person play?", "chess")]},
}
OPTIONS = {"A": "doctor", "B": "pilot", "C": "chef", "D": "judge"}
CLASSIFICATION = {  # split -> {person: (right letters of the image questions, of the text-only questions)}
    "forget": {"1": ("BA", "B"), "2": ("B", "B")},
    "retain": {"3": ("A", "CB"), "4": ("", "DA")},
}
QUESTIONS = ("What is the job of this person?", "Which job fits this person best in the year 2020?")


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 24), colour).save(buf, format="PNG")  # not square, not 16: the processor resizes and crops
    return buf.getvalue()


def _classification_task(pid, letters):
    image, text = letters

    def qs(letters, substitute):
        return [{"Question": substitute(QUESTIONS[i % 2]), "Options": OPTIONS, "Correct_Answer": a}
                for i, a in enumerate(letters)]
    return {"Image_Textual_Questions": qs(image, lambda q: q),
            "Pure_Text_Questions": qs(text, lambda q: substitute_name(q, PEOPLE[pid]))}


def _vocabulary() -> list[str]:
    texts = ["USER: ASSISTANT:", " ".join(PEOPLE.values()), mc_prompt("", OPTIONS)] + list(QUESTIONS)
    texts += [f"{q} {a}" for people in PROFILES.values() for qa in people.values() for q, a in qa]
    return sorted({w for t in texts for w in WORD.findall(t)})


def _processor():
    vocab = {w: i for i, w in enumerate(SPECIAL + tuple(_vocabulary()))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                           unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    image_processor = tf.CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    return tf.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                             vision_feature_select_strategy="default", num_additional_image_tokens=1,
                             chat_template=TEMPLATE)


def _model(processor):
    tok = processor.tokenizer
    vision = tf.CLIPVisionConfig(hidden_size=24, intermediate_size=36, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=IMAGE, patch_size=PATCH)
    text = tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                          tie_word_embeddings=False)
    torch.manual_seed(0)
    cfg = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_index=processor.image_token_id,
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    return tf.LlavaForConditionalGeneration(cfg).eval()


def _write(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("real_bench")
    processor = _processor()
    model = _model(processor)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    files = {}
    for split, people in PROFILES.items():
        files[split] = _write(root / f"{split}.parquet", [
            {"ID": int(pid), "name": PEOPLE[pid], "image": {"bytes": _png((40 * int(pid), 90, 200)), "path": None},
             "metadata": json.dumps([{"Question": q, "Answer": a} for q, a in qa])} for pid, qa in people.items()])
        files[f"{split}_eval"] = _write(root / f"{split}_eval.parquet", [
            {"ID": int(pid), "name": PEOPLE[pid], "image": {"bytes": _png((90, 40 * int(pid), 10)), "path": None},
             "Classification_Task": json.dumps(_classification_task(pid, letters))}
            for pid, letters in CLASSIFICATION[split].items()])
    return {"root": root, "model": root / "model", "processor": processor, **files}


def cli(capsys, *argv):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def _expected_tokens(split: str, modality: str) -> dict[str, int]:
    """Tokens each tower should profile per token kind, counted by hand from the template (bos + words, padding
    excluded): the vision tower sees PATCHES + 1 (CLS) per image, the projector and language model PATCHES."""
    qa = [(pid, q, a) for pid, items in PROFILES[split].items() for q, a in items]
    if modality == "text":
        qa = [(pid, substitute_name(q, PEOPLE[pid]), a) for pid, q, a in qa]
    words = sum(1 + len(WORD.findall(f"USER: {q} ASSISTANT: {a}")) for _, q, a in qa)
    images = len(qa) if modality == "multimodal" else 0
    return {"vision/image": images * (PATCHES + 1), "projector/image": images * PATCHES,
            "language/image": images * PATCHES, "language/text": words}


def _counts(stats: NeuronStats) -> dict[str, dict[str, int]]:
    """{group: {"tower/kind": tokens}} from neuron 0 of the first layer of each tower (every neuron counts alike)."""
    first = {}
    for key in sorted(stats.blocks):
        first.setdefault(stats.fingerprint["layers"][key.split("::")[0]]["tower"], stats.blocks[key])
    return {g: {f"{tower}/{kind}": int(block[F["count"], i, 0]) for tower, block in first.items()
                for kind in ("image", "text") if g.endswith("/" + kind)} for i, g in enumerate(stats.groups)}


def test_profile_select_prune_evaluate_on_parquet(bench, tmp_path, capsys):
    stats, single = tmp_path / "stats.safetensors", tmp_path / "single.safetensors"
    masks, pruned = tmp_path / "masks.safetensors", tmp_path / "pruned"
    common = ["--forget", bench["forget"], "--retain", bench["retain"], "--no-progress"]
    cli(capsys, "profile", bench["model"], stats, *common, "--batch-size", 2)
    cli(capsys, "profile", bench["model"], single, *common, "--batch-size", 1)
    s = NeuronStats.load(stats)
    counts = _counts(s)
    for split in PROFILES:
        for modality in ("multimodal", "text"):
            want = _expected_tokens(split, modality)
            for kind in ("image", "text"):
                got = counts[f"{split}/{modality}/{kind}"]
                assert got == {k: want.get(k, 0) for k in got}, (split, modality, kind)
    # padded batches profile exactly the tokens of unpadded ones; values agree up to float32 matmul reordering
    one = NeuronStats.load(single)
    for key, block in s.blocks.items():
        assert torch.equal(block[F["count"]], one.blocks[key][F["count"]]), key
        scale = block[F["sum_abs"]].abs().amax()
        torch.testing.assert_close(block[F["sum_abs"]], one.blocks[key][F["sum_abs"]], rtol=1e-5, atol=1e-5 * scale)

    assert "language 2" in cli(capsys, "report", stats)
    cli(capsys, "select", stats, masks, "--strategy", "manu-code", "--alpha", 10)
    assert Masks.load(masks).num_pruned() > 0
    cli(capsys, "prune", bench["model"], masks, pruned)

    # masks applied reversibly to the original == weights zeroed in the pruned copy (its processor travelled with it)
    evals = ["--forget", bench["forget_eval"], "--retain", bench["retain_eval"], "--batch-size", 2]
    masked, zeroed = tmp_path / "masked.json", tmp_path / "zeroed.json"
    cli(capsys, "evaluate", bench["model"], *evals, "--masks", masks, "--json", masked)
    out = cli(capsys, "evaluate", pruned, *evals, "--json", zeroed)
    a, b = json.loads(masked.read_text())["results"], json.loads(zeroed.read_text())["results"]
    assert list(a) == ["forget/multimodal", "forget/text", "retain/multimodal", "retain/text"] and "forget/text" in out
    for key in a:
        assert a[key]["n"] == b[key]["n"] and a[key]["accuracy"] == b[key]["accuracy"], key
        assert a[key]["answer_prob"] == pytest.approx(b[key]["answer_prob"], rel=1e-5), key


def _rigged_model(bench):
    """The tiny LLaVA made to answer "B" after the last real token and "A" at padding: attention and MLP outputs
    zeroed, so a position's logits depend on its own token only, and the embeddings / lm_head chosen by hand."""
    tok = bench["processor"].tokenizer
    model = _model(bench["processor"])
    lm = model.model.language_model
    with torch.no_grad():
        for layer in lm.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        lm.embed_tokens.weight.zero_()
        lm.embed_tokens.weight[tok.convert_tokens_to_ids(":"), 0] = 1.0  # the generation prompt ends with ":"
        lm.embed_tokens.weight[tok.pad_token_id, 1] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok.convert_tokens_to_ids("B"), 0] = 1.0
        model.lm_head.weight[tok.convert_tokens_to_ids("A"), 1] = 1.0
    return model


def test_evaluate_accuracy_of_a_rigged_model(bench, tmp_path, capsys):
    rigged, results = tmp_path / "rigged", tmp_path / "results.json"
    _rigged_model(bench).save_pretrained(rigged)
    bench["processor"].save_pretrained(rigged)
    out = cli(capsys, "evaluate", rigged, "--forget", bench["forget_eval"], "--retain", bench["retain_eval"],
              "--batch-size", 2, "--json", results)
    got = json.loads(results.read_text())["results"]
    # logit of "B" at the last real token: RMSNorm of a one-hot embedding is sqrt(hidden) (eps 1e-6), every other
    # token's logit is 0, so p(B) = e^z / (e^z + V - 1) and any other letter gets 1 / (e^z + V - 1)
    z, vocab = math.sqrt(32 / (1 + 32e-6)), len(bench["processor"].tokenizer)
    p_b, p_other = math.exp(z) / (math.exp(z) + vocab - 1), 1 / (math.exp(z) + vocab - 1)
    for split, people in CLASSIFICATION.items():
        for column, modality in enumerate(("multimodal", "text")):
            letters = "".join(p[column] for p in people.values())
            want = {"accuracy": letters.count("B") / len(letters), "n": len(letters),
                    "answer_prob": sum(p_b if c == "B" else p_other for c in letters) / len(letters)}
            assert got[f"{split}/{modality}"] == pytest.approx(want, rel=1e-6), (split, modality)
    assert re.search(r"forget/text\s+100\.00\s", out) and re.search(r"retain/text\s+25\.00\s", out), out


def test_bad_real_inputs_are_one_line_errors(bench, tmp_path, capsys):
    no_image = _write(tmp_path / "no_image.parquet", [{"ID": 1, "name": PEOPLE["1"], "image": None,
                                                       "metadata": json.dumps([{"Question": "q", "Answer": "a"}])}])
    bare = tmp_path / "bare"  # weights and config only: no processor to encode the questions with
    _model(bench["processor"]).save_pretrained(bare)
    for argv, match in [
        (["profile", bench["model"], tmp_path / "s.safetensors", "--forget", no_image, "--retain", bench["retain"]],
         "person 1 has no image"),
        (["profile", bench["model"], tmp_path / "s.safetensors", "--forget", bench["forget"], "--retain",
          bench["retain"], "--batch-size", 0], "--batch-size must be >= 1"),
        (["evaluate", bare, "--forget", bench["forget_eval"], "--retain", bench["retain_eval"]],
         "no usable processor saved with the model"),
    ]:
        capsys.readouterr()
        assert main([str(a) for a in argv]) == 2
        last = capsys.readouterr().err.rstrip("\n").split("\n")[-1]
        assert last.startswith("manu-fast: error:") and match in last, last
