"""lm-evaluation-harness backend: any lm-eval task on our JAX model, with a PEFT adapter or a training run.

    python -m flacuna_jax.lm_eval --model_args model=HF_DIR[,adapter=PEFT_DIR|run=RUN_DIR][,dtype=float32][,base_quant=nf4] \\
        --tasks hellaswag [--include_path TASK_DIR] [--num_fewshot K] [--limit N] [--batch_size 8] \\
        --output_path OUT

Every other flag is lm-eval's own (`lm-eval run --help`): this CLI registers the model as
`flacuna_jax`, adds `--model flacuna_jax` and hands over to lm-eval's CLI. From Python:

    import lm_eval
    from flacuna_jax.lm_eval import FlacunaLM
    lm_eval.simple_evaluate(model=FlacunaLM(model=HF_DIR, batch_size=8), tasks=["hellaswag"])

`model_args`: model (HF LLaMA dir), adapter | run, tokenizer (default: model), dtype (float32 |
bfloat16), base_quant (none | int8 | nf4: the base quantized as bitsandbytes does, the LoRA factors
applied on top, as `--base-quant` of the other CLIs), batch_size, max_gen_toks (default 256), seed
(sampling).

Requests are tokenized as lm-eval's HF backend (`--model hf`) tokenizes them: `TemplateLM` (lm-eval's
own code) splits context and continuation (trailing context spaces move to the continuation; ctx =
tok(context), continuation = tok(context + continuation)[len(ctx):]; an empty context becomes the
BOS, or EOS, token); special tokens as the tokenizer adds them unless the text already starts with
BOS; the input is truncated from the left to the window (max_position_embeddings + 1 tokens, the
last not fed). Rolling log-likelihoods use lm-eval's own disjoint windows. `generate_until` cuts
the context from the left to leave room for `max_gen_toks`, decodes on our KV-cache decoder (greedy
unless do_sample with temperature > 0; top_p), stops a row at EOS (the checkpoint's generation
config) or once it has generated a stop string's tokens, and cuts the text at the first stop
string as lm-eval does. Scoring runs on `score.score_token_requests`, decoding on `generate.Generator`.
"""

from __future__ import annotations

import json
import sys
from collections import deque
from pathlib import Path
from typing import Any, Sequence

import jax.numpy as jnp
import lm_eval.models  # noqa: F401  lm-eval's own backends, registered before ours (get_model loads them only into an empty registry)
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry
import numpy as np
from lm_eval.models.utils import (Collator, handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs,
                                  postprocess_generated_text)

from flacuna_jax.config import BASE_QUANTS
from flacuna_jax.dtypes import FLOAT_DTYPES as DTYPES
from flacuna_jax.generate import Generator
from flacuna_jax.inference import load_for_inference
from flacuna_jax.score import score_token_requests

SAMPLING_KWARGS = {"top_p"}  # generation kwargs we honour besides until / max_gen_toks / do_sample / temperature


def generation_eos_ids(model_dir: str | Path, config_eos: int | None) -> tuple[int, ...]:
    """EOS ids that end a row, as transformers' `generate` takes them: generation_config.json, else config.json."""
    path = Path(model_dir) / "generation_config.json"
    eos = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
    if eos is None:
        eos = config_eos
    return tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))


