"""`python -m saev activations`: record a ViT's residual stream over an image dataset.

The command, top to bottom: check the flags, build the ViT and the image list, pick the shard
directory (named by a hash of the recording's settings), check that a re-run is of the same
dataset, then run the ViT loop into the shard writer. At the end of the module, the saev 0.1
inference API (`make_vit`, `make_img_transform`, `RecordedVisionTransformer`) as a thin layer
over `saev.vits`, so notebooks written for saev 0.1 run unchanged.

The loop is: DataLoader workers decode and transform images (pinned memory, prefetch) while
the ViT runs; forward hooks copy the chosen blocks' outputs into one buffer; a background
thread writes it to the shard files. So the GPU only ever waits on the ViT.

Batches are aligned to shard boundaries (a batch never spans two shards, and each shard's
batches start at its first image), so a resumed run or a `--n-jobs` part sees exactly the
same batches as one uninterrupted run, and writes the same bytes.

Before anything is written, a re-run into an existing directory must be of the same dataset
(saev.shards.dataset compares the files' fingerprint, and the labels' unless `--relabel`),
and the writer must get the lock of its shard range (no second run writes the same shards).
"""

import dataclasses
import logging
import math
import pathlib
import time
import typing

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from saev import vits
from saev.errors import UserError
from saev.helpers import resolve_device, short_hash, slurm_executor
from saev.images import Demo, ImageDataset, ImageList, Images
from saev.shards import dataset
from saev.shards.metadata import Metadata
from saev.shards.writer import (
    INDEX_FILE,
    SKIPPED_FILE,
    ShardWriter,
    read_skipped,
    write_image_index,
)

logger = logging.getLogger("saev.activations")


@dataclasses.dataclass(frozen=True)
class Config:
    """Record the residual stream of chosen ViT blocks over an image dataset into shards."""

    vit_family: typing.Literal["clip", "siglip", "dinov2", "timm"] = "clip"
    """Backbone family: clip/siglip (open_clip) or dinov2/timm (timm)."""
    vit_ckpt: str = "ViT-B-32/openai"
    """Checkpoint: open_clip ARCH/tag, hf-hub:org/name or ARCH/path/to/weights; a timm model name or NAME/path/to/weights."""
    vit_layers: list[int] = dataclasses.field(default_factory=lambda: [-2])
    """Blocks whose output to record; negative indices count from the last block."""
    random_weights: bool = False
    """Use randomly initialised weights instead of pretrained ones (recorded as pretrained=false)."""
    images: Images = dataclasses.field(default_factory=Demo)
    """Image dataset."""
    dump_to: pathlib.Path = pathlib.Path("./shards")
    """Shards go to DUMP_TO/<hash of this recording's settings>; if DUMP_TO itself holds a metadata.json, into DUMP_TO."""
    n_patches_per_shard: int = 2_400_000
    """Tokens per shard file; images per shard = this // tokens per image (at least 1)."""
    dtype: typing.Literal["float32", "float16"] = "float32"
    """Stored activation dtype."""
    batch_size: int = 256
    """Images per ViT forward pass."""
    n_workers: int = 4
    """DataLoader worker processes that decode images (0: decode in the main process)."""
    device: str = "auto"
    """Torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ..."""
    seed: int = 42
    """Seed of torch's RNG before the model is built (this fixes --random-weights); stored in metadata."""
    strict: bool = False
    """Stop at the first unreadable or non-image file instead of skipping it and listing it in skipped.txt."""
    relabel: bool = False
    """Re-attach labels that changed since the recording: rewrite images.csv and the labels' fingerprint, keep the activations (without it a changed label file is refused)."""
    n_jobs: int = 1
    """Split the shards into this many disjoint parts (e.g. one per machine)."""
    job_index: int = 0
    """Which part (0..n_jobs-1) this run records."""
    slurm: bool = False
    """Submit all --n-jobs parts as a Slurm job array (submitit) instead of running here."""
    slurm_account: str = ""
    """Slurm account."""
    slurm_partition: str = ""
    """Slurm partition."""
    slurm_time_min: int = 240
    """Slurm time limit per job, in minutes."""
    slurm_gpus: int = 1
    """GPUs per Slurm job."""
    slurm_cpus: int = 8
    """CPUs per Slurm job (used by the DataLoader workers)."""
    log_to: pathlib.Path = pathlib.Path("./logs")
    """Where submitit keeps Slurm job scripts and logs."""


