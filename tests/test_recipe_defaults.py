"""The student recipe's defaults (issue 15): gold-only `ce` twins beside every distilled run, a full-shuffle
training stream without length buckets, the schedule switch, max and mean pooling, rare words without a vector as <unk>."""
from __future__ import annotations

import torch

from trainer.evaluate import result_table
from trainer.losses import get_loss
from trainer.students import BiLSTMConfig
from trainer.run_setup import optimizer, stream_config, train_sets
from trainer.train import RunSpec, TrainConfig, plan_runs


class _Sets:
    """What train_sets asks of a cache: the names of its sets."""

    def sets(self):
        return ["dev", "test", "train", "aug-tang"]


def test_ce_reads_gold_rows_only_and_distilled_runs_read_the_augmented_sets():
    cfg = TrainConfig()
    assert train_sets(cfg, _Sets(), [get_loss("ce")]) == ["train"]
    assert train_sets(cfg, _Sets(), [get_loss("tang_mse")]) == ["train", "aug-tang"]
    assert train_sets(TrainConfig(use_augmented=False), _Sets(), [get_loss("hinton")]) == ["train"]
    assert train_sets(TrainConfig(train_sets=["aug-tang"]), _Sets(), [get_loss("ce")]) == ["aug-tang"]


def test_every_distilled_student_gets_its_ce_twin_once():
    runs = plan_runs(TrainConfig(students=["bilstm", "textcnn"], losses=["hinton", "tang_mse"]))
    assert [r.name for r in runs] == ["bilstm-ce", "bilstm-hinton", "bilstm-tang_mse", "textcnn-ce", "textcnn-hinton",
                                      "textcnn-tang_mse"]
    wide = RunSpec(student="bilstm", loss="hinton", name="wide", student_params={"hidden_size": 300})
    runs = plan_runs(TrainConfig(runs=[RunSpec(student="bilstm", loss="ce"), wide]))
    assert [(r.name, r.student_params) for r in runs] == [("bilstm-ce", {}), ("wide-ce", {"hidden_size": 300}),
                                                          ("wide", {"hidden_size": 300})]
    assert [r.name for r in plan_runs(TrainConfig(losses=["hinton"], baseline=False))] == ["bilstm-hinton"]


def test_result_table_shows_the_teacher_and_what_distillation_bought():
    rows = [{"run": "bilstm-ce", "test_accuracy": 0.70, "teacher_test_accuracy": 0.79, "vs_ce": None},
            {"run": "bilstm-hinton", "test_accuracy": 0.75, "teacher_test_accuracy": 0.79, "vs_ce": 0.05}]
    lines = result_table(rows).splitlines()
    assert lines[2].startswith("| teacher (cached logits) |") and "0.7900" in lines[2]
    assert "| +0.0500 |" in lines[4]


def test_training_stream_is_a_full_shuffle_without_buckets_unless_fields_are_token_level():
    cfg = TrainConfig(batch_size=32)
    full = stream_config(cfg, {"logits", "cls"}, seed=3)
    assert (full.window_blocks, full.bucket_by_length, full.batch_size, full.seed) == (0, False, 32, 3)
    bounded = stream_config(cfg, {"logits", "attention"}, seed=0)
    assert bounded.window_blocks * bounded.block_rows == 16_384
    assert stream_config(TrainConfig(shuffle_rows=1000, bucket_by_length=True), {"logits"}, 0).window_blocks == 2
    assert stream_config(TrainConfig(bucket_by_length=True), {"logits"}, 0).bucket_by_length


def test_schedules_warm_up_then_decay_or_stay_flat():
    def lrs(schedule):
        opt, sched = optimizer(torch.nn.Linear(2, 2), 1e-3, TrainConfig(schedule=schedule, warmup_ratio=0.1), 100)
        out = []
        for _ in range(100):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    linear, constant = lrs("linear"), lrs("constant")
    assert linear[0] == constant[0] == 0.0 and linear[10] == constant[10] == 1e-3
    assert linear[99] < 2e-5 and constant[99] == 1e-3


def test_bilstm_pools_by_max_and_mean_by_default():
    assert BiLSTMConfig().pooling == "max_mean"


def test_words_without_a_vector_need_two_occurrences_before_augmentation():
    """URL tails and typos seen once read <unk> (which training then learns); augmented copies of a row do not
    count as a second occurrence."""
    from data.vectors import load_vectors
    from trainer.vocab import Vocab

    known = load_vectors("glove50", "embeddings").key_to_index
    original = ["the zzqx cat", "qqqz dog", "qqqz again"]
    texts = original + ["the zzqx cat !", "a zzqx cat"]  # two augmented copies of the first row
    vocab = Vocab.build(texts, pretrained=known, oov_min_freq=TrainConfig().oov_min_freq, original=original)
    assert "zzqx" not in vocab and "qqqz" in vocab and {"the", "cat", "dog", "a", "!"} <= set(vocab.itos)
    assert "zzqx" in Vocab.build(texts, pretrained=known, oov_min_freq=1, original=original)


def test_rows_of_words_without_a_vector_take_oov_std():
    from trainer.vocab import Vocab, load_embeddings

    vocab = Vocab.build([" ".join(f"zq{i}x" for i in range(400)) + " the"])
    default, missing = load_embeddings(vocab, "glove50")
    narrow, _ = load_embeddings(vocab, "glove50", oov_std=0.3)
    assert missing == 400
    oov = [vocab.stoi[f"zq{i}x"] for i in range(400)]
    assert abs(float(narrow[oov].std()) - 0.3) < 0.02 and float(default[oov].std()) > 0.6  # GloVe 50d's own std
    assert torch.equal(narrow[vocab.stoi["the"]], default[vocab.stoi["the"]])
