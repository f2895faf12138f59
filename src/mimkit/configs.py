"""Typed configuration: one dataclass per section, YAML recipes fill them, ``key=value`` overrides them.

A recipe is a YAML file (or the name of one shipped in ``mimkit/recipes``). The ``method`` section is
the dataclass of the chosen method (``method.name``; ``method=lut`` is short for ``method.name=lut``).
Unknown keys are errors that name the nearest valid key; so are values of the wrong type.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

RECIPE_DIR = Path(__file__).parent / "recipes"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Arch:
    """A named encoder size."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int

    def timm_name(self, name: str) -> str:
        return f"{name}_patch{self.patch_size}_224"


ARCHS: dict[str, Arch] = {
    "vit_tiny": Arch(192, 12, 3, 16),
    "vit_small": Arch(384, 12, 6, 16),
    "vit_base": Arch(768, 12, 12, 16),
    "vit_large": Arch(1024, 24, 16, 16),
    "vit_huge": Arch(1280, 32, 16, 14),
}
# one vector per image: the cls token, the mean of the patch tokens, or that mean before the final norm
POOLS = ("cls", "mean", "mean_prenorm")


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names the key and what was expected."""


@dataclass(frozen=True)
class Check:
    """What a config field must hold, declared on the field (:func:`checked`) and checked once, by
    :func:`validate`, for every section and the method's: a range (``low`` / ``high``, closed unless
    ``*_open``) or one of ``choices``. ``null``: allowed, and what it means (the text after "or null");
    ``note``: why, in parentheses after the range."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    null: str | None = None
    note: str = ""

    def holds(self, value: Any) -> bool:
        if value is None:
            return self.null is not None
        if self.choices:
            return value in self.choices
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def must(self) -> str:
        if self.choices:
            what = f"be one of {', '.join(self.choices)}"
        elif self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            what = f"lie in {left}{_number(self.low)}, {_number(self.high)}{right}"
        elif self.low is not None:
            what = (
                f"be > {_number(self.low)}"
                if self.low_open
                else ("be at least 1" if self.low == 1 else f"be >= {_number(self.low)}")
            )
        else:
            what = f"be < {_number(self.high)}" if self.high_open else f"be <= {_number(self.high)}"
        extras = [f"or null{self.null}"] if self.null is not None else []
        return what + "".join(f" ({e})" for e in [*extras, *([self.note] if self.note else [])])


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def checked(default: Any, **check: Any) -> Any:
    """A dataclass field whose range or choices are declared (:class:`Check`) rather than hand-written."""
    return field(default=default, metadata={"check": Check(**check)})