def main(cfg: Config) -> None:
    check_config(cfg)
    if cfg.slurm:
        submit(cfg)
        return
    record(cfg)


def check_config(cfg: Config) -> None:
    for key in ("batch_size", "n_jobs", "n_patches_per_shard"):
        if getattr(cfg, key) < 1:
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{flag} {getattr(cfg, key)}: expected a positive integer.")
    if not cfg.vit_layers:
        raise UserError("--vit-layers is empty; expected at least one block index.")
    if not 0 <= cfg.job_index < cfg.n_jobs:
        raise UserError(
            f"--job-index {cfg.job_index}: expected 0..{cfg.n_jobs - 1} for --n-jobs {cfg.n_jobs}."
        )
    if cfg.n_workers < 0:
        raise UserError(f"--n-workers {cfg.n_workers}: expected >= 0.")


def job_shards(n_shards: int, n_jobs: int, job_index: int) -> range:
    """Contiguous, disjoint shard ranges covering [0, n_shards), one per job."""
    per = math.ceil(n_shards / n_jobs) if n_shards else 0
    return range(min(job_index * per, n_shards), min((job_index + 1) * per, n_shards))


def recording_key(md: Metadata) -> dict[str, typing.Any]:
    """What determines the bytes: the metadata (model, ckpt, layers, dataset, dtype, shard size,
    seed, random weights). Batch size, workers, device and the job split are deliberately out,
    and so is the dataset's fingerprint: a changed dataset lands in the same directory, which
    then refuses it (saev.shards.dataset) instead of silently starting a second recording."""
    key = md.to_json()
    key.pop("fingerprint", None)
    return key


def output_dir(dump_to: pathlib.Path, md: Metadata) -> pathlib.Path:
    dump_to = pathlib.Path(dump_to).expanduser()
    if (dump_to / "metadata.json").is_file():
        return dump_to
    return dump_to / short_hash(recording_key(md))


def record(cfg: Config) -> pathlib.Path:
    """Run (or resume) this job's part of the recording; returns the shard directory."""
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    images = cfg.images.load(strict=cfg.strict)
    # Random weights come from torch's RNG: seed it so a resumed or split run builds the same
    # random model (and so writes the same bytes).
    torch.manual_seed(cfg.seed)
    vit = vits.make_vit(cfg.vit_family, cfg.vit_ckpt, pretrained=not cfg.random_weights)
    if cfg.random_weights:
        print(
            f"*** RANDOM WEIGHTS: {cfg.vit_ckpt} is randomly initialised (metadata pretrained=false). ***"
        )
    layers = vit.resolve_layers(cfg.vit_layers)
    md = make_metadata(cfg, vit, layers, images)
    root = output_dir(cfg.dump_to, md)
    plan = dataset.check(root, md, images, relabel=cfg.relabel)
    shards = job_shards(md.n_shards, cfg.n_jobs, cfg.job_index)
    with ShardWriter(root, plan.md, shards=shards, skipped=images.skipped) as writer:
        write_index(root, plan, images)
        print(f"shards: {root}")
        if writer.done:
            print(
                f"nothing to do: shards {shards.start}..{shards.stop - 1} are already complete in {root}"
            )
            return root
        if writer.start_img > shards.start * md.n_imgs_per_shard:
            print(
                f"resuming at image {writer.start_img} (shard {writer.start_img // md.n_imgs_per_shard})"
            )
        n_todo = writer.stop_img - writer.start_img
        record_images(cfg, vit, layers, images, writer, device)
    elapsed = time.perf_counter() - t0
    n_bytes = n_todo * md.bytes_per_img
    n_skipped = len(images.skipped) + len(read_skipped(root, plan.md))
    print(
        f"recorded {n_todo} images ({md.n_imgs} in all) into shards {shards.start}..{shards.stop - 1} "
        f"of {md.n_shards}: {n_bytes / 1e9:.2f} GB in {elapsed:.1f}s ({n_todo / elapsed:.1f} img/s)"
        + (f"; {n_skipped} files skipped (see {root / SKIPPED_FILE})" if n_skipped else "")
    )
    print(f"shards: {root}")
    return root


