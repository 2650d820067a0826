"""Training a `BituneModel` with the Hugging Face `Trainer`.

`BituneTrainer` is a `transformers.Trainer` that knows four things about Bitune:

* the loss: one forward runs the prompt passes and the answer pass and returns the cross-entropy over answer
  tokens, normalised by the answer tokens of the whole optimizer step (all accumulation steps, all processes),
  so gradient accumulation and data parallelism give the gradient of one big batch;
* checkpoints: every `checkpoint-N` folder is a loadable Bitune checkpoint (adapters, mixing coefficients,
  tokenizer) plus the trainer's optimizer/scheduler/RNG state, and appears in one rename, so a crash during a
  save leaves the previous checkpoint as the latest;
* resuming: both adapters and the mixer are loaded back into the live model in place, all still trainable;
  every checkpoint records what defines the run (`bitune_run.json`), and a resume that would change it is
  refused unless forced (see `check_resume`);
* parallelism: DDP (torchrun, accelerate launch) and DeepSpeed ZeRO-1/2 work; FSDP and ZeRO-3 are refused at
  start-up until they are validated on GPUs through the Trainer (the layer-synchronous forward already trains
  exactly under per-layer `fully_shard` at the torch level: tests/test_layer_sync.py).

`train(config)` builds everything from a `TrainConfig` and runs it, holding a lock on the output folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from peft import set_peft_model_state_dict
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments, set_seed
from transformers.integrations import is_tensorboard_available
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from bitune.core.batch import collate
from bitune.core.checkpoint import (
    ADAPTER_WEIGHTS,
    MIXER_FILE,
    describe,
    load_weights,
    local_or_hub,
    read_config,
    verify_files,
)
from bitune.core.loading import load_tokenizer, pad_token_id, resolve_device
from bitune.core.model import BituneModel
from bitune.core.passes import max_positions
from bitune.core.prompts import use_chat_template
from bitune.data.samples import Sample, load_dataset_samples, random_subset, split_off
from bitune.errors import BituneError, BituneInputError
from bitune.files import atomic_directory, atomic_write_json, atomic_write_text, lock_folder, remove_leftovers
from bitune.settings import plain
from bitune.training.config import TrainConfig
from bitune.training.outputs import (
    FINAL_DIR,
    LOCK_FILE,
    METRICS_FILE,
    RUN_FILE,
    TRAIN_CONFIG_FILE,
    TRAINER_STATE_FILE,
)

logger = logging.getLogger(__name__)

_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_ALPHA_KEY = re.compile(r"^alpha/(keys|values)/(\d+)$")
# What interrupted writes of a run leave in its output folder (see `bitune.files.remove_leftovers`).
_RUN_LEFTOVERS = re.compile(
    rf"{PREFIX_CHECKPOINT_DIR}-\d+|{FINAL_DIR}|{re.escape(TRAIN_CONFIG_FILE)}|{re.escape(METRICS_FILE)}"
)
# The settings a resumed run may change (documented in docs/training.md): every other one defines the run.
MAY_CHANGE_ON_RESUME = (
    "output_dir",
    "device",
    "training.resume_from_checkpoint",
    "training.force_resume",
    "training.logging_steps",
    "training.report_to",
    "training.save_steps",
    "training.save_total_limit",
    "training.eval_steps",
    "training.eval_batch_size",
    "training.activation_checkpointing",
)
RUN_RECORD_VERSION = 1


# ----------------------------------------------------------------------------------------------------------
# Data


@dataclass
class BituneCollator:
    """Turn samples (`bitune.data.samples.Sample`s, or mappings with `prompt_ids` and `answer_ids`) into a Bitune batch.

    Example:
        >>> BituneCollator(pad_token_id=0)([Sample([1, 5, 6], [7, 2]), Sample([1, 8], [2])])["prompt_ids"].tolist()
        [[1, 5, 6], [0, 1, 8]]
    """

    pad_token_id: int = 0

    def __call__(self, samples: Sequence[Sample | Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        prompts = [_field(sample, "prompt_ids") for sample in samples]
        answers = [_field(sample, "answer_ids") for sample in samples]
        return collate(prompts, answers, self.pad_token_id)


def _field(sample: Sample | Mapping[str, Any], name: str) -> Any:
    return sample[name] if isinstance(sample, Mapping) else getattr(sample, name)


# ----------------------------------------------------------------------------------------------------------
# The trainer


class BituneTrainer(Trainer):
    """A `transformers.Trainer` for a `BituneModel` (see the module docstring for what it changes).

    Use it like the stock `Trainer`, with `remove_unused_columns=False` and samples that have `prompt_ids`
    and `answer_ids`; the default collator is `BituneCollator`.

    Example:
        >>> from peft import LoraConfig
        >>> from bitune import BituneModel
        >>> from bitune.data.samples import DataConfig, load_dataset_samples
        >>> samples, _ = load_dataset_samples(
        ...     DataConfig("../shared/data/instruct/alpaca_gpt4_999.json", max_length=64, limit=8), tokenizer)
        >>> model = BituneModel.from_base(base, LoraConfig(target_modules="all-linear"))
        >>> args = TrainingArguments(tmp, max_steps=1, per_device_train_batch_size=4, report_to="none",
        ...     disable_tqdm=True, remove_unused_columns=False)
        >>> trainer = BituneTrainer(model=model, args=args, train_dataset=samples, processing_class=tokenizer)
        >>> trainer.train()  # the Trainer prints its final metrics
        {'train_runtime': ...}
        TrainOutput(global_step=1, training_loss=..., metrics={...})
    """

    # `compute_loss` normalises by the answer tokens of the whole optimizer step (see `_get_num_items_in_batch`),
    # so the Trainer must not divide it by the number of accumulation steps again.
    loss_is_scaled_for_ga = True

    def __init__(self, model: BituneModel, args: TrainingArguments, **kwargs) -> None:
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = BituneCollator(pad_token_id(kwargs.get("processing_class")))
        self._checkpoint_staging: Path | None = None
        # Written into every checkpoint (what defines the run; see `run_record`), set by `train`.
        self.run_record: dict | None = None
        # A forced resume with changed settings: the new optimizer settings replace the checkpoint's.
        self.apply_new_settings = False
        super().__init__(model=model, args=args, **kwargs)
        self._check_parallelism()

    # ------------------------------------------------------------------ loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs, num_items_in_batch=num_items_in_batch)
        loss = outputs.loss
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # The denominator counts the answer tokens of every process, and DDP averages the gradients of
            # the processes: scaling by their number makes the result the gradient of the global mean.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor:
        """The answer tokens of one optimizer step: all its micro-batches, summed over processes."""
        count = sum(
            (batch["answer_mask"].sum().to(device) for batch in batch_samples), torch.tensor(0, device=device)
        )
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return count

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation computes the loss only (the mean over the batch's answer tokens)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the current mixing coefficients α (per layer, keys and values) to every training log."""
        if "loss" in logs:
            for kind, alphas in self.accelerator.unwrap_model(self.model).alphas().items():
                logs.update({f"alpha/{kind}/{layer}": alpha for layer, alpha in enumerate(alphas)})
        super().log(logs, start_time)

    # ------------------------------------------------------------------ checkpoints

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write a Bitune checkpoint (adapters, mixer, tokenizer) to `output_dir`; call it on every process.

        The folder is replaced as a whole, so the default is `args.output_dir/final`, not the run folder.
        """
        if self.args.should_save:
            self._save(output_dir)
        self.accelerator.wait_for_everyone()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model)
        model.save_pretrained(
            output_dir or Path(self.args.output_dir) / FINAL_DIR, tokenizer=self.processing_class
        )

    def _save_checkpoint(self, model, trial) -> None:
        """The stock checkpoint, written into a staging folder and published with one rename."""
        run_dir = Path(super()._get_output_dir(trial))
        final = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        # The same name on every process: each one writes its RNG state there.
        staging = run_dir / f".tmp-{final.name}"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # left by a run that died while saving
        self.accelerator.wait_for_everyone()
        self._checkpoint_staging = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._checkpoint_staging = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            if self.run_record is not None:
                atomic_write_json(staging / final.name / RUN_FILE, self.run_record)
            with atomic_directory(final) as published:
                for item in (staging / final.name).iterdir():
                    os.replace(item, published / item.name)
            shutil.rmtree(staging)
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    def _get_output_dir(self, trial) -> str:
        # While a checkpoint is being written, the stock code puts `checkpoint-N` into the staging folder.
        return (
            str(self._checkpoint_staging)
            if self._checkpoint_staging is not None
            else super()._get_output_dir(trial)
        )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        restore_weights(
            self.accelerator.unwrap_model(model if model is not None else self.model), resume_from_checkpoint
        )

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """The stock loading, with unreadable state files reported; after a forced resume, the new optimizer
        settings (learning rate, betas, weight decay, schedule length) replace those saved in the checkpoint."""
        fresh = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        with _state_files_of(checkpoint):
            super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or not self.apply_new_settings:
            return
        groups, scheduler = self.optimizer.param_groups, self.lr_scheduler
        before = [group["lr"] for group in groups]
        for group, settings in zip(groups, fresh, strict=True):
            group.update({k: v for k, v in settings.items() if k != "lr"})
        if isinstance(scheduler, LambdaLR):
            scheduler.base_lrs = [group["initial_lr"] for group in groups]
            for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
                group["lr"] = base * factor(scheduler.last_epoch)
            scheduler._last_lr = [group["lr"] for group in groups]
        logger.warning(
            "forced resume: the learning rate at step %d is %.4g (the checkpoint's schedule had %.4g); the "
            "schedule now ends at step %d",
            scheduler.last_epoch,
            groups[0]["lr"],
            before[0],
            self.args.max_steps,
        )

    def _load_rng_state(self, checkpoint: str | None) -> None:
        with _state_files_of(checkpoint):
            super()._load_rng_state(checkpoint)

    # ------------------------------------------------------------------ parallelism

    def _check_parallelism(self) -> None:
        """Refuse, before the first step, the parallel set-ups in which Bitune cannot train correctly.

        They are launch settings, so the refusal is a `BituneInputError` (the CLI prints it and exits with 2).
        """
        if self.args.n_gpu > 1:
            raise BituneInputError(
                f"{self.args.n_gpu} GPUs in one process (torch DataParallel) are not supported; start one process "
                "per GPU (torchrun --nproc_per_node N -m bitune train ..., or accelerate launch), or make one GPU "
                "visible (CUDA_VISIBLE_DEVICES=0)"
            )
        state = self.accelerator.state
        if self.is_deepspeed_enabled and state.deepspeed_plugin.zero_stage == 3:
            raise BituneInputError(
                "DeepSpeed ZeRO-3 is not supported: it gathers a layer's parameters for that layer's forward and "
                "backward only, but Bitune's answer pass sends gradients into every layer's prompt passes through "
                "the KV cache afterwards. Use ZeRO-2 (configs/deepspeed/zero2.json) or plain DDP"
            )
        if self.args.fsdp or self.is_fsdp_enabled:
            raise BituneInputError(
                "FSDP through the Trainer is not supported yet: it has not been validated on GPUs (saving sharded "
                "adapters, the Trainer's FSDP wrapping of a non-PreTrainedModel). Use DDP (torchrun, or accelerate "
                "launch --config_file configs/accelerate/ddp.yaml) or DeepSpeed ZeRO-2 "
                "(configs/accelerate/deepspeed_zero2.yaml); see docs/training.md"
            )


# ----------------------------------------------------------------------------------------------------------
# Checkpoints


def restore_weights(model: BituneModel, checkpoint_dir: str | Path) -> None:
    """Copy the adapters and mixing coefficients of a Bitune checkpoint into `model`, in place.

    The parameters stay the same objects (an optimizer holding them keeps working) and keep `requires_grad`.
    The checkpoint must come from the same mode and PEFT method.

    Example:
        >>> from peft import LoraConfig
        >>> from bitune import BituneModel
        >>> other = BituneModel.from_base(base, LoraConfig(r=4, target_modules="all-linear"))  # new adapters
        >>> restore_weights(other, checkpoint)  # now those of `model`, which `checkpoint` holds
        >>> all(torch.equal(mine, theirs) for mine, theirs in zip(other.parameters(), model.parameters()))
        True
    """
    checkpoint_dir = Path(checkpoint_dir)
    saved, expected = read_config(checkpoint_dir), describe(model)
    for key in ("adapters", "bitune", "peft_type", "num_layers"):
        if saved.get(key, expected[key]) != expected[key]:
            raise BituneInputError(
                f"{checkpoint_dir}: the checkpoint has {key} {saved.get(key)!r} but the model has "
                f"{expected[key]!r}; resume with the settings the checkpoint was trained with"
            )
    verify_files(checkpoint_dir, saved)
    trainable = {name for name, parameter in model.peft_model.named_parameters() if parameter.requires_grad}
    for adapter in saved["adapters"]:
        weights = load_weights(checkpoint_dir / adapter / ADAPTER_WEIGHTS)
        try:
            result = set_peft_model_state_dict(model.peft_model, weights, adapter_name=adapter)
        except RuntimeError as error:  # a tensor of another shape: another rank, or another base model
            gist = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), error)
            raise BituneInputError(
                f"{checkpoint_dir / adapter}: adapter weights do not fit the model ({gist}); was it trained with "
                "another peft.r or on another base model?"
            ) from None
        missing = [key for key in result.missing_keys if key in trainable and f".{adapter}" in key]
        if result.unexpected_keys or missing:
            raise BituneInputError(
                f"{checkpoint_dir / adapter}: adapter weights do not match the model (unexpected: "
                f"{result.unexpected_keys[:3]}, missing: {missing[:3]}); was it trained on another base model?"
            )
    if model.mixer is not None:
        try:
            model.mixer.load_state_dict(load_weights(checkpoint_dir / MIXER_FILE))
        except RuntimeError as error:
            raise BituneInputError(
                f"{checkpoint_dir / MIXER_FILE}: does not fit the model ({error})"
            ) from None


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete `checkpoint-N` folder in `output_dir` (staging folders of interrupted saves are skipped).

    Example:
        >>> for step in (500, 1500, 2000):
        ...     (tmp / f"checkpoint-{step}").mkdir()
        >>> for step in (500, 1500):  # checkpoint-2000 was interrupted: it has no trainer_state.json
        ...     (tmp / f"checkpoint-{step}" / "trainer_state.json").touch()
        >>> latest_checkpoint(tmp).name
        'checkpoint-1500'
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    steps = {
        int(match.group(1)): path
        for path in output_dir.iterdir()
        if (match := _CHECKPOINT_NAME.match(path.name)) and (path / TRAINER_STATE_FILE).is_file()
    }
    return steps[max(steps)] if steps else None


# ----------------------------------------------------------------------------------------------------------
# Metrics


class MetricsFileCallback(TrainerCallback):
    """Append every log (loss, learning_rate, grad_norm, eval_loss, α per layer) as one JSON line to a file.

    The file is `output_dir/metrics.jsonl`; α values are stored as `"alphas": {"keys": [...], "values": [...]}`.
    On resume, lines logged after the checkpoint's step (by the interrupted run) are dropped first.
    """

    def on_train_begin(self, args, state, control, **kwargs):
        path = Path(args.output_dir) / METRICS_FILE
        if state.is_world_process_zero and path.is_file():
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
            kept = [line for line in lines if _logged_step(line) <= state.global_step]
            if len(kept) < len(lines):
                atomic_write_text(path, "".join(kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record: dict[str, Any] = {"step": state.global_step}
        alphas: dict[str, list[float]] = {}
        for key, value in logs.items():
            if match := _ALPHA_KEY.match(key):
                alphas.setdefault(match.group(1), []).append(value)  # layers arrive in order
            else:
                record[key] = value
        if alphas:
            record["alphas"] = alphas
        with open(Path(args.output_dir) / METRICS_FILE, "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")  # one write per line: appends do not interleave


# ----------------------------------------------------------------------------------------------------------
# The whole run


def train(config: TrainConfig, callbacks: Sequence[TrainerCallback] = ()) -> Path:
    """Fine-tune `config.model` with Bitune as `config` says; returns the final checkpoint (output_dir/final).

    Writes `train_config.yaml`, `metrics.jsonl`, TensorBoard logs and `checkpoint-N` folders to
    `config.output_dir`. Run it under `torchrun` or `accelerate launch` for several GPUs.

    The output folder is locked for the run (a second run into it gets a `BituneInputError`), and what
    interrupted saves of an earlier run left there is removed first. A precision the device cannot train in is
    replaced by one it can (said in one line). A resume is checked against the checkpoint's record of the run
    (see `check_resume`).

    Example:
        >>> from bitune.training import load_config, train
        >>> final = train(load_config("configs/paper_lora.yaml", ["--output_dir", "runs/a"]))  # doctest: +SKIP
        >>> model = BituneModel.from_pretrained(final)  # doctest: +SKIP
    """
    config = supported_precision(config)
    output_dir = Path(config.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise BituneInputError(f"output_dir {output_dir} is a file, not a folder; choose a folder")
    main_process = int(os.environ.get("RANK", "0")) == 0
    with lock_folder(output_dir, LOCK_FILE, "output_dir") if main_process else contextlib.nullcontext():
        if main_process:
            for leftover in remove_leftovers(output_dir, _RUN_LEFTOVERS):
                logger.info("removed %s, left by an interrupted save", leftover)
        return _train(config, callbacks)


def _train(config: TrainConfig, callbacks: Sequence[TrainerCallback]) -> Path:
    output_dir = Path(config.output_dir)
    resume_from = _resume_point(config)
    saved_record = read_run_record(resume_from, config.training.force_resume) if resume_from else None
    resumed_state = _trainer_state(resume_from) if resume_from else None
    set_seed(config.training.seed)  # the fresh adapters are drawn from it
    tokenizer = load_tokenizer(config.model.tokenizer or config.model.name_or_path)
    use_chat_template(tokenizer, config.data.chat_template)  # saved with every checkpoint's tokenizer
    train_samples, eval_samples, stats = _load_samples(config, tokenizer)
    args = training_arguments(config, has_validation=bool(eval_samples))
    record = run_record(config, train_samples, eval_samples, args.world_size)
    forced = (
        check_resume(resume_from, saved_record, record, config.training.force_resume) if resume_from else []
    )
    with _model_errors(config):
        model = BituneModel.from_base(
            config.model.name_or_path,
            config.peft.to_peft_config(),
            config.bitune,
            dtype=config.base_dtype,
            attn_implementation=config.model.attn_implementation,
            quantization=config.model.quantization,
            device=config.device,
        )
    _check_fits(config, model)
    trainer = BituneTrainer(
        model=model,
        args=args,
        train_dataset=train_samples,
        eval_dataset=eval_samples or None,
        processing_class=tokenizer,
        callbacks=[MetricsFileCallback(), *callbacks],
    )
    trainer.run_record, trainer.apply_new_settings = record, bool(forced)
    if trainer.is_world_process_zero():
        atomic_write_text(output_dir / TRAIN_CONFIG_FILE, config.to_yaml())
        logger.info(
            "%s", run_summary(config, trainer, stats, len(train_samples), len(eval_samples), resumed_state)
        )
    if resumed_state is not None and resumed_state.global_step >= config.training.max_steps:
        # Nothing left to train: the Trainer would run one more step before it checks max_steps.
        restore_weights(trainer.accelerator.unwrap_model(trainer.model), resume_from)
        trainer.state = resumed_state
    else:
        trainer.train(resume_from_checkpoint=resume_from)
    if eval_samples and not _evaluated_at(trainer.state, trainer.state.global_step):
        trainer.evaluate()
    final = output_dir / FINAL_DIR
    trainer.save_model(str(final))
    return final


def _evaluated_at(state, step: int) -> bool:
    return any("eval_loss" in entry and entry.get("step") == step for entry in state.log_history)


def training_arguments(config: TrainConfig, has_validation: bool = False) -> TrainingArguments:
    """The `transformers.TrainingArguments` of a run (`training.trainer_args` override the derived ones)."""
    settings = config.training
    if settings.eval_steps and not has_validation:
        raise BituneInputError(
            "training.eval_steps is set but there is no validation data; set validation.path or validation.size"
        )
    if settings.trainer_args.get("load_best_model_at_end"):
        raise BituneInputError(
            "training.trainer_args.load_best_model_at_end is not supported; load a checkpoint-N"
        )
    device = resolve_device(config.device)  # an unavailable device fails here, before the Trainer starts
    report_to = settings.report_to
    if report_to is None:
        report_to = ["tensorboard"] if is_tensorboard_available() else []
    arguments = dict(
        output_dir=config.output_dir,
        max_steps=settings.max_steps,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler_type,
        warmup_steps=settings.warmup_ratio,  # a float below 1 is a share of max_steps
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.eval_batch_size or settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        max_grad_norm=settings.max_grad_norm,
        weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1,
        adam_beta2=settings.adam_beta2,
        adam_epsilon=settings.adam_epsilon,
        bf16=settings.precision == "bf16",
        fp16=settings.precision == "fp16",
        activation_checkpointing=settings.activation_checkpointing,
        seed=settings.seed,
        eval_strategy="steps" if settings.eval_steps else "no",
        eval_steps=settings.eval_steps or None,
        save_strategy="steps" if settings.save_steps else "no",
        save_steps=settings.save_steps or 500,
        save_total_limit=settings.save_total_limit,
        logging_strategy="steps" if settings.logging_steps else "no",
        logging_steps=settings.logging_steps or 500,
        report_to=report_to,
        remove_unused_columns=False,
        use_cpu=device.type == "cpu",
        disable_tqdm=False,
    )
    try:
        return TrainingArguments(**{**arguments, **settings.trainer_args})
    except (TypeError, ValueError, ImportError) as error:
        raise BituneInputError(f"training settings rejected by transformers: {error}") from None


def _load_samples(config: TrainConfig, tokenizer) -> tuple[list[Sample], list[Sample], Any]:
    """The training and validation samples, and the statistics of the training data."""
    samples, stats = load_dataset_samples(config.data, tokenizer)
    logger.info("training data: %s", stats)
    validation = config.validation
    if validation.path is not None:
        eval_samples, eval_stats = load_dataset_samples(
            replace(config.data, path=validation.path, limit=validation.limit), tokenizer
        )
        logger.info("validation data: %s", eval_stats)
        return samples, eval_samples, stats
    if validation.size is not None:
        samples, held_out = split_off(samples, validation.size, seed=config.data.seed)
        eval_samples = random_subset(held_out, validation.limit, config.data.seed)
        logger.info("validation data: %d held-out samples, %d evaluated", len(held_out), len(eval_samples))
        return samples, eval_samples, stats
    return samples, [], stats


def _resume_point(config: TrainConfig) -> str | None:
    output_dir = Path(config.output_dir)
    requested = config.training.resume_from_checkpoint
    if requested is None:
        earlier = latest_checkpoint(output_dir) or (
            output_dir / FINAL_DIR if (output_dir / FINAL_DIR).exists() else None
        )
        if earlier is not None:
            raise BituneInputError(
                f"{output_dir} already holds a run ({earlier.name}); continue it with "
                "--training.resume_from_checkpoint latest, or choose another output_dir"
            )
        return None
    if requested == "latest":
        found = latest_checkpoint(output_dir)
        logger.info("resuming from %s", found or f"the start: no checkpoint in {output_dir}")
        return str(found) if found else None
    if not (Path(requested) / TRAINER_STATE_FILE).is_file():
        raise BituneInputError(
            f"training.resume_from_checkpoint: {requested} is not a training checkpoint ({TRAINER_STATE_FILE} "
            "is missing); point it to a checkpoint-N folder, or use latest"
        )
    return requested


# ----------------------------------------------------------------------------------------------------------
# Precision, model, start-up summary


def supported_precision(config: TrainConfig) -> TrainConfig:
    """`config` with a `training.precision` its device can train in: mixed precision (bf16, fp16) needs a GPU,
    so a CPU trains in fp32; a GPU without bf16 trains in fp16. A change is said in one line.

    Example:
        >>> config = TrainConfig.from_dict({"model": "m", "data": "d.jsonl", "output_dir": "o", "device": "cpu"})
        >>> supported_precision(config).training.precision
        'fp32'
    """
    precision, device = config.training.precision, resolve_device(config.device)
    if precision == "fp32":
        return config
    if device.type == "cpu":
        chosen, reason = "fp32", "mixed precision needs a GPU"
    elif device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        chosen, reason = "fp16", f"{torch.cuda.get_device_name(device)} has no bf16"
    else:
        return config
    logger.warning(
        "training.precision %s: %s, so this run trains in %s on the %s (set --training.precision %s to choose "
        "it yourself)",
        precision,
        reason,
        chosen,
        device.type.upper() if device.type != "cpu" else "CPU",
        chosen,
    )
    return replace(config, training=replace(config.training, precision=chosen))


@contextlib.contextmanager
def _model_errors(config: TrainConfig):
    """Errors of building the model from the settings, as `BituneInputError`s naming the setting."""
    try:
        yield
    except BituneInputError:
        raise
    except BituneError as error:  # e.g. an encoder model (check_model_support)
        raise BituneInputError(f"model.name_or_path {config.model.name_or_path}: {error}") from None
    except ValueError as error:
        if "target modules" not in str(error).lower():
            raise
        raise BituneInputError(
            f"peft.target_modules {config.peft.target_modules!r} matches no module of "
            f"{config.model.name_or_path}; name its linear layers (e.g. '.*_proj', or [q_proj, v_proj])"
        ) from None


def _check_fits(config: TrainConfig, model: BituneModel) -> None:
    """Refuse samples longer than the model reads (its position embeddings)."""
    positions, max_length = max_positions(model.config), getattr(config.data, "max_length", None)
    if positions is not None and isinstance(max_length, int) and max_length > positions:
        raise BituneInputError(
            f"data.max_length {max_length} is more than {config.model.name_or_path} reads ({positions} "
            f"positions); set --data.max_length {positions} or less"
        )


def run_summary(
    config: TrainConfig,
    trainer: BituneTrainer,
    stats: Any,
    train_count: int,
    eval_count: int,
    resumed: TrainerState | None = None,
) -> str:
    """What the run will do, printed at its start: data, steps and batch, trainable parameters, device.

    Example (a tiny run):
        run summary (output_dir runs/a)
          data        train.jsonl: 25 rows -> 25 samples (dropped: 0 empty, 0 too long; truncated: 0);
                      20 train, 5 validation
          steps       6 optimizer steps x effective batch 4 (batch 4 x accumulation 1 x 1 process) =
                      24 samples, 1.20 epochs
          trainable   4,612 parameters: adapters 4,608 (causal 2,304, bidir 2,304), mixing coefficients 4
          device      cpu, precision fp32 (base weights float32)
    """
    settings, args = config.training, trainer.args
    processes = args.world_size
    effective = settings.batch_size * settings.gradient_accumulation_steps * processes
    seen = settings.max_steps * effective
    model = trainer.accelerator.unwrap_model(trainer.model)
    adapters: dict[str, int] = {name: 0 for name in model.bitune_config.spec.adapters}
    for name, parameter in model.peft_model.named_parameters():
        if parameter.requires_grad:
            adapter = next((a for a in adapters if f".{a}." in f"{name}."), "other")
            adapters[adapter] = adapters.get(adapter, 0) + parameter.numel()
    mixing = sum(p.numel() for p in model.mixer.parameters()) if model.mixer is not None else 0
    total = sum(adapters.values()) + mixing
    parts = ", ".join(f"{name} {count:,}" for name, count in adapters.items())
    resume = ""
    if resumed is not None:
        left = max(0, settings.max_steps - resumed.global_step)
        resume = f" (resumed at step {resumed.global_step}: {left} left)"
    lines = [
        f"run summary (output_dir {config.output_dir})",
        f"  data        {stats}; {train_count} train, {eval_count} validation",
        f"  steps       {settings.max_steps} optimizer steps{resume} x effective batch {effective} (batch "
        f"{settings.batch_size} x accumulation {settings.gradient_accumulation_steps} x {processes} "
        f"process{'es' if processes > 1 else ''}) = {seen:,} samples, {seen / max(train_count, 1):.2f} epochs",
        f"  trainable   {total:,} parameters: adapters {sum(adapters.values()):,} ({parts}), mixing "
        f"coefficients {mixing:,}",
        f"  device      {args.device}, precision {settings.precision} (base weights {config.base_dtype})",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Resuming: what defines a run, and what a resume may change


def run_record(
    config: TrainConfig, train_samples: Sequence[Sample], eval_samples: Sequence[Sample], processes: int
) -> dict:
    """What defines a run, as written into every checkpoint (`bitune_run.json`): its settings, except those
    that may change on resume (`MAY_CHANGE_ON_RESUME`), with local paths made absolute, the number of
    processes, and a fingerprint of the training and validation samples (their tokens)."""
    settings = {
        key: value for key, value in _flat(plain(config.to_dict())).items() if key not in MAY_CHANGE_ON_RESUME
    }
    settings["model.name_or_path"] = local_or_hub(config.model.name_or_path)
    settings["model.tokenizer"] = local_or_hub(config.model.tokenizer or config.model.name_or_path)
    settings["model.dtype"] = config.base_dtype
    for key in ("data.path", "validation.path"):
        if isinstance(settings.get(key), str):
            settings[key] = local_or_hub(settings[key])
    settings["processes"] = processes
    return {
        "format_version": RUN_RECORD_VERSION,
        "settings": settings,
        "data": {"training": _fingerprint(train_samples), "validation": _fingerprint(eval_samples)},
    }


def _flat(sections: Mapping[str, Any]) -> dict[str, Any]:
    """{"training": {"max_steps": 3}} -> {"training.max_steps": 3}; one level deep (values stay whole)."""
    flat: dict[str, Any] = {}
    for section, value in sections.items():
        if isinstance(value, Mapping):
            flat.update({f"{section}.{key}": item for key, item in value.items()})
        else:
            flat[section] = value
    return flat


def _fingerprint(samples: Sequence[Sample]) -> dict[str, Any]:
    """The number of samples and the SHA-256 of their tokens, in order."""
    digest = hashlib.sha256()
    for sample in samples:
        for ids in (_field(sample, "prompt_ids"), _field(sample, "answer_ids")):
            digest.update(len(ids).to_bytes(8, "little"))
            digest.update(array("q", ids).tobytes())
    return {"samples": len(samples), "sha256": digest.hexdigest()}


def read_run_record(checkpoint: str | Path, force: bool = False) -> dict | None:
    """A checkpoint's `bitune_run.json`; without one (an older bitune), a `BituneInputError` unless `force`."""
    path = Path(checkpoint) / RUN_FILE
    if not path.is_file():
        if force:
            logger.warning("forced resume: %s has no %s; its settings are not checked", checkpoint, RUN_FILE)
            return None
        raise BituneInputError(
            f"{checkpoint} has no {RUN_FILE} (written by an older bitune?), so the resume cannot be checked "
            "against the run's settings; set --training.force_resume true to resume it unchecked"
        )
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise BituneInputError(f"{path}: not valid JSON ({error}); the checkpoint is damaged") from None
    if not (
        isinstance(record, dict)
        and isinstance(record.get("settings"), dict)
        and isinstance(record.get("data"), dict)
    ):
        raise BituneInputError(f"{path}: not a record of a run (settings, data); the checkpoint is damaged")
    return record


