"""Data for unlearning experiments: a seeded synthetic fictitious-profile benchmark.

Synthetic benchmark (``SyntheticProfiles``), shaped like MLLMU-Bench: N fictitious people, each with a face-like
image (a random 4x4 grid of colours, bilinearly upsampled: smooth, low-frequency, learnt fast by a tiny ViT) and
one value per attribute (birthplace, occupation, ...). Every attribute value, name and question phrasing is one
token, so a multiple-choice answer is the argmax over the option tokens' logits at the answer position.
Each question is asked two ways:

- multimodal: ``<bos> <image>*P <this-person> <question> <answer>`` (the face stands for the person);
- text-only:  ``<bos> <first name> <last name> <question> <answer>`` (the person's name instead of the image).

Questions come in several phrasings ("templates") per attribute and faces in several noisy renderings
("variants"): the training loop uses all of them, profiling uses ``PROFILE_TEMPLATES``/``PROFILE_VARIANT`` and the
reported evaluation uses ``EVAL_TEMPLATES``/``EVAL_VARIANT``, so pruning is never tuned on the reported questions.

The real benchmarks (MLLMU-Bench, CLEAR) are read by ``manu_fast.datasets``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .schema import MODALITIES, PROFILE_MODES, SPLITS  # noqa: F401  (re-exported: the demo's names)

ATTRIBUTES = ("birthplace", "occupation", "hobby", "education", "pet", "employer", "vehicle", "instrument")
SPECIAL_TOKENS = ("<pad>", "<bos>", "<image>", "<this-person>", "<answer>")
PROFILE_TEMPLATES = (0, 1)
EVAL_TEMPLATES = (2, 3)
PROFILE_VARIANT = 1
EVAL_VARIANT = 2
FACE_GRID = 4


@dataclass(frozen=True)
class Question:
    """One multiple-choice question about one person's attribute; ``options`` are value indices of that attribute."""

    person: int
    attribute: int
    template: int
    options: tuple[int, ...]
    answer_index: int

    @property
    def answer(self) -> int:
        return self.options[self.answer_index]


@dataclass
class Batch:
    """Model kwargs (``inputs``, with an optional ``profile_mask``) plus what scoring needs.

    ``answer_position`` (B,): index of the token whose next-token logits answer the question;
    ``option_ids`` (B, K): token ids of the options; ``answer_index`` (B,): which option is right;
    ``target_ids`` (B,): the right token id (``option_ids[b, answer_index[b]]``).
    """

    inputs: dict
    answer_position: torch.Tensor
    option_ids: torch.Tensor
    answer_index: torch.Tensor
    questions: list[Question] = field(repr=False)

    @property
    def target_ids(self) -> torch.Tensor:
        return self.option_ids.gather(1, self.answer_index[:, None]).squeeze(1)

    def to(self, device) -> "Batch":
        moved = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.inputs.items()}
        return Batch(moved, self.answer_position.to(device), self.option_ids.to(device),
                     self.answer_index.to(device), self.questions)


def num_image_tokens(config) -> int:
    """How many ``<image>`` placeholders one image needs in a LlavaForConditionalGeneration prompt."""
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    if config.vision_feature_select_strategy == "full":
        return patches + 1
    if config.vision_feature_select_strategy == "default":
        return patches
    raise ValueError(f"unknown vision_feature_select_strategy {config.vision_feature_select_strategy!r}")


def _check_modality(modality: str) -> None:
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")


