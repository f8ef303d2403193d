"""What decides a request's images, declared once: the options schema and ``SampleOptions``.

An :class:`Option` is a name, a type, a default and its bounds or choices. Three options
belong to every request (``sampler``, ``steps``, ``spacing``: :func:`common`); every other
one is declared by the sampler that takes it, on its class (``Sampler.options``). From
these declarations alone, :meth:`SampleOptions.make` checks what the Python API is given,
:meth:`SampleOptions.from_json` what a server request carries, :func:`click_options`
generates the CLI's flags and :meth:`SampleOptions.to_dict` writes what servers echo and
bulk manifests record. A new sampler option is one :class:`Option` on one sampler class.

``n`` and ``seed`` are request fields, not sampling options (they do not change how an
image is drawn, only which): :data:`N` and :data:`SEED` are declared here too so that every
entry point checks them the same way.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import MAX_SEED, OptionError
from .schedule import SPACINGS, Schedule


@dataclass(frozen=True)
class Option:
    """One option: ``type`` is int, float or str; ``choices`` or [``low``, ``high``] bound it.

    ``default`` None means "decided later" (``steps``: the model's T).
    """

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    low: float | None = None
    high: float | None = None

    def check(self, value: Any) -> Any:
        """``value`` as this option's type, or :class:`OptionError` naming the option."""
        if value is None and self.default is None:
            return None
        kind = {int: "an integer", float: "a number", str: "a string"}[self.type]
        if self.type is str:
            ok = isinstance(value, str)
        elif self.type is int:
            ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        else:
            ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)
                  and math.isfinite(value))
            kind = "a finite number"
        if not ok:
            raise OptionError(self.name, f"{self.name} must be {kind}, got {show_value(value)}",
                              kind="type")
        if self.choices is not None and value not in self.choices:
            raise OptionError(self.name, f"unknown {self.name} {show_value(value)}; expected "
                              f"one of {self.choices}")
        if ((self.low is not None and value < self.low)
                or (self.high is not None and value > self.high)):
            raise OptionError(self.name, f"{self.name} must be {self.bounds()}, got "
                              f"{show_value(value)}")
        # An int stays the object it is: a client's stand-in for a huge literal keeps naming
        # itself ("an integer of 5000 digits") in the limits checked later.
        return value if self.type is int and isinstance(value, int) else self.type(value)

    def bounds(self) -> str:
        if self.high is None:
            return f">= {self.low}"
        if self.type is int and self.low is not None:
            return f"an integer in [{self.low}, {self.high}]"
        return f"in [{self.low}, {self.high}]"


def show_value(value: Any) -> str:
    """A value for an error message, cut short (a client's value may be huge)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# Request fields: every entry point (API, CLI, server, bulk) checks them with these.
N = Option("n", int, 1, "images to draw", low=1)
# Seeds are non-negative 63-bit integers, so every file and client stores them as int64.
SEED = Option("seed", int, 0, "image k of a seed depends on (seed, k) only", low=0,
              high=MAX_SEED)
STEPS = Option("steps", int, None, "network calls, on a respaced chain (default: all T of "
               "the model)", low=1)
SPACING = Option("spacing", str, "linspace", "which timesteps --steps keeps",
                 choices=SPACINGS)


def _sampler_option() -> Option:
    from .samplers import REGISTRY

    # The registry as it is now: a sampler registered after import is a choice too.
    return Option("sampler", str, "ddpm", "the sampling algorithm", choices=tuple(REGISTRY))


def common() -> tuple[Option, ...]:
    """The options of every request, in the order they are echoed."""
    return (_sampler_option(), STEPS, SPACING)


def sampler_schemas() -> dict[str, tuple[Option, ...]]:
    """Each registered sampler's own options."""
    from .samplers import REGISTRY

    return {name: tuple(cls.options) for name, cls in REGISTRY.items()}


def sampler_options() -> dict[str, Option]:
    """Every sampler option by name (the first declaration; :func:`check_schema` makes the
    others agree): the default sampler's first, then the others' in registry order, so an
    echo lists ``variance`` before ``eta`` as it always has."""
    schemas = sampler_schemas()
    default = _sampler_option().default
    merged: dict[str, Option] = {}
    for name in [default, *schemas]:
        for option in schemas.get(name, ()):
            merged.setdefault(option.name, option)
    return merged


def takers(name: str) -> list[str]:
    return [s for s, options in sampler_schemas().items() if any(o.name == name for o in options)]


def check_schema(sampler: str, options: tuple[Option, ...],
                 others: Mapping[str, tuple[Option, ...]]) -> None:
    """At registration: an option name means one thing across samplers (its type and choices;
    defaults may differ), and none shadows a request field."""
    reserved = {"sampler", "steps", "spacing", "n", "seed", "prediction"}
    for option in options:
        if not isinstance(option, Option):
            raise TypeError(f"sampler {sampler!r}: options must be runtime.options.Option, got "
                            f"{type(option).__name__}")
        if option.name in reserved:
            raise ValueError(f"sampler {sampler!r}: option {option.name!r} is a request field")
        for other_name, theirs in others.items():
            for other in theirs:
                if other.name == option.name and (other.type, other.choices) != (
                        option.type, option.choices):
                    raise ValueError(f"sampler {sampler!r}: option {option.name!r} differs from "
                                     f"sampler {other_name!r}'s in type or choices")


