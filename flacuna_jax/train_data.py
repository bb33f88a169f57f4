"""The training loop's view of the data pipeline: global batches on the mesh, steps per epoch, eval.

An adapter over `flacuna_jax.data` (its public functions only): each host builds its share of the
per-step batch with `pipeline_from_config`, and `jax.make_array_from_process_local_data` assembles
the global [global_batch, seq_len] arrays, split over (data, fsdp). The iterator state (JSON) goes
into every checkpoint. When `train.steps` is not set, one epoch is counted exactly (small data) or
estimated from a sample with the same first-fit packing (large data).
"""

from __future__ import annotations

import itertools
import json
from typing import Any, Iterator

import jax
import numpy as np

from flacuna_jax.config import Config
from flacuna_jax.data import counts_from_state, pipeline_from_config
from flacuna_jax.sharding import batch_sharding
from flacuna_jax.step import BATCH_KEYS
from flacuna_jax.tokenizer import load_tokenizer

EXACT_COUNT_LIMIT = 30_000  # host examples up to which an epoch's steps are counted by iterating
SAMPLE = 2_000


def first_fit_rows(lengths: list[int], seq_len: int, num_bins: int = 8) -> int:
    """Rows the packer makes from examples of these lengths (same first-fit rule, lengths only)."""
    bins: list[int] = []
    rows = 0
    for n in lengths:
        for i, fill in enumerate(bins):
            if fill + n <= seq_len:
                bins[i] += n
                if bins[i] == seq_len:
                    bins.pop(i)
                    rows += 1
                break
        else:
            if len(bins) >= num_bins:
                bins.pop(max(range(len(bins)), key=lambda i: (bins[i], -i)))
                rows += 1
            bins.append(n)
    return rows + len(bins)


def _over_hosts(reduce: Any, n: int) -> int:
    from jax.experimental import multihost_utils
    return int(reduce(multihost_utils.process_allgather(np.asarray(n, np.int64))))