def check_declared(obj: Any, prefix: str) -> None:
    """Every declared :class:`Check` of a config section (and of the sections inside it)."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_declared(value, f"{key}.")
        rule = f.metadata.get("check")
        if rule is not None and not rule.holds(value):
            shown = repr(value) if isinstance(value, str) else value
            raise ConfigError(f"'{key}' must {rule.must()}; got {shown}")


@dataclass
class ModelConfig:
    arch: str = "vit_base"  # vit_tiny | vit_small | vit_base | vit_large | vit_huge
    img_size: int = checked(224, low=1)
    patch_size: int | None = checked(None, low=1, null=" for the arch's")  # None: 16; 14 for vit_huge
    embed_dim: int | None = checked(None, low=1, null=" for the arch's")  # None: the arch's width
    depth: int | None = checked(None, low=1, null=" for the arch's")
    num_heads: int | None = checked(None, low=1, null=" for the arch's")
    mlp_ratio: float = checked(4.0, low=0, low_open=True)
    drop_path: float = checked(0.0, low=0, high=1, high_open=True)
    # what the encoder takes: pixels | token_ids (SeiT++: a learned embedding of each id, then a patch of
    # patch_size x patch_size cells per token) | token_embeddings (SeiT: codebook vectors, conv stem
    # k4 s2 p1). For tokens, img_size and patch_size count grid cells (SeiT++ on ImageNet: 28 and 2).
    stem: str = checked("pixels", choices=("pixels", "token_ids", "token_embeddings"))
    # token_ids: ids per cell; None: the training token dataset's
    vocab_size: int | None = checked(None, low=1, null=" for the data's")
    token_dim: int = checked(
        32, low=1
    )  # the width of a cell's embedding (token_ids) or of the codebook vectors
    token_dropout: float = checked(0.0, low=0, high=1, high_open=True)  # on the id embeddings (SeiT++: 0.1)


@dataclass
class DataConfig:
    train: str = (
        "demo:train"  # demo:train | demo:val | synthetic[:N] | folder | file.npz | glob, comma-separated
    )
    # loader processes; None: the cores this process may use, per local rank
    num_workers: int | None = checked(None, low=0, null="")
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = checked(
        0.875, low=0, high=1, low_open=True
    )  # evaluation: resize to img_size / crop_pct,
    # then center-crop img_size
    max_images: int | None = checked(None, low=1, null="")  # use only the first N images of the source
    # where training images become normalised floats: in the loader's workers, or on the device from uint8
    # batches (a quarter of the bytes between processes and to the GPU; the same numbers); auto: the device
    # on GPUs. Evaluations always normalise in the loader.
    normalize: str = checked("auto", choices=("auto", "loader", "device"))
    # decode training JPEGs at the smallest scale of 1/2, 1/4, 1/8 whose shorter side stays >= this many
    # px (libjpeg's DCT scaling, through PIL's draft; much faster on large photos); null: full size
    decode_size: int | None = checked(None, low=1, null="")
    # where training JPEGs are decoded: cpu (the loader's workers, PIL) or device (the workers only read
    # the files; the training device decodes each batch, nvJPEG on GPUs, and makes the views there, under
    # each sample's seed); pre-training only
    decode: str = checked("cpu", choices=("cpu", "device"))
    # token models: images among the data (data.train, eval.train, eval.val) are tokenized once, as they are
    # read, by this tokenizer (a tokenizer.pt, its run folder, or "demo": the one shipped with mimkit);
    # null: token data are given, and images are read by the tokenizer those data record
    tokenizer: str | None = None
    # hold out this fraction of data.train (per class, fixed) as eval.val: data.train becomes
    # "PATH#train=F" and eval.val "PATH#val=F", which every later command reads the same way
    val_fraction: float = checked(0.0, low=0, high=1, high_open=True)


@dataclass
class OptimConfig:
    epochs: int = checked(800, low=1)
    warmup_epochs: float = 40.0
    batch_size: int = checked(64, low=1)  # per device, per micro-batch
    accum_iter: int = checked(1, low=1)
    blr: float = checked(1.5e-4, low=0, low_open=True)  # base lr, scaled by the effective batch with lr_rule
    lr: float | None = checked(
        None, low=0, low_open=True, null=" to scale optim.blr"
    )  # absolute; overrides blr
    # linear: blr * B / 256 | sqrt: blr * (ref / 256) * sqrt(B / ref)
    lr_rule: str = checked("linear", choices=("linear", "sqrt"))
    lr_ref_batch: int = checked(4096, low=1)  # ref of the sqrt rule (4096 gives blr * sqrt(B) / 4)
    min_lr: float = checked(0.0, low=0)  # the cosine ends here
    min_lr_frac: float = checked(0.0, low=0, high=1)  # or at this fraction of the lr, whichever is larger
    warmup_from_min_lr: bool = False  # warm up from min_lr instead of 0
    weight_decay: float = checked(0.05, low=0)
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float | None = checked(None, low=0, low_open=True, null=" for no clipping")
    # adamw | lars (the linear probe's: momentum, trust 0.001, 1-D tensors not adapted)
    name: str = checked("adamw", choices=("adamw", "lars"))
    momentum: float = checked(0.9, low=0, high=1, high_open=True)  # lars only
    # AdamW's fused kernel (one launch for all tensors; numerically the same update up to rounding): null
    # fuses on GPUs only, true / false force it on or off (false is the plain loop, a speed baseline)
    fused: bool | None = None
    # The reference codes decay cls/mask tokens (3-D tensors); by default we exclude them with the other
    # position-like parameters. The paper recipes set this to true to match the reference exactly.
    decay_tokens: bool = False


@dataclass
class RunConfig:
    out: str | None = None  # run folder; default runs/<recipe>
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto (bf16 on GPUs that have it, else fp32) | bf16 | fp16 | fp32
    precision: str = checked("auto", choices=("auto", "bf16", "fp16", "fp32"))
    # torch.compile of the method's step, forward and loss (the backward follows through AOTAutograd);
    # compile_mode is torch.compile's mode: reduce-overhead adds CUDA graphs, which need static shapes (MAE
    # and LUT keep a fixed count of visible patches; Latent MIM and MTM do too)
    compile: bool = False
    compile_mode: str = checked(
        "default", choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    )
    # When the host reads the step's health flags (a non-finite loss, gradients or update; a stop signal
    # that reached another rank): "step" reads them before every update (one host sync per step, any
    # optimizer); "log" only at log steps and saves: the step never waits on the device, fused AdamW skips
    # updates on the device from the first non-finite step on, EMA teachers stand still, and the run stops
    # at the next read with the weights from before that step saved. auto: log where it can (fused AdamW,
    # no fp16 loss scaling), else step.
    host_sync: str = checked("auto", choices=("auto", "step", "log"))
    # Numerics-changing speed-ups, off by default. tf32: fp32 matmuls in TensorFloat-32 on GPUs that have
    # it (a 10-bit mantissa; for the rest of the process; torch runs cuDNN convolutions so already).
    # float8: the linear layers that train (encoder, decoder, heads; not an EMA teacher nor a frozen
    # encoder) in float8 through torchao (GPUs of compute capability 8.9 or more; needs torchao).
    tf32: bool = False
    float8: bool = False
    # also rewrite last.pt this often within an epoch (0: at every logged step; .inf: at epoch ends only)
    checkpoint_minutes: float = checked(20.0, low=0, note="0: at every logged step")
    resume: str = "auto"  # auto (continue out/last.pt if present) | none | path to a checkpoint
    log_every: int = checked(20, low=1)  # optimizer steps between logged scalars
    progress: bool = True
    # leave early (after saving) at this optimizer step; schedule unchanged
    stop_at_step: int | None = checked(None, low=1, null="")


@dataclass
class EvalConfig:
    knn: bool = True  # k-NN accuracy at the end of pre-training, when eval.val is set
    # also every N epochs: pre-training's k-NN; a linear probe's or fine-tuning's held-out accuracy (and
    # at the last epoch), with the best epoch beside the final weights' figure
    every_epochs: int = checked(0, low=0, note="0: only at the end")
    baseline: bool = False  # also measure the encoder at initialisation, for comparison
    train: str | None = None  # labelled memory bank; None: data.train
    val: str | None = None  # labelled queries
    k: int = checked(20, low=1)
    temperature: float = checked(0.07, low=0, low_open=True)
    # cls | mean (of the patch tokens) | mean_prenorm (that mean before the final norm)
    pool: str = checked("cls", choices=POOLS)
    batch_size: int = checked(256, low=1)
    # also Latent MIM's leave-one-out 1-NN on eval.val (mean of the patch tokens before the final norm)
    lmim_nn: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: Any = None  # the method's own dataclass, chosen by method.name
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    recipe: str = ""  # where the recipe came from (informational)


STEMS = ("pixels", "token_ids", "token_embeddings")
# float keys for which +inf has a meaning (checkpoint_minutes: never within an epoch)
MAY_BE_INFINITE = ("run.checkpoint_minutes",)


def recipe_path(recipe: str | Path) -> Path:
    """A path to a YAML file, or the name of a shipped recipe (with or without .yaml)."""
    path = Path(recipe)
    if path.is_file():
        return path
    shipped = RECIPE_DIR / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
    near = difflib.get_close_matches(path.stem, names, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    raise ConfigError(f"recipe '{recipe}' is neither a file nor a shipped recipe ({', '.join(names)}){hint}")


# what the ``method`` section may be: name -> config dataclass; filled by mimkit.methods (a leaf cannot
# import the methods; importing any part of mimkit imports them)
METHOD_CONFIGS: dict[str, type] = {}


def register_method_config(name: str, config: type) -> None:
    """Make ``method.name=<name>`` build ``config`` (a dataclass with a ``name`` field)."""
    METHOD_CONFIGS[name] = config


def _valid_keys(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> dataclass field type, for every leaf and section."""
    keys: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        name = f"{prefix}{f.name}"
        value = getattr(obj, f.name)
        keys[name] = f.type
        if dataclasses.is_dataclass(value):
            keys.update(_valid_keys(value, prefix=f"{name}."))
    return keys


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


