"""lm-evaluation-harness over the live model of any layout: ``CurryLM``, lm-eval's model interface
(``loglikelihood``, ``loglikelihood_rolling``, ``generate_until``) on a ``Scorer``.

lm-eval runs whole on every rank, as one process (rank 0 of 1 in its eyes): every rank builds the same
requests, and the ``Scorer`` splits each batch of them over the data-parallel ranks (their tensor,
pipeline and context parallel peers cooperating on the same rows) and gathers the results, so every rank
returns every answer and computes the same scores. Only the first rank reports them.

Tokenization follows lm-eval's Hugging Face backend (``HFLM``) rule for rule, so that a model scores
the same here as there: a tokenizer directory is read with transformers' ``AutoTokenizer``; a request's
context and continuation are encoded together and split at the context's length (``TemplateLM``); the
window is the run's ``data.seq_len`` (``HFLM``'s ``max_length``); a rolling request is cut into
disjoint windows after a prefix token (BOS, else EOS). Generation is greedy: one forward of every
unfinished request per new token (no cache, so it runs in every layout); sampling is refused.
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from curry_train.config.eval_tasks import HarnessError, require_lm_eval, task_manager
from curry_train.evaluation.scoring import Row, Scorer

log = logging.getLogger(__name__)


class EvalTokenizer:
    """Encode and decode as lm-eval's Hugging Face backend would: a directory (or ``tokenizer.json``)
    through transformers; ``byte``: UTF-8 bytes, NUL (the separator) as end of text."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.hf = None
        if spec == "byte":
            self.eos_id: Optional[int] = 0
            self.bos_id: Optional[int] = None
            return
        import transformers  # noqa: PLC0415  (lm-eval's own dependency)

        path = Path(spec)
        if path.is_dir():
            self.hf = transformers.AutoTokenizer.from_pretrained(str(path))
        else:
            self.hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
        self.eos_id, self.bos_id = self.hf.eos_token_id, self.hf.bos_token_id

    @property
    def prefix_id(self) -> int:
        """What a request without context (or a rolling window's first token) is conditioned on."""
        prefix = self.bos_id if self.bos_id is not None else self.eos_id
        if prefix is None:
            raise HarnessError(f"tokenizer {self.spec}: neither BOS nor EOS, so nothing to condition a text's start on")
        return prefix

    def encode(self, text: str, add_special_tokens: Optional[bool] = None) -> list[int]:
        if self.hf is None:
            return list(text.encode("utf-8"))
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and self.bos_id is not None:
            bos = self.hf.decode(self.bos_id)
            if bos and text.startswith(bos):  # already there: not twice
                options["add_special_tokens"] = False
        return list(self.hf.encode(text, **options))

    def decode(self, ids: Sequence[int]) -> str:
        if self.hf is None:
            return bytes(i for i in ids if 0 < i < 256).decode("utf-8", errors="replace")
        return self.hf.decode(list(ids), skip_special_tokens=True)


def _template_lm() -> type:
    require_lm_eval()
    from lm_eval.api.model import TemplateLM  # noqa: PLC0415

    return TemplateLM


def curry_lm(scorer: Scorer, tokenizer: EvalTokenizer) -> Any:
    """A ``CurryLM`` (lm-eval's ``TemplateLM``) over ``scorer``."""

    class CurryLM(_template_lm()):
        backend = "causal"

        def __init__(self) -> None:
            super().__init__()
            self.scorer, self.tok = scorer, tokenizer

        @property
        def eot_token_id(self) -> int:
            return self.tok.eos_id if self.tok.eos_id is not None else self.tok.prefix_id

        @property
        def prefix_token_id(self) -> int:
            return self.tok.prefix_id

        @property
        def max_length(self) -> int:
            return self.scorer.width - 1

        def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs: Any) -> list[int]:
            return self.tok.encode(string, add_special_tokens)

        def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list:
            rows = [_scored(context, continuation, self.scorer.width) for _, context, continuation in requests]
            return [(score.logprob, score.greedy) for score in self.scorer.score(rows)]

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
            from lm_eval import utils  # noqa: PLC0415

            rows, owners = [], []
            for index, (text,) in enumerate(request.args for request in requests):
                windows = utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
                for context, predicted in map(utils.make_disjoint_window, windows):
                    rows.append(_scored(context, predicted, self.scorer.width))
                    owners.append(index)
            totals = [0.0] * len(requests)
            for owner, score in zip(owners, self.scorer.score(rows), strict=True):
                totals[owner] += score.logprob
            return totals

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
            return _generate(self, [request.args for request in requests])

    return CurryLM()