class DataFeed:
    def __init__(self, cfg: Config, host_rows: int, mesh: jax.sharding.Mesh):
        self.cfg, self.mesh, self.host_rows = cfg, mesh, host_rows
        self.sharding = batch_sharding(mesh)
        self.tokenizer = load_tokenizer(cfg.tokenizer_path)
        common = dict(seq_len=cfg.train.seq_len, seed=cfg.seed, process_index=jax.process_index(),
                      process_count=jax.process_count())
        epochs = None if cfg.train.steps else cfg.train.epochs
        self.train = pipeline_from_config(cfg.data, self.tokenizer, batch_size=host_rows, split="train",
                                          epochs=epochs, **common)
        self.iterator = self.train.iterator()
        self.estimated = False
        self.total_steps = cfg.train.steps or self._count_steps()
        self.eval = None
        self.eval_rows = cfg.train.per_device_batch_size * mesh.shape["data"] * mesh.shape["fsdp"] // jax.process_count()
        if cfg.data.eval_fraction > 0:
            ev = pipeline_from_config(cfg.data, self.tokenizer, batch_size=self.eval_rows, split="eval",
                                      drop_remainder=False, **common)
            self.eval = ev if ev.report["host_examples"] > 0 else None
        self.eval_limit = cfg.eval.max_batches or None
        self.eval_steps = None  # one host: until its eval split ends
        if cfg.data.eval_fraction > 0 and jax.process_count() > 1:
            # Every host runs as many eval steps as the host with the most batches (at most eval.max_batches),
            # the others feed untrained rows once their share ends: each example is scored exactly once.
            n = sum(1 for _ in self.eval.iterator()) if self.eval is not None else 0
            self.eval_steps = _over_hosts(np.max, min(n, self.eval_limit or n))

    @property
    def has_eval(self) -> bool:
        return self.eval is not None if self.eval_steps is None else self.eval_steps > 0

    def _count_steps(self) -> int:
        n = len(self.train.examples)
        if n <= EXACT_COUNT_LIMIT:
            steps = sum(1 for _ in self.train.iterator())
        else:
            self.estimated = True
            idx = np.linspace(0, n - 1, min(SAMPLE, n)).astype(np.int64)
            kept = [len(ex["ids"]) for ex in (self.train.examples[int(i)] for i in idx) if ex["drop"] is None]
            per_example = (first_fit_rows(kept, self.cfg.train.seq_len) if self.cfg.data.packing else len(kept)) / len(idx)
            steps = int(n * per_example) // self.host_rows
        if jax.process_count() > 1:  # hosts may pack their shares into different numbers of rows
            steps = _over_hosts(np.min, steps)
        if steps < 1:
            raise ValueError(f"the training split gives no full batch of {self.host_rows} rows per host")
        return steps

    def describe(self) -> str:
        how = "train.steps" if self.cfg.train.steps else (
            f"{self.cfg.train.epochs} epoch(s), " + ("estimated from a sample" if self.estimated else "counted"))
        r = self.train.report
        ev = f", eval {self.eval.report['host_examples']} examples" if self.eval is not None else ", no eval split"
        return (f"data: {r['epoch_examples']} train examples per epoch ({r['skipped_bad_records']} bad records skipped)"
                f"{ev}; {self.total_steps} steps ({how}) of {self.host_rows} rows x {self.cfg.train.seq_len} per host")

    def _global(self, host: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {k: jax.make_array_from_process_local_data(self.sharding, np.asarray(host[k])) for k in BATCH_KEYS}

    def next_batch(self) -> dict[str, jax.Array] | None:
        try:
            return self._global(next(self.iterator))
        except StopIteration:
            return None

    def get_state(self) -> Any:
        return self.iterator.get_state()

    def set_state(self, state: Any) -> None:
        self.iterator.set_state(state)

    def all_host_states(self, state: Any) -> list:
        """[state of host 0, host 1, ...] (every host calls this): a checkpoint holds every host's position."""
        if jax.process_count() == 1:
            return [state]
        from jax.experimental import multihost_utils
        blob = np.frombuffer(json.dumps(state).encode(), np.uint8)
        lengths = multihost_utils.process_allgather(np.asarray(len(blob), np.int64))
        padded = np.zeros(int(np.max(lengths)), np.uint8)
        padded[: len(blob)] = blob
        blobs = multihost_utils.process_allgather(padded)
        return [json.loads(bytes(b[: int(n)])) for b, n in zip(blobs, lengths)]

    def set_host_states(self, states: list) -> None:
        """Restores this host's position from `all_host_states`' list."""
        if not isinstance(states, list) or len(states) != jax.process_count():
            n = len(states) if isinstance(states, list) else "?"
            raise ValueError(f"the checkpoint holds data-iterator states of {n} processes, this run has "
                             f"{jax.process_count()}: resume with the same number of processes")
        self.set_state(states[jax.process_index()])

    def counters(self, state: Any = None) -> dict[str, Any]:
        """The loader's counters (data_* metrics) in `state` (default: the iterator's current state)."""
        c = counts_from_state(self.get_state() if state is None else state)
        out = {f"data_{k}": int(c[k]) for k in ("truncated", "dropped_overlong", "dropped_no_target",
                                                 "skipped_leading_turns")}
        out["data_bad_records_skipped"] = int(self.train.report["skipped_bad_records"])
        if c["row_slots"]:
            out["data_packing_efficiency"] = round(c["tokens"] / c["row_slots"], 4)
        return out

    def eval_batches(self) -> Iterator[dict[str, jax.Array]]:
        """Held-out batches (at most eval.max_batches; with several hosts, `eval_steps` on each): a short
        batch, or one past the end of this host's share, is filled with untrained rows."""
        empty = {k: np.zeros((self.eval_rows, self.cfg.train.seq_len), np.float32 if k == "loss_mask" else np.int32)
                 for k in BATCH_KEYS}
        host_batches = iter(self.eval.iterator()) if self.eval is not None else iter(())
        if self.eval_steps is not None:
            host_batches = itertools.islice(itertools.chain(host_batches, itertools.repeat(empty)), self.eval_steps)
        elif self.eval_limit is not None:
            host_batches = itertools.islice(host_batches, self.eval_limit)
        for host in host_batches:
            rows = len(host["input_ids"])
            yield self._global({k: np.concatenate([host[k], empty[k][rows:]]) for k in BATCH_KEYS})
