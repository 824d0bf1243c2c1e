"""The jobs bench/quality.py runs: name -> (group, what to run), and the targets they are held to. A job's key
is its effective settings (bench/quality.py, job_key), so editing a job here reruns it; the other jobs keep their
results."""
from __future__ import annotations

TEACHER = "work/quality/teacher"


# the TextCNN's maps before its default changed (Kim's widths, maps and dropout, with the ReLU head): TextCNN
# ablations measured then pin them, so their results stay keyed to what they ran
KIM = {"widths": [3, 4, 5], "num_filters": 100, "dropout": 0.5}
W15 = [1, 2, 3, 4, 5]


def run(student, loss, **extra) -> dict:
    return {"student": student, "loss": loss, **extra}


# name -> (group, what to run); project runs take `overrides` (TrainConfig key=value) and a RunSpec.
JOBS = {
    "reference-bilstm-plain": ("main", {"reference": "plain"}),
    "bilstm-ce": ("main", {"spec": run("bilstm", "ce")}),
    "reference-bilstm-distil": ("main", {"reference": "distil"}),
    "reference-bilstm-textbrewer": ("main", {"reference": "textbrewer"}),
    "bilstm-tang_mse": ("main", {"spec": run("bilstm", "tang_mse")}),
    "bilstm-hinton": ("main", {"spec": run("bilstm", "hinton")}),
    "textcnn-ce": ("main", {"spec": run("textcnn", "ce")}),
    "textcnn-tang_mse": ("main", {"spec": run("textcnn", "tang_mse")}),
    "textcnn-hinton": ("main", {"spec": run("textcnn", "hinton")}),
    "smallbert-hinton": ("main", {"spec": run("smallbert", "hinton", epochs=3,
                                              student_params={"source": TEACHER, "num_layers": 2})}),
    # one change at a time from the defaults; `oov_min_freq=1`, `lr=1e-3` (BiLSTM) and `mlp_hidden: 0` (TextCNN) pin
    # a job measured before that default changed
    "abl-old-defaults": ("ablation", {"spec": run("bilstm", "tang_mse", lr=1e-3, student_params={"pooling": "last"}),
                                      "overrides": ["bucket_by_length=true", "shuffle_rows=4096", "oov_min_freq=1"]}),
    "abl-pooling-last": ("ablation", {"spec": run("bilstm", "tang_mse", lr=1e-3, student_params={"pooling": "last"})}),
    "abl-bucketing": ("ablation", {"spec": run("bilstm", "tang_mse", lr=1e-3), "overrides": ["bucket_by_length=true"]}),
    "abl-window-4096": ("ablation", {"spec": run("bilstm", "tang_mse", lr=1e-3), "overrides": ["shuffle_rows=4096"]}),
    "abl-oov-keep-all": ("ablation", {"spec": run("bilstm", "tang_mse", lr=1e-3), "overrides": ["oov_min_freq=1"]}),
    "abl-constant-lr": ("ablation", {"spec": run("bilstm", "tang_mse", lr=1e-3),
                                     "overrides": ["schedule=constant", "oov_min_freq=1"]}),
    "abl-ce-over-labelled": ("ablation", {"spec": run("bilstm", "tang_mse", lr=1e-3,
                                                      loss_params={"ce_over": "labelled"}),
                                          "overrides": ["oov_min_freq=1"]}),
    "abl-mse-class-mean": ("ablation", {"spec": run("bilstm", "tang_mse", lr=1e-3, loss_params={"class_mean": True})}),
    "abl-plain-oov-keep-all": ("ablation", {"spec": run("bilstm", "ce", lr=1e-3), "overrides": ["oov_min_freq=1"]}),
    "abl-plain-oov-std-0.3": ("ablation", {"spec": run("bilstm", "ce", lr=1e-3),
                                           "overrides": ["oov_std=0.3", "oov_min_freq=1"]}),
    "abl-plain-epochs-8": ("ablation", {"spec": run("bilstm", "ce", lr=1e-3), "overrides": ["epochs=8"]}),
    "abl-plain-oov-both": ("ablation", {"spec": run("bilstm", "ce", lr=1e-3), "overrides": ["oov_std=0.3"]}),
    "abl-plain-constant-lr": ("ablation", {"spec": run("bilstm", "ce", lr=1e-3),
                                           "overrides": ["schedule=constant", "oov_min_freq=1"]}),
    "abl-plain-reference-optim": ("ablation", {"spec": run("bilstm", "ce", lr=1e-3),
                                               "overrides": ["schedule=constant", "warmup_ratio=0", "grad_clip=1000000.0",
                                                             "oov_min_freq=1"]}),
    "abl-plain-lr-1e-3": ("ablation", {"spec": run("bilstm", "ce", lr=1e-3)}),
    "abl-lr-1e-3": ("ablation", {"spec": run("bilstm", "tang_mse", lr=1e-3)}),
    "abl-textcnn-lr-2e-3": ("ablation", {"spec": run("textcnn", "tang_mse", student_params={**KIM, "mlp_hidden": 0},
                                                     lr=2e-3)}),
    "abl-hinton-hidden-300": ("ablation", {"spec": run("bilstm", "hinton", student_params={"hidden_size": 300})}),
    "abl-textcnn-linear-head": ("ablation", {"spec": run("textcnn", "tang_mse", student_params={**KIM, "mlp_hidden": 0})}),
    "abl-textcnn-filters-200": ("ablation", {"spec": run("textcnn", "tang_mse",
                                                         student_params={**KIM, "mlp_hidden": 0, "num_filters": 200})}),
    "abl-textcnn-tang-12": ("ablation", {"spec": run("textcnn", "tang_mse", student_params=KIM), "tang_n_iter": 12}),
    "abl-hinton-tang-12": ("ablation", {"spec": run("bilstm", "hinton"), "tang_n_iter": 12}),
    "abl-textcnn-filters-300": ("ablation", {"spec": run("textcnn", "tang_mse", student_params={**KIM, "num_filters": 300})}),
    "abl-textcnn-epochs-10": ("ablation", {"spec": run("textcnn", "tang_mse", student_params=KIM),
                                           "overrides": ["epochs=10"]}),
    # TinyBERT's augmentation (MLM + GloVe substitution, 4 samples per training row) beside Tang's rows, and alone
    "abl-hinton-tang-tinybert": ("ablation", {"spec": run("bilstm", "hinton"), "tinybert_samples": 4}),
    "abl-textcnn-tang-tinybert": ("ablation", {"spec": run("textcnn", "hinton"), "tinybert_samples": 4}),
    "abl-hinton-tinybert-only": ("ablation", {"spec": run("bilstm", "hinton"), "tinybert_samples": 4,
                                              "overrides": ["train_sets=[train,aug-tinybert]"]}),
    # from Kim's maps with the ReLU head (the default before the one below), `hinton`: unigram/bigram filters, less
    # dropout, both, then more maps (today's default); the teacher's last [CLS] as a hint on the feature maps (PKD's
    # normalised MSE through a learned projection); 3x the maps with twice the epochs
    "abl-textcnn-kim-hinton": ("ablation", {"spec": run("textcnn", "hinton", student_params=KIM)}),
    "abl-textcnn-kim-tang_mse": ("ablation", {"spec": run("textcnn", "tang_mse", student_params=KIM)}),
    "abl-textcnn-widths-1-5": ("ablation", {"spec": run("textcnn", "hinton", student_params={**KIM, "widths": W15})}),
    "abl-textcnn-dropout-0.2": ("ablation", {"spec": run("textcnn", "hinton", student_params={**KIM, "dropout": 0.2})}),
    "abl-textcnn-widths-1-5-dropout-0.2": ("ablation", {"spec": run("textcnn", "hinton", student_params={
        **KIM, "widths": W15, "dropout": 0.2})}),
    "abl-textcnn-widths-1-5-dropout-0.1": ("ablation", {"spec": run("textcnn", "hinton", student_params={
        **KIM, "widths": W15, "dropout": 0.1})}),
    "abl-textcnn-widths-1-5-dropout-0.2-filters-200": ("ablation", {"spec": run("textcnn", "hinton", student_params={
        **KIM, "widths": W15, "dropout": 0.2, "num_filters": 200})}),
    "abl-textcnn-pkd-top": ("ablation", {"spec": run("textcnn", "pkd", student_params=KIM,
                                                     loss_params={"t": 2.0, "layer_map": [[1, 6]]})}),
    "abl-textcnn-300-epochs-10": ("ablation", {"spec": run("textcnn", "hinton", student_params={**KIM, "num_filters": 300}),
                                               "overrides": ["epochs=10"]}),
    # the distilled BiLSTM (hinton, Tang rows) one setting at a time: all weight on the teacher's soft targets;
    # more or no dropout on the sentence features and the MLP; dev and test on a moving average of the weights;
    # half the batch; a softer temperature; GloVe rows kept as they are (frozen embeddings)
    "abl-hinton-alpha-1": ("ablation", {"spec": run("bilstm", "hinton", loss_params={"alpha": 1.0})}),
    "abl-hinton-dropout-0.3": ("ablation", {"spec": run("bilstm", "hinton", student_params={"dropout": 0.3})}),
    "abl-hinton-ema-0.998": ("ablation", {"spec": run("bilstm", "hinton"), "overrides": ["ema_decay=0.998"]}),
    "abl-hinton-dropout-0": ("ablation", {"spec": run("bilstm", "hinton", student_params={"dropout": 0.0})}),
    "abl-hinton-batch-32": ("ablation", {"spec": run("bilstm", "hinton"), "overrides": ["batch_size=32"]}),
    "abl-hinton-t-4": ("ablation", {"spec": run("bilstm", "hinton", loss_params={"t": 4.0})}),
    # the sentence vector and encoder depth: max pooling (the default before max_mean) for the three BiLSTM main
    # jobs; max and mean over time concatenated; two stacked BiLSTM layers; tang_mse at half the batch
    "abl-hinton-pooling-max": ("ablation", {"spec": run("bilstm", "hinton", student_params={"pooling": "max"})}),
    "abl-tang_mse-pooling-max": ("ablation", {"spec": run("bilstm", "tang_mse", student_params={"pooling": "max"})}),
    "abl-plain-pooling-max": ("ablation", {"spec": run("bilstm", "ce", student_params={"pooling": "max"})}),
    "abl-hinton-max-mean": ("ablation", {"spec": run("bilstm", "hinton", student_params={"pooling": "max_mean"})}),
    "abl-hinton-2-layers": ("ablation", {"spec": run("bilstm", "hinton", student_params={"num_layers": 2})}),
    "abl-tang_mse-batch-32": ("ablation", {"spec": run("bilstm", "tang_mse"), "overrides": ["batch_size=32"]}),
    "abl-hinton-frozen-embeddings": ("ablation", {"spec": run("bilstm", "hinton",
                                                             student_params={"freeze_embeddings": True})}),
    "abl-smallbert-lr-1e-4": ("ablation", {"spec": run("smallbert", "hinton", epochs=3, lr=1e-4,
                                                     student_params={"source": TEACHER, "num_layers": 2})}),
    "abl-smallbert-lr-5e-5": ("ablation", {"spec": run("smallbert", "hinton", epochs=3, lr=5e-5,  # the old default
                                                     student_params={"source": TEACHER, "num_layers": 2})}),
    # issue 14: the small-BERT methods that read token-level fields, trained from the layered cache of the gold rows
    # stored as fp16 and as int8 (same seeds): the int8 cache may cost at most 0.3 points of test accuracy
    **{f"{storage}-smallbert-{loss}": ("int8", {"spec": run("smallbert", loss, epochs=3, lr=1e-4,
                                                            student_params={"source": TEACHER, "num_layers": 2},
                                                            loss_params=params),
                                              "layers": storage})
       for storage in ("fp16", "int8")
       for loss, params in (("tinybert", {}), ("distilbert", {}), ("minilm", {"w_soft": 1.0, "w_ce": 1.0}))},
    "abl-textcnn-class-mean": ("ablation", {"spec": run("textcnn", "tang_mse", student_params={**KIM, "mlp_hidden": 0},
                                                        loss_params={"class_mean": True})}),
}
# the BiLSTM ablations were measured with max pooling over time, the default before max_mean: they pin it, so their
# results stay keyed to what they ran
for _group, _job in JOBS.values():
    if _group == "ablation" and _job["spec"]["student"] == "bilstm":
        _job["spec"]["student_params"] = {"pooling": "max", **_job["spec"].get("student_params", {})}

# target: (job, allowed gap below the reference, reference) — reference "teacher" or a job name
TARGETS = [("bilstm-ce", 0.0, "reference-bilstm-plain"), ("bilstm-hinton", 0.0, "reference-bilstm-distil"),
           ("bilstm-hinton", 0.0, "reference-bilstm-textbrewer"), ("bilstm-tang_mse", 0.015, "teacher"),
           ("bilstm-hinton", 0.015, "teacher"), ("abl-hinton-hidden-300", 0.015, "teacher"),
           ("textcnn-tang_mse", 0.025, "teacher"), ("textcnn-hinton", 0.025, "teacher"),
           ("smallbert-hinton", 0.01, "teacher"),
           *((f"int8-smallbert-{loss}", 0.003, f"fp16-smallbert-{loss}") for loss in ("tinybert", "distilbert", "minilm"))]
