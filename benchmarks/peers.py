"""Quality per token against dictionary_learning 0.1.0 (issue 10, DESIGN §8 "Quality per token").

saev (`saev.train.main.train` at its defaults) and dictionary_learning 0.1.0 (its `trainSAE`
with `TopKTrainer` / `StandardTrainer` at *their* defaults) are trained on the same tokens, in
the same order, and scored by one function on the same held-out tokens. A faster but worse
SAE is not a win, so the script prints quality and speed side by side and checks the targets:

- FVU: saev <= 0.9 x dictionary_learning's (relu: at matched L0);
- MMCS (planted data): saev >= dictionary_learning's + 0.05;
- planted-easy (d=64, 256 atoms, 4 active, uniform, 2M tokens), topk: saev MMCS >= 0.95;
- speed: saev tokens/s >= 1.5 x dictionary_learning's.

Install the peer once, outside the venv (it pins old dependencies we do not want; only
`einops` is needed, and a one-line `nnsight` stub for an import it never uses here):

    python -m pip install --no-deps --target .peers dictionary-learning==0.1.0 einops
    mkdir -p .peers/nnsight
    echo 'LanguageModel = None  # stub: imported by dictionary_learning, unused' > .peers/nnsight/__init__.py

(`benchmarks/peers_setup.sh [DIR]` runs exactly these.) `--peers DIR` (default: $SAEV_PEERS,
else `.peers/` in the repository root, which git ignores) is put first on sys.path, so the
peer runs on this venv's torch.

Data sets (`--datasets`):
- `planted-hard`: d=64, 512 unit-norm atoms, 6 active per token with Zipf frequencies
  (p_i ~ 1/i), exponential coefficients, a constant offset and Gaussian noise; 2M train tokens.
- `planted-easy`: d=64, 256 atoms, 4 active, uniform frequencies; 2M train tokens.
- `planted`: the same generator with `--d --n-atoms --n-active --freq --zipf-exponent
  --offset --noise` (and `--n-tokens`, which applies to every data set).
- `vit`: a random-weight timm `vit_small_patch16_224`, block -2, patch tokens of the bundled
  demo images, recorded with `python -m saev activations --random-weights`; 400k train tokens.
Planted shards are written with `saev.shards.ShardWriter` and regenerated bit for bit from
their seed; both kinds are cached under `--cache` (default: PEERS/cache).

Both libraries read saev's train split (`split_images`) through `ShuffledLoader` with the
training run's own data settings, so the peer's batches are the saev stream cut at its own
batch size (2048, the dictionary_learning demos' `sae_batch_size`; the first batches are
checked to hold the same tokens); both are scored on the
first `--n-eval` tokens of the eval split in image order (what `saev evaluate` scores), and
the saev FVU is checked against `saev.evaluate`. The peer keeps its defaults (TopK lr
2e-4/sqrt(d_sae/2^14), AuxK 1/32; Standard lr 1e-3, l1_penalty 0.1; constant lr after warmup;
no input normalisation) except that its step-count warmups (1000 and 2000 steps) are capped
at 5% of the run, the cap saev's own lr warmup uses: the trainers assert warmup < steps.

tokens/s is saev's own `tokens_per_s` (metrics.jsonl, training loop only) and, for the peer,
training tokens / wall time of its `trainSAE` call. One run's tokens/s moves by 10-15% on a
small machine (the peer's more than saev's), so `--speed-repeats N` trains each side N times,
alternating saev and peer, and compares the medians; every run trains the same SAEs (both
libraries are seeded), only the first is scored. For relu, each side trains its whole L1
sweep in one pass (saev: one stacked sweep; peer: one `trainSAE` with several trainers), so
speed is compared per SAE (tokens/s x SAEs), and FVU and MMCS at the peer's L0 are read off
saev's L0 curve (linear in log L0; only inside saev's L0 range).

    python benchmarks/peers.py                                  # planted-hard, planted-easy, vit; topk and relu
    python benchmarks/peers.py --datasets planted-hard --families topk
    python benchmarks/peers.py --saev-arg lr=1e-3 --saev-arg sae.k_aux=256 --json out.json
    python benchmarks/peers.py --datasets planted-hard --families relu --speed-repeats 3
    python benchmarks/peers.py --datasets vit --families relu --relu-coeffs-saev 0.03 0.1 0.3 --relu-coeffs-peer 0.03 0.1 0.3
"""

import argparse
import ast
import contextlib
import dataclasses
import hashlib
import inspect
import io
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import tomllib

REPO = pathlib.Path(__file__).resolve().parents[1]
# Benchmark the saev of this checkout, not whichever one the venv installed (`python
# benchmarks/peers.py` puts benchmarks/, not the working directory, on sys.path).
sys.path.insert(0, str(REPO))

# tqdm reads TQDM_* defaults once, at import: refresh progress bars every 10 s, so a log
# file gets a readable trail instead of a line every 0.1 s.
os.environ.setdefault("TQDM_MININTERVAL", "10")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import saev.nn  # noqa: E402
from saev.errors import UserError  # noqa: E402
from saev.evaluate import DataConfig as EvalData  # noqa: E402
from saev.evaluate import evaluate_ckpts  # noqa: E402
from saev.helpers import keep_freed_memory, resolve_device  # noqa: E402
from saev.shards import Metadata, Shards, ShardWriter  # noqa: E402
from saev.shards.shuffled import ShuffledLoader, split_images  # noqa: E402
from saev.train.config import DataConfig  # noqa: E402
from saev.train.main import Config, train  # noqa: E402