def _check_keys(tree: dict, schema: Config, origin: str) -> None:
    valid = _valid_keys(schema)
    leaves = [k for k in valid if not dataclasses.is_dataclass(_get(schema, k))]
    for key in _flatten(tree):
        if key in valid:
            if dataclasses.is_dataclass(_get(schema, key)):
                example = next(k for k in leaves if k.startswith(f"{key}."))
                raise ConfigError(f"{origin}: '{key}' is a section; set its keys, e.g. {example}=...")
            continue
        # a section given a scalar, or a leaf given a dict
        parent = key.rsplit(".", 1)[0] if "." in key else None
        if parent in valid and not dataclasses.is_dataclass(_get(schema, parent)):
            raise ConfigError(f"{origin}: '{parent}' is a value, not a section (got '{key}')")
        near = difflib.get_close_matches(key, leaves, n=1, cutoff=0.5)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise ConfigError(f"{origin}: unknown config key '{key}'{hint}")


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _normalise_method(tree: dict) -> dict:
    method = tree.get("method")
    if isinstance(method, str):
        tree = {**tree, "method": {"name": method}}
    return tree


def build_config(
    recipe: str | Path | dict | None = None, overrides: list[str] | dict | None = None
) -> Config:
    """Resolve a recipe (path, shipped name or dict) plus overrides into a typed :class:`Config`."""
    origin = "config"
    if recipe is None:
        base: dict = {}
    elif isinstance(recipe, dict):
        base = recipe
    else:
        path = recipe_path(recipe)
        origin = str(path)
        try:
            loaded = OmegaConf.to_container(OmegaConf.load(path))
        except Exception as err:  # yaml errors carry line numbers; keep them
            raise ConfigError(f"{path}: not a valid YAML recipe: {err}") from err
        base = loaded or {}
        if not isinstance(base, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(base).__name__}")
        base.setdefault("recipe", path.stem)
    if isinstance(overrides, dict):
        extra = overrides
    else:
        bad = [o for o in overrides or [] if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad[0]!r}")
        # "method=lut" names the method; as a dotted key it would clash with method.* overrides
        overrides = [
            f"method.name={o.split('=', 1)[1]}" if o.startswith("method=") else o for o in overrides or []
        ]
        try:
            extra = OmegaConf.to_container(OmegaConf.from_dotlist(overrides))
        except OmegaConfBaseException as err:
            raise ConfigError(f"overrides: {err}") from err
    base, extra = _normalise_method(base), _normalise_method(extra)

    methods = METHOD_CONFIGS
    name = extra.get("method", {}).get("name") or base.get("method", {}).get("name") or "mae"
    if name not in methods:
        near = difflib.get_close_matches(str(name), methods, n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise ConfigError(f"unknown method '{name}' (known: {', '.join(methods)}){hint}")
    schema = Config(method=methods[name]())

    base_method = base.get("method", {})
    if base_method.get("name", name) != name:
        # switching method on the command line: the recipe's settings for the other method that the
        # new one does not have are dropped, and said so
        known = {f.name for f in dataclasses.fields(schema.method)}
        dropped = sorted(k for k in base_method if k not in known)
        base = {**base, "method": {k: v for k, v in base_method.items() if k in known and k != "name"}}
        if dropped:
            print(
                f"note: method '{name}' does not use the recipe's method.{', method.'.join(dropped)}",
                file=sys.stderr,
            )
    _check_keys(base, schema, origin)
    _check_keys(extra, schema, "overrides")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), base, extra)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        given = {**_flatten(base), **_flatten(extra)}
        key = getattr(err, "full_key", None) or _offending_key(given, schema)
        where = "overrides" if key in _flatten(extra) else origin
        reason = str(getattr(err, "msg", None) or err).splitlines()[0]
        raise ConfigError(f"{where}: bad value for '{key}' ({given.get(key)!r}): {reason}") from err
    _shorten_warmup(cfg, base, extra)
    validate(cfg)
    _hold_out(cfg, extra)
    return cfg


