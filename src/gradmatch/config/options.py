"""The run options of a merge (:class:`MergeOptions`: how to compute and write it, as opposed to the merge config,
which says what to merge), and the two spellings generated from it: the flags of `gradmatch merge` and the
options of the command that merge.json and the model card record to rebuild a merge.

Each option is declared once, here: its name, type, choices, default and help. ``add_flags`` turns a field into
its flag (``block_rows`` → ``--block-rows``; a yes/no option whose default is yes → ``--no-<name>``, its help
"do not" and the option's description), and
``command_flags`` writes the non-default options back in the same spelling, so a recorded command cannot drift
from the parser.
"""

from __future__ import annotations

import shlex
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gradmatch.config.merge import OUT_DTYPES
from gradmatch.errors import UserError

#: Dtypes a merge computes in.
PRECISIONS = ("float32", "float64")
#: The two ways a merged block is computed: the method's fused kernel or its torch formula.
KERNEL_PATHS = ("fused", "reference")
#: The kernel option: one of the paths, or ``auto`` (see MergeOptions.kernel).
KERNELS = ("auto", *KERNEL_PATHS)


class MergeOptions(BaseModel):
    """How a merge runs and writes its output; none of them changes which models are merged."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Options that are not part of the command that rebuilds a merge (it writes into a new folder).
    NOT_REBUILT: ClassVar[tuple[str, ...]] = ("overwrite",)

    overwrite: bool = Field(False, description="replace an existing output folder (atomically)")
    device: str = Field("cpu", description="cpu, cuda, cuda:1, ...")
    precision: Literal[PRECISIONS] = Field("float32", description="compute dtype")  # type: ignore[valid-type]
    out_dtype: Literal[OUT_DTYPES] | None = Field(  # type: ignore[valid-type]
        None, description="dtype of the merged floating tensors (default: the config's out_dtype, else the parent's "
        "stored dtype; bfloat16 for a float8 parent)")
    max_shard_size: str | int = Field("5GB", description="safetensors shard size, e.g. 2GB, 500MB")
    block_rows: int | None = Field(None, description="rows per block for methods that stream a tensor (default: "
                                   "about 2^17 entries per input)")
    threads: int | None = Field(1, description="CPU threads for torch and the fused kernels (merging is memory-bound; "
                                "more can be slower on shared machines)")
    kernel: Literal[KERNELS] = Field(  # type: ignore[valid-type]
        "auto", description="fused: one compiled pass over the inputs as stored (gradient_matching, task_arithmetic; "
        "CPU, float32); reference: the torch formula; auto (default): fused for merges that read 2 GiB or more")
    check_hessians: bool = Field(True, description="check that each Hessian and Gram was computed on the model it is "
                                 "paired with (the weights its fisher.json / gram.json names), refusing it otherwise")
    allow_config_mismatch: bool = Field(False, description="merge children whose config differs from the parent's in "
                                        "a way that changes the function")
    card: bool = Field(True, description="write a model card (README.md: method, formula, inputs, how to reproduce)")

    @field_validator("block_rows", "threads")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value <= 0:
            raise ValueError(f"must be positive, got {value}")
        return value

    @field_validator("device")
    @classmethod
    def _named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a device (cpu, cuda, cuda:1, ...)")
        return value


def _choices(annotation: Any) -> tuple[str, ...] | None:
    """The choices of a ``Literal[...]`` annotation (or of ``Literal[...] | None``), else None."""
    for part in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(part) is Literal:
            return typing.get_args(part)
    return None


def _value_type(annotation: Any) -> type:
    """What the flag's text becomes: int for ``int`` and ``int | None``, else the text itself."""
    parts = [a for a in typing.get_args(annotation) if a is not type(None)] if typing.get_origin(annotation) in (
        Union, types.UnionType) else [annotation]
    return int if parts == [int] else str


def flag(name: str) -> str:
    """The flag of option ``name``: ``--block-rows``; ``--no-check-hessians`` for a yes/no option whose default is yes."""
    field = MergeOptions.model_fields[name]
    negated = field.annotation is bool and field.default is True
    return f"--{'no-' if negated else ''}{name.replace('_', '-')}"



def add_flags(parser) -> None:
    """Add every option of :class:`MergeOptions` to an argparse parser or group (dest: the option's name)."""
    for name, field in MergeOptions.model_fields.items():
        if field.annotation is bool:
            negated = field.default is True
            parser.add_argument(flag(name), dest=name, action="store_false" if negated else "store_true",
                                help=f"do not {field.description}" if negated else field.description)
            continue
        parser.add_argument(flag(name), dest=name, default=field.default, choices=_choices(field.annotation),
                            type=_value_type(field.annotation), help=field.description)


def one_line(exc: ValidationError, spell=lambda name: name) -> str:
    """The first problem of a MergeOptions ValidationError as one line naming the option as ``spell`` writes it."""
    first = exc.errors()[0]
    name = str(first["loc"][0]) if first.get("loc") else "options"
    where = spell(name) if name in MergeOptions.model_fields else name
    if first.get("type") == "literal_error":
        choices = _choices(MergeOptions.model_fields[name].annotation) or ()
        return f"{where} must be one of {', '.join(choices)}, not {first.get('input')!r}"
    return f"{where} {first.get('msg', 'is not valid').removeprefix('Value error, ')}"


def merge_options(options: MergeOptions | Mapping[str, Any] | None = None, **given: Any) -> MergeOptions:
    """MergeOptions from an object or a mapping of options, with keyword options replacing theirs.

    ``check_inputs`` is the older name of ``check_hessians``. An unknown name is a TypeError (as for any keyword
    argument); a bad value is a one-line :class:`~gradmatch.errors.UserError` naming the option."""
    if "check_inputs" in given:
        if "check_hessians" in given:
            raise TypeError("give check_hessians or its older name check_inputs, not both")
        given["check_hessians"] = given.pop("check_inputs")
    unknown = sorted(set(given) - set(MergeOptions.model_fields))
    if unknown:
        raise TypeError(f"unknown merge option {unknown[0]!r} (options: {', '.join(MergeOptions.model_fields)})")
    if isinstance(options, MergeOptions) and not given:
        return options
    base = options.model_dump() if isinstance(options, MergeOptions) else dict(options or {})
    try:
        return MergeOptions.model_validate({**base, **given})
    except ValidationError as exc:
        raise UserError(one_line(exc)) from None


def options_from_args(args) -> MergeOptions:
    """The MergeOptions of parsed `gradmatch merge` arguments (added by :func:`add_flags`); a bad value is a
    one-line UserError naming its flag."""
    try:
        return MergeOptions.model_validate({name: getattr(args, name) for name in MergeOptions.model_fields})
    except ValidationError as exc:
        raise UserError(one_line(exc, flag)) from None


def command_flags(options: MergeOptions) -> list[str]:
    """Every option that differs from its default, as the flags that give it (shell-quoted), in declaration order:
    what the recorded command needs besides the config to rebuild the merge."""
    flags = []
    for name, field in MergeOptions.model_fields.items():
        value = getattr(options, name)
        if name in MergeOptions.NOT_REBUILT or value == field.default:
            continue
        flags.append(flag(name) if field.annotation is bool else f"{flag(name)} {shlex.quote(str(value))}")
    return flags
