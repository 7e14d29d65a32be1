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
    "compile", "model", "loss", "trainer", "preset", "hydra", "chat_template"})


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