def check_resume(checkpoint: str | Path, saved: dict | None, record: dict, force: bool) -> list[str]:
    """The differences between a checkpoint's record of its run and the resuming run's (`run_record`).

    Any difference is refused (`BituneInputError` naming each) unless `force`; then each is reported, and the
    new settings apply from the checkpoint's step on: a changed `training.max_steps` re-stretches the
    learning-rate schedule over the new length. Settings in `MAY_CHANGE_ON_RESUME` are not compared, nor are
    settings that the checkpoint's bitune did not have. Changed validation data is reported, not refused.
    """
    if saved is None:
        return ["no record of the checkpoint's settings"]
    old, new = saved["settings"], record["settings"]
    differences = []
    for key in sorted(set(old) & set(new)):
        if key in MAY_CHANGE_ON_RESUME or key.startswith(("data.", "validation.")) or old[key] == new[key]:
            continue
        note = (
            " (the learning-rate schedule is re-stretched over the new length)"
            if key == "training.max_steps"
            else ""
        )
        differences.append(f"{key} {_shown(old[key])} -> {_shown(new[key])}{note}")
    if saved["data"].get("training") != record["data"]["training"]:
        settings = [
            f"{key} {_shown(old[key])} -> {_shown(new[key])}"
            for key in sorted(set(old) & set(new))
            if key.startswith(("data.", "validation.")) and old[key] != new[key]
        ]
        differences.append(
            f"the training samples ({_data(saved['data'].get('training'))} -> {_data(record['data']['training'])}"
            f"{': ' + ', '.join(settings) if settings else ': the data file or the tokenizer changed'})"
        )
    if saved["data"].get("validation") != record["data"]["validation"]:
        logger.warning(
            "%s: the validation samples differ from the checkpoint's (%s -> %s); eval_loss from here on is on "
            "other samples",
            checkpoint,
            _data(saved["data"].get("validation")),
            _data(record["data"]["validation"]),
        )
    if not differences:
        return []
    listed = "; ".join(differences)
    if not force:
        raise BituneInputError(
            f"cannot resume from {checkpoint}: the run's settings differ from the checkpoint's: {listed}. Resume "
            "with the settings it was trained with, start a new output_dir, or set --training.force_resume true "
            "to continue with the new settings"
        )
    logger.warning("forced resume from %s with changed settings: %s", checkpoint, listed)
    return differences


def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def _data(fingerprint: Any) -> str:
    if not isinstance(fingerprint, dict):
        return "unknown"
    return f"{fingerprint.get('samples')} samples, sha256 {str(fingerprint.get('sha256'))[:12]}"


def _trainer_state(checkpoint: str | Path) -> TrainerState:
    path = Path(checkpoint) / TRAINER_STATE_FILE
    try:
        return TrainerState.load_from_json(str(path))
    except (OSError, ValueError, TypeError) as error:
        raise BituneInputError(f"{path}: cannot be read ({error}); resume from another checkpoint") from None


@contextlib.contextmanager
def _state_files_of(checkpoint: str | None):
    """Unreadable optimizer, scheduler or RNG state files of a checkpoint, as a `BituneInputError`."""
    try:
        yield
    except (pickle.UnpicklingError, EOFError, RuntimeError, OSError, KeyError, ValueError) as error:
        if checkpoint is None:
            raise
        gist = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise BituneInputError(
            f"{checkpoint}: its optimizer, scheduler or RNG state cannot be read ({gist[:200]}); bitune loads "
            "only plain tensors from them and never runs a pickle. Resume from another checkpoint"
        ) from None


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; a line cut short by a crash counts as after every step."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError, TypeError):
        return float("inf")
