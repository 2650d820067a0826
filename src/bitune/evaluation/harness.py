"""lm-evaluation-harness integration: the `bitune` model for lm-eval's tasks, command line and Python API.

lm-eval has no plugin discovery, so the model is registered when this module is imported. From the shell,
`bitune lm-eval ...` (or `python -m bitune.evaluation.harness ...`) registers it and runs lm-eval's own
command line with the remaining arguments:

    bitune lm-eval run --model bitune --model_args pretrained=BASE,bitune=CHECKPOINT --tasks piqa,arc_easy
    bitune lm-eval run --model bitune --model_args pretrained=BASE,peft=ADAPTER --tasks gsm8k   # plain PEFT
    bitune lm-eval run --model bitune --model_args pretrained=BASE --tasks mmlu --include_path MY_TASKS

Every other `hf` model argument works as usual (dtype, device, tokenizer, batch_size, max_length, ...). The
tokenizer comes from the checkpoint (or adapter) folder when it holds one, else from `pretrained`.
`batch_size` counts distinct contexts (questions): each one's prompt is encoded once and all its
continuations are scored from that cache (`bitune.evaluation.scoring`).

Python:
    >>> import lm_eval, bitune.evaluation.harness
    >>> lm_eval.simple_evaluate(model="bitune", model_args="pretrained=BASE,bitune=CKPT", tasks=["piqa"])  # doctest: +SKIP

or, request by request, with lm-eval's model API:
    >>> from lm_eval.api.instance import Instance
    >>> from lm_eval.api.registry import get_model
    >>> lm = get_model("bitune").create_from_arg_string(f"pretrained={base},bitune={checkpoint},device=cpu")
    >>> request = Instance("loglikelihood", doc={}, arguments=("Once upon a time", ", there was"), idx=0)
    >>> lm.loglikelihood([request], disable_tqdm=True)  # (log-probability, is it the greedy continuation?)
    [(-0.1..., True)]
    >>> request = Instance("generate_until", doc={}, arguments=("Once upon a time", {"until": ["."]}), idx=0)
    >>> lm.generate_until([request], disable_tqdm=True)
    [', there was a little girl named Lily']
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from bitune.core.loading import tokenizer_source
from bitune.core.model import BituneModel
from bitune.core.plain import PlainModel
from bitune.core.pretrained import load_for_inference
from bitune.evaluation.scoring import loglikelihoods

MODEL_NAME = "bitune"


@register_model(MODEL_NAME)
class BituneLM(HFLM):
    """lm-eval's `hf` model, scoring and generating through a Bitune model (or a plain/PEFT model alike).

    Args (lm-eval `--model_args`, besides every `hf` one):
        pretrained: the base model (path or hub id), or an already built `BituneModel` / `PlainModel` /
            transformers model.
        bitune: a Bitune checkpoint folder (`BituneModel.save_pretrained`).
        peft: a plain PEFT adapter, evaluated as a `BituneModel` in mode "baseline" (same code path).
    """

    def __init__(
        self,
        pretrained: str | BituneModel | PlainModel | torch.nn.Module,
        bitune: str | None = None,
        peft: str | None = None,
        **kwargs,
    ) -> None:
        self.scoring_model: BituneModel | PlainModel | None = None
        if isinstance(pretrained, (BituneModel, PlainModel)):
            self.scoring_model, pretrained = pretrained, pretrained.base_model
        if isinstance(pretrained, str) and kwargs.get("tokenizer") is None:
            kwargs["tokenizer"] = str(tokenizer_source(bitune or peft, pretrained))
        super().__init__(pretrained, bitune=bitune, peft=peft, **kwargs)
        # HFLM moved the base model to its device; the adapters and mixing coefficients follow.
        if self.scoring_model is None:  # the checkpoint or adapter goes onto the base model HFLM holds
            self.scoring_model, _ = load_for_inference(
                checkpoint=bitune,
                base_model=self._model,
                peft_adapter=peft,
                tokenizer=self.tokenizer,
                device=self._model.device,
            )
        else:
            self.scoring_model.to(self._model.device).eval()

    def _create_model(
        self, pretrained: str, *, bitune: str | None = None, peft: str | None = None, **kwargs
    ) -> None:
        super()._create_model(pretrained, **kwargs)  # the base model alone, into self._model

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        batch_size = override_bs or self.batch_size
        if not isinstance(batch_size, int):
            raise ValueError(f"model {MODEL_NAME!r} needs a whole-number batch_size (contexts per batch)")
        scores = loglikelihoods(
            self.scoring_model,
            [(context, continuation) for _, context, continuation in requests],
            batch_size=batch_size,
            pad_token_id=self.tokenizer.pad_token_id,
            max_length=self.max_length,
            progress=not disable_tqdm and self.rank == 0,
        )
        answers = [tuple(score) for score in scores]
        for (request, _, _), answer in zip(requests, answers, strict=True):
            if request is not None:  # rolling windows are cached per document by the caller
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return answers

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        # HFLM's own `_model_generate` (greedy/sampling settings, stop criteria) calling our model's generate.
        with self._serving(self.scoring_model):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    @contextlib.contextmanager
    def _serving(self, model: torch.nn.Module) -> Iterator[None]:
        base, self._model = self._model, model
        try:
            yield
        finally:
            self._model = base


def main(argv: Sequence[str] | None = None) -> int:
    """Run lm-eval's command line (`run`, `ls`, `validate`) with the `bitune` model registered.

    Example:
        >>> main(["run", "--model", "bitune", "--model_args", "pretrained=BASE,bitune=CKPT",
        ...       "--tasks", "piqa", "--device", "cpu"])  # doctest: +SKIP
    """
    from lm_eval.__main__ import cli_evaluate

    arguments = list(sys.argv[1:] if argv is None else argv)
    saved, sys.argv = sys.argv, ["lm-eval", *arguments]  # lm-eval's parser reads sys.argv
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


__all__ = ["MODEL_NAME", "BituneLM", "main"]

if __name__ == "__main__":
    sys.exit(main())