def split_spec(spec: str) -> tuple[str, str | None, float]:
    """``PATH#train=F`` / ``PATH#val=F``: the source at PATH without / with its held-out fraction F."""
    base, _, suffix = spec.rpartition("#")
    part, _, value = suffix.partition("=")
    if not base or part not in ("train", "val") or not value:  # a plain path, '#' in a name included
        return spec, None, 0.0
    try:
        fraction = float(value)
    except ValueError:
        fraction = -1.0
    if not 0 < fraction < 1:
        raise ValueError(
            f"'{spec}': a held-out split is written PATH#train=F or PATH#val=F with 0 < F < 1 (the part "
            "kept for training, or the held-out fraction F)"
        )
    return base, part, fraction


def _hold_out(cfg: Config, overrides: dict) -> None:
    """data.val_fraction: data.train loses its held-out part, which becomes eval.val (once: a saved config
    already says so)."""
    fraction = cfg.data.val_fraction
    if not fraction or split_spec(cfg.data.train)[1] is not None:
        return
    if cfg.eval.val and "val" in overrides.get("eval", {}):
        raise ConfigError(
            f"data.val_fraction={fraction} holds out part of data.train as eval.val, but eval.val is given "
            f"('{cfg.eval.val}'): give one of them"
        )
    if cfg.eval.val:
        print(
            f"note: eval.val is the held-out {fraction:g} of data.train (data.val_fraction), not the "
            f"recipe's '{cfg.eval.val}'",
            file=sys.stderr,
        )
    train = cfg.data.train
    cfg.data.train, cfg.eval.val = f"{train}#train={fraction:g}", f"{train}#val={fraction:g}"
    if cfg.eval.train == train:  # a memory bank of the same images must not hold the held-out ones
        cfg.eval.train = cfg.data.train


