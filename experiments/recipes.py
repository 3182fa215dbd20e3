"""Every experiment of docs/experiments.md: a name, what it changes, and its settings.

Each recipe is the `small` preset with BASE applied (every lever written out, so a row keeps its meaning
when the preset's defaults change), then its own `sets`. `images` = images seen in training.
"""
from __future__ import annotations

# The levers at the values of the small preset before these experiments (the paper's choices at 32x32).
BASE = ["train.optimizer=adagrad", "train.lr=0.01", "train.norm_control=none", "model.sparsity=0.1",
        "model.pool_eps=0.01", "model.stage_gradients=local", "model.input_norm=standardize",
        "model.tied=false", "train.seed=0", "train.log_every=50", "train.checkpoint_every=100000000"]
ADAM_DEC = ["train.optimizer=adam", "train.lr=0.001", "train.norm_control=decoder"]
# Fewer, larger top-stage fields: stage 2 sees the whole 16x16 stage-1 map with a 12x12 field
# (5x5 locations, 3x3 after pooling) and 16 maps.
BIG_TOP = ["model.stages.2.receptive_field=12", "model.stages.2.maps=16"]
TIED = ["train.optimizer=adam", "train.lr=0.001", "train.norm_control=encoder", "model.tied=true"]
LONG = ["train.checkpoint_every=5000", "train.log_every=500"]
CURVE = ["train.checkpoint_every=2500", "train.keep_checkpoints=0", "train.log_every=500"]
FEW = ADAM_DEC + LONG  # the recipe that found the face unit (trained on 10% faces)
SCREEN = 20_000  # the shared machine ran at ~60-90 img/s under other jobs' load: 200 steps each


def _long(what: str, sets: list[str], images: int = 1_500_000, data: str = "train_fewfaces", **extra) -> dict:
    """A long row of issue 20 (1.5 million images on the 10%-faces set unless it says otherwise)."""
    return {"what": what, "sets": sets, "images": images, "data": data, **extra}