def record_images(
    cfg: Config, vit, layers: list[int], images: ImageList, writer: ShardWriter, device
) -> None:
    """The ViT loop: images [writer.start_img, writer.stop_img) into the writer."""
    vit = vit.to(device)
    recorder = vits.Recorder(vit, layers)
    loader = torch.utils.data.DataLoader(
        ImageDataset(images, vit.transform, vit.image_size),
        batch_sampler=shard_aligned_batches(
            writer.start_img, writer.stop_img, writer.md.n_imgs_per_shard, cfg.batch_size
        ),
        num_workers=cfg.n_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if cfg.n_workers > 0 else None,
    )
    store = torch.float16 if cfg.dtype == "float16" else torch.float32
    n_todo = writer.stop_img - writer.start_img
    try:
        with tqdm(total=n_todo, unit="img", desc="recording", dynamic_ncols=True) as bar:
            for imgs, idx, ok in loader:
                failed = []
                for i in idx[~ok].tolist():
                    if cfg.strict:
                        raise UserError(
                            f"{images.root / images.paths[i]}: could not decode image (--strict)."
                        )
                    failed.append(
                        (i, images.paths[i], "could not decode; recorded as a black image")
                    )
                acts = recorder.record(imgs.to(device, non_blocking=True))
                # Decode failures are noted with their shard, so skipped.txt lists them even
                # after a kill and a resume.
                writer.write(acts.to(store), skipped=failed)
                bar.update(len(idx))
    finally:
        recorder.remove()


def write_index(root: pathlib.Path, plan: dataset.Plan, images: ImageList) -> None:
    """images.csv and files.tsv of a new recording; with --relabel, the new labels (images.csv
    first, then metadata.json, so a kill in between leaves labels that a re-run re-attaches)."""
    if plan.relabelled is not None:
        write_image_index(root, images.rows())
        plan.relabelled.dump(root / "metadata.json")
        print(f"re-attached the labels of {len(images)} images in {root / INDEX_FILE}")
    elif not (root / INDEX_FILE).is_file():
        write_image_index(root, images.rows())
    if plan.md.fingerprint is not None and not (root / dataset.FILES_FILE).is_file():
        dataset.write_file_list(root, images)


