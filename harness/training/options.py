"""Every accepted option is read, or refused before any model loads.

Each loop declares the top-level options it reads (`reads(spec, cfg)`) and the values it
behaves as for some it does not read (`behaves_as(spec, cfg)`, e.g. PPO's one micro-batch per
minibatch: gradient_accumulation_steps=1); each strategy declares its own (READS). The options
every run reads (data, schedule, logging, the model, ...) are listed here. An option given on
the command line that the run would not read is refused, naming the option, the loss and the
loop, instead of being silently ignored; stating the value the run behaves as anyway is fine.
(loss.* options are checked by each loss's options class, harness/objectives.)
"""

# read by train.py, the data loaders, the schedule, the logger and the checkpoint writer of
# every loop, or config groups with their own checks
ALWAYS_READ = frozenset({
    "seed", "exp_name", "batch_size", "eval_batch_size", "debug", "datasets", "wandb",
    "local_dirs", "do_first_eval", "local_run_dir", "lr", "max_grad_norm", "max_length",
    "max_prompt_length", "n_epochs", "n_examples", "n_eval_examples", "optimizer",
    "warmup_steps", "eval_every", "minimum_log_interval_secs", "save_every", "prefs_path",
    "data_fraction", "num_turns", "resume", "export_hf", "keep_last", "fused_optimizer",
    "compile", "model", "loss", "trainer", "preset", "hydra", "gold_eval_prompts",
    "num_threads", "resume_accept_data_change", "chat_template"})


def given_keys(overrides) -> set[str]:
    """The top-level keys named by command-line overrides (key=v, +key=v, ++key=v, ~key)."""
    keys = set()
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0].split(".", 1)[0]
        if key and "/" not in key:
            keys.add(key)
    return keys


def check_options_read(cfg, overrides, reads: set, behaves_as: dict, loss: str, loop: str):
    """Refuse each given option that neither every run, nor the loop, nor the strategy reads,
    unless it states the value the run behaves as."""
    unread = sorted(key for key in given_keys(overrides) - ALWAYS_READ - set(reads)
                    if key not in behaves_as or cfg.get(key) != behaves_as[key])
    if unread:
        raise ValueError(f"{unread[0]} is not read by loss={loss} ({loop}); remove it"
                         + (f" (also not read: {', '.join(unread[1:])})" if unread[1:] else ""))


# ------------------------------------------------------------------------------ value ranges
class Rule:
    """An option's type and range: kind int or float (an int is a float too), bounds, null."""

    def __init__(self, kind, low=None, high=None, *, null=False, open_low=False, example=None,
                 null_means=""):
        self.kind, self.low, self.high, self.null, self.open_low = kind, low, high, null, open_low
        self.example, self.null_means = example, null_means

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        if self.low is not None:
            what += f" {'>' if self.open_low else '>='} {self.low}"
        if self.high is not None:
            what += f"{' and' if self.low is not None else ''} <= {self.high}"
        return what + (f", or null ({self.null_means})" if self.null else "")

    def ok(self, value) -> bool:
        if value is None:
            return self.null
        kinds = (int,) if self.kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or value != value \
                or value in (float("inf"), float("-inf")):
            return False
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return self.high is None or value <= self.high


POSITIVE_INT = Rule(int, 1)
# every numeric option a run reads: checked before any model loads (train.check_config)
RANGES = {
    "seed": Rule(int, 0), "batch_size": POSITIVE_INT, "eval_batch_size": POSITIVE_INT,
    "lr": Rule(float, 0, open_low=True, example="1e-4"),
    "gradient_accumulation_steps": POSITIVE_INT,
    "max_grad_norm": Rule(float, 0, open_low=True, example="10.0"),
    "max_length": Rule(int, 2), "max_prompt_length": POSITIVE_INT,
    "n_epochs": Rule(int, 1, null=True, null_means="stop by n_examples"),
    "n_examples": Rule(int, 1, null=True, null_means="stop by n_epochs"),
    "n_eval_examples": POSITIVE_INT, "warmup_steps": Rule(int, 0), "eval_every": POSITIVE_INT,
    "minimum_log_interval_secs": Rule(float, 0),
    "keep_last": Rule(int, 1, null=True, null_means="keep every checkpoint"),
    "num_turns": POSITIVE_INT, "n_eval_model_samples": Rule(int, 0),
    "sample_max_new_tokens": POSITIVE_INT, "sample_top_p": Rule(float, 0, 1, open_low=True),
    "sample_temperature": Rule(float, 0, open_low=True), "logits_chunk_size": POSITIVE_INT,
    "pack_length": Rule(int, 2, null=True, null_means="2 x max_length"),
    "nproc_per_node": Rule(int, 1, null=True, null_means="one per visible GPU"),
    "fsdp_port": Rule(int, 1, 65535, null=True, null_means="a free port"),
    "data_fraction": Rule(float, 0, 1, open_low=True),
    "micro_batch_tokens": Rule(int, 1, null=True, null_means="gradient_accumulation_steps"),
    "gold_eval_prompts": Rule(int, 0),
    "num_threads": Rule(int, 1, null=True, null_means="torch's default"),
    "health.max_loss": Rule(float, null=True, null_means="no limit"),
    "health.max_loss_ratio": Rule(float, 1, open_low=True, null=True, null_means="no limit"),
    "health.max_grad_norm": Rule(float, 0, open_low=True, null=True, null_means="no limit"),
    "trainer.tp_size": Rule(int, 1, null=True, null_means="all ranks"),
    "model.lora.alpha": Rule(float, 0, open_low=True),
    "model.lora.dropout": Rule(float, 0, 1),
}


def check_ranges(cfg):
    """Refuse any numeric option of the wrong type or out of its range, naming it and the
    range; and a run that would never stop (n_epochs and n_examples both null)."""
    from omegaconf import OmegaConf
    for key, rule in RANGES.items():
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if node is None or leaf not in node:  # absent (a run saved before it existed)
            continue
        value = node[leaf]
        if not rule.ok(value):
            example = f" (e.g. {key}={rule.example})" if rule.example else ""
            raise ValueError(f"{key}={value!r} must be {rule.describe()}{example}")
    if cfg.get("n_epochs") is None and cfg.get("n_examples") is None:
        raise ValueError("n_epochs=null and n_examples=null: the run would never stop; set one")