class FlacunaLM(TemplateLM):
    """lm-eval's `LM` on our scorer and decoder; the LoRA of an adapter or run is folded into the base
    (kept beside it on a quantized base), loaded with one weight buffer per layer (`model.unrolled`)."""

    def __init__(self, model: str, adapter: str | None = None, run: str | None = None, tokenizer: str | None = None,
                 dtype: str = "float32", batch_size: int | str = 8, max_gen_toks: int = 256, seed: int = 1234,
                 base_quant: str = "none", max_batch_size: int | None = None, device: str | None = None):
        # max_batch_size, device: lm-eval passes them to every backend; JAX places the model itself.
        super().__init__()
        from flacuna_jax.tokenizer import load_tokenizer

        if adapter is not None and run is not None:
            raise ValueError("model_args: give adapter or run, not both")
        if dtype not in DTYPES:
            raise ValueError(f"model_args: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if base_quant not in BASE_QUANTS:
            raise ValueError(f"model_args: base_quant must be one of {', '.join(BASE_QUANTS)}, got {base_quant!r}")
        if str(batch_size).startswith("auto"):
            raise ValueError("batch_size=auto is not supported by flacuna_jax: give a number")
        self.model_dir, self.adapter, self.run, self.dtype = str(model), adapter, run, dtype
        net, params = load_for_inference(str(model), adapter, run, DTYPES[dtype], base_quant, layers="unrolled")
        self._use(net, params, load_tokenizer(tokenizer or model),
                  generation_eos_ids(model, net.config.eos_token_id), batch_size, max_gen_toks, seed)

    @classmethod
    def from_loaded(cls, model: Any, params: Any, tokenizer: Any, eos_ids: Sequence[int], batch_size: int = 8,
                    max_gen_toks: int = 256, seed: int = 1234) -> "FlacunaLM":
        """A backend over a model already in memory (training's evaluation); `set_params` swaps weights."""
        lm = cls.__new__(cls)
        TemplateLM.__init__(lm)
        lm.model_dir, lm.adapter, lm.run, lm.dtype = None, None, None, jnp.dtype(model.runtime.compute_dtype).name
        lm._use(model, params, tokenizer, tuple(eos_ids), batch_size, max_gen_toks, seed)
        return lm

    def _use(self, model: Any, params: Any, tokenizer: Any, eos_ids: tuple[int, ...], batch_size: int | str,
             max_gen_toks: int, seed: int) -> None:
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self._batch_size, self._max_gen_toks, self.seed = int(batch_size), int(max_gen_toks), int(seed)
        tok = tokenizer  # padding id as lm-eval's configure_pad_token picks it (masked out either way)
        pad = next((t for t in (tok.pad_token_id, tok.unk_token_id, tok.eos_token_id) if t is not None), 0)
        self.generator = Generator(model, params, eos_ids, pad_id=pad, batch_size=self._batch_size)

    def set_params(self, params: Any) -> None:
        self.params = self.generator.params = params

    # ------------------------------------------------------------------ what lm-eval asks of a backend

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:  # conditions an empty context and the first rolling window
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self.model.config.max_position_embeddings

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """The tokenizer's own special tokens, none where the text already starts with the prefix token."""
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def get_model_info(self) -> dict:
        import jax

        return {"model_path": self.model_dir, "adapter": self.adapter, "run": self.run, "model_dtype": self.dtype,
                "model_num_parameters": sum(int(x.size) for x in jax.tree.leaves(self.params))}

    # ------------------------------------------------------------------ scoring

    def _loglikelihood_tokens(self, requests: Sequence[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is greedy) per (cache key, context ids, continuation ids)."""
        window = self.max_length + 1
        for _, _, cont in requests:
            if not 0 < len(cont) <= self.max_length:
                raise ValueError(f"a continuation of {len(cont)} tokens does not fit the window of {self.max_length}")
        scored = score_token_requests(self.model, self.params, [((c + x)[-window:], len(x)) for _, c, x in requests],
                                      self.batch_size)
        out = [(r["loglik"], r["is_greedy"]) for r in scored]
        for (key, _, _), answer in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood over lm-eval's disjoint windows of the model's length, summed."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (loglik, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[i] += loglik
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation

    def _context_ids(self, context: str, max_ctx_len: int) -> list[int]:
        """As lm-eval's tok_batch_encode: no special tokens added to a text starting with BOS; left-truncated."""
        bos = self.tokenizer.bos_token
        special = {"add_special_tokens": False} if has_bos_prefix(context, bos) else {}
        return self.tokenizer.encode(context, **special)[-max_ctx_len:]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        args = [req.args for req in requests]
        out: list[str | None] = [None] * len(args)
        eos_text = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        groups = Collator.group(list(enumerate(args)), fn=lambda x: x[1][1], group_by="gen_kwargs")
        for members in groups.values():
            idx = [i for i, _ in members]
            kwargs = dict(normalize_gen_kwargs(args[idx[0]][1], self.max_gen_toks))
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            texts = self._generate([args[i][0] for i in idx], until, kwargs)
            for i, text in zip(idx, texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", args[i], text)
        return out  # type: ignore[return-value]

    def _generate(self, contexts: list[str], until: list[str], kwargs: dict) -> list[str]:
        max_gen = int(kwargs.pop("max_gen_toks"))
        do_sample, temperature = bool(kwargs.pop("do_sample")), float(kwargs.pop("temperature", 0.0))
        top_p = float(kwargs.pop("top_p", None) or 1.0)
        unsupported = sorted(k for k, v in kwargs.items() if v is not None)
        if unsupported:
            raise ValueError(f"generation kwargs not supported by flacuna_jax: {unsupported} "
                             f"(supported: until, max_gen_toks, do_sample, temperature, {', '.join(SAMPLING_KWARGS)})")
        if do_sample and temperature <= 0:
            raise ValueError("do_sample=True needs temperature > 0")
        if max_gen >= self.max_length:
            raise ValueError(f"max_gen_toks ({max_gen}) must be below the model's length ({self.max_length})")
        prompts = [self._context_ids(c, self.max_length - max_gen) for c in contexts]
        stops = [self.tokenizer.encode(s, add_special_tokens=False) for s in until if s]
        temperature = temperature if do_sample else 0.0
        table = stop_sequences_table(stops, self.model.config.vocab_size)
        ids = self.generator.generate_ids(prompts, max_gen, temperature, top_p, self.seed, stop_table=table)
        texts = [self.tokenizer.decode(x, skip_special_tokens=True) for x in ids]
        # A row stopped on a stop string's tokens whose text does not contain the string (a tokenizer
        # that decodes them differently in context) would end too early: decode it again without stops.
        # Not a row that ended at EOS (lm-eval adds the EOS text to `until`; EOS ends a row anyway).
        eos = set(self.generator.eos_ids)
        again = [i for i, (x, t) in enumerate(zip(ids, texts))
                 if ends_with_any(x, stops) and not (x and x[-1] in eos)
                 and postprocess_generated_text(t, until, None) == t]
        if again:
            redo = self.generator.generate_ids([prompts[i] for i in again], max_gen, temperature, top_p, self.seed)
            for i, x in zip(again, redo):
                texts[i] = self.tokenizer.decode(x, skip_special_tokens=True)
        return [postprocess_generated_text(t, until, None) for t in texts]


def stop_sequences_table(sequences: Sequence[Sequence[int]], vocab_size: int) -> np.ndarray | None:
    """The decoder's stop automaton [vocab, states] (generate.make_decoder's stop_table) for "the
    tokens generated so far end with one of `sequences`": Aho-Corasick over token ids, the last
    column the absorbing stop state. None when there is nothing to stop on."""
    seqs = [tuple(int(t) for t in q) for q in sequences if q and all(0 <= t < vocab_size for t in q)]
    if not seqs:
        return None
    children: list[dict[int, int]] = [{}]
    terminal = [False]
    for q in seqs:  # the trie
        node = 0
        for t in q:
            if t not in children[node]:
                children[node][t] = len(children)
                children.append({})
                terminal.append(False)
            node = children[node][t]
        terminal[node] = True
    alphabet = sorted({t for q in seqs for t in q})
    fail = [0] * len(children)
    goto: list[dict[int, int]] = [{} for _ in children]
    queue = deque()
    for t in alphabet:
        goto[0][t] = children[0].get(t, 0)
        if t in children[0]:
            queue.append(children[0][t])
    while queue:  # breadth first: a node's failure link is shallower, so already complete
        s = queue.popleft()
        terminal[s] = terminal[s] or terminal[fail[s]]
        for t in alphabet:
            if t in children[s]:
                fail[children[s][t]] = goto[fail[s]][t]
                goto[s][t] = children[s][t]
                queue.append(children[s][t])
            else:
                goto[s][t] = goto[fail[s]][t]
    final = len(children)
    table = np.zeros((vocab_size, final + 1), np.int32)  # any other token: back to the start
    table[:, final] = final
    for s in range(final):
        for t in alphabet:
            table[t, s] = final if terminal[goto[s][t]] else goto[s][t]
    return table


def ends_with_any(ids: Sequence[int], sequences: Sequence[Sequence[int]]) -> bool:
    return any(len(q) <= len(ids) and list(ids[len(ids) - len(q):]) == list(q) for q in sequences if q)


class LmEvalSuite:
    """lm-eval tasks scored during training (`eval.tasks` entries `lm_eval:<task>`), on the model in memory.

    Calling it with the current parameters returns {"<task>/<metric>": value} (stderr left out),
    which training logs as eval/<task>/<metric>.
    """

    PREFIX = "lm_eval:"

    def __init__(self, model: Any, tokenizer: Any, tasks: Sequence[str], eos_ids: Sequence[int],
                 include_path: str | None = None, limit: int | None = None, num_fewshot: int | None = None,
                 batch_size: int = 8):
        from lm_eval.tasks import TaskManager

        self.tasks, self.limit, self.num_fewshot = list(tasks), limit, num_fewshot
        self.manager = TaskManager(include_path=include_path)
        unknown = [t for t in self.tasks if t not in self.manager.all_tasks]
        if unknown:
            raise ValueError(f"unknown lm-eval task(s) {unknown}" + (f" (also looked in {include_path})" if include_path else ""))
        self.lm = FlacunaLM.from_loaded(model, None, tokenizer, eos_ids, batch_size)

    def __call__(self, params: Any) -> dict[str, float]:
        import lm_eval

        self.lm.set_params(params)
        out = lm_eval.simple_evaluate(model=self.lm, tasks=self.tasks, task_manager=self.manager, limit=self.limit,
                                      num_fewshot=self.num_fewshot, bootstrap_iters=0, log_samples=False,
                                      verbosity="WARNING")
        return {f"{task}/{key.split(',')[0]}": float(value) for task, res in out["results"].items()
                for key, value in res.items()
                if "," in key and "_stderr" not in key and isinstance(value, (int, float))}


LM_EVAL_COMMANDS = ("run", "ls", "validate")

# Registered by module path, not by decorator: `python -m flacuna_jax.lm_eval` runs this file as
# __main__ and a decorator would register a second class under the same name when imported again.
if "flacuna_jax" not in model_registry:
    model_registry.register("flacuna_jax", target="flacuna_jax.lm_eval:FlacunaLM")


def main(argv: list[str] | None = None) -> None:
    """lm-eval's CLI with this backend registered and chosen (`run` and `--model flacuna_jax` implied)."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in LM_EVAL_COMMANDS:
        argv = ["run", *argv]
    if argv[0] == "run" and not any(a in ("--model", "-M") or a.startswith("--model=") for a in argv):
        argv[1:1] = ["--model", "flacuna_jax"]
    if argv[0] == "run" and ("-h" in argv or "--help" in argv):
        print(__doc__)
    sys.argv = ["python -m flacuna_jax.lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
