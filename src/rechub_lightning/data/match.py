"""MatchDataModule: interactions -> retrieval training samples, leave-last-out evaluation,
the item corpus and item frequencies.

Pipeline (everything fitted on training interactions only):

1. interactions sorted by user, then time (stable); per user the **last** interaction is
   the test target, the one before the validation target, the rest is training data;
2. category encoders (id 0 = padding/unknown) fitted on the training interactions for
   the user id, the item id and the user/item attribute columns;
3. training samples from :func:`~rechub_lightning.data.sequence.generate_seq_feature_match`
   (``mode`` 0 point-wise with labels, 1 pair-wise, 2 list-wise, offline negatives by
   ``sample_method``) joined with the profiles by
   :func:`~rechub_lightning.data.sequence.gen_model_input`; every training interaction at
   position >= 1 is a target (the one the sample generator keeps for its own test split
   is put back, with negatives from the same distribution);
4. validation/test rows: one per user, the history before the held-out interaction, the
   held-out item id as label (``-1`` when the item never occurs in training: it cannot be
   retrieved) and the user's earlier items (excluded from retrieval by
   :class:`~rechub_lightning.modules.match.MatchModule`);
5. the item corpus (every training item with its attributes) and ``log q`` of each item's
   training frequency (logQ correction, ``sample_weight``).

The :class:`~rechub_lightning.features.FeatureSchema` (groups ``user``, ``item``,
``neg_items``, ``sample_weight``) exists right after ``__init__`` for LightningCLI's link.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from ..features import DenseFeature, Feature, FeatureSchema, SequenceFeature, SparseFeature
from .base import as_frame, load_preprocessing_state, read_table, validate_batch_tensors
from .datasets import TensorDictDataset, check_int, make_dataloader
from .preprocessing import CategoryEncoder
from .sequence import _redraw_collisions, gen_model_input, generate_seq_feature_match, time_order_key
from .synthetic_seq import make_movielens_like

__all__ = ["MatchDataModule", "SeenItemsDataset", "SEEN_ITEMS_KEY"]

#: Key of the eval-batch tensor ``(B, S)`` holding each user's already-seen item ids
#: (0 = padding); :class:`~rechub_lightning.modules.match.MatchModule` excludes them from
#: retrieval and never passes the key to the model.
SEEN_ITEMS_KEY = "__seen_items__"

_ML_USER_COLS = ("gender", "age", "occupation", "zip")
_MODES = (0, 1, 2)
_POOLINGS = ("mean", "sum")


class SeenItemsDataset(TensorDictDataset):
    """Evaluation users whose batches also carry their seen items under :data:`SEEN_ITEMS_KEY`.

    Seen items are stored once as CSR (``indptr``, ``items``) and padded per batch to the
    batch's longest list, so memory does not grow with the heaviest user.

    Args:
        x: user feature columns.
        y: held-out item id per user (``-1``: none), kept as int64: float32 labels would round
            ids above ``2**24`` to a neighbouring item.
        seen_indptr: ``(N + 1,)`` offsets into ``seen_items``.
        seen_items: item ids, user after user.

    Raises:
        ValueError: ``y`` holds values that are not whole numbers, or its length or
            ``seen_indptr``'s does not match the rows of ``x``.
    """

    def __init__(self, x: Mapping[str, Any], y: Any, seen_indptr: np.ndarray, seen_items: np.ndarray) -> None:
        super().__init__(x)
        y = torch.as_tensor(np.asarray(y))
        if y.is_floating_point() and not bool((y == y.round()).all()):
            raise ValueError(f"held-out item ids y must be whole numbers, found {float(y[y != y.round()][0])}")
        self.y = y.long()
        if len(self.y) != len(self):
            raise ValueError(f"y must have one held-out item id per row ({len(self)}), got {len(self.y)}")
        self.seen_indptr = torch.as_tensor(seen_indptr, dtype=torch.long)
        self.seen_items = torch.as_tensor(seen_items, dtype=torch.long)
        if self.seen_indptr.numel() != len(self) + 1:
            raise ValueError(f"seen_indptr must have {len(self) + 1} entries, got {self.seen_indptr.numel()}")

    def seen(self, idx: torch.Tensor) -> torch.Tensor:
        """Seen item ids of rows ``idx``, ``(len(idx), S)`` padded with 0."""
        start, stop = self.seen_indptr[idx], self.seen_indptr[idx + 1]
        counts = stop - start
        width = int(counts.max()) if counts.numel() else 0
        out = torch.zeros(len(idx), width, dtype=torch.long)
        if width:
            row = torch.repeat_interleave(torch.arange(len(idx)), counts)
            col = torch.arange(int(counts.sum())) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
            src = torch.repeat_interleave(start, counts) + col
            out[row, col] = self.seen_items.index_select(0, src)
        return out

    def __getitem__(self, index: Any) -> Any:
        single = isinstance(index, (int, np.integer))
        idx = torch.as_tensor([index] if single else index, dtype=torch.long)
        x, y = super().__getitem__(idx)
        x[SEEN_ITEMS_KEY] = self.seen(idx)
        if single:
            return {k: v[0] for k, v in x.items()}, y[0]
        return x, y


class MatchDataModule(L.LightningDataModule):
    """Retrieval data: training samples for ``mode`` 0/1/2, leave-last-out validation and test users.

    With no ``path`` and no ``data`` it uses the embedded MovieLens-shaped synthetic data
    (:func:`~rechub_lightning.data.synthetic_seq.make_movielens_like`: users with latent
    tastes, movies with latent topics, time-ordered interactions), so it works offline.
    Random ranking reaches ``Recall@10 = 10 / n_items`` on it.

    Args:
        path: CSV/TSV/Parquet interactions, e.g. ml-1m's ``ratings`` joined with users and
            movies (``user_id, movie_id, rating, timestamp, title, genres, gender, age,
            occupation, zip``).
        data: a pandas DataFrame or dict of arrays instead of ``path``.
        user_col: user id column.
        item_col: item id column.
        time_col: timestamp column: numbers, datetimes, or text holding either (parsed, so
            that ``"998"`` sorts before ``"1000"`` and ``"12/30/2021"`` before ``"01/02/2022"``).
        user_feature_cols: user attribute columns (default: those of ml-1m's ``gender, age,
            occupation, zip`` that exist). A user's attributes are those of his most recent
            training interaction, in training and evaluation alike; predicting for other
            interactions than the training ones (a checkpoint's corpus restored), those of his
            most recent interaction.
        item_feature_cols: item attribute columns (default: ``["cate_id"]`` when derived
            from ``genres_col``, else none). An item's attributes are those of its most recent
            training interaction.
        genres_col: a ``"A|B|C"`` column whose first value becomes the item attribute
            ``cate_id`` (what Torch-RecHub's ml-1m examples do); ignored when absent.
        mode: ``0`` point-wise (labels, ``neg_ratio`` negative rows per positive), ``1``
            pair-wise (one negative per row), ``2`` list-wise (``neg_ratio`` negatives per
            row; ``neg_ratio=0`` gives positives only, for in-model negatives such as YoutubeSBC).
        neg_ratio: offline negatives per positive.
        sample_method: negative distribution: ``0`` uniform, ``1`` ``count**0.75``, ``2``
            ``log(count + 1)``, ``3`` log-uniform over popularity rank (RALM).
        seq_max_len: history length (the most recent items, zero-padded on the left).
        history_pooling: pooling of the history feature in the schema (``mean``/``sum``);
            sequence models read the unpooled history anyway.
        embed_dim: embedding width of every categorical feature.
        min_freq: values seen fewer times in training map to the unknown id 0.
        batch_size: training batch size.
        eval_batch_size: validation/test/predict batch size (default: ``batch_size``).
        num_workers: DataLoader workers (0 is fastest for in-memory tensors).
        seed: negative sampling and shuffling seed (and the synthetic data's).
        synthetic_users: users of the default synthetic data.
        synthetic_items: movies of the default synthetic data.
        synthetic_interactions: inclusive range of interactions per synthetic user.
        preprocessing_from: a checkpoint whose fitted encoders to reuse instead of fitting, and
            whose training item corpus (items and attributes) to retrieve from instead of the
            items of these interactions (checkpoints that hold no corpus: these items, said in
            the log).
        streaming: not supported (``True`` raises ``ValueError``): histories, leave-last-out
            targets, negative sampling frequencies and the item corpus are built from the whole
            interaction log in memory. Out-of-core Parquet streaming exists for
            :class:`CTRDataModule` and :class:`MTLDataModule`.

    Attributes:
        schema: the :class:`FeatureSchema` (groups ``user``, ``item``, ``neg_items`` when
            there are offline negatives, ``sample_weight``).
        item_id_feature: the item id feature's name (``item_col``).

    Example:
        >>> dm = MatchDataModule(mode=2, neg_ratio=3, synthetic_users=100, synthetic_items=300,
        ...                      synthetic_interactions=(10, 20))
        >>> dm.schema.groups["item"], dm.schema.groups["neg_items"]
        (['movie_id', 'cate_id'], ['neg_items', 'neg_cate_id'])
    """

    def __init__(
        self,
        path: str | None = None,
        data: Any = None,
        user_col: str = "user_id",
        item_col: str = "movie_id",
        time_col: str = "timestamp",
        user_feature_cols: Sequence[str] | None = None,
        item_feature_cols: Sequence[str] | None = None,
        genres_col: str | None = "genres",
        mode: int = 0,
        neg_ratio: int = 3,
        sample_method: int = 1,
        seq_max_len: int = 50,
        history_pooling: str = "mean",
        embed_dim: int = 16,
        min_freq: int = 1,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 2022,
        synthetic_users: int = 1000,
        synthetic_items: int = 2000,
        synthetic_interactions: tuple[int, int] = (20, 100),
        preprocessing_from: str | None = None,
        streaming: bool = False,
    ) -> None:
        super().__init__()
        if streaming:
            raise ValueError(
                "MatchDataModule does not support streaming=True: it builds each user's time-ordered history, "
                "leave-last-out targets, negative sampling distribution and item corpus from the whole interaction "
                "log, which needs the log in memory. Stream ranking/multi-task data with CTRDataModule/MTLDataModule "
                "(streaming=True), or pre-build retrieval samples and train them with CTRDataModule."
            )
        if isinstance(mode, bool) or mode not in _MODES:
            raise ValueError(f"mode must be 0 (point-wise), 1 (pair-wise) or 2 (list-wise), got mode={mode!r}")
        if int(neg_ratio) < 0:
            raise ValueError(f"neg_ratio must be >= 0, got neg_ratio={neg_ratio}")
        if sample_method not in (0, 1, 2, 3):
            raise ValueError(f"sample_method must be 0, 1, 2 or 3, got sample_method={sample_method!r}")
        if int(seq_max_len) < 1:
            raise ValueError(f"seq_max_len must be >= 1, got seq_max_len={seq_max_len}")
        if history_pooling not in _POOLINGS:
            raise ValueError(f"history_pooling must be one of {_POOLINGS}, got {history_pooling!r}")
        check_int(batch_size, "batch_size")
        if eval_batch_size is not None:
            check_int(eval_batch_size, "eval_batch_size")
        self.save_hyperparameters(ignore=["data"])
        self.user_col, self.item_col, self.time_col = user_col, item_col, time_col
        self.mode = int(mode)
        self.neg_ratio = 1 if self.mode == 1 else check_int(neg_ratio, "neg_ratio", minimum=0)  # 2.9 is an error, not 2
        self.sample_method = int(sample_method)
        self.seq_max_len = check_int(seq_max_len, "seq_max_len")
        self.history_pooling = history_pooling
        self.embed_dim = int(embed_dim)
        self.min_freq = int(min_freq)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(batch_size if eval_batch_size is None else eval_batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.item_id_feature = item_col
        self.history_feature = "hist_" + item_col
        self._synthetic = (int(synthetic_users), int(synthetic_items), tuple(int(v) for v in synthetic_interactions))

        # ids (and named attributes) of a CSV are read as text: "007" stays "007", not the number 7
        text = [user_col, item_col, *(user_feature_cols or []), *(item_feature_cols or [])]
        frame = self._load(path, data, text)
        if genres_col and genres_col in frame.columns and "cate_id" not in frame.columns:
            frame = frame.assign(cate_id=frame[genres_col].astype("string").str.split("|").str[0])
        if user_feature_cols is None:
            user_feature_cols = [c for c in _ML_USER_COLS if c in frame.columns]
        if item_feature_cols is None:
            item_feature_cols = ["cate_id"] if "cate_id" in frame.columns else []
        self.user_feature_cols = list(user_feature_cols)
        self.item_feature_cols = list(item_feature_cols)
        needed = [user_col, item_col, time_col, *self.user_feature_cols, *self.item_feature_cols]
        missing = [c for c in dict.fromkeys(needed) if c not in frame.columns]
        if missing:
            raise KeyError(f"column(s) {missing} not found in the interactions; columns are {list(frame.columns)}")
        if frame[item_col].isna().any():
            # A missing item would become a pseudo-item of the corpus, trained on and recommended.
            raise ValueError(f"item column {item_col!r} has {int(frame[item_col].isna().sum())} missing value(s)")
        self._frame = self._split(frame[list(dict.fromkeys(needed))])

        # the training item profile (item id -> attribute ids) when the preprocessing comes from a
        # checkpoint: the corpus is every training item, whatever the given interactions hold
        self._trained_items: pd.DataFrame | None = None
        restored = load_preprocessing_state(preprocessing_from) if preprocessing_from else None
        if restored is not None:
            self.encoders = self._encoders_from_state(restored["preprocessor"])
            self._trained_items = self._item_profile_from_state(restored, preprocessing_from)
            rank_zero_info(f"Preprocessing restored from {preprocessing_from}")
        else:
            train = self._frame[self._frame["_rank"] >= 2]
            if len(train) == 0:
                raise ValueError("no training interactions: every user has at most 2 (the validation and test targets)")
            self.encoders = {c: CategoryEncoder(self.min_freq).fit(train[c]) for c in self._encoded_cols}
        self.schema: FeatureSchema = self._make_schema()
        self._built: dict[str, Any] = {}

    # ------------------------------------------------------------------ sources
    @property
    def _encoded_cols(self) -> list[str]:
        return list(dict.fromkeys([self.user_col, self.item_col, *self.user_feature_cols, *self.item_feature_cols]))

    def default_frame(self) -> pd.DataFrame:
        """The embedded synthetic MovieLens-shaped interactions."""
        users, items, per_user = self._synthetic
        return make_movielens_like(n_users=users, n_items=items, interactions_per_user=per_user, seed=self.seed).ratings

    def _load(self, path: str | None, data: Any, text_columns: Sequence[str] = ()) -> pd.DataFrame:
        if path is not None and data is not None:
            raise ValueError("give either path or data, not both")
        if data is not None:
            return as_frame(data)
        return read_table(path, text_columns) if path is not None else self.default_frame()

    def _split(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Sorted by user then time (stable) with ``_rank`` (0 = last interaction (test), 1 =
        validation) and ``_time``, the times as codes in time order (text times parsed once)."""
        frame = frame.reset_index(drop=True)
        users = pd.factorize(frame[self.user_col], sort=True)[0]
        if (users < 0).any():
            raise ValueError(f"user column {self.user_col!r} has missing values")
        times = pd.factorize(time_order_key(frame[self.time_col], self.time_col), sort=True)[0]
        order = np.lexsort((np.arange(len(frame)), times, users))
        frame = frame.iloc[order].reset_index(drop=True)
        u = users[order]
        counts = np.bincount(u)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        pos = np.arange(len(frame)) - starts[u]
        return frame.assign(_user=u, _pos=pos, _rank=counts[u] - 1 - pos, _time=times[order])

    # ------------------------------------------------------------------ schema
    def _vocab(self, col: str) -> int:
        return self.encoders[col].vocab_size

    def _make_schema(self) -> FeatureSchema:
        d, item = self.embed_dim, self.item_col
        user = [SparseFeature(self.user_col, self._vocab(self.user_col), d, padding_idx=0)]
        user += [SparseFeature(c, self._vocab(c), d, padding_idx=0) for c in self.user_feature_cols]
        user.append(
            SequenceFeature(self.history_feature, self._vocab(item), d, pooling=self.history_pooling, shared_with=item, padding_idx=0)
        )
        items: list[Feature] = [SparseFeature(item, self._vocab(item), d, padding_idx=0)]
        items += [SparseFeature(c, self._vocab(c), d, padding_idx=0) for c in self.item_feature_cols]
        negs: list[Feature] = []
        if self.mode in (1, 2) and self.neg_ratio > 0:
            negs = [SequenceFeature("neg_items", self._vocab(item), d, pooling="concat", shared_with=item, padding_idx=0)]
            negs += [
                SequenceFeature(f"neg_{c}", self._vocab(c), d, pooling="concat", shared_with=c, padding_idx=0)
                for c in self.item_feature_cols
            ]
        weight = [DenseFeature("sample_weight")]
        groups = {
            "user": [f.name for f in user],
            "item": [f.name for f in items],
            "sample_weight": ["sample_weight"],
        }
        if negs:
            groups["neg_items"] = [f.name for f in negs]
        labels = ["label"] if self.mode == 0 else []
        return FeatureSchema(user + items + negs + weight, labels, groups)

    # ------------------------------------------------------------------ encoding
    def _encoded(self) -> pd.DataFrame:
        if "encoded" not in self._built:
            enc = self._frame.copy()
            for c in self._encoded_cols:
                enc[c] = self.encoders[c].transform(self._frame[c])
            self._built["encoded"] = enc
        return self._built["encoded"]

    def _profiles(self) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, np.ndarray]]:
        """User profile, item profile (training items) and item id -> attribute id arrays."""
        # a user's / an item's attributes: those of the most recent training interaction; joined on
        # the encoded user id (users sharing the unknown id 0 under min_freq join once)
        user_profile = self._user_attributes()[[self.user_col, *self.user_feature_cols]].drop_duplicates(self.user_col, keep="last")
        item_profile = self._trained_items if self._trained_items is not None else self._item_profile()
        vocab = self._vocab(self.item_col)
        attr = {}
        for c in self.item_feature_cols:
            arr = np.zeros(vocab, dtype=np.int64)
            arr[item_profile[self.item_col].to_numpy()] = item_profile[c].to_numpy()
            attr[c] = arr
        return user_profile, item_profile, attr

    def _item_profile(self) -> pd.DataFrame:
        """Every item of this datamodule's training interactions (encoded ids ascending) with the
        encoded attributes of its most recent training interaction."""
        if "item_profile" not in self._built:
            enc = self._encoded()
            train = enc[(enc["_rank"] >= 2) & (enc[self.item_col] > 0)]
            by_time = np.argsort(train["_time"].to_numpy(), kind="stable")
            profile = train.iloc[by_time][[self.item_col, *self.item_feature_cols]].drop_duplicates(self.item_col, keep="last")
            self._built["item_profile"] = profile.sort_values(self.item_col).reset_index(drop=True)
        return self._built["item_profile"]

    def _item_profile_from_state(self, state: Mapping[str, Any], source: str) -> pd.DataFrame | None:
        """The training item profile saved in a checkpoint's datamodule state (``None``, with a
        message, for checkpoints written before it was saved: the corpus then comes from the
        given interactions).

        Raises:
            KeyError: the saved profile lacks the item id or an item attribute column.
            ValueError: a saved id lies outside its column's fitted vocabulary.
        """
        saved = state.get("item_profile")
        if saved is None:
            rank_zero_info(
                f"{source} holds no training item corpus (written by an older version): the item corpus "
                f"and the item attributes come from the given interactions, not from training"
            )
            return None
        cols = [self.item_col, *self.item_feature_cols]
        missing = [c for c in cols if c not in saved]
        if missing:
            raise KeyError(f"the item corpus saved in {source} has no column(s) {missing}; it holds {sorted(saved)}")
        profile = pd.DataFrame({c: torch.as_tensor(saved[c]).reshape(-1).long().numpy() for c in cols})
        for c in cols:
            vocab = self._vocab(c)
            bad = profile[c][(profile[c] < 0) | (profile[c] >= vocab)]
            if len(bad):
                raise ValueError(f"the item corpus saved in {source} has {c} id {int(bad.iloc[0])} outside [0, {vocab})")
        return profile.sort_values(self.item_col).reset_index(drop=True)

    def _user_attributes(self) -> pd.DataFrame:
        """One row per user (``_user``) with his most recent training interaction's encoded
        attributes (users without training interactions: their first interaction's)."""
        if "user_attributes" not in self._built:
            enc = self._encoded()
            cols = ["_user", self.user_col, *self.user_feature_cols]
            train = enc.loc[enc["_rank"] >= 2, cols].drop_duplicates("_user", keep="last")
            rest = enc.loc[~enc["_user"].isin(train["_user"]), cols].drop_duplicates("_user")
            self._built["user_attributes"] = pd.concat([train, rest]).set_index("_user", drop=False).sort_index()
        return self._built["user_attributes"]

    def item_counts(self) -> np.ndarray:
        """Training interactions per item id, ``(vocab_size,)`` (id 0 counts the unknown items)."""
        if "counts" not in self._built:
            enc = self._encoded()
            ids = enc.loc[enc["_rank"] >= 2, self.item_col].to_numpy()
            self._built["counts"] = np.bincount(ids, minlength=self._vocab(self.item_col)).astype(np.int64)
        return self._built["counts"]

    def item_log_q(self) -> torch.Tensor:
        """``log q`` of each item id, ``q`` = its share of the training interactions (unseen ids: half a count)."""
        counts = self.item_counts().astype(np.float64)
        q = np.where(counts > 0, counts, 0.5) / max(counts.sum(), 1.0)
        return torch.as_tensor(np.log(q), dtype=torch.float32)

    def item_corpus(self) -> dict[str, torch.Tensor]:
        """Every training item (ids ascending) with its attributes: the retrieval corpus.

        With the preprocessing restored from a checkpoint (``preprocessing_from``, or
        :meth:`load_state_dict` with other interactions) these are the training items and
        attributes saved in it, not the items of the given interactions."""
        _, item_profile, _ = self._profiles()
        return {c: torch.tensor(item_profile[c].to_numpy(), dtype=torch.long) for c in item_profile.columns}

    # ------------------------------------------------------------------ training samples
    def _train_samples(self) -> pd.DataFrame:
        """Training rows of ``generate_seq_feature_match`` plus each user's last training target."""
        enc = self._encoded()
        train = enc.loc[(enc["_rank"] >= 2) & (enc[self.item_col] > 0), [self.user_col, self.item_col, "_time"]]
        mode, ratio = self.mode, self.neg_ratio
        gen_mode = 0 if (mode == 2 and ratio == 0) else mode
        rows, last = generate_seq_feature_match(
            train, self.user_col, self.item_col, "_time",  # time codes: the same order, parsed once
            sample_method=self.sample_method, mode=gen_mode, neg_ratio=ratio, seed=self.seed,
        )
        last = last[last["histlen_" + self.item_col] > 0].reset_index(drop=True)
        if len(last):
            last = self._with_negatives(last, train[self.item_col].to_numpy(), gen_mode, ratio)
        return pd.concat([rows, last], ignore_index=True)

    def _with_negatives(self, last: pd.DataFrame, items: np.ndarray, mode: int, ratio: int) -> pd.DataFrame:
        """Negatives for the rows generate_seq_feature_match kept for its test split (same distribution)."""
        if ratio == 0:
            return last
        uniq, counts = np.unique(items, return_counts=True)
        order = np.argsort(-counts, kind="stable")
        cand, cnt = uniq[order], counts[order].astype(np.float64)
        if self.sample_method == 0:
            p = None
        elif self.sample_method == 1:
            p = cnt**0.75 / (cnt**0.75).sum()
        elif self.sample_method == 2:
            w = np.log(cnt + 1) + 1e-6
            p = w / w.sum()
        else:
            rank = np.arange(len(cand), dtype=np.float64)
            w = np.log(rank + 2) - np.log(rank + 1)
            p = w / w.sum()
        rs = np.random.RandomState(self.seed + 1)
        pos = last[self.item_col].to_numpy()
        neg = rs.choice(cand, size=len(last) * ratio, replace=True, p=p)
        neg = _redraw_collisions(neg, np.repeat(pos, ratio), cand, p, rs).reshape(len(last), ratio)
        if mode == 0:
            per = 1 + ratio
            out = last.loc[last.index.repeat(per)].reset_index(drop=True)
            is_pos = np.tile(np.arange(per) == 0, len(last))
            item = np.repeat(pos, per)
            item[~is_pos] = neg.reshape(-1)
            out[self.item_col] = item
            out["label"] = is_pos.astype(np.int64)
            return out
        out = last.copy()
        out["neg_items"] = neg[:, 0] if mode == 1 else list(neg)
        return out

    def _train_dataset(self) -> TensorDictDataset:
        if "train" in self._built:
            return self._built["train"]
        df = self._train_samples()
        user_profile, item_profile, attr = self._profiles()
        x = gen_model_input(df, user_profile, self.user_col, item_profile, self.item_col, self.seq_max_len)
        n = len(df)
        cols = {f.name: x[f.name] for f in self.schema.group("user") + self.schema.group("item")}
        if "neg_items" in self.schema.groups:
            neg = np.asarray(x["neg_items"], dtype=np.int64).reshape(n, -1)
            cols["neg_items"] = neg
            for c in self.item_feature_cols:
                cols[f"neg_{c}"] = attr[c][neg]
        log_q = self.item_log_q().numpy()
        cols["sample_weight"] = np.exp(log_q[np.asarray(x[self.item_col], dtype=np.int64)]).astype(np.float32)
        y = np.asarray(x["label"], dtype=np.float32) if self.mode == 0 else np.zeros(n, dtype=np.float32)
        if self.mode == 2 and self.neg_ratio == 0:
            cols.pop("label", None)
        ds = TensorDictDataset(cols, y)
        self._validate(ds, "train")
        self._built["train"] = ds
        return ds

    # ------------------------------------------------------------------ evaluation users
    def _eval_dataset(self, split: str) -> SeenItemsDataset | None:
        """One row per user: the history before the held-out interaction (``predict``: all of it)."""
        if split in self._built:
            return self._built[split]
        enc = self._encoded()
        items = enc[self.item_col].to_numpy()
        rank = enc["_rank"].to_numpy()
        pos = enc["_pos"].to_numpy()
        if split == "predict":
            at = np.flatnonzero(rank == 0)
            target = None
            end = at + 1  # the whole history
        else:
            at = np.flatnonzero(rank == (1 if split == "val" else 0))
            target = np.where(items[at] > 0, items[at], -1)
            end = at
        if len(at) == 0:
            self._built[split] = None
            return None
        start = at - pos[at]
        L = self.seq_max_len
        idx = end[:, None] - L + np.arange(L)[None, :]
        valid = idx >= start[:, None]
        hist = np.where(valid, items[np.clip(idx, 0, None)], 0)
        cols = {self.user_col: enc[self.user_col].to_numpy()[at]}
        if split == "predict" and self._trained_items is not None:
            # interactions that are not the training data: serve each user as he is now
            attrs = enc.iloc[at]
        else:
            attrs = self._user_attributes().loc[enc["_user"].to_numpy()[at]]  # the profile training used
        for c in self.user_feature_cols:
            cols[c] = attrs[c].to_numpy()
        cols[self.history_feature] = hist
        # seen = the user's items before the held-out one (all of them for predict), minus that item
        lengths = end - start
        flat_idx = np.repeat(start, lengths) + (np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths))
        seen = items[flat_idx]
        owner = np.repeat(np.arange(len(at)), lengths)
        keep = seen > 0
        if target is not None:
            keep &= seen != target[owner]
        seen, owner = seen[keep], owner[keep]
        indptr = np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=len(at)))])
        y = target if target is not None else np.full(len(at), -1)
        ds = SeenItemsDataset(cols, y.astype(np.int64), indptr, seen)
        self._validate(ds, split)
        self._built[split] = ds
        return ds

    def dataset(self, split: str) -> TensorDictDataset | None:
        """The encoded dataset of ``train``, ``val``, ``test`` or ``predict`` (users)."""
        if split == "train":
            return self._train_dataset()
        if split in ("val", "test", "predict"):
            return self._eval_dataset(split)
        raise ValueError(f"split must be 'train', 'val', 'test' or 'predict', got {split!r}")

    def raw_frame(self, split: str) -> pd.DataFrame | None:
        """Raw (unencoded) user columns of the ``val``, ``test`` or ``predict`` users, one row per
        user in the order their loader reads them (the user id and attribute columns)."""
        if split not in ("val", "test", "predict"):
            raise ValueError(f"raw_frame: split must be 'val', 'test' or 'predict' (one row per user), got {split!r}")
        rank = self._frame["_rank"].to_numpy()
        at = np.flatnonzero(rank == (1 if split == "val" else 0))
        cols = list(dict.fromkeys([self.user_col, *self.user_feature_cols]))
        return self._frame.iloc[at][cols].reset_index(drop=True)

    def decode(self, column: str, ids: Any) -> np.ndarray:
        """Raw values of encoded ids of ``column`` (the user id, the item id or an attribute).

        Ids map back to the value they were encoded from in this datamodule's interactions
        (original dtype kept), else to the fitted encoder's category; the unknown id 0,
        ``-1`` and ids outside the vocabulary give ``None``.

        Raises:
            KeyError: ``column`` is not an encoded column.
        """
        if column not in self.encoders:
            raise KeyError(f"decode: column {column!r} is not encoded; encoded columns are {self._encoded_cols}")
        key = f"decode:{column}"
        if key not in self._built:
            enc = self._encoded()[column].to_numpy()
            raw = self._frame[column].to_numpy()
            uniq, first = np.unique(enc, return_index=True)
            table = np.empty(self._vocab(column), dtype=object)
            table[:] = None
            cats = self.encoders[column].categories
            table[1 : len(cats) + 1] = [int(c) if isinstance(c, float) and c.is_integer() else c for c in cats]
            keep = uniq > 0
            table[uniq[keep]] = raw[first[keep]]
            table[0] = None
            self._built[key] = table
        table = self._built[key]
        ids = np.asarray(ids, dtype=np.int64)
        ok = (ids >= 0) & (ids < len(table))
        out = np.empty(ids.shape, dtype=object)
        out[:] = None
        out[ok] = table[ids[ok]]
        dtype = self._frame[column].dtype
        if out.size and (ids > 0).all() and ok.all() and pd.api.types.is_numeric_dtype(dtype):
            try:  # every id decoded: keep the column's numeric dtype (e.g. int64 movie ids)
                return np.asarray(pd.Series(out).astype(dtype))
            except (TypeError, ValueError):
                pass
        return out

    # ------------------------------------------------------------------ validation
    def _validate(self, ds: TensorDictDataset, split: str) -> None:
        present = [f for f in self.schema.features if f.name in ds.x]
        validate_batch_tensors(ds.x, FeatureSchema(present), split)
        if ds.y is None:
            return
        y = ds.y
        if not torch.isfinite(y).all():
            raise ValueError(f"labels of the {split} data have {int((~torch.isfinite(y)).sum())} NaN/inf value(s)")
        if split == "train" and self.mode == 0:
            bad = y[(y != 0) & (y != 1)]
            if bad.numel():
                raise ValueError(f"point-wise label 'label' in the train data must be 0 or 1, found {float(bad[0])}")
        if split in ("val", "test"):
            vocab = self._vocab(self.item_col)
            bad = y[(y < -1) | (y >= vocab)]
            if bad.numel():
                raise ValueError(f"held-out item id {int(bad[0])} in the {split} data is outside [-1, {vocab})")

    # ------------------------------------------------------------------ lightning hooks
    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self._train_dataset()
            if self._eval_dataset("val") is None:
                raise ValueError("no validation users: every user needs at least 2 interactions")
        if stage == "validate" and self._eval_dataset("val") is None:
            raise ValueError("no validation users: every user needs at least 2 interactions")
        if stage == "test" and self._eval_dataset("test") is None:
            raise ValueError("no test users")

    def train_dataloader(self) -> DataLoader:
        return make_dataloader(
            self._train_dataset(), self.batch_size, shuffle=True, seed=self.seed, num_workers=self.num_workers, train=True
        )

    def _eval_loader(self, split: str) -> DataLoader | list:
        ds = self._eval_dataset(split)
        if ds is None:
            return []
        return make_dataloader(ds, self.eval_batch_size, train=False, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader | list:
        return self._eval_loader("test")

    def item_dataloader(self) -> DataLoader:
        """The item corpus in batches (no labels)."""
        return make_dataloader(TensorDictDataset(self.item_corpus()), self.eval_batch_size, train=False, num_workers=self.num_workers)

    def predict_dataloader(self) -> list[DataLoader]:
        """``[users, items]``: every user with his whole history, then the item corpus;
        :class:`~rechub_lightning.modules.match.MatchModule` returns user embeddings for the
        first and item embeddings for the second."""
        return [self._eval_loader("predict"), self.item_dataloader()]  # type: ignore[list-item]

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        item_profile = self._trained_items if self._trained_items is not None else self._item_profile()
        return {
            "preprocessor": {"encoders": {c: e.state_dict() for c, e in self.encoders.items()}},
            "schema": self.schema.to_dict(),
            # the retrieval corpus: a checkpoint's predictions cover every training item, with the
            # attributes it was trained with, whatever interactions they are made for
            "item_profile": {c: torch.tensor(item_profile[c].to_numpy(), dtype=torch.long) for c in item_profile.columns},
        }

    @staticmethod
    def _encoders_from_state(state: Mapping[str, Any]) -> dict[str, CategoryEncoder]:
        if "encoders" not in state:
            raise ValueError("the checkpoint's preprocessing state holds no matching encoders")
        return {c: CategoryEncoder().load_state_dict(s) for c, s in state["encoders"].items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Reuse a checkpoint's encoders and training item corpus (what Lightning calls when it
        restores a checkpoint); nothing is rebuilt when they are those of this datamodule."""
        encoders = self._encoders_from_state(state_dict["preprocessor"])
        if {c: e.state_dict() for c, e in encoders.items()} != {c: e.state_dict() for c, e in self.encoders.items()}:
            missing = [c for c in self._encoded_cols if c not in encoders]
            if missing:
                raise KeyError(f"the checkpoint has no encoder for column(s) {missing}")
            self.encoders = encoders
            self.schema = self._make_schema()
            self._built.clear()
        elif "item_profile" not in state_dict:
            return  # an older checkpoint with these very encoders: nothing to restore
        trained = self._item_profile_from_state(state_dict, "the checkpoint")
        if trained is None:
            return
        if _same_profile(trained, self._trained_items if self._trained_items is not None else self._item_profile()):
            return  # e.g. resuming on the training interactions themselves
        self._trained_items = trained
        self._built.clear()


def _same_profile(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    """Whether two encoded item profiles hold the same columns and ids (whatever their int dtype)."""
    return list(a.columns) == list(b.columns) and len(a) == len(b) and all(
        np.array_equal(a[c].to_numpy(), b[c].to_numpy()) for c in a.columns
    )
