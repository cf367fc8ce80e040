"""The real-benchmark CLI path offline, on files in MLLMU-Bench's and CLEAR's published schemas (tests/bench_files.py):
profile -> report -> select -> prune -> evaluate for both benchmarks, every protocol, and the metrics of a model whose
replies and losses are known by hand. No download anywhere."""
import json
import math
import re
import sys

import pytest
import torch

import bench_files as bf
from manu_fast.datasets import NAME_QUESTIONS, name_in_answer, replace_placeholders
from manu_fast.cli import main
from manu_fast.masks import Masks
from manu_fast.stats import FIELD_INDEX, NeuronStats


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return bf.write_all(tmp_path_factory.mktemp("real_bench"))


def cli(capsys, *argv):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def _counts(stats: NeuronStats) -> dict[str, dict[str, int]]:
    """{group: {"tower/kind": tokens}} from neuron 0 of the first layer of each tower (every neuron counts alike)."""
    first = {}
    for key in sorted(stats.blocks):
        first.setdefault(stats.fingerprint["layers"][key.split("::")[0]]["tower"], stats.blocks[key])
    return {g: {f"{tower}/{kind}": int(block[FIELD_INDEX["count"], i, 0]) for tower, block in first.items()
                for kind in ("image", "text") if g.endswith("/" + kind)} for i, g in enumerate(stats.groups)}


def _mllmu_profile_pairs(people) -> dict[str, list[tuple[str, str]]]:
    """(question, answer) per modality, built by hand from MANU's rules (tests/bench_files.py's FT_QA)."""
    out = {"multimodal": [], "text": []}
    for pid in people:
        pairs = bf.FT_QA[pid]
        name = bf.NAMES_FILE.get(pid) or next(name_in_answer(a) for q, a in pairs if q in NAME_QUESTIONS)
        out["multimodal"] += pairs
        out["text"] += [(replace_placeholders(q, name), replace_placeholders(a, name)) for q, a in pairs
                        if q not in NAME_QUESTIONS]
    return out


def _expected_tokens(pairs, modality) -> dict[str, int]:
    """Tokens each tower should profile, counted from the template (bos + words, padding excluded): the vision tower
    sees PATCHES + 1 (CLS) per image, the projector and language model PATCHES."""
    words = sum(1 + len(bf.WORD.findall(f"USER: {q} ASSISTANT: {a}")) for q, a in pairs)
    images = len(pairs) if modality == "multimodal" else 0
    return {"vision/image": images * (bf.PATCHES + 1), "projector/image": images * bf.PATCHES,
            "language/image": images * bf.PATCHES, "language/text": words}


def _check_counts(stats_path, pairs_by_split):
    counts = _counts(NeuronStats.load(stats_path))
    for split, pairs in pairs_by_split.items():
        for modality in ("multimodal", "text"):
            want = _expected_tokens(pairs[modality], modality)
            for kind in ("image", "text"):
                got = counts[f"{split}/{modality}/{kind}"]
                assert got == {k: want.get(k, 0) for k in got}, (split, modality, kind)


def _masked_equals_pruned(capsys, bench, tmp_path, stats, evaluate_args):
    """select -> prune, then evaluate with the masks applied reversibly and on the pruned copy: same results."""
    masks, pruned = tmp_path / "masks.safetensors", tmp_path / "pruned"
    cli(capsys, "select", stats, masks, "--strategy", "manu-code", "--alpha", 10)
    assert Masks.load(masks).num_pruned() > 0
    cli(capsys, "prune", bench["model"], masks, pruned)
    masked, zeroed = tmp_path / "masked.json", tmp_path / "zeroed.json"
    cli(capsys, "evaluate", bench["model"], *evaluate_args, "--masks", masks, "--json", masked)
    cli(capsys, "evaluate", pruned, *evaluate_args, "--json", zeroed)
    a, b = json.loads(masked.read_text())["results"], json.loads(zeroed.read_text())["results"]
    assert a.keys() == b.keys()
    for key in a:
        for task in a[key]:
            for metric, value in a[key][task].items():
                if isinstance(value, float):
                    assert value == pytest.approx(b[key][task][metric], rel=1e-5, abs=1e-6), (key, task, metric)
                else:
                    assert value == b[key][task][metric], (key, task, metric)
    return a


