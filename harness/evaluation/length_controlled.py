"""AlpacaEval 2's length-controlled (LC) win rate, offline.

The LC win rate (Dubois et al. 2024) fits a GLM to the judged preferences of a model (output_2,
generator_2) against a baseline (output_1):

    P(model preferred) = sigmoid(w_len * tanh(std_delta_len) + w_id * instruction_difficulty
                                 + w_model)

std_delta_len = (len(output_1) - len(output_2)) / std over the annotations (characters). The LC
win rate is the mean prediction with the length term at zero: what the win rate would be if the
model's outputs were as long as the baseline's. This is alpaca_eval 0.6.6's
metrics/glm_winrate.py computed without its hub downloads: the same features, the same logistic
regression with probabilities as targets (scikit-learn, L1, liblinear, 5-fold GroupKFold over
the regularisation strength, scored by the continuous log loss), so the numbers agree with it
(tests/test_length_controlled.py checks it against alpaca_eval where it is installed).

GLMs, by alpaca_eval's names:
  length_controlled_minimal  length + model terms: any instruction set (the default here)
  length_controlled_noreg    + instruction_difficulty: needs the per-instruction difficulty,
                             which exists for AlpacaEval's own 805 instructions only
  length_controlled_v1       + regularised towards AlpacaEval's gamed baselines (weight 0.2):
                             the leaderboard's LC; needs its df_gamed.csv (instruction_difficulty
                             comes with it), a file you download once and pass with --gamed
"""

import csv
import math

import numpy as np

GLMS = {"length_controlled_minimal": (False, None), "length_controlled_noreg": (True, None),
        "length_controlled_v1": (True, 0.2)}  # (uses instruction_difficulty, baseline lambda)


def _scores(preferences) -> np.ndarray:
    """Preferences in [1, 2] (0 read as a tie, None as failed: NaN) -> [0, 1]."""
    out = np.array([np.nan if p is None else 1.5 if p == 0 else float(p) for p in preferences])
    return out - 1


