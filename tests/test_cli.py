"""CLI end to end on a tiny (untrained) demo LLaVA: profile -> select -> report -> prune, one-line errors, --help.
Also the iterative pruning helper against the real profiler."""
import dataclasses
import json

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from manu_fast import demo
from manu_fast.cli import main
from manu_fast.demo import DEMO_CONFIG
from manu_fast.masks import Masks, apply_masks
from manu_fast.pipeline import iterative_prune
from manu_fast.select import top_k_count
from manu_fast.stats import NeuronStats

TINY = demo.ModelConfig(num_people=6, vision_hidden=16, vision_intermediate=24, text_hidden=16, text_intermediate=40,
                        heads=2, train_steps=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llava")
    demo.build_tiny_llava(TINY, demo.benchmark(TINY)).save_pretrained(path)
    (path / DEMO_CONFIG).write_text(json.dumps(dataclasses.asdict(TINY)))
    return path


def run(capsys, *argv):
    capsys.readouterr()  # drop what earlier steps printed
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(capsys, *argv, match):
    rc, _, err = run(capsys, *argv)
    last = err.rstrip("\n").split("\n")[-1]  # model loading may draw progress bars first
    assert rc == 2 and last.startswith("manu-fast: error:") and "Traceback" not in err, err
    assert match in last, err


def test_pipeline_profile_select_report_prune(model_dir, tmp_path, capsys):
    stats, masks, pruned = tmp_path / "stats.safetensors", tmp_path / "masks.safetensors", tmp_path / "pruned"
    assert run(capsys, "profile", model_dir, stats, "--synthetic", "--forget-percent", 20, "--no-progress")[0] == 0
    # the same run through a checkpoint, resumed from its finished checkpoint: nothing recounted
    ck, again = tmp_path / "ck.safetensors", tmp_path / "again.safetensors"
    for _ in range(2):
        assert run(capsys, "profile", model_dir, again, "--synthetic", "--forget-percent", 20, "--no-progress",
                   "--checkpoint", ck, "--checkpoint-every", 1, "--resume")[0] == 0
    a, b = NeuronStats.load(stats), NeuronStats.load(again)
    assert all(torch.equal(a.blocks[k], b.blocks[k]) for k in a.blocks)
    rc, out, _ = run(capsys, "report", stats)
    assert rc == 0 and "layers: vision 2, projector 1, language 2" in out and "forget/text/text" in out
    assert run(capsys, "select", stats, masks, "--strategy", "manu-code", "--alpha", 10)[0] == 0
    m = Masks.load(masks)
    expected = {"vision": top_k_count(10, 2 * 24), "projector": top_k_count(10, 16), "language": top_k_count(10, 2 * 40)}
    assert {t: p for t, (p, _) in m.by_tower().items()} == expected
    per_tower = tmp_path / "per_tower.safetensors"
    assert run(capsys, "select", stats, per_tower, "--alpha", "vision=10,language=20")[0] == 0
    assert {t: p for t, (p, _) in Masks.load(per_tower).by_tower().items()} == {
        "vision": top_k_count(10, 2 * 24), "projector": 0, "language": top_k_count(20, 2 * 40)}
    one_line_error(capsys, "select", stats, per_tower, "--alpha", "vision=ten", match="tower/layer=number")
    per_layer = tmp_path / "per_layer.safetensors"  # our strategy with a per-layer budget given by a pattern
    assert run(capsys, "select", stats, per_layer, "--strategy", "power-ratio",
               "--alpha", "vision=10,*language_model.layers.1.mlp=50")[0] == 0
    pl = Masks.load(per_layer)
    assert pl.num_pruned("vision") == top_k_count(10, 2 * 24) and pl.num_pruned("projector") == 0
    assert int((~pl.keep["model.language_model.layers.1.mlp"]).sum()) == top_k_count(50, 40)
    assert int((~pl.keep["model.language_model.layers.0.mlp"]).sum()) == 0
    one_line_error(capsys, "select", stats, per_layer, "--strategy", "power-ratio", "--alpha", "*layers.9.mlp=5",
                   match="matches no scored layer")
    rc, out, _ = run(capsys, "report", masks)
    assert rc == 0 and "strategy=manu-code, alpha=10.0" in out
    assert out.splitlines()[-1].split() == ["total", str(len(m.keep)), str(m.num_pruned()), str(m.num_total()),
                                            f"{100 * m.fraction():.2f}"]
    assert run(capsys, "prune", model_dir, masks, pruned)[0] == 0
    assert (pruned / DEMO_CONFIG).is_file()  # non-weight files travel with the pruned weights
    # the stock reload of the pruned model equals the original with the masks applied reversibly
    data = demo.benchmark(TINY)
    original = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    batch = demo.question_sets(data, original, 20, "question")[1]["forget", "multimodal"][0].inputs
    apply_masks(original, m)
    reloaded = LlavaForConditionalGeneration.from_pretrained(pruned).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, original(**batch).logits, rtol=1e-5, atol=1e-5)
    one_line_error(capsys, "prune", model_dir, masks, model_dir, match="is the MODEL_DIR it reads")