def make_metadata(cfg: Config, vit, layers: list[int], images: ImageList) -> Metadata:
    n_tokens = vit.n_patches + int(vit.cls_token)
    return Metadata(
        vit_family=cfg.vit_family,
        vit_ckpt=cfg.vit_ckpt,
        layers=layers,
        n_blocks=vit.n_blocks,
        n_patches_per_img=vit.n_patches,
        cls_token=vit.cls_token,
        d_vit=vit.d_vit,
        n_imgs=len(images),
        n_imgs_per_shard=max(1, cfg.n_patches_per_shard // n_tokens),
        dtype=cfg.dtype,
        image_size=vit.image_size,
        patch_grid=vit.patch_grid,
        data=images.data,
        seed=cfg.seed,
        pretrained=not cfg.random_weights,
        fingerprint=images.fingerprint(),
    )


def shard_aligned_batches(
    start: int, stop: int, per_shard: int, batch_size: int
) -> list[list[int]]:
    """Index batches over [start, stop) that restart at every shard boundary."""
    batches = []
    i = start
    while i < stop:
        end = min(stop, (i // per_shard + 1) * per_shard, i + batch_size)
        batches.append(list(range(i, end)))
        i = end
    return batches


def submit(cfg: Config, executor=None) -> list:
    """Submit one Slurm job per --n-jobs part through submitit; returns the jobs."""
    if executor is None:
        executor = slurm_executor(
            cfg.log_to,
            "saev-activations",
            timeout_min=cfg.slurm_time_min,
            gpus_per_node=cfg.slurm_gpus,
            cpus_per_task=cfg.slurm_cpus,
            slurm_account=cfg.slurm_account or None,
            slurm_partition=cfg.slurm_partition or None,
        )
    parts = [dataclasses.replace(cfg, slurm=False, job_index=i) for i in range(cfg.n_jobs)]
    jobs = executor.map_array(main, parts)
    for job, part in zip(jobs, parts, strict=True):
        print(f"submitted job {job.job_id}: part {part.job_index} of {cfg.n_jobs}")
    print(
        f"logs: {cfg.log_to}; re-run the same command without --slurm to check or finish the recording."
    )
    return jobs


# The saev 0.1 inference API.
#
# saev 0.1's inference guide gets an SAE's codes for one image like this:
#
#     vit = saev.activations.make_vit("clip", "ViT-B-16/openai")
#     recorded_vit = saev.activations.RecordedVisionTransformer(vit, 196, True, [10])
#     x = saev.activations.make_img_transform("clip", "ViT-B-16/openai")(img)[None]
#     _, vit_acts = recorded_vit(x)                 # [1, 1, 197, 768]
#     x_hat, f_x, loss = sae(vit_acts[:, 0, 1:, :])  # sae = saev.nn.load("sae.pt")
#
# The three names below keep that code running. They are thin: the model, its transform and
# the hooks are saev.vits's (docs/migrating.md).


def make_vit(vit_family: str, vit_ckpt: str) -> vits.Vit:
    """saev 0.1's `make_vit`: the pretrained ViT `vit_ckpt` of `vit_family`, in eval mode.

    Same as `saev.vits.make_vit(vit_family, vit_ckpt)`, which also takes `pretrained=False`.
    """
    return vits.make_vit(vit_family, vit_ckpt)


def make_img_transform(vit_family: str, vit_ckpt: str) -> typing.Callable:
    """saev 0.1's `make_img_transform`: the model's eval transform, PIL image -> [3, h, w]."""
    return vits.make_img_transform(vit_family, vit_ckpt)


class RecordedVisionTransformer(torch.nn.Module):
    """saev 0.1's recorder: calling it on images gives `(output, acts)`, acts of shape
    `[batch, n_layers, tokens, d_vit]` on the CPU (as 0.1 returned them).

    Tokens are CLS first (when the model has one), then the patches in row-major order;
    register tokens are dropped. The layers' order is the order of `layers` (0.1 stored
    them in the order the blocks ran, which is the same for an ascending list).
    `n_patches_per_img` and `cls_token` were needed by 0.1 to size its buffer; here they are
    read from the model, and checked against it so a notebook's wrong number fails loudly.
    """

    def __init__(self, vit: vits.Vit, n_patches_per_img: int, cls_token: bool, layers: list[int]):
        super().__init__()
        if n_patches_per_img != vit.n_patches or cls_token != vit.cls_token:
            raise UserError(
                f"RecordedVisionTransformer(n_patches_per_img={n_patches_per_img}, "
                f"cls_token={cls_token}): the model has {vit.n_patches} patches per image and "
                f"{'a' if vit.cls_token else 'no'} CLS token; pass those (saev.vits.Recorder "
                "reads them from the model)."
            )
        self.vit = vit
        self.n_patches_per_img = n_patches_per_img
        self.cls_token = cls_token
        self.layers = list(layers)
        self.recorder = vits.Recorder(vit, layers)

    def forward(
        self, batch: Float[Tensor, "batch 3 height width"]
    ) -> tuple[Tensor, Float[Tensor, "batch n_layers tokens d_vit"]]:
        out, acts = self.recorder(batch)
        return out, acts.cpu()