def _scored(context: Sequence[int], continuation: Sequence[int], width: int) -> Row:
    """The row that scores ``continuation`` after ``context``: the last ``width`` tokens of both (as
    ``HFLM`` cuts them), the continuation's marked."""
    whole = [*context, *continuation][-width:]
    n = min(len(continuation), len(whole) - 1)
    return Row(whole, [False] * (len(whole) - n) + [True] * n)


def _generate(lm: Any, requests: Sequence[tuple[str, dict]]) -> list[str]:
    """Greedy continuations, all requests at once: each round scores one new token of every unfinished one."""
    width = lm.scorer.width
    states = []
    for context, options in requests:
        options = dict(options or {})
        if options.get("do_sample") or float(options.get("temperature") or 0.0) > 0:
            raise HarnessError(
                "a task asks for sampled generation (do_sample/temperature): curry's harness adapter"
                " generates greedily; set the task's generation_kwargs to do_sample: false"
            )
        until = options.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        if lm.tok.eos_id is not None:
            eos = lm.tok.decode([lm.tok.eos_id]) if lm.tok.hf is not None else ""
            if eos and eos not in until:
                until.append(eos)
        budget = int(options.get("max_gen_toks", 256))
        prompt = lm.tok_encode(context)[-max(1, width - 1 - budget) :]
        states.append({"tokens": prompt, "new": [], "until": until, "budget": budget, "done": budget <= 0})
    while True:
        active = [state for state in states if not state["done"]]
        if not active:
            break
        rows = []
        for state in active:  # the next token is the greedy pick at the slot after the sequence
            tokens = [*state["tokens"], *state["new"]][-(width - 1) :]
            rows.append(Row([*tokens, 0], [False] * len(tokens) + [True]))
        for state, score in zip(active, lm.scorer.score(rows), strict=True):
            state["new"].append(score.next_token)
            text = lm.tok.decode(state["new"])
            if (
                score.next_token == lm.tok.eos_id
                or len(state["new"]) >= state["budget"]
                or any(stop and stop in text for stop in state["until"])
            ):
                state["done"] = True
    out = []
    for state in states:
        new = state["new"]
        if new and new[-1] == lm.tok.eos_id:
            new = new[:-1]
        text = lm.tok.decode(new)
        for stop in state["until"]:
            if stop:
                text = text.split(stop)[0]
        out.append(text)
    return out


# ----------------------------------------------------------------------------------------------
# Tasks


def _silent_tqdm(*args: Any, **kwargs: Any) -> Any:
    import tqdm  # noqa: PLC0415

    return tqdm.tqdm(*args, **{**kwargs, "disable": True})  # whatever the caller asked


@contextmanager
def _quiet_run() -> Iterator[None]:
    """lm-eval as one process on every rank: its results returned on each; no progress bars from its request
    building and tokenizing (they would repeat on every rank at every evaluation), and no ``git describe``
    of the working directory (lm-eval records its version)."""
    from lm_eval import evaluator  # noqa: PLC0415
    from lm_eval.api import model, task  # noqa: PLC0415

    saved = [(evaluator, "get_git_commit_hash"), (task, "tqdm"), (model, "tqdm")]
    before = [getattr(module, name) for module, name in saved]
    local_rank = os.environ.get("LOCAL_RANK")
    evaluator.get_git_commit_hash = lambda: None
    task.tqdm = model.tqdm = _silent_tqdm
    # lm-eval returns its results only where LOCAL_RANK is 0: every rank here runs it as one process
    os.environ["LOCAL_RANK"] = "0"
    try:
        yield
    finally:
        for (module, name), value in zip(saved, before, strict=True):
            setattr(module, name, value)
        if local_rank is None:
            os.environ.pop("LOCAL_RANK", None)
        else:
            os.environ["LOCAL_RANK"] = local_rank


def run_tasks(
    lm: Any,
    tasks: Sequence[str],
    include_path: Optional[str] = None,
    limit: Optional[int] = None,
    num_fewshot: Optional[int] = None,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Each task's metrics (``{task: {metric: value}}``; a filter other than ``none`` is named after the
    metric, ``exact_match/strict``) from lm-eval's ``simple_evaluate`` with ``lm``."""
    lm_eval = require_lm_eval()
    try:
        with _quiet_run():
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(tasks),
                task_manager=task_manager(include_path, tasks),
                limit=limit,
                num_fewshot=num_fewshot,
                log_samples=False,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
    except (FileNotFoundError, OSError) as error:
        raise HarnessError(f"eval.harness: a task's data could not be read: {error}") from error
    return metrics_of(out["results"])


def metrics_of(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for task, values in results.items():
        for key, value in values.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, selected = key.split(",", 1)
            name = metric if selected == "none" else f"{metric}/{re.sub(r'[^A-Za-z0-9_.-]+', '_', selected)}"
            table.setdefault(task, {})[name] = float(value)
    return table
