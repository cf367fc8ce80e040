"""Synthetic benchmark: determinism, token layout, splits, profile masks (the real benchmarks: test_benchmarks.py)."""
import pytest
import torch

from manu_fast.synthetic import EVAL_TEMPLATES, PROFILE_TEMPLATES, SyntheticProfiles, num_image_tokens


def test_same_seed_same_benchmark_other_seed_differs():
    a, b, c = SyntheticProfiles(seed=3), SyntheticProfiles(seed=3), SyntheticProfiles(seed=4)
    assert torch.equal(a.faces, b.faces) and torch.equal(a.facts, b.facts)
    assert a.questions(range(5), (0, 1)) == b.questions(range(5), (0, 1))
    assert torch.equal(a.images([1, 2], variant=2), b.images([1, 2], variant=2))
    assert not torch.equal(a.facts, c.facts)
    assert a.split(10) == b.split(10)


@pytest.mark.parametrize("percent,expected", [(5, 2), (10, 4), (15, 6)])
def test_split_sizes_disjoint_and_complete(percent, expected):
    forget, retain = SyntheticProfiles(num_people=40).split(percent)
    assert len(forget) == expected
    assert sorted(forget + retain) == list(range(40))


def test_split_rejects_bad_percent():
    with pytest.raises(ValueError, match="forget_percent"):
        SyntheticProfiles().split(0)


def test_questions_options_hold_the_true_fact_once():
    d = SyntheticProfiles(num_people=6, values_per_attribute=8, num_options=4)
    qs = d.questions(range(6), EVAL_TEMPLATES)
    assert len(qs) == 6 * d.num_attributes * len(EVAL_TEMPLATES)
    for q in qs:
        assert q.answer == int(d.facts[q.person, q.attribute])
        assert len(set(q.options)) == 4 and q.options.count(q.answer) == 1
    assert {q.answer_index for q in qs} == {0, 1, 2, 3}  # the right slot is not always the same


def test_batch_token_layout_both_modalities():
    d = SyntheticProfiles(num_people=5)
    q = d.questions([3], PROFILE_TEMPLATES)[:2]
    mm = d.batch(q, "multimodal", image_tokens=16, variant=1, profile="question")
    ids = mm.inputs["input_ids"]
    assert ids[0, 0] == d.bos_id and (ids[0, 1:17] == d.image_id).all() and ids[0, 17] == d.this_person_id
    assert ids[0, 18] == d.question_id(q[0].attribute, q[0].template) and ids[0, 19] == d.answer_id
    assert mm.inputs["pixel_values"].shape == (2, 3, 16, 16)
    assert mm.inputs["profile_mask"][0].nonzero().flatten().tolist() == [18, 19]
    assert mm.answer_position.tolist() == [19, 19]
    assert mm.target_ids.tolist() == [d.value_id(x.attribute, x.answer) for x in q]
    txt = d.batch(q, "text", image_tokens=16, profile="answer")
    assert txt.inputs["input_ids"][0].tolist() == [d.bos_id, *d.name_ids(3), d.question_id(q[0].attribute, 0),
                                                   d.answer_id]
    assert "pixel_values" not in txt.inputs
    assert txt.inputs["profile_mask"][0].tolist() == [False, False, False, False, True]


def test_images_are_the_upsampled_face_plus_variant_noise():
    d = SyntheticProfiles(num_people=3, image_size=16, image_noise=0.0)
    img = d.images([2], variant=0)[0]
    # bilinear with align_corners: the corner pixels are the corner cells of the 4x4 grid
    assert torch.allclose(img[:, 0, 0], d.faces[2, :, 0, 0]) and torch.allclose(img[:, -1, -1], d.faces[2, :, -1, -1])
    noisy = SyntheticProfiles(num_people=3, image_noise=0.05)
    assert not torch.equal(noisy.images([2], variant=1), noisy.images([2], variant=2))
    assert torch.equal(noisy.images([0, 2], variant=1)[1], noisy.images([2], variant=1)[0])


def test_bad_inputs_raise():
    d = SyntheticProfiles(num_people=4)
    with pytest.raises(ValueError, match="modality"):
        d.batch(d.questions([0], (0,)), "audio", 16)
    with pytest.raises(ValueError, match="profile"):
        d.batch(d.questions([0], (0,)), "text", 16, profile="everything")
    with pytest.raises(ValueError, match="num_options"):
        SyntheticProfiles(values_per_attribute=3, num_options=4)


def test_num_image_tokens_matches_llava_forward():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    d = SyntheticProfiles(num_people=3)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, image_size=16, patch_size=4),
                      text_config=LlamaConfig(vocab_size=d.vocab_size, hidden_size=16, intermediate_size=32,
                                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2),
                      image_token_id=d.image_id)
    model = LlavaForConditionalGeneration(cfg).eval()
    n = num_image_tokens(cfg)
    assert n == 16
    b = d.batch(d.questions([1], (0,)), "multimodal", n, variant=0)
    assert model(**b.inputs).logits.shape == (6, 20, d.vocab_size)


def test_names_are_distinct_two_token_pairs():
    d = SyntheticProfiles(num_people=40)
    assert len(set(d.names)) == 40
    assert len({tuple(d.name_ids(p)) for p in range(40)}) == 40
