"""Train / eval preprocessing and the tf.data pipelines that apply them.

Every random op is *stateless*, seeded by (run seed, epoch, example position): the same seed gives
the same images, and a resumed run replays exactly. The evaluation preprocessing is the one the
exported SavedModels run inside their graph (`models/preprocessing.py`).
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import tensorflow as tf

from trainer.config.schema import TTA_MODES
from trainer.data.augmentation import BatchMix, ImagePolicy
from trainer.data.decode import decode_full, decode_random_crop
from trainer.errors import DataError
from trainer.models.preprocessing import eval_preprocess, resize_short_side, to_float

log = logging.getLogger(__name__)


def random_resized_crop(image, size, scale, ratio, seed: tf.Tensor) -> tf.Tensor:
    """Inception-style crop of a random area and aspect ratio (decoded only there, for a JPEG),
    resized to size x size, float32 in [0, 1]."""
    crop = to_float(decode_random_crop(image, seed, scale, ratio))
    # Antialiasing matters only when shrinking; enlarging, plain bilinear gives the same pixels
    # (within 2e-5) at about half the cost. Both are convex filters: the result stays in [0, 1].
    shrinks = tf.reduce_any(tf.shape(crop)[:2] > tf.cast(size, tf.int32))
    return tf.cond(shrinks,
                   lambda: tf.image.resize(crop, (size, size), "bilinear", antialias=True),
                   lambda: tf.image.resize(crop, (size, size), "bilinear"))


@tf.autograph.experimental.do_not_convert
def interpolation(data_cfg) -> str:
    """The evaluation resize of a data config (bilinear in runs made before it was a key).

    Not converted by autograph: called inside the map functions, it would convert OmegaConf's
    `get` and the 27 functions behind it (1.5 s of the first pipeline's build)."""
    return str(data_cfg.get("interpolation", "bilinear"))


def train_preprocess(image: tf.Tensor, seed: tf.Tensor, data_cfg, aug_cfg,
                     policy: ImagePolicy | None = None, size=None) -> tf.Tensor:
    """A split's image (array, bytes or file) -> float32 [size, size, 3] in [0, 1]: crop, flip,
    then the image policy.

    `size` (default data.image_size) may be a tensor: multi-scale batches choose it per batch.
    """
    size = data_cfg.image_size if size is None else size
    if aug_cfg.random_resized_crop:
        image = random_resized_crop(image, size, aug_cfg.scale, aug_cfg.ratio, seed)
    else:
        image = eval_preprocess(decode_full(image), size, data_cfg.crop_pct,
                                interpolation(data_cfg))
    static = size if isinstance(size, int) else None
    image = tf.ensure_shape(image, [static, static, 3])  # Keras' colour ops need the channels
    if aug_cfg.hflip:
        image = tf.image.stateless_random_flip_left_right(image, seed + 1)
    policy = policy or ImagePolicy(aug_cfg)
    return policy(image, seed)


def multiscale_plan(sizes, base_size: int, batch_size: int, seed: int, epoch: int,
                    batches: int = 64, multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(size, batch) of each of `batches` batches, repeated cyclically: sizes drawn from
    `sizes` by (seed, epoch); batch x (base / size)^2 keeps pixels per batch about constant
    (ml-cvnets' variable batch sampler), rounded down to a multiple of the replica count."""
    rng = np.random.default_rng([seed, epoch, 7])
    chosen = rng.choice(np.asarray(sizes, np.int64), batches)
    counts = np.maximum(batch_size * (base_size / chosen) ** 2 // multiple, 1) * multiple
    return chosen, counts.astype(np.int64)


def train_pipeline(ds: tf.data.Dataset, data_cfg, aug_cfg, batch_size: int, seed: int,
                   epoch: int = 0, skip_batches: int = 0, num_classes: int | None = None,
                   replicas: int = 1, shard: tuple[int, int] = (0, 1),
                   unreadable: Unreadable | None = None) -> tf.data.Dataset:
    """One epoch's augmented data, endless, in batches of `batch_size // replicas` (one replica's
    share of a global batch; consecutive ones go to consecutive replicas).

    The order and every random op are functions of (seed, epoch, position) alone, so a run
    resumed at batch `skip_batches` of `epoch` sees exactly what an uninterrupted run sees.
    `shard=(worker, workers)`: this worker keeps only its replicas' shares of each global batch,
    chosen by position *before* anything is read or decoded, so input work shrinks with workers
    and every example is still seen once, with the same augmentation, whatever the worker count.
    With mixup / cutmix the labels are soft, [batch, num_classes]. With `aug.multiscale_sizes`
    batches come at several resolutions and sizes (see `multiscale_plan`).
    """
    policy, mix = ImagePolicy(aug_cfg), BatchMix(aug_cfg, num_classes or 1)
    if mix.enabled and not num_classes:
        raise ValueError("mixup / cutmix need num_classes for their soft labels")
    multiscale = bool(aug_cfg.multiscale_sizes)
    positions = example_positions(ds, data_cfg, aug_cfg, batch_size, seed, epoch, skip_batches,
                                  replicas, shard, num_classes)
    plan_sizes, plan_counts = _plan(data_cfg, aug_cfg, batch_size, seed, epoch, replicas)
    group_of = _grouping(plan_counts, replicas)
    sizes, counts, n = tf.constant(plan_sizes), tf.constant(plan_counts // replicas), len(plan_sizes)

    # Few tf.data stages per example: each costs microseconds an image can ill afford.
    def prepare(k, example):
        index, (image, label) = example
        seed_pair = tf.stack([tf.constant(seed, tf.int64), epoch * (1 << 32) + index])
        group = group_of(index) if multiscale else index  # only multi-scale batches need it
        size = sizes[group // replicas % n] if multiscale else None
        image = train_preprocess(image, seed_pair, data_cfg, aug_cfg, policy, size)
        return k, image, label, seed_pair, group

    ds = positions.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if _decodes(positions):  # a file can still fail to decode: skipped, and reported
        ds = ds.ignore_errors()
        if unreadable is not None:
            ds = unreadable.watch(ds, positions)
    if multiscale:  # the consecutive examples of one replica's share of a batch -> one batch
        ds = ds.group_by_window(
            key_func=lambda k, image, label, s, group: group,
            reduce_func=lambda key, window: window.batch(counts[key // replicas % n]),
            window_size_func=lambda key: counts[key // replicas % n])
    else:
        ds = ds.batch(batch_size // replicas, drop_remainder=True)
    if mix.enabled:  # seeded by the batch's first example: replayable like the rest
        ds = ds.map(lambda k, images, labels, seeds, group: mix(images, labels, seeds[0] + 3),
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
        ds = ds.map(lambda k, images, labels, seeds, group: (images, labels))
    return ds.prefetch(tf.data.AUTOTUNE)


def _plan(data_cfg, aug_cfg, batch_size: int, seed: int, epoch: int,
          replicas: int) -> tuple[np.ndarray, np.ndarray]:
    if aug_cfg.multiscale_sizes:
        return multiscale_plan(aug_cfg.multiscale_sizes, data_cfg.image_size, batch_size, seed,
                               epoch, multiple=replicas)
    return np.array([data_cfg.image_size]), np.array([batch_size])


def example_positions(ds: tf.data.Dataset, data_cfg, aug_cfg, batch_size: int, seed: int,
                      epoch: int, skip_batches: int = 0, replicas: int = 1,
                      shard: tuple[int, int] = (0, 1),
                      num_classes: int | None = None) -> tf.data.Dataset:
    """The epoch's examples before any decoding, as (k, (index, (image, label))).

    `index`: the example's position in the epoch's global stream (its augmentation seed);
    `k`: a count of what this worker keeps (a gap in k after decoding is an example that could
    not be decoded).
    """
    worker, workers = shard
    plan_sizes, plan_counts = _plan(data_cfg, aug_cfg, batch_size, seed, epoch, replicas)
    n, period = len(plan_counts), int(plan_counts.sum())  # the plan repeats every n batches
    start = skip_batches // n * period + int(plan_counts[:skip_batches % n].sum())
    epoch_seed = seed * 100_003 + epoch
    if str(data_cfg.get("class_balance", "none")) == "sampler":
        ds = balanced(ds, num_classes, data_cfg.shuffle_buffer, epoch_seed)
    else:
        ds = ds.shuffle(data_cfg.shuffle_buffer, seed=epoch_seed,
                        reshuffle_each_iteration=False).repeat()
    ds = ds.enumerate().skip(start)  # skipped before any file is read
    if workers > 1:
        group_of, per_worker = _grouping(plan_counts, replicas), replicas // workers
        ds = ds.filter(lambda index, example: group_of(index) % replicas // per_worker == worker)
    return ds.enumerate()


def balanced(ds: tf.data.Dataset, num_classes: int | None, buffer: int,
             seed: int) -> tf.data.Dataset:
    """An endless stream that draws each class equally often (data.class_balance=sampler):
    each class's examples shuffled and repeated, then a seeded choice of class per position,
    so the stream is a function of the seed, as the plain shuffle is."""
    if not num_classes:
        raise ValueError("data.class_balance=sampler needs the number of classes")
    per_class = [ds.filter(lambda image, label, c=c: label == c)
                 .shuffle(buffer, seed=seed + c, reshuffle_each_iteration=False).repeat()
                 for c in range(num_classes)]
    return tf.data.Dataset.sample_from_datasets(per_class, [1.0 / num_classes] * num_classes,
                                                seed=seed)


def _grouping(plan_counts: np.ndarray, replicas: int):
    """index -> global batch x replicas + the replica that trains on the example."""
    n, period = len(plan_counts), int(plan_counts.sum())
    ends = tf.constant(np.cumsum(plan_counts))  # example index where each planned batch ends
    counts = tf.constant(plan_counts)

    def group_of(index):
        within = tf.searchsorted(ends, [index % period], side="right", out_type=tf.int64)[0]
        offset = index % period - (ends[within] - counts[within])  # place inside its batch
        return (index // period * n + within) * replicas + offset // (counts[within] // replicas)
    return group_of


def _decodes(positions: tf.data.Dataset) -> bool:
    """Whether the split's images are encoded (bytes or files), i.e. can fail to decode."""
    image_spec = positions.element_spec[1][1][0]
    return isinstance(image_spec, dict) or image_spec.dtype == tf.string


class Unreadable:
    """Training examples that failed to decode although the scan passed them (corrupt past the
    header, or changed since): skipped and reported in skipped_files.csv, or, with
    data.on_error=fail, the run stops naming the file.

    tf.data can only drop a failing element (`ignore_errors`); a gap in the worker's count `k`
    shows where, and the string-only `example_positions` stream, replayed, names the file.
    """

    def __init__(self, on_error: str = "skip"):
        self.on_error, self.streams, self.gaps = str(on_error), [], []

    def watch(self, ds: tf.data.Dataset, positions: tf.data.Dataset) -> tf.data.Dataset:
        token = len(self.streams)
        self.streams.append(positions)

        def record(lo, hi):
            if self.on_error == "fail":  # the caller names the file (see `named_on_failure`)
                # The first failure only: prefetching goes on past it, without advancing the scan.
                self.gaps = self.gaps or [(token, int(lo), int(lo) + 1)]
                raise ValueError("an undecodable training image (data.on_error=fail)")
            self.gaps.append((token, int(lo), int(hi)))
            log.warning("%d training example(s) could not be decoded: skipped (listed in "
                        "skipped_files.csv at the end of training)", int(hi - lo))
            return np.int64(0)

        def check(expected, element):
            k = element[0]
            noted = tf.cond(k > expected, lambda: tf.numpy_function(
                record, [expected, k], tf.int64, stateful=True), lambda: tf.constant(0, tf.int64))
            with tf.control_dependencies([noted]):
                return k + 1, tuple(tf.identity(t) for t in element)

        return ds.scan(tf.constant(0, tf.int64), check)

    @contextlib.contextmanager
    def named_on_failure(self):
        """Around training: a decode failure under data.on_error=fail becomes a DataError that
        names the file."""
        try:
            yield
        except tf.errors.OpError:
            if not self.gaps:
                raise
            files = ", ".join(f for f, _ in self.files())
            raise DataError(f"{files}: cannot decode (data.on_error=fail; use skip to leave it "
                            "out)") from None

    def files(self) -> list[tuple[str, str]]:
        """(file, reason) of every gap so far, found by replaying the positions stream."""
        found = {}
        for token, lo, hi in self.gaps:
            for k, (index, (image, _)) in self.streams[token].skip(lo).take(hi - lo):
                name = (image["file"].numpy().decode() if isinstance(image, dict)
                        else f"example at position {int(index)} of the training split")
                found[name] = "cannot decode: failed in the input pipeline"
        return list(found.items())


def eval_pipeline(ds: tf.data.Dataset, data_cfg, batch_size: int) -> tf.data.Dataset:
    """Every example once, in order, decoded once and given the evaluation preprocessing.
    Undecodable files are left out (data.on_error=skip) rather than stopping an evaluation."""
    size, crop_pct, method = data_cfg.image_size, data_cfg.crop_pct, interpolation(data_cfg)
    ds = ds.map(lambda image, label: (eval_preprocess(decode_full(image), size, crop_pct, method),
                                      label),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = _skip_undecodable(ds, data_cfg)
    options = tf.data.Options()  # several workers: each evaluates its share of every batch
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE).with_options(options)


def tta_views(image, data_cfg, mode: str) -> tf.Tensor:
    """The test-time views of one image, [V, size, size, 3]: view 0 is the evaluation image
    (the centre crop); `flip` adds its mirror image, `crops` the four corner crops of the same
    resized image (five-crop), `crops_flip` all ten."""
    resized, size = resize_short_side(decode_full(image), data_cfg.image_size, data_cfg.crop_pct,
                                      interpolation(data_cfg))
    h, w = tf.shape(resized)[0], tf.shape(resized)[1]
    corners = [((h - size) // 2, (w - size) // 2)]
    if mode.startswith("crops"):
        corners += [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size)]
    views = [resized[top:top + size, left:left + size] for top, left in corners]
    if mode.endswith("flip"):
        views += [tf.image.flip_left_right(v) for v in views]
    return tf.stack(views)


def tta_pipeline(ds: tf.data.Dataset, data_cfg, batch_size: int, mode: str) -> tf.data.Dataset:
    """(views [B, V, size, size, 3], labels) of every example once, in order."""
    if mode not in TTA_MODES:
        raise ValueError(f"tta={mode!r} is not known; choose one of {', '.join(TTA_MODES)}")
    ds = ds.map(lambda image, label: (tta_views(image, data_cfg, mode), label),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return _skip_undecodable(ds, data_cfg).batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _skip_undecodable(ds: tf.data.Dataset, data_cfg) -> tf.data.Dataset:
    """Evaluation leaves undecodable files out (data.on_error=skip) rather than stopping."""
    return ds.ignore_errors() if str(data_cfg.get("on_error", "skip")) == "skip" else ds