def _shorten_warmup(cfg: Config, recipe: dict, overrides: dict) -> None:
    """A run made shorter than its warmup (``optim.epochs=2`` on a recipe with 4 warmup epochs) keeps the
    recipe's share of warmup, with a note, rather than failing; a warmup given on the command line is the
    user's and is checked as given."""
    optim = cfg.optim
    if "warmup_epochs" in overrides.get("optim", {}) or not optim.warmup_epochs > optim.epochs >= 1:
        return
    defaults = OptimConfig()
    recipe_optim = recipe.get("optim", {})
    recipe_epochs = recipe_optim.get("epochs", defaults.epochs)
    recipe_warmup = recipe_optim.get("warmup_epochs", defaults.warmup_epochs)
    share = recipe_warmup / recipe_epochs if 0 < recipe_warmup < recipe_epochs else 0.1
    shortened = round(optim.epochs * share, 6)
    print(
        f"note: optim.warmup_epochs {optim.warmup_epochs:g} is longer than the run's {optim.epochs} epochs; "
        f"warming up for {shortened:g} epochs, the recipe's share (set optim.warmup_epochs to choose)",
        file=sys.stderr,
    )
    optim.warmup_epochs = shortened


def _offending_key(given: dict[str, Any], schema: Config) -> str:
    """The first given key that does not merge on its own (OmegaConf does not always say which)."""
    for key, value in given.items():
        tree: dict[str, Any] = {}
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
        try:
            OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), tree))
        except Exception:
            return key
    return "?"