def test_mllmu_profile_select_prune_evaluate(bench, tmp_path, capsys):
    files = bench["mllmu"]
    stats, single = tmp_path / "stats.safetensors", tmp_path / "single.safetensors"
    common = ["--forget", files["forget_5"], "--retain", files["retain_95"], "--qa", files["ft_Data"],
              "--names", files["names"], "--no-progress"]
    cli(capsys, "profile", bench["model"], stats, *common, "--batch-size", 2)
    cli(capsys, "profile", bench["model"], single, *common, "--batch-size", 1)
    _check_counts(stats, {"forget": _mllmu_profile_pairs(bf.FORGET), "retain": _mllmu_profile_pairs(bf.RETAIN)})
    # padded batches profile exactly the tokens of unpadded ones; values agree up to float32 matmul reordering
    s, one = NeuronStats.load(stats), NeuronStats.load(single)
    for key, block in s.blocks.items():
        assert torch.equal(block[FIELD_INDEX["count"]], one.blocks[key][FIELD_INDEX["count"]]), key
        scale = block[FIELD_INDEX["sum_abs"]].abs().amax()
        torch.testing.assert_close(block[FIELD_INDEX["sum_abs"]], one.blocks[key][FIELD_INDEX["sum_abs"]], rtol=1e-5, atol=1e-5 * scale)
    # MANU's own prune file (image, ID, metadata) profiles the forget people exactly as forget_5 + ft_Data does
    manu = tmp_path / "manu.safetensors"
    cli(capsys, "profile", bench["model"], manu, "--forget", files["manu_forget"], "--retain", files["retain_95"],
        "--qa", files["ft_Data"], "--names", files["names"], "--no-progress", "--batch-size", 2)
    m = NeuronStats.load(manu)
    assert all(torch.equal(m.blocks[k], s.blocks[k]) for k in s.blocks)
    assert "language 2" in cli(capsys, "report", stats)

    pytest.importorskip("rouge_score", reason="the generation task's ROUGE needs rouge-score (the 'eval' extra)")
    evaluate = ["--forget", files["forget_5"], "--retain", files["retain_95"], "--test", files["Test_Set"],
                "--celebrity", files["Retain_Set"], "--few-shot", files["Full_Set"], "--protocol", "mllmu",
                "--batch-size", 3, "--max-new-tokens", 4, "--no-progress"]
    results = _masked_equals_pruned(capsys, bench, tmp_path, stats, evaluate)
    splits = [f"{s}/{m}" for s in ("forget", "retain", "test", "celebrity") for m in ("multimodal", "text")]
    assert list(results) == splits
    assert all(set(results[k]) == {"classification", "cloze", "generation"} for k in splits)


def _asked(letters_by_person, few_shot_person, shots):
    """The right letters of the questions asked of a split: the few-shot person's first ``shots`` are not asked."""
    return "".join(letters[shots:] if pid == few_shot_person else letters for pid, letters in letters_by_person)