def read_gamed(path: str) -> dict[str, np.ndarray]:
    """alpaca_eval's df_gamed.csv: the gamed baselines' annotations and instruction difficulty."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    need = {"index", "preference", "std_delta_len", "instruction_difficulty", "not_gamed_baseline"}
    if not rows or need - set(rows[0]):
        raise ValueError(f"{path}: not alpaca_eval's df_gamed.csv (needs columns {sorted(need)})")
    col = lambda k, f=float: np.array([f(r[k]) for r in rows])  # noqa: E731
    return {"index": col("index", int), "preference": col("preference"),  # already in [0, 1]
            "std_delta_len": col("std_delta_len"),
            "instruction_difficulty": col("instruction_difficulty"),
            "not_gamed_baseline": col("not_gamed_baseline", lambda v: v.strip() == "True")}


def _design(tanh_len, difficulty, not_gamed, with_difficulty: bool) -> np.ndarray:
    cols = [tanh_len] + ([difficulty] if with_difficulty else []) + [not_gamed.astype(float)]
    return np.stack(cols, axis=1)


def _logloss_continuous(y_true, y_pred, true_prob, true_sample_weight=None):
    """Log loss against probabilities (alpaca_eval's scorer: labels 0/1 carry the probability)."""
    y = np.where(y_true == 1, true_prob, 1 - true_prob)
    p = np.clip(y_pred, 1e-15, 1 - 1e-15)
    loss = y * np.log(p) + (1 - y) * np.log(1 - p)
    if true_sample_weight is not None:
        loss = loss * true_sample_weight
    return -np.mean(loss)


def fit_glm(X: np.ndarray, y: np.ndarray, sample_weight=None, n_splits: int = 5):
    """L1 logistic regression on probability targets: every row twice (label 1 weighted y,
    label 0 weighted 1 - y), the strength chosen by GroupKFold CV on the continuous log loss."""
    import warnings

    import sklearn
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import make_scorer
    from sklearn.model_selection import GroupKFold
    sklearn.set_config(enable_metadata_routing=True)
    n = len(y)
    X2, labels = np.concatenate([X, X]), np.concatenate([np.ones(n), np.zeros(n)])
    true_prob = np.concatenate([y, 1 - y])
    groups = np.concatenate([np.arange(n), np.arange(n)])
    true_w = None if sample_weight is None else np.concatenate([sample_weight, sample_weight])
    weight = true_prob if true_w is None else true_prob * true_w
    scorer = make_scorer(_logloss_continuous, response_method="predict_proba",
                         greater_is_better=False).set_score_request(true_sample_weight=True,
                                                                    true_prob=True)
    model = LogisticRegressionCV(cv=GroupKFold(n_splits=n_splits), scoring=scorer,
                                 random_state=123, dual=False, penalty="l1", solver="liblinear",
                                 n_jobs=None, fit_intercept=False)
    model.set_fit_request(sample_weight=True)
    with warnings.catch_warnings():  # scikit-learn 1.8-1.9 announce the 1.10 API (pinned below it)
        warnings.simplefilter("ignore", FutureWarning)
        model.fit(X2, labels, sample_weight=weight, groups=groups, true_sample_weight=true_w,
                  true_prob=true_prob)
    return model


def length_controlled_win_rate(rows: list[dict], glm: str = "length_controlled_minimal",
                               gamed: str | None = None, difficulty=None) -> dict:
    """LC and raw win rates (in %) of output_2 over output_1 from annotation rows {output_1,
    output_2, preference}. `gamed`: df_gamed.csv (length_controlled_v1); `difficulty`: one
    instruction difficulty per row (noreg / v1; default: df_gamed's, by row position)."""
    if glm not in GLMS:
        raise ValueError(f"unknown GLM {glm!r}; one of {sorted(GLMS)}")
    with_difficulty, lam = GLMS[glm]
    y = _scores([r["preference"] for r in rows])
    valid = ~np.isnan(y)
    if valid.sum() < 5:
        raise ValueError(f"{int(valid.sum())} judged pairs: the GLM's 5-fold cross-validation "
                         "needs at least 5")
    raw = {"win_rate": 100 * y[valid].mean(), "n": int(valid.sum()), "failed": int((~valid).sum()),
           "standard_error": 100 * y[valid].std(ddof=1) / math.sqrt(valid.sum())}
    delta = np.array([len(r["output_1"]) - len(r["output_2"]) for r in rows], dtype=float)
    tanh_len = np.tanh(delta / delta.std(ddof=1)) if delta.std(ddof=1) > 0 else np.zeros(len(rows))
    g = read_gamed(gamed) if gamed else None
    if with_difficulty and difficulty is None:
        if g is None:
            raise ValueError(f"{glm} needs the instruction difficulty: pass df_gamed.csv "
                             "(--gamed) or use length_controlled_minimal")
        table = dict(zip(g["index"], g["instruction_difficulty"]))
        difficulty = np.array([table[i] for i in range(len(rows))])
    difficulty = np.zeros(len(rows)) if difficulty is None else np.asarray(difficulty, float)
    X = _design(tanh_len, difficulty, np.ones(len(rows), bool), with_difficulty)
    X_test = _design(np.zeros(len(rows)), difficulty, np.ones(len(rows), bool), with_difficulty)
    X_fit, y_fit, weight = X[valid], y[valid], None
    if lam:
        if g is None:
            raise ValueError(f"{glm} is regularised towards the gamed baselines: pass --gamed")
        Xg = _design(np.tanh(g["std_delta_len"]), g["instruction_difficulty"],
                     g["not_gamed_baseline"], True)
        keep = ~np.isnan(g["preference"])
        w_g = np.where(g["not_gamed_baseline"], 1.0, lam / 2)  # two gamed baselines
        X_fit = np.concatenate([Xg[keep], X_fit])
        y_fit = np.concatenate([g["preference"][keep], y_fit])
        weight = np.concatenate([w_g[keep], np.ones(int(valid.sum()))])
    model = fit_glm(X_fit, y_fit, weight)
    predicted = model.predict_proba(X_test)[:, 1]
    names = ["np.tanh(std_delta_len)"] + (["instruction_difficulty"] if with_difficulty else []) \
        + ["not_gamed_baseline.astype(float)"]
    return {**raw, "glm": glm, "length_controlled_winrate": 100 * predicted.mean(),
            "lc_standard_error": 100 * predicted.std(ddof=1) / math.sqrt(len(predicted)),
            "weights": dict(zip(names, model.coef_[0].tolist()))}