def num_patches(model: ModelConfig) -> int:
    """Patches per image of the encoder that ``model`` describes (the arch's patch size when unset)."""
    patch = model.patch_size if model.patch_size is not None else ARCHS[model.arch].patch_size
    return (model.img_size // patch) ** 2


def _check_finite(obj: Any, prefix: str = "") -> None:
    """NaN passes every range check (its comparisons are all false), so every float is checked first."""
    for f in dataclasses.fields(obj):
        key, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{key}.")
            continue
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, float) and not math.isfinite(v) and not (v > 0 and key in MAY_BE_INFINITE):
                what = "finite numbers" if isinstance(value, tuple) else "a finite number"
                raise ConfigError(f"'{key}' must be {what}; got {value}")


def _validate_arch(model: ModelConfig) -> None:
    """An arch's name, with the nearest one (before the sizes, which read the arch's defaults)."""
    if model.arch not in ARCHS:
        near = difflib.get_close_matches(model.arch, ARCHS, n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise ConfigError(f"'model.arch' must be one of {', '.join(ARCHS)}; got {model.arch!r}{hint}")


def _validate_sizes(model: ModelConfig) -> None:
    arch = ARCHS[model.arch]
    patch = model.patch_size if model.patch_size is not None else arch.patch_size
    dim = model.embed_dim if model.embed_dim is not None else arch.embed_dim
    heads = model.num_heads if model.num_heads is not None else arch.num_heads
    if model.img_size % patch:
        raise ConfigError(
            f"'model.img_size' ({model.img_size}) must be divisible by 'model.patch_size' ({patch})"
        )
    if dim % heads:
        raise ConfigError(f"'model.embed_dim' ({dim}) must be divisible by 'model.num_heads' ({heads})")
    if dim % 4:
        raise ConfigError(f"'model.embed_dim' must be divisible by 4 (the sin-cos position table); got {dim}")


def validate(cfg: Config) -> None:
    """Every value that training would refuse, or would use in a way that makes no sense, is an error
    here, so that ``--print-config`` and a run that has not read its data yet fail the same way."""
    _check_finite(cfg)
    _validate_arch(cfg.model)
    check_declared(cfg, "")
    _validate_sizes(cfg.model)  # what building the encoder would refuse: sizes that must divide
    if not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"'optim.betas' must both lie in [0, 1); got {list(cfg.optim.betas)}")
    if cfg.optim.warmup_epochs < 0 or cfg.optim.warmup_epochs > cfg.optim.epochs:
        raise ConfigError(
            f"'optim.warmup_epochs' must lie in [0, optim.epochs={cfg.optim.epochs}]; "
            f"got {cfg.optim.warmup_epochs}"
        )
    if cfg.data.decode == "device" and cfg.data.decode_size is not None:
        raise ConfigError(
            "'data.decode_size' reduces JPEG decoding in the loader's workers; with data.decode=device the "
            "device decodes at full size: leave one of them unset"
        )
    if not all(s > 0 for s in cfg.data.std):
        raise ConfigError(f"'data.std' must be > 0 in every channel; got {list(cfg.data.std)}")
    try:
        if hasattr(cfg.method, "validate"):
            cfg.method.validate()
        # checks that read other sections too (e.g. the number of patches of the model)
        if hasattr(cfg.method, "validate_with"):
            cfg.method.validate_with(cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


def diff(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two config dicts."""
    a, b = _flatten(old), _flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