RECIPES = {
    "adagrad_paper": {"what": "small preset as it was: Adagrad 0.01, no norm control", "sets": [], "images": SCREEN},
    "adam_decnorm": {"what": "Adam 1e-3, decoder vectors at unit norm", "sets": ADAM_DEC, "images": SCREEN},
    "adam_decnorm_30k": {"what": "Adam 1e-3, decoder vectors at unit norm (the demo's length)", "sets": ADAM_DEC,
                         "images": 30_000},
    "adam_encnorm": {"what": "Adam 1e-3, encoder vectors at unit norm",
                     "sets": ["train.optimizer=adam", "train.lr=0.001", "train.norm_control=encoder"], "images": SCREEN},
    "adam_nonorm": {"what": "Adam 1e-3, no norm control", "sets": ["train.optimizer=adam", "train.lr=0.001"],
                    "images": SCREEN},
    "adam3e3_decnorm": {"what": "Adam 3e-3, decoder unit norm", "sets": ADAM_DEC + ["train.lr=0.003"], "images": SCREEN},
    "decnorm_sparse0.3": {"what": "Adam 1e-3, decoder unit norm, lambda 0.3",
                          "sets": ADAM_DEC + ["model.sparsity=0.3"], "images": SCREEN},
    "decnorm_sparse0.03": {"what": "Adam 1e-3, decoder unit norm, lambda 0.03",
                           "sets": ADAM_DEC + ["model.sparsity=0.03"], "images": SCREEN},
    "decnorm_eps1e-4": {"what": "Adam 1e-3, decoder unit norm, pool eps 1e-4",
                        "sets": ADAM_DEC + ["model.pool_eps=0.0001"], "images": SCREEN},
    "decnorm_bigtop": {"what": "Adam 1e-3, decoder unit norm, top stage 12x12 fields, 16 maps",
                       "sets": ADAM_DEC + BIG_TOP, "images": SCREEN},
    "tied_encnorm": {"what": "tied weights (RICA: decoder = encoder^T), Adam 1e-3, encoder unit norm",
                     "sets": ["train.optimizer=adam", "train.lr=0.001", "train.norm_control=encoder", "model.tied=true"],
                     "images": SCREEN},
    "tied_sparse0.3": {"what": "tied weights, Adam 1e-3, encoder unit norm, lambda 0.3",
                       "sets": ["train.optimizer=adam", "train.lr=0.001", "train.norm_control=encoder", "model.tied=true",
                                "model.sparsity=0.3"], "images": SCREEN},
    "tied_sparse1.0": {"what": "tied weights, Adam 1e-3, encoder unit norm, lambda 1.0",
                       "sets": ["train.optimizer=adam", "train.lr=0.001", "train.norm_control=encoder", "model.tied=true",
                                "model.sparsity=1.0"], "images": SCREEN},
    "tied_encnorm_100k": {"what": "tied weights, Adam 1e-3, encoder unit norm, 5x longer",
                          "sets": ["train.optimizer=adam", "train.lr=0.001", "train.norm_control=encoder", "model.tied=true"],
                          "images": 100_000},
    # Long runs on the idle machine (one thread, about 1,600 images/s): READING.md saw training add
    # information at stages 0 and 1 only after 1.5 million images. A checkpoint every 500,000 images
    # (the newest two are kept) so the row can also be scored part-way.
    "adam_decnorm_1.5M": {"what": "Adam 1e-3, decoder unit norm, 1.5 million images",
                          "sets": ADAM_DEC + LONG, "images": 1_500_000},
    "tied_sparse0.3_1.5M": {"what": "tied weights, Adam 1e-3, encoder unit norm, lambda 0.3, 1.5 million images",
                            "sets": TIED + ["model.sparsity=0.3"] + LONG, "images": 1_500_000},
    "adam_decnorm_greedy_1.5M": {"what": "Adam 1e-3, decoder unit norm, greedy: one stage at a time, 500,000 images each",
                                 "sets": ADAM_DEC + LONG + ["train.schedule=greedy"], "images": 1_500_000},
    "tied_sparse0.3_greedy_1.5M": {"what": "tied weights, Adam 1e-3, encoder unit norm, lambda 0.3, greedy: 500,000 images per stage",
                                   "sets": TIED + ["model.sparsity=0.3"] + LONG + ["train.schedule=greedy"], "images": 1_500_000},
    "control_nofaces_1.5M": {"what": "control: Adam 1e-3, decoder unit norm, training data without faces, 1.5 million images",
                             "sets": ADAM_DEC + LONG, "images": 1_500_000, "data": "train_nofaces"},
    "decnorm_bigtop_500k": {"what": "Adam 1e-3, decoder unit norm, top stage 12x12 fields, 16 maps, 500,000 images",
                            "sets": ADAM_DEC + BIG_TOP + LONG, "images": 500_000},
    "decnorm_top32_500k": {"what": "Adam 1e-3, decoder unit norm, top stage 32 maps per location, 500,000 images",
                           "sets": ADAM_DEC + ["model.stages.2.maps=32"] + LONG, "images": 500_000},
    "decnorm_inputlcn": {"what": "Adam 1e-3, decoder unit norm, input whitened locally (LCN on pixels)",
                         "sets": ADAM_DEC + ["model.input_norm=lcn"], "images": SCREEN},
    "decnorm_joint": {"what": "Adam 1e-3, decoder unit norm, joint gradients between stages",
                      "sets": ADAM_DEC + ["model.stage_gradients=joint"], "images": SCREEN},
    "decnorm_fewfaces": {"what": "Adam 1e-3, decoder unit norm, training data with 10% faces",
                         "sets": ADAM_DEC, "images": SCREEN, "data": "train_fewfaces"},
    "control_nofaces": {"what": "control: Adam 1e-3, decoder unit norm, training data without faces (filter-faces)",
                        "sets": ADAM_DEC, "images": SCREEN, "data": "train_nofaces"},
    # ---- Science III (issue 20): the face unit at 10% faces. 1.5 million images on one thread take 20-27
    # minutes on the idle 2-core machine. Learning curves keep every checkpoint, 250,000 images apart, for
    # `run.py NAME --step S` (experiments/score_curve.sh scores them all).
    "decnorm_fewfaces_1.5M": _long("Adam 1e-3, decoder unit norm, 10% faces, 1.5 million images (the run that found "
                                   "the face unit)", FEW),
    "fewfaces_curve_3M": _long("Adam 1e-3, decoder unit norm, 10% faces, 3 million images (learning curve)",
                               ADAM_DEC + CURVE, images=3_000_000),
    **{f"fewfaces_seed{seed}_1.5M": _long(f"as decnorm_fewfaces_1.5M, training seed {seed}", FEW + [f"train.seed={seed}"])
       for seed in (1, 2)},
    **{f"faces{pc:02d}_1.5M": _long(f"Adam 1e-3, decoder unit norm, {pc}% faces, 1.5 million images", FEW,
                                    data=f"train_faces{pc:02d}") for pc in (1, 3, 20, 30)},
    **{f"{prefix}_lr3e-3_curve_1.5M": _long(f"Adam 3e-3, decoder unit norm, {pc}% faces, 1.5 million images "
                                            "(learning curve)", ADAM_DEC + ["train.lr=0.003"] + CURVE, data=data)
       for prefix, pc, data in (("fewfaces", 10, "train_fewfaces"), ("faces20", 20, "train_faces20"))},
    # The recipe at 10% faces: one lever changed per row.
    "fewfaces_adagrad_1.5M": _long("the paper's Adagrad (0.01) instead of Adam, decoder unit norm, 10% faces",
                                   FEW + ["train.optimizer=adagrad", "train.lr=0.01"]),
    "fewfaces_tied_1.5M": _long("tied weights (decoder = encoder^T), Adam 1e-3, encoder unit norm, 10% faces",
                                TIED + LONG),
    "fewfaces_nonorm_1.5M": _long("Adam 1e-3, no norm control, 10% faces", FEW + ["train.norm_control=none"]),
    "fewfaces_nolcn_1.5M": _long("Adam 1e-3, decoder unit norm, without LCN, 10% faces", FEW + ["model.lcn=false"]),
    # Cats and bodies: faces, cat faces and padded bodies each 7% of the training data, scored on all three.
    "rare3_1.5M": _long("Adam 1e-3, decoder unit norm, faces, cat faces and bodies each 7%, 1.5 million images", FEW,
                        data="train_rare3", concepts=["faces", "catfaces", "bodiespad"]),
}


def config_for(name: str, images: int | None = None):
    from grandmother.config import load_config
    r = RECIPES[name]
    return load_config("small", BASE + r["sets"] + [f"train.steps={(images or r['images']) // 100}"])
