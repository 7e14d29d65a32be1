"""When a training loop stops, evaluates and saves: one schedule for the offline loop
(trainers.BasicTrainer) and the rollout loop (harness.rl.loop), both counting examples.

A loop passes itself as `trainer`: it has .cfg, .state (examples, next_eval, last_eval,
last_save), .evaluate(), .save() and .logger."""

import math

from harness.run_dir import fault_point


def total_examples(cfg, per_epoch: int) -> float:
    """Examples to train on: n_epochs epochs of `per_epoch`, capped at n_examples."""
    total = cfg.n_epochs * per_epoch if cfg.n_epochs else math.inf
    return min(total, cfg.n_examples) if cfg.n_examples else total


def evaluate_if_due(trainer):
    """Evaluate once the example count reaches next_eval (eval_every apart, as the reference
    counts examples, not steps); with save_every=null each evaluation after the first step
    also writes a checkpoint."""
    cfg, st = trainer.cfg, trainer.state
    if st.examples < st.next_eval:
        return
    trainer.evaluate()
    while st.next_eval <= st.examples:
        st.next_eval += cfg.eval_every
    if cfg.save_every is None and st.examples > 0:
        trainer.save()


def crossed_multiple(every: int, examples: int, batch_examples: int) -> bool:
    """Whether the last batch took the example count across a multiple of `every`."""
    return examples // every > (examples - batch_examples) // every


def advance_epoch(state, per_epoch: int):
    """Start the next epoch once this one's `per_epoch` examples are used up."""
    if state.epoch_offset >= per_epoch:
        state.epoch, state.epoch_offset = state.epoch + 1, 0


def save_if_due(trainer, batch_examples: int):
    """After a step (and advance_epoch): save_every=N saves when the example count crosses a
    multiple of N (step-K/); save_every=epoch_N at the end of every N-th epoch (epoch-K/)."""
    every, st = trainer.cfg.save_every, trainer.state
    if isinstance(every, str) and every.startswith("epoch_"):
        if st.epoch_offset == 0 and st.epoch % int(every[len("epoch_"):]) == 0:
            trainer.save(f"epoch-{st.epoch}")
    elif every and crossed_multiple(every, st.examples, batch_examples):
        trainer.save()


def finish(trainer):
    """A last evaluation and checkpoint at the final count (unless one just happened)."""
    st = trainer.state
    if st.last_eval != st.examples:
        trainer.evaluate()
    if st.last_save != st.examples:
        trainer.save()
    trainer.logger.close()
    fault_point("run:finished")  # tests: a kill after the last save (a resume then re-saves)


def rows_to_visit(batches, state, total: float) -> list[int]:
    """Indices into batches.examples of the examples a loop at `state` will train on before it
    stops at `total` examples (whole batches, epoch orders as the loop draws them): what the
    reference pre-pass has to score, so a short run does not score the whole data set."""
    rows, seen, epoch, offset = [], state.examples, state.epoch, state.epoch_offset
    per_epoch, size = batches.examples_per_epoch, batches.batch_size
    while seen < total and len(set(rows)) < len(batches.examples):
        left = total - seen
        take = per_epoch - offset if left == math.inf else \
            min(per_epoch - offset, math.ceil(left / size) * size)
        rows.extend(batches.epoch_order(epoch)[offset: offset + take].tolist())
        seen, epoch, offset = seen + take, epoch + 1, 0
    return rows