def test_mllmu_protocol_on_a_rigged_model(bench, tmp_path, capsys):
    """The rigged model replies "B" to everything: every metric follows from the files by hand."""
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer", reason="ROUGE needs rouge-score (the 'eval' extra)")
    files, results = bench["mllmu"], tmp_path / "results.json"
    out = cli(capsys, "evaluate", bench["rigged"], "--forget", files["forget_5"], "--retain", files["retain_95"],
              "--test", files["Test_Set"], "--celebrity", files["Retain_Set"], "--few-shot", files["Full_Set"],
              "--protocol", "mllmu", "--batch-size", 4, "--max-new-tokens", 3, "--no-progress", "--json", results)
    report = json.loads(results.read_text())
    got, few_shot = report["results"], report["few_shot"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    people = {"forget": bf.FORGET, "retain": bf.RETAIN, "test": bf.FORGET, "celebrity": tuple(bf.CELEBRITIES)}
    for split, ids in people.items():
        shot = few_shot[split]["classification"]
        assert shot == ([] if split == "celebrity" else shot) and len(shot) == (split != "celebrity")
        cloze_shots = set(few_shot[split]["cloze"])
        for column, modality in enumerate(("multimodal", "text")):
            task = got[f"{split}/{modality}"]
            # classification: the few-shot person's own questions are not asked; "B" is right where the answer is B
            asked = _asked([(p, bf.LETTERS[p][column]) for p in ids], shot[0] if shot else None,
                           len(bf.LETTERS[shot[0]][column]) if shot else 0)
            c = task["classification"]
            assert (c["n"], c["no_letter"]) == (len(asked), 0), (split, modality)
            assert c["accuracy"] == pytest.approx(asked.count("B") / len(asked)), (split, modality)
            assert c["skipped_few_shot"] == sum(len(bf.LETTERS[p][column]) for p in shot)
            # cloze: a reply "B" holds the ground truths "B" and "b", no other
            kind = "Image_Textual" if column == 0 else "Pure_Text"
            truths = [q["Ground_Truth"] for p in ids if p not in cloze_shots for q in bf.cloze(p) if q["Type"] == kind]
            assert task["cloze"]["n"] == len(truths)
            assert task["cloze"]["accuracy"] == pytest.approx(sum(t.lower() == "b" for t in truths) / len(truths))
            # generation: ROUGE F-measure of "B" against each ground truth, computed here with rouge-score
            truths = [q["Ground_Truth"] for p in ids for q in bf.generation(p) if q["Type"] == kind]
            g = task["generation"]
            assert g["n"] == len(truths) and {r["reply"] for r in g["predictions"]} == {"B"}
            for metric in ("rouge1", "rouge2", "rougeL"):
                want = sum(scorer.score(t, "B")[metric].fmeasure for t in truths) / len(truths)
                assert g[metric] == pytest.approx(want), (split, modality, metric)
    assert set(few_shot["test"]["cloze"]) <= set(bf.FORGET) and set(few_shot["retain"]["cloze"]) <= set(bf.RETAIN)
    assert re.search(r"forget/text\s+classification\s+\d+\s+accuracy \d+\.\d\d %", out), out


def test_logit_protocol_on_a_rigged_model(bench, tmp_path, capsys):
    """Our logit protocol on the real schema: the logit of "B" at the last real token (padding would answer "A")."""
    files, results = bench["mllmu"], tmp_path / "results.json"
    cli(capsys, "evaluate", bench["rigged"], "--forget", files["forget_5"], "--retain", files["retain_95"],
        "--test", files["Test_Set"], "--batch-size", 2, "--json", results, "--no-progress")
    got = json.loads(results.read_text())["results"]
    # RMSNorm of a one-hot embedding is sqrt(hidden), every other token's logit is 0, so p(B) = e^z / (e^z + V - 1)
    z, vocab = bf.RIGGED_Z, len(bench["processor"].tokenizer)
    p_b, p_other = math.exp(z) / (math.exp(z) + vocab - 1), 1 / (math.exp(z) + vocab - 1)
    for split, ids in (("forget", bf.FORGET), ("retain", bf.RETAIN), ("test", bf.FORGET)):
        for column, modality in enumerate(("multimodal", "text")):
            letters = "".join(bf.LETTERS[p][column] for p in ids)
            want = {"accuracy": letters.count("B") / len(letters), "n": len(letters),
                    "answer_prob": sum(p_b if c == "B" else p_other for c in letters) / len(letters)}
            assert got[f"{split}/{modality}"]["classification"] == pytest.approx(want, rel=1e-6), (split, modality)


def test_clear_profile_select_prune_evaluate(bench, tmp_path, capsys):
    files, stats = bench["clear"], tmp_path / "stats.safetensors"
    cli(capsys, "profile", bench["model"], stats, "--benchmark", "clear", "--forget", files["forget10+tofu"],
        "--retain", files["retain90+tofu"], "--batch-size", 2, "--no-progress")
    from manu_fast.datasets import caption_question
    pairs = {split: {"multimodal": [(caption_question(0, c), c) for c in people.values()], "text": bf.TOFU[split]}
             for split, people in (("forget", bf.CLEAR_FORGET), ("retain", bf.CLEAR_RETAIN))}
    _check_counts(stats, pairs)
    pytest.importorskip("rouge_score", reason="CLEAR's ROUGE needs rouge-score (the 'eval' extra)")
    evaluate = ["--protocol", "clear", "--forget", files["forget10_perturbed"], "--retain", files["retain_perturbed"],
                "--real-faces", files["real_faces"], "--real-world", files["real_world"], "--batch-size", 3,
                "--max-new-tokens", 4, "--no-progress"]
    results = _masked_equals_pruned(capsys, bench, tmp_path, stats, evaluate)
    assert list(results) == ["forget/multimodal", "retain/multimodal", "real_faces/multimodal", "real_world/mixed"]


def _utility_values(label, metrics) -> dict:
    return {"ROUGE " + label: metrics["rougeL_recall"], "Prob. " + label: metrics["prob"],
            "Truth Ratio " + label: metrics["truth_ratio"]}


def test_clear_protocol_on_a_rigged_model(bench, tmp_path, capsys):
    """Rigged model: every answer turn costs ``bf.rigged_loss``; the reply is "B" (CLEAR's text prompt, or ours with
    the image, both end with ":"). Truth ratio, probability, ROUGE and Model Utility as calculate_metrics.py."""
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer", reason="ROUGE needs rouge-score (the 'eval' extra)")
    files, results = bench["clear"], tmp_path / "results.json"
    argv = ["evaluate", bench["rigged"], "--protocol", "clear", "--forget", files["forget10_perturbed"], "--retain",
            files["retain_perturbed"], "--real-faces", files["real_faces"], "--real-world", files["real_world"],
            "--batch-size", 2, "--max-new-tokens", 3, "--no-progress", "--json", results]
    out = cli(capsys, *argv)
    report = json.loads(results.read_text())
    got = report["results"]

    def loss(answer):
        return bf.rigged_loss(answer, len(bench["processor"].tokenizer))

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def expected(rows, forget, prob):
        """calculate_metrics.py's metrics of (truth, paraphrase, wrong answers) rows."""
        wrong = [loss(w) for _, _, ws in rows for w in ws]
        ratios = [math.exp(sum(wrong) / len(wrong) - loss(p)) for _, p, _ in rows]
        probs = [math.exp(-loss(t)) if prob == "exp" else
                 math.exp(-loss(t)) / (math.exp(-loss(t)) + sum(math.exp(-loss(w)) for w in ws)) for t, _, ws in rows]
        return {"rougeL_recall": sum(scorer.score(t, "B")["rougeL"].recall for t, _, _ in rows) / len(rows),
                "prob": sum(probs) / len(rows),
                "truth_ratio": sum(min(r, 1 / r) if forget else max(0, 1 - 1 / r) for r in ratios) / len(rows)}

    utility = {}  # calculate_metrics.py's names of the non-forget values
    for split, people in (("forget", bf.CLEAR_FORGET), ("retain", bf.CLEAR_RETAIN)):
        rows = [bf.perturbed_row(k, n, c) for k, (n, c) in enumerate(people.items())]
        assert report["rows"][split] == [len(rows), len(rows)]
        for task, truth, para, wrong, prob in (
                ("captions", "caption", "paraphrased_caption", "perturbed_captions", "exp"),
                ("face_recognition", "name", "name", "perturbed_names", "normalized")):
            want = expected([(r[truth], r[para], r[wrong]) for r in rows], split == "forget", prob)
            m = got[f"{split}/multimodal"][task]
            assert m["n"] == len(rows)
            for metric, value in want.items():
                assert m[metric] == pytest.approx(value, rel=1e-6), (split, task, metric)
            if split == "retain":
                utility.update(_utility_values("Retain" + (" FaceRec" if task == "face_recognition" else ""), want))
    # multiple choice: the answer must cost less than each distinct wrong option; "B" is the cheapest answer
    faces = got["real_faces/multimodal"]["multiple_choice"]
    assert (faces["n"], faces["accuracy"]) == (2, 0.5)
    world = got["real_world/mixed"]["multiple_choice"]  # "the Seine" loses to "B"; the text-only row is in the task
    assert (world["n"], world["accuracy"]) == (3, pytest.approx(2 / 3))
    for label, m, rows in (
            ("Real Faces", faces, [(a, a, [o for o in dict.fromkeys(opts) if o != a]) for a, opts in bf.REAL_FACES]),
            ("Real World", world, [(a, a, [o for o in dict.fromkeys(opts) if o != a])
                                   for _, a, _, opts in bf.REAL_WORLD])):
        want = expected(rows, False, "normalized")
        for metric, value in want.items():
            assert m[metric] == pytest.approx(value, rel=1e-6), metric
        utility.update(_utility_values(label, want))
    # Model Utility: the harmonic mean of the 12 non-forget values; the reply "B" recalls nothing of the retain
    # captions, so it is 0, as scipy's hmean makes it
    assert report["model_utility"]["of"] == pytest.approx(utility, rel=1e-6) and len(utility) == 12
    assert report["model_utility"]["tasks"] == ["Retain", "Retain FaceRec", "Real Faces", "Real World"]
    assert utility["ROUGE Retain"] == 0 and report["model_utility"]["value"] == 0.0
    assert report["ds_size"] == 300 and report["generation_input"] == "text"
    assert "CLEAR Model Utility 0.0000" in out and "rows scored (the first 300 of each task" in out
    # the first row of each task only; replies with the image (ours) are "B" too
    cli(capsys, *argv, "--ds-size", 1, "--generation-input", "image")
    small = json.loads(results.read_text())
    assert small["rows"] == {"forget": [1, 2], "retain": [1, 2], "real_faces": [1, 2], "real_world": [1, 3]}
    assert small["generation_input"] == "image"
    assert {m["n"] for by_task in small["results"].values() for m in by_task.values()} == {1}
    assert small["results"]["forget/multimodal"]["captions"]["predictions"][0]["reply"] == "B"
    assert list(small["results"])[-1] == "real_world/multimodal"


def test_missing_rouge_is_one_line_error_before_the_model_loads(bench, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "rouge_score", None)  # as on an image without rouge-score
    files = bench["clear"]
    for argv in (["--protocol", "clear", "--forget", files["forget10_perturbed"], "--retain",
                  files["retain_perturbed"]],
                 ["--protocol", "mllmu", "--forget", bench["mllmu"]["forget_5"], "--retain",
                  bench["mllmu"]["retain_95"], "--few-shot", bench["mllmu"]["Full_Set"]]):
        capsys.readouterr()
        assert main(["evaluate", str(tmp_path / "no_model"), *map(str, argv)]) == 2
        assert capsys.readouterr().err.strip() == ("manu-fast: error: ROUGE needs the rouge-score package, which is "
                                                   'not installed: pip install "manu-fast[eval]"')
    # the tasks without ROUGE still run
    out = cli(capsys, "evaluate", bench["rigged"], "--protocol", "mllmu", "--tasks", "classification", "cloze",
              "--forget", bench["mllmu"]["forget_5"], "--retain", bench["mllmu"]["retain_95"], "--few-shot",
              bench["mllmu"]["Full_Set"], "--max-new-tokens", 2, "--no-progress")
    assert "cloze" in out and "generation" not in out


def test_bad_real_inputs_are_one_line_errors(bench, tmp_path, capsys):
    files = bench["mllmu"]
    bare = bench["bare"]  # weights and config only: no processor to encode the questions with
    no_image = bf.write(tmp_path / "no_image.parquet", [{"image": None, "ID": "1", "metadata": json.dumps(
        [{"Question": "q", "Answer": "a"}])}], bf.PROFILE_SCHEMA)
    evaluate = ["--forget", files["forget_5"], "--retain", files["retain_95"]]
    for argv, match in [
        (["profile", bench["model"], tmp_path / "s.safetensors", "--forget", no_image, "--retain", files["retain_95"],
          "--qa", files["ft_Data"]], "no_image.parquet row 0: image is null"),
        (["profile", bench["model"], tmp_path / "s.safetensors", "--forget", files["forget_5"], "--retain",
          files["retain_95"]], "no column 'metadata'"),
        (["profile", bench["model"], tmp_path / "s.safetensors", "--forget", files["forget_5"], "--retain",
          files["retain_95"], "--qa", files["ft_Data"]], "row 2: no name for ID '3'"),
        (["profile", bench["model"], tmp_path / "s.safetensors", "--benchmark", "clear", "--forget",
          bench["clear"]["forget10_perturbed"], "--retain", bench["clear"]["retain90+tofu"]], "no text items"),
        (["profile", bench["model"], tmp_path / "s.safetensors", "--forget", files["forget_5"], "--retain",
          files["retain_95"], "--batch-size", 0], "--batch-size must be >= 1"),
        (["evaluate", bare, *evaluate], "no usable processor saved with the model"),
        (["evaluate", bench["model"], *evaluate, "--protocol", "mllmu"], "needs --few-shot"),
        (["evaluate", bench["model"], *evaluate, "--tasks", "cloze"], "--tasks does not apply to --protocol logit"),
        (["evaluate", bench["model"], *evaluate, "--max-new-tokens", 5], "--max-new-tokens does not apply to"),
        (["evaluate", bench["model"], *evaluate, "--real-faces", files["forget_5"]], "--real-faces does not apply"),
        (["evaluate", bench["model"], *evaluate, "--ds-size", 5], "--ds-size does not apply to --protocol logit"),
        (["evaluate", bench["model"], "--protocol", "clear", "--forget", bench["clear"]["forget10_perturbed"],
          "--retain", bench["clear"]["retain_perturbed"], "--ds-size", -1], "--ds-size must be >= 0 (0 = all rows)"),
        (["evaluate", bench["model"], "--forget", files["Retain_Set"], "--retain", files["retain_95"], "--test",
          files["Test_Set"]], "has no row with ID 'c1'"),
        (["evaluate", bench["model"], *evaluate, "--protocol", "mllmu", "--tasks", "classification", "--few-shot",
          files["Retain_Set"]], "the few-shot file has no ID"),
    ]:
        capsys.readouterr()
        assert main([str(a) for a in argv]) == 2, argv
        last = capsys.readouterr().err.rstrip("\n").split("\n")[-1]
        assert last.startswith("manu-fast: error:") and match in last, (match, last)
