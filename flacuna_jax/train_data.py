"""The training loop's view of the data pipeline: global batches on the mesh, steps per epoch, eval.

An adapter over `flacuna_jax.data` (its public functions only). Every process plans the same
global batches (`data/batches.py`: one first-fit plan over the whole stream, so the batch of each
step depends on the data, the seed and `train.global_batch_size` only) and builds only the rows its
devices hold under the batch sharding; `jax.make_array_from_callback` hands each device its rows.
The iterator state (JSON) is the same on every process and goes into every checkpoint once, so a
run resumes under any number of processes and devices. When `train.steps` is not set, the steps of
`train.epochs` epochs are counted exactly from the packing plan, the same on every process: the
end of the data is the same step everywhere and the cosine schedule has its real length.
"""

from __future__ import annotations

from typing import Any, Iterator

import jax
import numpy as np

from flacuna_jax.config import Config
from flacuna_jax.data import DataError, EmptySplit, counts_from_state, pipeline_from_config
from flacuna_jax.data.packing import empty_row
from flacuna_jax.sharding import batch_sharding
from flacuna_jax.step import BATCH_KEYS
from flacuna_jax.tokenizer import load_tokenizer


def gather_from_processes(part: np.ndarray) -> list[np.ndarray]:
    """[part of process 0, process 1, ...] on every process (parts may differ in length)."""
    if jax.process_count() == 1:
        return [part]
    from jax.experimental import multihost_utils
    sizes = multihost_utils.process_allgather(np.asarray(len(part), np.int64))
    padded = np.zeros((int(np.max(sizes)),) + part.shape[1:], part.dtype)
    padded[: len(part)] = part
    parts = multihost_utils.process_allgather(padded)
    return [np.asarray(p[: int(n)]) for p, n in zip(parts, sizes)]


def host_rows(sharding: jax.sharding.Sharding, rows: int, seq_len: int) -> list[int]:
    """The batch rows (of `rows`) that this process' devices hold under `sharding`."""
    mine: set[int] = set()
    for index in sharding.addressable_devices_indices_map((rows, seq_len)).values():
        mine.update(range(*index[0].indices(rows)))
    return sorted(mine)


class DataFeed:
    def __init__(self, cfg: Config, mesh: jax.sharding.Mesh):
        self.cfg, self.mesh = cfg, mesh
        self.sharding = batch_sharding(mesh)
        self.tokenizer = load_tokenizer(cfg.tokenizer_path)
        rows, seq_len = cfg.train.global_batch_size, cfg.train.seq_len
        share = dict(seq_len=seq_len, seed=cfg.seed, process_index=jax.process_index(),
                     process_count=jax.process_count(), gather=gather_from_processes)
        epochs = None if cfg.train.steps else cfg.train.epochs
        self.train = pipeline_from_config(cfg.data, self.tokenizer, batch_size=rows, split="train", epochs=epochs,
                                          **share)
        self.rows = host_rows(self.sharding, rows, seq_len)
        self.iterator = self.train.iterator(self.rows)  # the example table pass happens here
        self.total_steps = cfg.train.steps or self.train.count_batches()
        if self.total_steps < 1:
            r = self.train.report
            raise DataError(f"data.sources: {cfg.train.epochs} epoch(s) of the training split ({r['split_kept']} "
                            f"trainable examples) do not fill one global batch of {rows} rows x {seq_len}")
        # Held-out batches: one row per device slot; the short last batch is padded with untrained rows.
        self.eval_rows = cfg.train.per_device_batch_size * mesh.shape["data"] * mesh.shape["fsdp"]
        try:
            self.eval = pipeline_from_config(cfg.data, self.tokenizer, batch_size=self.eval_rows, split="eval",
                                             drop_remainder=False, **share)
            self.eval.table  # raises when the held-out split yields nothing trainable
        except EmptySplit:
            self.eval = None
        self.eval_host_rows = host_rows(self.sharding, self.eval_rows, seq_len)
        # eval.max_batches counts global batches of train.global_batch_size rows, evaluated eval_rows at a
        # time: the same held-out rows under every topology.
        self.eval_limit = cfg.eval.max_batches * (rows // self.eval_rows) or None

    @property
    def has_eval(self) -> bool:
        return self.eval is not None

    def describe(self) -> str:
        how = "train.steps" if self.cfg.train.steps else f"{self.cfg.train.epochs} epoch(s), counted"
        r = self.train.report
        ev = (f", eval {self.eval.report['split_kept']} examples" if self.eval is not None
              else ", no eval split (data.eval_fraction gives no held-out record)")
        return (f"data: {r['epoch_examples']} train examples per epoch ({r['split_kept']} of {r['split_records']} "
                f"records trainable, {r['skipped_bad_records']} bad records skipped){ev}; {self.total_steps} steps "
                f"({how}) of {self.cfg.train.global_batch_size} rows x {self.cfg.train.seq_len}, "
                f"{len(self.rows)} rows built on this process")

    def _global(self, host: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {k: jax.make_array_from_callback(host[k].shape, self.sharding, lambda i, a=host[k]: a[i])
                for k in BATCH_KEYS}

    def next_batch(self) -> dict[str, jax.Array] | None:
        try:
            return self._global(next(self.iterator))
        except StopIteration:
            return None

    def get_state(self) -> Any:
        return self.iterator.get_state()

    def set_state(self, state: Any) -> None:
        if isinstance(state, list):
            raise DataError("the checkpoint holds per-process data-iterator states (an earlier loader): resume it "
                            "with the version that wrote it, or start a new output_dir")
        self.iterator.set_state(state)

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
        """Every held-out example once (at most eval.max_batches global batches' worth of rows), the same
        batches on every process and the same rows under every topology."""
        for i, host in enumerate(self.eval.iterator(self.eval_host_rows)):
            if self.eval_limit is not None and i >= self.eval_limit:
                return
            short = self.eval_rows - len(host["input_ids"])
            if short:
                pad = empty_row(self.cfg.train.seq_len)
                host = {k: np.concatenate([v, np.stack([pad[k]] * short)]) for k, v in host.items()}
            yield self._global(host)
