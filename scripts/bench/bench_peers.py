"""The peers scripts/bench/bench.py compares our trainer with: TRL's DPOTrainer (reference model in
memory, or its log-probs precomputed) and a bare Hugging Face training step (SFT). Each runs in a
worker process of its own over exactly our batches, in our order."""

import os
import time

from benchlib import Memory, n_params, synchronize, timed


def our_order_rows(spec: dict, tokenizer) -> list[dict]:
    """Our train examples in our epoch-0 order, so TRL's step i sees exactly our batch i."""
    from preference_datasets import BatchIterator, load_examples
    examples = load_examples([f"json:{spec['data']}"], "train", sft_mode=False, seed=0)
    order = BatchIterator(examples, tokenizer, batch_size=spec["batch_size"], shuffle=True, seed=0,
                          max_length=spec["max_length"], max_prompt_length=spec["max_length"] // 2
                          ).epoch_order(0)
    return [{"prompt": examples[i].prompt, "chosen": examples[i].chosen,
             "rejected": examples[i].rejected} for i in order]


def trl_classes(mem: Memory, device: str):
    """A step timer callback, and DPOTrainer reading data in order and timing its pre-pass."""
    import trl
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.started = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            if self.started is None:
                mem.start_steps()
            synchronize(device)
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            synchronize(device)
            self.times.append(time.perf_counter() - self.started)

    class InOrderDPOTrainer(trl.DPOTrainer):
        masks, prepass_s = [], 0.0  # class-level: the pre-pass runs inside __init__

        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(self.train_dataset if train_dataset is None else train_dataset)

        def _precompute_ref_logps(self, *args, **kwargs):
            start = time.perf_counter()
            out = super()._precompute_ref_logps(*args, **kwargs)
            InOrderDPOTrainer.prepass_s += time.perf_counter() - start
            return out

        def training_step(self, model, inputs, *args, **kwargs):
            self.masks.append(inputs["attention_mask"].detach())
            return super().training_step(model, inputs, *args, **kwargs)

    return StepTimer, InOrderDPOTrainer


def run_trl(spec: dict) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from harness.models.modeling import load_model, load_tokenizer
    device, bs = spec["device"], spec["batch_size"]
    mem = Memory(device)
    start = time.perf_counter()  # --epoch: the wall clock from loading to the last step
    tokenizer = load_tokenizer(spec["model_dir"])
    policy = load_model(spec["model_dir"], spec["dtype"]).to(device)
    rows = our_order_rows(spec, tokenizer)
    precompute = spec["reference"] == "precomputed"
    # DPOConfig defaults to bf16 autocast and gradient checkpointing: off, to match ours
    args = trl.DPOConfig(
        output_dir=os.path.join(spec["tmp"], "trl"), per_device_train_batch_size=bs,
        max_length=spec["max_length"], learning_rate=spec["lr"], beta=spec["beta"],
        max_steps=-(-len(rows) // bs), max_grad_norm=10.0, gradient_checkpointing=False,
        bf16=spec["dtype"] == "bfloat16", fp16=False, use_cpu=device == "cpu",
        precompute_ref_log_probs=precompute, precompute_ref_batch_size=bs, report_to=[],
        eval_strategy="no", save_strategy="no", logging_steps=10**6, disable_tqdm=True,
        dataloader_num_workers=0, seed=0)
    optimizer = getattr(torch.optim, spec["optimizer"])(policy.parameters(), lr=spec["lr"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    StepTimer, Trainer = trl_classes(mem, device)
    timer = StepTimer()
    trainer = Trainer(model=policy, args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=tokenizer, callbacks=[timer],
                      optimizers=(optimizer, scheduler))
    trainer.train()
    synchronize(device)
    return dict(wall_s=time.perf_counter() - start, times=timer.times,
                tokens=[int(m.sum()) for m in Trainer.masks],
                padded=[m.numel() for m in Trainer.masks], prepass_s=Trainer.prepass_s,
                prepass_pairs=len(rows) if precompute else 0, params=n_params(policy), mem=mem,
                examples=[m.shape[0] // 2 for m in Trainer.masks],
                versions={"torch": torch.__version__, "trl": trl.__version__})


def run_bare(spec: dict) -> dict:
    """The peer for SFT: a bare training step (HF forward with labels, backward, fused AdamW
    where the device has it) over exactly our SFT batches, nothing else; with --compile each
    decoder block is torch.compile'd (torchtitan's per-block compile, static shapes)."""
    import torch
    from harness.models.modeling import load_model, load_tokenizer
    from preference_datasets import BatchIterator, load_examples
    device = spec["device"]
    mem = Memory(device)
    tokenizer = load_tokenizer(spec["model_dir"])
    policy = load_model(spec["model_dir"], spec["dtype"]).to(device).train()
    if spec.get("compile"):
        for block in policy.model.layers:
            block.compile()
    examples = load_examples([f"json:{spec['data']}"], "train", sft_mode=True, seed=0)
    batches = list(BatchIterator(examples, tokenizer, batch_size=spec["batch_size"], shuffle=True,
                                 seed=0, max_length=spec["max_length"],
                                 max_prompt_length=spec["max_length"] // 2).epoch_batches(0))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=spec["lr"], fused=True)

    def step(batch):
        ids, mask, labels = (batch[f"chosen_{k}"].to(device) for k in
                             ("input_ids", "attention_mask", "labels"))
        policy(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    mem.start_steps()
    times = [timed(lambda b=b: step(b), device) for b in batches]
    return dict(times=times, tokens=[int(b["chosen_attention_mask"].sum()) for b in batches],
                padded=[b["chosen_input_ids"].numel() for b in batches], prepass_s=0.0,
                prepass_pairs=0, params=n_params(policy), mem=mem,
                examples=[len(b["uid"]) for b in batches], versions={"torch": torch.__version__})