@dataclass(frozen=True)
class SampleOptions:
    """A checked set of options: build it with :meth:`make` or :meth:`from_json`.

    ``params`` holds every option the sampler takes, defaults filled in, in its declared
    order; ``steps`` None means the model's full chain.
    """

    sampler: str = "ddpm"
    steps: int | None = None
    spacing: str = "linspace"
    params: tuple[tuple[str, Any], ...] = field(default=())

    @classmethod
    def make(cls, sampler: str | None = None, steps: int | None = None,
             spacing: str | None = None, *, defaults: Mapping[str, Any] | None = None,
             **params) -> SampleOptions:
        """Check every option; None means "not given". What is not given comes from
        ``defaults`` (a model's own, its record's ``defaults``), then from the schema. An
        option given for a sampler that does not take it must be None or the default of the
        sampler that does (so one set of flags serves every sampler); a model default the
        chosen sampler does not take is left out."""
        base = dict(defaults or {})
        sampler_opt, steps_opt, spacing_opt = common()
        sampler = sampler_opt.check(_given(sampler, base.get("sampler"), sampler_opt.default))
        steps = steps_opt.check(_given(steps, base.get("steps"), None))
        spacing = spacing_opt.check(_given(spacing, base.get("spacing"), spacing_opt.default))
        own = {o.name: o for o in sampler_schemas()[sampler]}
        known = sampler_options()
        for name, value in params.items():
            if name in own or value is None:
                continue
            if name not in known:
                raise OptionError(name, f"unknown option {name!r}; options are "
                                  f"{', '.join(o.name for o in (*common(), *known.values()))}",
                                  kind="type")
            if known[name].check(value) != known[name].default:
                raise OptionError(name, f"{name} does not apply to the {sampler} sampler (only "
                                  f"to {', '.join(takers(name))})")
        checked = tuple((name, option.check(_given(params.get(name), base.get(name),
                                                   option.default)))
                        for name, option in own.items())
        return cls(sampler, steps, spacing, checked)

    @classmethod
    def from_json(cls, body: Mapping[str, Any], *,
                  defaults: Mapping[str, Any] | None = None) -> SampleOptions:
        """The options in a decoded JSON request (other fields ignored); a missing or null
        field takes the model's default, then the schema's."""
        names = [o.name for o in common()] + list(sampler_options())
        return cls.make(**{k: body[k] for k in names if body.get(k) is not None},
                        defaults=defaults)

    @property
    def kwargs(self) -> dict[str, Any]:
        """The sampler's own options, for :func:`runtime.samplers.make_sampler`."""
        return dict(self.params)

    def to_dict(self) -> dict[str, Any]:
        """sampler, steps, spacing, then every sampler option (this sampler's value, or the
        default where it does not take one): what a server echoes and a manifest records."""
        out: dict[str, Any] = {"sampler": self.sampler, "steps": self.steps,
                               "spacing": self.spacing}
        for name, option in sampler_options().items():
            out[name] = option.default
        out.update(self.params)
        return out

    def with_steps(self, steps: int) -> SampleOptions:
        return SampleOptions(self.sampler, steps, self.spacing, self.params)

    def respace(self, schedule: Schedule) -> Schedule:
        """The schedule this request walks: ``steps`` of ``schedule``'s chosen by ``spacing``;
        :class:`OptionError` when the model's chain cannot give them."""
        T = schedule.num_timesteps
        steps = T if self.steps is None else self.steps
        if steps > T:
            raise OptionError("steps", f"steps must be at most the model's {T}, got {steps}")
        try:
            return schedule.respaced(steps, self.spacing)
        except ValueError as err:  # a spacing that cannot keep that many distinct steps
            raise OptionError("spacing", str(err)) from None


def _given(value, model_default, schema_default):
    if value is not None:
        return value
    return model_default if model_default is not None else schema_default


def click_options(fn):
    """Decorate a click command with one flag per option (common, then each sampler option).

    Every flag defaults to None ("not given"), so :meth:`SampleOptions.make` can tell a flag
    given for another sampler from one left alone, and fill in the model's defaults.
    """
    sampler_opt, steps_opt, spacing_opt = common()
    flags = [flag(sampler_opt, None, f"{sampler_opt.help} (default: the model's, else ddpm)"),
             flag(steps_opt, None, steps_opt.help),
             flag(spacing_opt, None, f"{spacing_opt.help} (default: the model's, else "
                                     "linspace)")]
    for name, option in sampler_options().items():
        flags.append(flag(option, None, f"{option.help} ({', '.join(takers(name))} only; "
                                        f"default {option.default})"))
    for decorate in reversed(flags):
        fn = decorate(fn)
    return fn


def flag(option: Option, default, help_text: str):
    """The click option for ``option`` (--name-with-dashes), bounded by its schema."""
    import click

    from .util.clierrors import finite_float

    kwargs: dict[str, Any] = {"default": default, "help": help_text}
    if option.choices is not None:
        kwargs["type"] = click.Choice(option.choices)
    elif option.type is int:
        kwargs["type"] = click.IntRange(option.low, option.high)
    elif option.type is float:
        kwargs["type"] = click.FloatRange(option.low, option.high)
        kwargs["callback"] = finite_float
    return click.option(f"--{option.name.replace('_', '-')}", option.name, **kwargs)


def option_names() -> list[str]:
    """The keyword names :func:`click_options` adds to a command."""
    return [o.name for o in common()] + list(sampler_options())