class SyntheticProfiles:
    """A seeded synthetic fictitious-profile benchmark (see the module docstring)."""

    def __init__(self, num_people: int = 40, num_attributes: int = 6, values_per_attribute: int = 8,
                 num_templates: int = 4, num_options: int = 4, image_size: int = 16, image_noise: float = 0.05,
                 seed: int = 0):
        if num_people < 2:
            raise ValueError(f"num_people must be >= 2, got {num_people}")
        if not 1 <= num_attributes <= len(ATTRIBUTES):
            raise ValueError(f"num_attributes must be in [1, {len(ATTRIBUTES)}], got {num_attributes}")
        if not 2 <= num_options <= values_per_attribute:
            raise ValueError(f"num_options must be in [2, values_per_attribute={values_per_attribute}], "
                             f"got {num_options}")
        needed = max(EVAL_TEMPLATES + PROFILE_TEMPLATES) + 1
        if num_templates < needed:
            raise ValueError(f"num_templates must be >= {needed} (profiling and evaluation phrasings), "
                             f"got {num_templates}")
        if image_size % FACE_GRID:
            raise ValueError(f"image_size must be a multiple of {FACE_GRID}, got {image_size}")
        self.num_people, self.num_attributes = num_people, num_attributes
        self.values_per_attribute, self.num_templates, self.num_options = values_per_attribute, num_templates, num_options
        self.image_size, self.image_noise, self.seed = image_size, image_noise, seed
        self.attributes = ATTRIBUTES[:num_attributes]
        g = torch.Generator().manual_seed(seed)
        self.faces = torch.rand(num_people, 3, FACE_GRID, FACE_GRID, generator=g) * 2 - 1
        self.facts = torch.randint(0, values_per_attribute, (num_people, num_attributes), generator=g)
        # names are two tokens from small pools (first x last): a person is a conjunction of tokens, as real
        # multi-token names are, so the model must compute facts in its MLPs rather than read them off one embedding
        pool = math.ceil(math.sqrt(num_people))
        pairs = torch.randperm(pool * pool, generator=g)[:num_people]
        self.names = [(int(i) // pool, int(i) % pool) for i in pairs]
        self.tokens = list(SPECIAL_TOKENS)
        self.tokens += [f"first{i}" for i in range(pool)] + [f"last{i}" for i in range(pool)]
        self.tokens += [f"q:{a}:{t}" for a in self.attributes for t in range(num_templates)]
        self.tokens += [f"{a}={v}" for a in self.attributes for v in range(values_per_attribute)]
        self.token_id = {t: i for i, t in enumerate(self.tokens)}
        self.pad_id, self.bos_id, self.image_id, self.this_person_id, self.answer_id = range(len(SPECIAL_TOKENS))

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def name_ids(self, person: int) -> list[int]:
        first, last = self.names[person]
        return [self.token_id[f"first{first}"], self.token_id[f"last{last}"]]

    def question_id(self, attribute: int, template: int) -> int:
        return self.token_id[f"q:{self.attributes[attribute]}:{template}"]

    def value_id(self, attribute: int, value: int) -> int:
        return self.token_id[f"{self.attributes[attribute]}={value}"]

    def split(self, forget_percent: float) -> tuple[list[int], list[int]]:
        """(forget, retain) person indices: a seeded ``forget_percent`` % of the people (at least one) and the rest."""
        if not 0 < forget_percent < 100:
            raise ValueError(f"forget_percent must be in (0, 100), got {forget_percent}")
        k = max(1, round(self.num_people * forget_percent / 100))
        order = torch.randperm(self.num_people, generator=torch.Generator().manual_seed(self.seed + 1)).tolist()
        return sorted(order[:k]), sorted(order[k:])

    def questions(self, people, templates) -> list[Question]:
        """Every (person, attribute, template) question, options drawn per question from a seed (deterministic)."""
        out = []
        for p in people:
            for a in range(self.num_attributes):
                for t in templates:
                    if not 0 <= t < self.num_templates:
                        raise ValueError(f"template {t} out of range [0, {self.num_templates})")
                    g = torch.Generator().manual_seed(((self.seed * 1009 + p) * 101 + a) * 31 + t)
                    right = int(self.facts[p, a])
                    wrong = [v for v in torch.randperm(self.values_per_attribute, generator=g).tolist() if v != right]
                    options = wrong[: self.num_options - 1]
                    slot = int(torch.randint(0, self.num_options, (1,), generator=g))
                    options.insert(slot, right)
                    out.append(Question(p, a, t, tuple(options), slot))
        return out

    def images(self, people, variant: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Faces of ``people`` (B, 3, S, S): the 4x4 colour grid upsampled, plus noise that depends on ``variant``
        (a fixed rendering) or, when ``variant`` is None, on ``generator`` (fresh noise, for training)."""
        idx = torch.as_tensor(list(people), dtype=torch.long)
        base = F.interpolate(self.faces[idx], size=(self.image_size, self.image_size), mode="bilinear",
                             align_corners=True)
        if variant is not None:
            generator = torch.Generator().manual_seed(self.seed * 1000 + 7919 * (variant + 1))
            noise = torch.randn(self.num_people, *base.shape[1:], generator=generator)[idx]
        else:
            noise = torch.randn(base.shape, generator=generator)
        return base + self.image_noise * noise

    def batch(self, questions: list[Question], modality: str, image_tokens: int, *, variant: int | None = None,
              generator: torch.Generator | None = None, profile: str | None = None) -> Batch:
        """One batch of ``questions`` asked in ``modality``. ``profile`` (one of PROFILE_MODES) adds a
        ``profile_mask``: "answer" = the answer position only, "question" = the question and answer tokens,
        "all" = every token (image placeholders included)."""
        _check_modality(modality)
        if not questions:
            raise ValueError("batch() needs at least one question")
        if profile is not None and profile not in PROFILE_MODES:
            raise ValueError(f"profile must be one of {PROFILE_MODES} or None, got {profile!r}")
        people = [q.person for q in questions]
        if modality == "multimodal":
            prefix = [[self.bos_id] + [self.image_id] * image_tokens + [self.this_person_id] for _ in questions]
        else:
            prefix = [[self.bos_id] + self.name_ids(p) for p in people]
        ids = torch.tensor([pre + [self.question_id(q.attribute, q.template), self.answer_id]
                            for pre, q in zip(prefix, questions)])
        b, length = ids.shape
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if modality == "multimodal":
            inputs["pixel_values"] = self.images(people, variant, generator)
        if profile is not None:
            mask = torch.zeros(b, length, dtype=torch.bool)
            mask[:, {"answer": length - 1, "question": length - 2, "all": 0}[profile]:] = True
            inputs["profile_mask"] = mask
        options = torch.tensor([[self.value_id(q.attribute, v) for v in q.options] for q in questions])
        return Batch(inputs, torch.full((b,), length - 1), options,
                     torch.tensor([q.answer_index for q in questions]), questions)

    def batches(self, questions: list[Question], modality: str, image_tokens: int, batch_size: int = 64,
                **kwargs) -> list[Batch]:
        """``questions`` in order, cut into batches of at most ``batch_size`` (kwargs as in ``batch``)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return [self.batch(questions[i:i + batch_size], modality, image_tokens, **kwargs)
                for i in range(0, len(questions), batch_size)]