PEER = "dictionary_learning"
PEER_VERSION = "0.1.0"
PEER_BATCH = 2048
"""The peer's batch size: `sae_batch_size` of dictionary_learning's demo configs."""
WARMUP_CAP = 0.05
"""Step-count warmups of the peer are capped at this fraction of its steps (see the docstring)."""
STEP_KEYS = ("warmup_steps", "sparsity_warmup_steps", "decay_start", "threshold_start_step")
"""Peer trainer keys counted in steps: a value in (0, 1) given by --peer-arg is a fraction of the run."""
INSTALL = (
    f"python -m pip install --no-deps --target DIR dictionary-learning=={PEER_VERSION} einops && "
    "mkdir -p DIR/nnsight && echo 'LanguageModel = None' > DIR/nnsight/__init__.py "
    "(or: benchmarks/peers_setup.sh DIR)"
)

TARGET_FVU_RATIO = 0.9
TARGET_MMCS_DIFF = 0.05
TARGET_EASY_MMCS = 0.95
TARGET_SPEED = 1.5


# Data.


@dataclasses.dataclass(frozen=True)
class Planted:
    """A planted dictionary: x = offset + sum over active atoms of c_i * atom_i + noise."""

    d: int = 64
    n_atoms: int = 512
    n_active: int = 6
    freq: str = "zipf"
    """zipf: atom i is drawn with probability ~ 1/(i+1)^zipf_exponent; uniform: all equally often."""
    zipf_exponent: float = 1.0
    n_tokens: int = 2_000_000
    """Training tokens the train split must hold (the eval split comes on top)."""
    offset: float = 2.0
    """Norm of the constant offset vector (a typical token without it has norm ~3.5 at 6 active)."""
    noise: float = 0.05
    """Standard deviation of the Gaussian noise per dimension (about 1% of the variance)."""
    seed: int = 0
    tokens_per_img: int = 256
    version: int = 1


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    kind: str  # "planted" or "vit"
    n_tokens: int
    k: int
    planted: Planted | None = None
    easy_target: bool = False
    """The issue's MMCS >= 0.95 target applies (the planted-easy configuration)."""


def datasets(args) -> dict[str, Dataset]:
    hard = Planted(d=64, n_atoms=512, n_active=6, freq="zipf", n_tokens=2_000_000)
    easy = Planted(d=64, n_atoms=256, n_active=4, freq="uniform", n_tokens=2_000_000)
    custom = Planted(
        d=args.d,
        n_atoms=args.n_atoms,
        n_active=args.n_active,
        freq=args.freq,
        zipf_exponent=args.zipf_exponent,
        offset=args.offset,
        noise=args.noise,
        n_tokens=0,
    )
    out = {}
    for name, p, easy_target in (
        ("planted-hard", hard, False),
        ("planted-easy", easy, True),
        ("planted", custom, False),
    ):
        n = args.n_tokens or p.n_tokens or 2_000_000
        p = dataclasses.replace(p, n_tokens=n)
        out[name] = Dataset(
            name, "planted", n, args.k or p.n_active, p, easy_target and n == 2_000_000
        )
    out["vit"] = Dataset("vit", "vit", args.n_tokens or 400_000, args.k or 32)
    return out


