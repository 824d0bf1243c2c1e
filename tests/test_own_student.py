"""Bring your own student: a module written outside the project, registered with `register_student`, trains
from a cache with a logit loss and an intermediate-layer loss, saves, loads and predicts raw text."""
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import trainer
from data.config import from_dict
from data.io import UserError
from trainer.losses.types import StudentOutput
from trainer.students import STUDENTS, register_student
from trainer.train import train_all
from tests.test_train import _cfg


@dataclass
class BagConfig:
    num_labels: int = 2
    vocab_size: int = 0  # filled from the tokenizer
    dim: int = 32
    tokenizer: str = ""  # a folder with the teacher's tokenizer files
    project_to: int | None = None  # the teacher width: the trainer sets it for losses on the teacher's [CLS]


class BagOfEmbeddings(nn.Module):
    """Mean of token embeddings over the teacher's own token ids, then a linear layer."""

    kind = "bag"
    config_class = BagConfig
    reads_teacher_ids = True
    offers = frozenset({"hidden"})
    default_lr = 5e-3

    def __init__(self, cfg: BagConfig, tokenizer):
        super().__init__()
        self.config, self.tokenizer, self.label_names = cfg, tokenizer, None
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_labels)
        self.projections = nn.ModuleDict({"pkd": nn.Linear(cfg.dim, cfg.project_to)}) if cfg.project_to else None

    @classmethod
    def build(cls, config, tokenizer=None):
        from transformers import AutoTokenizer

        cfg = from_dict(BagConfig, config) if isinstance(config, dict) else config
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(cfg.tokenizer)
        cfg.vocab_size = len(tokenizer)
        return cls(cfg, tokenizer)

    @classmethod
    def for_run(cls, params, inputs):
        return cls.build(params)

    @classmethod
    def from_saved(cls, folder, config):
        from transformers import AutoTokenizer

        return cls.build(config, AutoTokenizer.from_pretrained(str(folder)))

    def save_encoder(self, folder):
        self.tokenizer.save_pretrained(str(folder))

    def encode_texts(self, texts, texts_b=None):
        return dict(self.tokenizer([t or "" for t in texts], padding=True, return_tensors="pt"))

    def forward(self, batch, want=frozenset()):
        mask = batch["attention_mask"].bool()
        tokens = self.embed(batch["input_ids"])
        pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return StudentOutput(logits=self.head(pooled), hidden_states=[tokens, tokens], mask=mask, pooled=pooled,
                             projections=self.projections)


@pytest.fixture
def bag_registered():
    register_student(BagOfEmbeddings)
    yield
    STUDENTS.pop("bag")


def test_a_class_missing_part_of_the_protocol_is_refused():
    class Half(nn.Module):
        kind, config_class = "half", BagConfig

    with pytest.raises(TypeError, match="lacks reads_teacher_ids, offers, default_lr, for_run"):
        register_student(Half)


def test_own_student_trains_with_logit_and_layer_losses_then_predicts(tiny_cache, tmp_path, bag_registered):
    run, cache_dir = tiny_cache
    runs = [{"student": "bag", "loss": loss, "student_params": {"tokenizer": run.teacher.out_dir}}
            for loss in ("hinton", "pkd")]
    results = train_all(_cfg(cache_dir, tmp_path, runs=runs, epochs=2, baseline=False))
    assert [r["loss"] for r in results] == ["hinton", "pkd"]
    pkd = (tmp_path / "bag-pkd" / "metrics.jsonl").read_text()
    assert "\"patient\"" in pkd  # the layer term was computed and logged
    model = trainer.load(str(tmp_path / "bag-pkd" / "best"))
    assert isinstance(model.model, BagOfEmbeddings) and model.model.projections is not None
    labels = model.predict(["i love these cars", "never again", ""])
    assert len(labels) == 3 and set(labels) <= {"negative", "neutral", "positive"}
    probs = model.predict_proba(["i love these cars"])
    assert torch.allclose(probs.sum(-1), torch.ones(1))


def test_a_loss_needing_what_the_student_does_not_offer_is_refused(tiny_cache, tmp_path, bag_registered):
    _, cache_dir = tiny_cache
    runs = [{"student": "bag", "loss": "minilm", "student_params": {"tokenizer": "unused"}}]
    with pytest.raises(UserError, match="loss minilm needs the student's attention, values, which student bag does not"):
        train_all(_cfg(cache_dir, tmp_path, runs=runs, baseline=False))
    assert not any(tmp_path.iterdir())  # refused before anything was written
