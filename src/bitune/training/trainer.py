"""Training a `BituneModel` with the Hugging Face `Trainer`.

`BituneTrainer` is a `transformers.Trainer` that knows four things about Bitune:

* the loss: one forward runs the prompt passes and the answer pass and returns the cross-entropy over answer
  tokens, normalised by the answer tokens of the whole optimizer step (all accumulation steps, all processes),
  so gradient accumulation and data parallelism give the gradient of one big batch;
* checkpoints: every `checkpoint-N` folder is a loadable Bitune checkpoint (adapters, mixing coefficients,
  tokenizer) plus the trainer's optimizer/scheduler/RNG state, and appears in one rename, so a crash during a
  save leaves the previous checkpoint as the latest;
* resuming: both adapters and the mixer are loaded back into the live model in place, all still trainable;
* parallelism: DDP (torchrun, accelerate launch) and DeepSpeed ZeRO-1/2 work; FSDP and ZeRO-3 are refused at
  start-up until they are validated on GPUs through the Trainer (the layer-synchronous forward already trains
  exactly under per-layer `fully_shard` at the torch level: tests/test_layer_sync.py).

`train(config)` builds everything from a `TrainConfig` and runs it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.integrations import is_tensorboard_available
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from bitune.core.batch import collate
from bitune.core.checkpoint import MIXER_FILE, describe, read_config
from bitune.core.loading import load_tokenizer, pad_token_id, resolve_device
from bitune.core.model import BituneModel
from bitune.data.samples import Sample, load_dataset_samples, split_off
from bitune.errors import BituneInputError
from bitune.files import atomic_directory, atomic_write_text
from bitune.training.config import TrainConfig
from bitune.training.outputs import FINAL_DIR, METRICS_FILE, TRAIN_CONFIG_FILE, TRAINER_STATE_FILE

logger = logging.getLogger(__name__)

_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_ALPHA_KEY = re.compile(r"^alpha/(keys|values)/(\d+)$")


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
        >>> trainer = BituneTrainer(model=model, args=TrainingArguments("out", max_steps=100,
        ...     remove_unused_columns=False), train_dataset=samples, processing_class=tokenizer)  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
    """

    # `compute_loss` normalises by the answer tokens of the whole optimizer step (see `_get_num_items_in_batch`),
    # so the Trainer must not divide it by the number of accumulation steps again.
    loss_is_scaled_for_ga = True

    def __init__(self, model: BituneModel, args: TrainingArguments, **kwargs) -> None:
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = BituneCollator(pad_token_id(kwargs.get("processing_class")))
        self._checkpoint_staging: Path | None = None
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
        >>> restore_weights(model, "runs/a/checkpoint-500")  # doctest: +SKIP
    """
    checkpoint_dir = Path(checkpoint_dir)
    saved, expected = read_config(checkpoint_dir), describe(model)
    for key in ("adapters", "bitune", "peft_type"):
        if saved.get(key) != expected[key]:
            raise BituneInputError(
                f"{checkpoint_dir}: the checkpoint has {key} {saved.get(key)!r} but the model has "
                f"{expected[key]!r}; resume with the settings the checkpoint was trained with"
            )
    trainable = {name for name, parameter in model.peft_model.named_parameters() if parameter.requires_grad}
    for adapter in saved["adapters"]:
        weights = load_file(checkpoint_dir / adapter / "adapter_model.safetensors")
        result = set_peft_model_state_dict(model.peft_model, weights, adapter_name=adapter)
        missing = [key for key in result.missing_keys if key in trainable and f".{adapter}" in key]
        if result.unexpected_keys or missing:
            raise BituneInputError(
                f"{checkpoint_dir / adapter}: adapter weights do not match the model (unexpected: "
                f"{result.unexpected_keys[:3]}, missing: {missing[:3]}); was it trained on another base model?"
            )
    if model.mixer is not None:
        try:
            model.mixer.load_state_dict(load_file(checkpoint_dir / MIXER_FILE))
        except RuntimeError as error:
            raise BituneInputError(
                f"{checkpoint_dir / MIXER_FILE}: does not fit the model ({error})"
            ) from None


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete `checkpoint-N` folder in `output_dir` (staging folders of interrupted saves are skipped).

    Example:
        >>> latest_checkpoint("runs/a")  # doctest: +SKIP
        PosixPath('runs/a/checkpoint-1500')
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
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            kept = [line for line in lines if json.loads(line).get("step", 0) <= state.global_step]
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

    Example:
        >>> from bitune.training import load_config, train
        >>> final = train(load_config("configs/paper_lora.yaml", ["--output_dir", "runs/a"]))  # doctest: +SKIP
        >>> model = BituneModel.from_pretrained(final)  # doctest: +SKIP
    """
    output_dir = Path(config.output_dir)
    resume_from = _resume_point(config)
    set_seed(config.training.seed)  # the fresh adapters are drawn from it
    tokenizer = load_tokenizer(config.model.tokenizer or config.model.name_or_path)
    train_samples, eval_samples = _load_samples(config, tokenizer)
    model = BituneModel.from_base(
        config.model.name_or_path,
        config.peft.to_peft_config(),
        config.bitune,
        dtype=config.base_dtype,
        attn_implementation=config.model.attn_implementation,
    )
    trainer = BituneTrainer(
        model=model,
        args=training_arguments(config, has_validation=bool(eval_samples)),
        train_dataset=train_samples,
        eval_dataset=eval_samples or None,
        processing_class=tokenizer,
        callbacks=[MetricsFileCallback(), *callbacks],
    )
    if trainer.is_world_process_zero():
        atomic_write_text(output_dir / TRAIN_CONFIG_FILE, config.to_yaml())
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
    resolve_device(config.device)  # an unavailable device fails here, before the Trainer starts
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
        use_cpu=config.device == "cpu",
        disable_tqdm=False,
    )
    try:
        return TrainingArguments(**{**arguments, **settings.trainer_args})
    except (TypeError, ValueError, ImportError) as error:
        raise BituneInputError(f"training settings rejected by transformers: {error}") from None


def _load_samples(config: TrainConfig, tokenizer) -> tuple[list[Sample], list[Sample]]:
    samples, stats = load_dataset_samples(config.data, tokenizer)
    logger.info("training data: %s", stats)
    validation = config.validation
    if validation.path is not None:
        eval_samples, eval_stats = load_dataset_samples(
            replace(config.data, path=validation.path, limit=None), tokenizer
        )
        logger.info("validation data: %s", eval_stats)
        return samples, eval_samples
    if validation.size is not None:
        return split_off(samples, validation.size, seed=config.data.seed)
    return samples, []


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