def planted_truth(p: Planted) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(atoms [n_atoms, d] unit rows, offset [d], atom probabilities [n_atoms]) from the seed."""
    rng = np.random.default_rng([p.seed, 0])
    atoms = rng.standard_normal((p.n_atoms, p.d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    offset = rng.standard_normal(p.d)
    offset *= p.offset / np.linalg.norm(offset)
    ranks = np.arange(1, p.n_atoms + 1)
    probs = ranks**-p.zipf_exponent if p.freq == "zipf" else np.ones(p.n_atoms)
    return atoms.astype(np.float32), offset.astype(np.float32), probs / probs.sum()


def planted_tokens(
    p: Planted, rng: np.random.Generator, n: int, atoms, offset, probs
) -> np.ndarray:
    """`n` tokens [n, d]: `n_active` distinct atoms each, drawn with probabilities `probs`
    without replacement (Gumbel top-k), exponential coefficients, offset and noise."""
    out = np.empty((n, p.d), dtype=np.float32)
    logp = np.log(probs)[None]
    step = 8192
    for a in range(0, n, step):
        m = min(step, n - a)
        keys = logp - np.log(-np.log(rng.random((m, p.n_atoms))))
        idx = np.argpartition(-keys, p.n_active - 1, axis=1)[:, : p.n_active]
        coef = rng.exponential(size=(m, p.n_active)).astype(np.float32)
        x = np.einsum("mk,mkd->md", coef, atoms[idx])
        out[a : a + m] = x + offset + p.noise * rng.standard_normal((m, p.d)).astype(np.float32)
    return out


def planted_shards(
    p: Planted, cache: pathlib.Path, eval_frac: float, split_seed: int
) -> pathlib.Path:
    """Write (or reuse) the shard directory of `p`; the train split holds >= n_tokens + a batch."""
    n_tok = p.tokens_per_img
    need = p.n_tokens + 16384  # saev rounds n_train up to whole batches: stay within one epoch
    n_imgs = math.ceil(need / n_tok / max(1e-9, 1 - eval_frac))
    while len(split_images(n_imgs, eval_frac, split_seed)[0]) * n_tok < need:
        n_imgs += 1
    desc = {"kind": "planted", **dataclasses.asdict(p), "n_imgs": n_imgs}
    tag = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:10]
    root = cache / f"planted-{tag}"
    md = Metadata(
        vit_family="timm",
        vit_ckpt="planted",
        layers=[0],
        n_blocks=1,
        n_patches_per_img=n_tok,
        cls_token=False,
        d_vit=p.d,
        n_imgs=n_imgs,
        n_imgs_per_shard=1024,
        data=desc,
        seed=p.seed,
        pretrained=False,
    )
    atoms, offset, probs = planted_truth(p)
    t0 = time.perf_counter()
    with ShardWriter(root, md) as w:
        if w.done:
            return root
        print(f"  writing {n_imgs * n_tok:,} planted tokens to {root} ...", flush=True)
        # One generator per shard, so a resumed writer regenerates exactly the missing shards.
        for shard_i in range(w.start_img // md.n_imgs_per_shard, md.n_shards):
            rng = np.random.default_rng([p.seed, 1, shard_i])
            n = md.n_imgs_in(shard_i)
            x = planted_tokens(p, rng, n * n_tok, atoms, offset, probs)
            w.write(x.reshape(n, 1, n_tok, p.d))
    print(f"  wrote in {time.perf_counter() - t0:.0f} s", flush=True)
    return root


def vit_shards(args, cache: pathlib.Path) -> pathlib.Path:
    """Record (or reuse) random-weight vit_small activations of the demo images with saev's CLI."""
    dump = cache / f"vit-{args.vit_ckpt}-l{args.vit_layer}-n{args.vit_imgs}"
    found = sorted(dump.glob("*/metadata.json"))
    if not found:
        cmd = [
            sys.executable, "-m", "saev", "activations",
            "--vit-family", "timm", "--vit-ckpt", args.vit_ckpt, "--random-weights",
            "--vit-layers", str(args.vit_layer), "--dump-to", str(dump),
            "--batch-size", "32", "--n-workers", "1", "--device", args.device,
            "images:demo", "--images.root", str(cache / f"demo-images-{args.vit_imgs}"),
            "--images.n-imgs", str(args.vit_imgs),
        ]  # fmt: skip
        print("  recording: " + " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        subprocess.run(cmd, check=True, cwd=REPO, env=env)
        print(f"  recorded in {time.perf_counter() - t0:.0f} s", flush=True)
        found = sorted(dump.glob("*/metadata.json"))
    if len(found) != 1:
        raise UserError(
            f"{dump}: expected one recording, found {len(found)}; remove the directory."
        )
    return found[0].parent


# Training: saev.


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def parse_overrides(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{flag} {item!r}: expected KEY=VALUE.")
        out[key.strip()] = value.strip()
    return out


def saev_toml(settings: dict, raw: dict[str, str]) -> str:
    """A sweep TOML of `settings` (dotted keys -> values; a list is an axis), then the raw
    --saev-arg values (TOML syntax; anything else is taken as a string), which win."""
    lines: dict[str, list[str]] = {}
    merged = {k: toml_value(v) for k, v in settings.items()}
    for key, value in raw.items():
        try:
            tomllib.loads(f"v = {value}")
            merged[key] = value
        except tomllib.TOMLDecodeError:
            merged[key] = json.dumps(value)
    for key, value in merged.items():
        table, _, name = key.rpartition(".")
        lines.setdefault(table, []).append(f"{name} = {value}")
    text = "\n".join(lines.pop("", [])) + "\n"
    for table, rows in lines.items():
        text += f"\n[{table}]\n" + "\n".join(rows) + "\n"
    return text


@dataclasses.dataclass
class Trained:
    """One trained SAE of either library, ready to score."""

    label: str
    coeff: float | None  # relu sparsity coefficient
    encode: object
    decode: object
    d_sae: int
    tokens_per_s: float
    n_saes: int  # SAEs trained in the same pass (speed per SAE = tokens_per_s * n_saes)
    tokens: int
    wall_s: float
    load: float
    """1-minute load average when training ended: other work on the machine skews tokens/s."""
    ckpt: pathlib.Path | None = None


def train_saev(
    shards: pathlib.Path, ds: Dataset, family: str, coeffs, args, work: pathlib.Path
) -> list[Trained]:
    settings = {
        "n_train": ds.n_tokens,
        "n_eval": 0,
        "data.shard_root": str(shards),
        "data.layer": Shards(shards).md.layers[0],  # the one recorded block
        "sae.family": family,
        "sae.exp_factor": args.exp_factor,
    }
    if family == "topk":
        settings["sae.k"] = ds.k
    elif coeffs:
        settings["sae.sparsity_coeff"] = list(coeffs)
    raw = parse_overrides(args.saev_arg, "--saev-arg")
    sweep = work / f"saev-{family}.toml"
    sweep.write_text(saev_toml(settings, raw))
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the plan and run directory lines
        # Run-level keys go in the Config: `train` takes run_root from the command line only.
        run_dir = train(
            Config(sweep=sweep, run_root=work / "runs", device=args.device, ckpt_every=0)
        )
    wall = time.perf_counter() - t0
    load = os.getloadavg()[0]
    members = sorted((run_dir / "members").iterdir())
    out = []
    for member in members:
        sae = saev.nn.load(member)
        rows = (member / "metrics.jsonl").read_text().splitlines()
        last = json.loads(rows[-1])
        out.append(
            Trained(
                label="saev",
                coeff=sae.cfg["hparams"].get("sparsity_coeff") if family != "topk" else None,
                encode=sae.encode,
                decode=sae.decode,
                d_sae=sae.d_sae,
                tokens_per_s=float(last["tokens_per_s"]),
                n_saes=len(members),
                tokens=int(last["tokens"]),
                wall_s=wall,
                load=load,
                ckpt=member,
            )
        )
    return sorted(out, key=lambda t: t.coeff or 0.0)


# Training: the peer.


def import_peer(peers: pathlib.Path):
    """dictionary_learning's trainSAE and trainers, imported from `peers` (first on sys.path)."""
    if not (peers / PEER).is_dir():
        raise UserError(f"--peers {peers}: no {PEER} there; install it with: {INSTALL}")
    sys.path.insert(0, str(peers))
    try:
        import dictionary_learning
        from dictionary_learning.dictionary import AutoEncoder
        from dictionary_learning.trainers.standard import StandardTrainer
        from dictionary_learning.trainers.top_k import AutoEncoderTopK, TopKTrainer
        from dictionary_learning.training import trainSAE
    except ImportError as err:
        raise UserError(
            f"--peers {peers}: cannot import {PEER} ({err}); install with: {INSTALL}"
        ) from err
    if dictionary_learning.__version__ != PEER_VERSION:
        raise UserError(
            f"--peers {peers}: {PEER} {dictionary_learning.__version__}; the benchmark is "
            f"defined against {PEER_VERSION}: {INSTALL}"
        )
    return {
        "trainSAE": trainSAE,
        "topk": (TopKTrainer, AutoEncoderTopK),
        "relu": (StandardTrainer, AutoEncoder),
    }


class Stream:
    """The saev training stream as an iterable of the peer's batches. Re-iterable (restarts at
    token 0), because trainSAE iterates it twice when normalize_activations is set."""

    def __init__(self, loader: ShuffledLoader):
        self.loader = loader

    def __iter__(self):
        return self.loader.batches()


FIXED = {"data", "trainer_configs", "steps", "activation_dim", "dict_size", "k", "layer",
         "lm_name", "dict_class", "device", "save_dir"}  # fmt: skip
"""Peer arguments the benchmark sets to match saev (width, k, tokens, device) or needs."""


def train_loader(shards: pathlib.Path, data: DataConfig, batch_size: int) -> ShuffledLoader:
    """The loader `saev train` builds for `data` (saev.train.loop.open_pass), at any batch size."""
    sh = Shards(shards)
    return ShuffledLoader(
        sh,
        layer=data.layer,
        tokens=data.tokens,
        batch_size=batch_size,
        imgs=split_images(sh.n_imgs, data.eval_frac, data.split_seed)[0],
        seed=data.seed,
        n_threads=data.n_threads,
        chunk_mb=data.chunk_mb,
        buffer_mb=data.buffer_mb,
    )


def first_tokens(loader: ShuffledLoader, n: int) -> torch.Tensor:
    parts, got = [], 0
    batches = loader.batches()
    for x in batches:
        parts.append(x[: n - got].clone())
        got += parts[-1].shape[0]
        if got >= n:
            break
    batches.close()
    return torch.cat(parts)


def check_same_stream(shards: pathlib.Path, data: DataConfig, batch: int) -> None:
    """The peer's batches must be saev's tokens in saev's order: the loader's stream does not
    depend on the batch size (while a shuffle window holds more than a batch); check its start."""
    n = 2 * max(batch, data.batch_size)
    ours = first_tokens(train_loader(shards, data, data.batch_size), n)
    theirs = first_tokens(train_loader(shards, data, batch), n)
    if not torch.equal(ours, theirs):
        raise UserError(
            f"the peer's batches of {batch} are not saev's token stream (batches of "
            f"{data.batch_size}); raise --saev-arg data.buffer_mb or pick another batch size."
        )


@dataclasses.dataclass(frozen=True)
class PeerArgs:
    """--peer-arg values sorted by where they go."""

    batch_size: int
    train_kw: dict
    """trainSAE arguments (normalize_activations, ...)."""
    trainer_kw: dict
    """Trainer constructor arguments (lr, decay_start, ...); STEP_KEYS may be fractions."""


def peer_args(peer, family: str, items: list[str]) -> PeerArgs:
    """Sort --peer-arg KEY=VALUE (Python literals) into trainSAE and trainer arguments; checked
    before any training, so a typo does not cost a saev run."""
    trainSAE, (trainer_cls, _) = peer["trainSAE"], peer[family]
    train_keys = set(inspect.signature(trainSAE).parameters) - FIXED
    trainer_keys = set(inspect.signature(trainer_cls).parameters) - FIXED
    batch, train_kw, trainer_kw = PEER_BATCH, {}, {}
    for key, text in parse_overrides(items, "--peer-arg").items():
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if key == "batch_size":
            if not isinstance(value, int) or value < 1:
                raise UserError(f"--peer-arg batch_size={text}: expected a positive integer.")
            batch = value
        elif key in train_keys:
            train_kw[key] = value
        elif key in trainer_keys:
            trainer_kw[key] = value
        else:
            raise UserError(
                f"--peer-arg {key}: not an argument of {trainer_cls.__name__} or trainSAE; "
                f"allowed: batch_size, {', '.join(sorted(trainer_keys | train_keys))}."
            )
    return PeerArgs(batch, train_kw, trainer_kw)


def train_peer(
    peer, shards: pathlib.Path, ref: Trained, family: str, coeffs, args, work: pathlib.Path
) -> list[Trained]:
    """Train dictionary_learning on the stream `ref` (a saev member) was trained on: same
    split, shuffle seed and loader settings, same tokens, its own batch size."""
    sae = saev.nn.load(ref.ckpt)
    tcfg = sae.cfg["train"]
    data = DataConfig(**{k: v for k, v in tcfg["data"].items() if k != "shard_root"})
    trainSAE, (trainer_cls, dict_cls) = peer["trainSAE"], peer[family]
    pa = peer_args(peer, family, args.peer_arg)
    batch = pa.batch_size
    steps = math.ceil(int(tcfg["n_train"]) / batch)
    device = str(resolve_device(args.device))
    base = {
        "trainer": trainer_cls,
        "dict_class": dict_cls,
        "activation_dim": sae.d_vit,
        "dict_size": sae.d_sae,
        "steps": steps,
        "layer": sae.layer,
        "lm_name": sae.cfg["shards"]["vit_ckpt"],
        "device": device,
        "seed": int(tcfg["seed"]),
    }
    for key in ("warmup_steps", "sparsity_warmup_steps"):
        default = inspect.signature(trainer_cls).parameters.get(key)
        if default is not None and default.default:
            base[key] = min(default.default, int(WARMUP_CAP * steps))
    if family == "topk":
        base["k"] = int(sae.cfg["hparams"]["k"])
    for key, value in pa.trainer_kw.items():
        if key in STEP_KEYS and isinstance(value, float) and 0 < value < 1:
            value = int(value * steps)
        base[key] = value
    train_kw = {"device": device, **pa.train_kw}
    if family == "topk":
        configs = [dict(base)]
    else:
        if "l1_penalty" in base:  # a single coefficient given by --peer-arg
            coeffs = [base["l1_penalty"]]
        configs = [{**base, "l1_penalty": c} for c in coeffs]
    check_same_stream(shards, data, batch)
    loader = train_loader(shards, data, batch)
    save_dir = work / f"peer-{family}"
    t0 = time.perf_counter()
    trainSAE(
        data=Stream(loader),
        trainer_configs=[dict(c) for c in configs],  # trainSAE pops "trainer" from each
        steps=steps,
        save_dir=str(save_dir),
        **train_kw,
    )
    wall = time.perf_counter() - t0
    load = os.getloadavg()[0]
    out = []
    for i, c in enumerate(configs):
        # trainSAE keeps its trainers; the trained weights are what it saves (ae.pt, raw units).
        ae = dict_cls.from_pretrained(str(save_dir / f"trainer_{i}" / "ae.pt"), device=device)
        ae.eval()
        out.append(
            Trained(
                label="dictionary_learning",
                coeff=c.get("l1_penalty") if family != "topk" else None,
                encode=ae.encode,
                decode=ae.decode,
                d_sae=sae.d_sae,
                tokens_per_s=steps * batch / wall,
                n_saes=len(configs),
                tokens=steps * batch,
                wall_s=wall,
                load=load,
            )
        )
    return out


# Evaluation: one function for both libraries.


def eval_tokens(shards: pathlib.Path, ckpt: pathlib.Path, n_eval: int) -> torch.Tensor:
    """The first `n_eval` eval-split tokens in image order (what `saev evaluate` scores), from
    the split and token selection the saev member was trained with."""
    cfg = saev.nn.load(ckpt).cfg
    data = cfg["train"]["data"]
    sh = Shards(shards)
    imgs = split_images(sh.n_imgs, data["eval_frac"], data["split_seed"])[1]
    loader = ShuffledLoader(
        sh, layer=data["layer"], tokens=data["tokens"], batch_size=8192, imgs=imgs, shuffle=False
    )
    parts, n = [], 0
    for x in loader.batches(n_epochs=1):
        parts.append(x[: n_eval - n].clone() if n_eval else x.clone())
        n += parts[-1].shape[0]
        if n_eval and n >= n_eval:
            break
    return torch.cat(parts)


@dataclasses.dataclass
class Scores:
    fvu: float
    l0: float
    dead_frac: float
    mmcs: float | None = None
    frac_09: float | None = None


@torch.no_grad()
def score(
    encode, decode, d_sae: int, x: torch.Tensor, atoms: np.ndarray | None, device, batch: int = 8192
) -> Scores:
    """FVU = sum ||x - x_hat||^2 / sum ||x - mean||^2 (float64), mean L0, fraction of latents
    that never fire on `x`, and for planted data MMCS (mean over true atoms of the best cosine
    to a decoder direction) and the fraction of atoms whose best cosine exceeds 0.9.

    Decoder directions come from the public API of either library: decode(e_i) - decode(0)."""
    x64 = x.double()
    total = ((x64 - x64.mean(dim=0)) ** 2).sum()
    err = torch.zeros((), dtype=torch.float64)
    l0 = 0
    fired = torch.zeros(d_sae, dtype=torch.bool)
    for a in range(0, x.shape[0], batch):
        xb = x[a : a + batch].to(device)
        f = encode(xb)
        x_hat = decode(f)
        err += ((xb.double() - x_hat.double()) ** 2).sum().cpu()
        active = (f != 0).cpu()
        l0 += int(active.sum())
        fired |= active.any(dim=0)
    out = Scores(
        fvu=float(err / total), l0=l0 / x.shape[0], dead_frac=float((~fired).double().mean())
    )
    if atoms is not None:
        eye = torch.eye(d_sae, device=device)
        dirs = (decode(eye) - decode(torch.zeros(1, d_sae, device=device))).double().cpu()
        dirs = dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-12)
        truth = torch.from_numpy(atoms).double()
        best = (truth @ dirs.T).max(dim=1).values
        out.mmcs = float(best.mean())
        out.frac_09 = float((best > 0.9).double().mean())
    return out


# Reporting.


def fmt(v, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def row_text(t: Trained, s: Scores) -> str:
    coeff = "" if t.coeff is None else f"{t.coeff:g}"
    return (
        f"  {t.label:<20} {coeff:>7} {t.tokens_per_s:>10,.0f} {t.n_saes:>4} {s.fvu:>8.4f} "
        f"{s.l0:>7.2f} {s.dead_frac:>6.3f} {fmt(s.mmcs, '6.3f'):>6} {fmt(s.frac_09, '5.2f'):>5}"
    )


HEADER = (
    f"  {'library':<20} {'coeff':>7} {'tokens/s':>10} {'SAEs':>4} {'FVU':>8} {'L0':>7} "
    f"{'dead':>6} {'MMCS':>6} {'>0.9':>5}"
)


def check(name: str, value: float | None, op: str, target: float, text: str) -> dict:
    if value is None or math.isnan(value):
        ok = None
    else:
        ok = value <= target if op == "<=" else value >= target
    verdict = {None: "n/a", True: "PASS", False: "FAIL"}[ok]
    print(f"  {text:<44} {fmt(value, '.3f'):>8}  (target {op} {target:g})  {verdict}")
    return {"name": name, "value": value, "op": op, "target": target, "pass": ok}


def speed(ts: list[Trained]) -> float:
    """Tokens/s per SAE of a pass (tokens/s x SAEs trained together)."""
    return ts[0].tokens_per_s * ts[0].n_saes


def compare_topk(ds: Dataset, ours, theirs, speed_ratio: float) -> list[dict]:
    s_s, s_p = ours[0][1], theirs[0][1]
    checks = [
        check("fvu_ratio", s_s.fvu / s_p.fvu, "<=", TARGET_FVU_RATIO, "FVU saev / peer"),
    ]
    if s_s.mmcs is not None:
        checks.append(
            check("mmcs_diff", s_s.mmcs - s_p.mmcs, ">=", TARGET_MMCS_DIFF, "MMCS saev - peer")
        )
    if ds.easy_target:
        checks.append(
            check("easy_mmcs", s_s.mmcs, ">=", TARGET_EASY_MMCS, "MMCS saev (planted-easy)")
        )
    checks.append(check("speed_ratio", speed_ratio, ">=", TARGET_SPEED, "tokens/s saev / peer"))
    return checks


def interp_log_l0(points: list[tuple[float, float]], l0: float) -> float | None:
    """Value at `l0` on the curve through (L0, value) points, linear in log L0; None outside."""
    pts = sorted((a, b) for a, b in points if a > 0 and b is not None)
    if len(pts) < 2 or not pts[0][0] <= l0 <= pts[-1][0]:
        if len(pts) == 1 and math.isclose(pts[0][0], l0, rel_tol=0.02):
            return pts[0][1]
        return None
    xs = np.log([a for a, _ in pts])
    return float(np.interp(math.log(l0), xs, [b for _, b in pts]))


def compare_relu(ours, theirs, speed_ratio: float) -> tuple[list[dict], list[dict]]:
    fvu_curve = [(s.l0, s.fvu) for _, s in ours]
    mmcs_curve = [(s.l0, s.mmcs) for _, s in ours]
    print("  at the peer's L0 (saev interpolated on its L0 curve, linear in log L0):")
    print(
        f"  {'peer coeff':>10} {'L0':>7} {'peer FVU':>9} {'saev FVU':>9} {'ratio':>6} "
        f"{'peer MMCS':>9} {'saev MMCS':>9} {'diff':>6}"
    )
    matched = []
    for t, s in theirs:
        fvu = interp_log_l0(fvu_curve, s.l0)
        mmcs = interp_log_l0(mmcs_curve, s.l0) if s.mmcs is not None else None
        m = {
            "peer_coeff": t.coeff,
            "l0": s.l0,
            "peer_fvu": s.fvu,
            "saev_fvu": fvu,
            "fvu_ratio": None if fvu is None else fvu / s.fvu,
            "peer_mmcs": s.mmcs,
            "saev_mmcs": mmcs,
            "mmcs_diff": None if mmcs is None else mmcs - s.mmcs,
        }
        matched.append(m)
        print(
            f"  {t.coeff:>10g} {s.l0:>7.2f} {s.fvu:>9.4f} {fmt(fvu, '9.4f'):>9} "
            f"{fmt(m['fvu_ratio'], '6.3f'):>6} {fmt(s.mmcs, '9.3f'):>9} {fmt(mmcs, '9.3f'):>9} "
            f"{fmt(m['mmcs_diff'], '+6.3f'):>6}"
        )
    inside = [m for m in matched if m["fvu_ratio"] is not None]
    outside = [m["l0"] for m in matched if m["fvu_ratio"] is None]
    if not inside:
        print("  no peer L0 lies inside saev's L0 range: widen --relu-coeffs-saev.")
    elif outside:
        # The checks below cover only the matched points: say so, or a PASS reads as all of them.
        lo, hi = min(s.l0 for _, s in ours), max(s.l0 for _, s in ours)
        listed = ", ".join(f"{v:.1f}" for v in outside)
        print(
            f"  not compared: peer L0 {listed}, outside saev's L0 range {lo:.2f}-{hi:.1f} "
            "(widen --relu-coeffs-saev to include them)"
        )
    worst_fvu = max((m["fvu_ratio"] for m in inside), default=None)
    checks = [
        check(
            "fvu_ratio", worst_fvu, "<=", TARGET_FVU_RATIO, "FVU saev / peer at matched L0 (worst)"
        )
    ]
    diffs = [m["mmcs_diff"] for m in inside if m["mmcs_diff"] is not None]
    if diffs:
        checks.append(
            check(
                "mmcs_diff",
                min(diffs),
                ">=",
                TARGET_MMCS_DIFF,
                "MMCS saev - peer at matched L0 (worst)",
            )
        )
    checks.append(
        check("speed_ratio", speed_ratio, ">=", TARGET_SPEED, "tokens/s per SAE saev / peer")
    )
    return checks, matched


# Main.


def run_family(ds, family, shards, atoms, peer, args, work, device) -> dict:
    coeffs_s = args.relu_coeffs_saev or RELU_COEFFS[ds.kind]["saev"]
    coeffs_p = args.relu_coeffs_peer or RELU_COEFFS[ds.kind]["peer"]
    t0 = time.perf_counter()
    print(f"  saev {family}: training ...", flush=True)
    ours_t = train_saev(shards, ds, family, coeffs_s, args, work)
    print(
        f"  saev {family}: {ours_t[0].tokens:,} tokens, {ours_t[0].wall_s:.0f} s wall "
        f"({len(ours_t)} SAE{'s' if len(ours_t) > 1 else ''}), load average {ours_t[0].load:.1f}",
        flush=True,
    )
    theirs_t = train_peer(peer, shards, ours_t[0], family, coeffs_p, args, work)
    print(
        f"  {PEER} {family}: {theirs_t[0].tokens:,} tokens, {theirs_t[0].wall_s:.0f} s wall, "
        f"load average {theirs_t[0].load:.1f}",
        flush=True,
    )
    speeds = {"saev": [speed(ours_t)], PEER: [speed(theirs_t)]}
    for r in range(1, args.speed_repeats):
        # Timing only: the same seeds train the same SAEs again, so only tokens/s is kept.
        again = work / f"repeat-{r}"
        again.mkdir(exist_ok=True)
        speeds["saev"].append(speed(train_saev(shards, ds, family, coeffs_s, args, again)))
        speeds[PEER].append(
            speed(train_peer(peer, shards, ours_t[0], family, coeffs_p, args, again))
        )
        print(
            f"  speed run {r + 1}/{args.speed_repeats}: saev {speeds['saev'][-1]:,.0f}, "
            f"{PEER} {speeds[PEER][-1]:,.0f} tokens/s per SAE",
            flush=True,
        )
    speed_ratio = float(np.median(speeds["saev"]) / np.median(speeds[PEER]))
    x = eval_tokens(shards, ours_t[0].ckpt, args.n_eval)
    ours = [(t, score(t.encode, t.decode, t.d_sae, x, atoms, device)) for t in ours_t]
    theirs = [(t, score(t.encode, t.decode, t.d_sae, x, atoms, device)) for t in theirs_t]
    # The same FVU from saev's own evaluation (saev evaluate): an independent check of score().
    ref = evaluate_ckpts(
        [(t.ckpt.name, t.ckpt) for t in ours_t],
        data=EvalData(batch_size=8192, n_tokens=args.n_eval),
        device=device,
    )
    fvu_check = max(abs(r["fvu"] - s.fvu) for r, (_, s) in zip(ref, ours, strict=True))
    d_sae = ours_t[0].d_sae
    what = f"k={ds.k}" if family == "topk" else "L1 sweep"
    print(f"\n  {family} ({what}, d_sae={d_sae}), scored on {x.shape[0]:,} held-out tokens")
    print(HEADER)
    for t, s in ours + theirs:
        print(row_text(t, s))
    print(f"  |FVU - saev evaluate's FVU| = {fvu_check:.1e}")
    if args.speed_repeats > 1:
        for lib, runs in speeds.items():
            listed = " / ".join(f"{v:,.0f}" for v in runs)
            print(
                f"  {lib} tokens/s per SAE, {len(runs)} runs: {listed} (median {np.median(runs):,.0f})"
            )
    matched = None
    if family == "topk":
        checks = compare_topk(ds, ours, theirs, speed_ratio)
    else:
        checks, matched = compare_relu(ours, theirs, speed_ratio)
    print(f"  ({family} on {ds.name}: {time.perf_counter() - t0:.0f} s in all)\n", flush=True)
    return {
        "d_sae": d_sae,
        "k": ds.k if family == "topk" else None,
        "n_eval_tokens": int(x.shape[0]),
        "fvu_check": fvu_check,
        "runs": [
            {
                "library": t.label,
                "coeff": t.coeff,
                "tokens": t.tokens,
                "tokens_per_s": t.tokens_per_s,
                "n_saes": t.n_saes,
                "wall_s": t.wall_s,
                "load": t.load,
                **dataclasses.asdict(s),
            }
            for t, s in ours + theirs
        ],
        "speed_runs": speeds,
        "matched_l0": matched,
        "checks": checks,
    }


RELU_COEFFS = {
    "planted": {"saev": [0.0003, 0.003, 0.03, 0.1, 0.3, 1.0], "peer": [0.03, 0.1, 0.3, 1.0, 3.0]},
    "vit": {"saev": [0.001, 0.01, 0.03, 0.1, 0.3, 1.0], "peer": [0.1, 0.3, 1.0, 3.0, 10.0]},
}
"""Default L1 sweeps; each includes the library's default (saev 0.1, dictionary_learning 0.1).
saev's λ is scale-free (docs/families.md, "Loss normalisation"), so one range nearly serves
both; its smallest λ gives a code denser than the peer's L0 184 (planted-hard, 1M tokens) and
389 (vit), so that those points stay in the comparison (the peer's densest points, L0 251 and
1,076, stay outside saev's range, as before relu's lr went to 4x). On planted-hard at the
default 2M tokens saev's densest code is L0 ~168 (λ 0.0003; 152 at 0.003), just past the
peer's L0 165: without λ 0.0003 that point fell outside the comparison unnoticed. Points
outside saev's range are listed as "not compared"; the checks cover the matched ones only.
The peer's L1 acts on raw activations (it does not normalise them by default), so its useful
range moves with their norm: about 4.5 on the planted sets, 13 on the random ViT's block 10."""


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """The data-set, width and scoring flags (shared with benchmarks/recipe.py)."""
    parser.add_argument("--cache", type=pathlib.Path, default=None,
                        help="shard cache (default: PEERS/cache)")  # fmt: skip
    parser.add_argument("--n-tokens", type=int, default=0,
                        help="training tokens for every data set (default: 2M planted, 400k vit)")  # fmt: skip
    parser.add_argument("--k", type=int, default=0, help="topk k (default: n_active; vit 32)")
    parser.add_argument("--exp-factor", type=int, default=8, help="d_sae = exp_factor x d")
    parser.add_argument("--d", type=int, default=64, help="`planted`: dimension")
    parser.add_argument("--n-atoms", type=int, default=512, help="`planted`: atoms")
    parser.add_argument("--n-active", type=int, default=6, help="`planted`: atoms per token")
    parser.add_argument("--freq", choices=["zipf", "uniform"], default="zipf", help="`planted`")
    parser.add_argument("--zipf-exponent", type=float, default=1.0, help="`planted`")
    parser.add_argument("--offset", type=float, default=2.0, help="`planted`: offset norm")
    parser.add_argument("--noise", type=float, default=0.05, help="`planted`: noise std per dim")
    parser.add_argument(
        "--vit-ckpt", default="vit_small_patch16_224", help="`vit`: timm model, random weights"
    )
    parser.add_argument("--vit-layer", type=int, default=-2, help="`vit`: block recorded")
    parser.add_argument("--vit-imgs", type=int, default=2400,
                        help="demo images to record (90%% train: 423k patch tokens)")  # fmt: skip
    parser.add_argument("--n-eval", type=int, default=1_000_000,
                        help="held-out tokens scored (first ones of the eval split; 0 = all)")  # fmt: skip


def dataset_shards(
    ds: Dataset, args, cache: pathlib.Path
) -> tuple[pathlib.Path, np.ndarray | None, str]:
    """(shard directory, true atoms or None, a one-line description) of data set `ds`,
    written or recorded on first use and cached under `cache`."""
    if ds.kind == "planted":
        p = ds.planted
        defaults = DataConfig()
        shards = planted_shards(p, cache, defaults.eval_frac, defaults.split_seed)
        desc = (
            f"d={p.d}, {p.n_atoms} atoms, {p.n_active} active, {p.freq} frequencies, "
            f"offset {p.offset:g}, noise {p.noise:g}"
        )
        return shards, planted_truth(p)[0], desc
    shards = vit_shards(args, cache)
    md = Shards(shards).md
    return shards, None, f"random-weight {md.vit_ckpt}, block {md.layers[0]}, d={md.d_vit}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", nargs="+", default=["planted-hard", "planted-easy", "vit"],
                        choices=["planted-hard", "planted-easy", "planted", "vit"])  # fmt: skip
    parser.add_argument("--families", nargs="+", default=["topk", "relu"], choices=["topk", "relu"])
    parser.add_argument("--peers", type=pathlib.Path,
                        default=pathlib.Path(os.environ.get("SAEV_PEERS", REPO / ".peers")),
                        help="directory holding dictionary_learning 0.1.0 (pip --target)")  # fmt: skip
    add_data_args(parser)
    parser.add_argument("--relu-coeffs-saev", type=float, nargs="+", default=None)
    parser.add_argument("--relu-coeffs-peer", type=float, nargs="+", default=None)
    parser.add_argument("--saev-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="saev train setting (sweep-TOML key and value), e.g. lr=1e-3, sae.k_aux=256")  # fmt: skip
    parser.add_argument("--peer-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="dictionary_learning trainer or trainSAE argument, e.g. lr=5e-4, "
                        "decay_start=0.8 (fraction of steps), normalize_activations=True, batch_size=4096")  # fmt: skip
    parser.add_argument("--speed-repeats", type=int, default=1,
                        help="train each side this many times, alternating, and compare median "
                        "tokens/s (only the first run is scored)")  # fmt: skip
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=pathlib.Path, default=None,
                        help="keep run directories here (default: a temporary directory)")  # fmt: skip
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write all numbers here")
    args = parser.parse_args()
    if args.speed_repeats < 1:
        parser.error("--speed-repeats must be at least 1")

    peer = import_peer(args.peers.resolve())
    for family in args.families:
        peer_args(peer, family, args.peer_arg)
    cache = (args.cache or args.peers / "cache").resolve()
    device = resolve_device(args.device)
    all_ds = datasets(args)
    # `saev train` keeps freed memory for reuse (saev.helpers.keep_freed_memory), process-wide:
    # set here, before either library trains, so both run under the same allocator settings.
    kept = keep_freed_memory()
    print(
        f"saev {saev.__version__} ({pathlib.Path(saev.__file__).parent}) vs {PEER} {PEER_VERSION}; device={device}, "
        f"torch threads={torch.get_num_threads()}, cpus={os.cpu_count()}, "
        f"malloc keeps freed memory (both libraries): {'yes' if kept else 'no'}",
        flush=True,
    )
    report: dict = {"device": str(device), "args": vars(args) | {}, "datasets": {}}
    with contextlib.ExitStack() as stack:
        if args.work is None:
            base = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="peers-")))
        else:
            base = args.work.resolve()
        for name in args.datasets:
            ds = all_ds[name]
            t0 = time.perf_counter()
            print(f"== {name} ==", flush=True)
            shards, atoms, desc = dataset_shards(ds, args, cache)
            prep = time.perf_counter() - t0
            print(
                f"  {desc}; {ds.n_tokens:,} training tokens; shards {shards} ({prep:.0f} s)",
                flush=True,
            )
            entry = {
                "description": desc,
                "shards": str(shards),
                "n_tokens": ds.n_tokens,
                "families": {},
            }
            for family in args.families:
                work = base / name / family
                work.mkdir(parents=True, exist_ok=True)
                entry["families"][family] = run_family(
                    ds, family, shards, atoms, peer, args, work, device
                )
            entry["seconds"] = time.perf_counter() - t0
            report["datasets"][name] = entry
            print(f"== {name}: {entry['seconds']:.0f} s ==\n", flush=True)

    print("summary (targets: FVU ratio <= 0.9, MMCS diff >= +0.05, speed >= 1.5x)")
    for name, entry in report["datasets"].items():
        for family, res in entry["families"].items():
            parts = [
                f"{c['name']} {fmt(c['value'], '.3f')} {({None: 'n/a', True: 'PASS', False: 'FAIL'})[c['pass']]}"
                for c in res["checks"]
            ]
            print(f"  {name:<13} {family:<5} " + "; ".join(parts))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