def test_report_on_a_model_folder_lists_every_mlp_per_tower(model_dir, tmp_path, capsys):
    rc, out, _ = run(capsys, "report", model_dir)
    assert rc == 0 and "towers inferred from the config" in out and "left out: nothing" in out
    assert [line.split()[:2] for line in out.splitlines() if line.startswith(("vision ", "projector ", "language "))] \
        == [["vision", "2"], ["projector", "1"], ["language", "2"]]
    assert "  projector  model.multi_modal_projector" in out
    import tiny_models as tm
    moe = tmp_path / "llama4"
    tm.build("llama4").save_pretrained(moe)
    rc, out, _ = run(capsys, "report", moe)
    assert rc == 0 and "left out (1):\n  language_model.model.layers.1.feed_forward.experts: mixture-of-experts" in out


def test_one_line_errors(model_dir, tmp_path, capsys):
    one_line_error(capsys, "select", tmp_path / "missing.safetensors", tmp_path / "m.safetensors", match="not found")
    one_line_error(capsys, "select", "a", "b", "--alpha", "lots", match="expected a number or tower/layer=number")
    one_line_error(capsys, "frobnicate", match="invalid choice")
    one_line_error(capsys, "profile", model_dir, tmp_path / "s.safetensors", match="--synthetic or both")
    one_line_error(capsys, "profile", tmp_path / "no_model", tmp_path / "s.safetensors", "--synthetic", match="not found")
    one_line_error(capsys, "profile", model_dir, tmp_path / "s.safetensors", "--synthetic", "--resume",
                   match="--resume needs --checkpoint")
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(b"\x00" * 20)
    one_line_error(capsys, "report", bad, match="junk.safetensors")
    # masks made for another model are refused
    other = Masks({"model.layers.0.mlp": torch.ones(4, dtype=torch.bool)},
                  {"model_type": "llama", "layers": {"model.layers.0.mlp": {"kind": "gated", "tower": "language",
                                                                           "neurons": 4, "hidden": 2}}})
    other.save(tmp_path / "other.safetensors")
    one_line_error(capsys, "prune", model_dir, tmp_path / "other.safetensors", tmp_path / "out", match="made for a 'llama' model")
    one_line_error(capsys, "demo", "--alphas", "x", match="invalid float value")


def test_profile_image_token_ids_option(model_dir, tmp_path, capsys):
    """--image-token-ids states the language model's image ids: the config's own id gives the default statistics,
    another id moves the placeholder positions to the text group."""
    image_id = LlavaForConditionalGeneration.from_pretrained(model_dir).config.image_token_index
    runs = {}
    for name, extra in (("default", []), ("same", ["--image-token-ids", image_id]), ("other", ["--image-token-ids", 1])):
        runs[name] = tmp_path / f"{name}.safetensors"
        assert run(capsys, "profile", model_dir, runs[name], "--synthetic", "--forget-percent", 20, "--no-progress",
                   "--profile-positions", "all", *extra)[0] == 0
    a, b, c = (NeuronStats.load(runs[n]) for n in ("default", "same", "other"))
    assert all(torch.equal(a.blocks[k], b.blocks[k]) for k in a.blocks)
    lm = next(k for k in a.blocks if "language_model" in k)
    image = a.groups.index("forget/multimodal/image")
    text = a.groups.index("forget/multimodal/text")
    moved = a.blocks[lm][0, image] - c.blocks[lm][0, image]  # image positions counted as text (and id 1 as image)
    assert (moved > 0).all() and torch.equal(c.blocks[lm][0, text] - a.blocks[lm][0, text], moved)


@pytest.mark.parametrize("command", [[], ["profile"], ["select"], ["prune"], ["report"], ["evaluate"], ["demo"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main(command + ["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "usage: manu-fast" in out
    for option in {"profile": ["--synthetic", "--sites", "--tau"], "select": ["--strategy", "--alpha", "--per-layer"],
                   "prune": ["--device", "--dtype"], "demo": ["--alphas"],
                   "evaluate": ["--protocol", "--few-shot", "--real-faces", "--tasks"]}.get((command or [""])[0], []):
        assert option in out


def test_iterative_prune_with_the_profiler(model_dir):
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    profiling, _ = demo.question_sets(demo.benchmark(TINY), model, 20, "question")
    data = {k: [b.inputs for b in v] for k, v in profiling.items()}
    masks = iterative_prune(model, data, 2, "manu-code", 10, profile_kwargs={"progress": False})
    per_round = {"vision": top_k_count(10, 48), "projector": top_k_count(10, 16), "language": top_k_count(10, 80)}
    assert {t: p for t, (p, _) in masks.by_tower().items()} == {t: 2 * k for t, k in per_round.items()}
    assert masks.description["previous"]["strategy"] == "manu-code"
    with pytest.raises(ValueError, match="one-shot iterator"):
        iterative_prune(model, {k: iter(v) for k, v in data.items()}, 2)
